//! The objects the agent has seen, indexed so that every change can be mapped
//! to the Services whose translation it affects. Pure: no I/O.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::translate::frontend_keys;
use super::{
    health_check, translate, FrontendKey, HealthCheck, ModelError, NodeContext, Object, ObjectKind,
    ServiceId, Translation,
};

/// The label the EndpointSlice controller puts on every slice it manages,
/// naming its Service (in the slice's namespace).
pub const LABEL_SERVICE_NAME: &str = "kubernetes.io/service-name";

/// namespace/name of an EndpointSlice.
type SliceKey = (String, String);

struct StoredSlice {
    service: ServiceId,
    slice: EndpointSlice,
}

/// Services, EndpointSlices (indexed by their Service) and Nodes.
///
/// Every mutation returns the Services whose translation inputs changed; the
/// caller re-translates exactly those. These may name Services that do not
/// exist (a slice can arrive before its Service, or outlive it): for them
/// [`ObjectStore::translate`] returns None.
///
/// When Services claim one frontend, it belongs to the oldest
/// (creationTimestamp; none sorts last), then the first by namespace/name:
/// the same owner on every node, whatever order the objects arrived in. The
/// others go without it. A change of owner affects every claimant, so the
/// next owner takes the frontend over as soon as the last one lets go.
#[derive(Default)]
pub struct ObjectStore {
    services: BTreeMap<ServiceId, Service>,
    slices: BTreeMap<SliceKey, StoredSlice>,
    slices_by_service: BTreeMap<ServiceId, BTreeSet<SliceKey>>,
    nodes: BTreeMap<String, Node>,
    /// The node the frontend claims are computed for (NodePort frontends
    /// are on its addresses); see [`ObjectStore::set_node`].
    node: NodeContext,
    /// The frontends each Service claims...
    claims: BTreeMap<ServiceId, BTreeSet<FrontendKey>>,
    /// ...and the Services claiming each frontend.
    claimants: BTreeMap<FrontendKey, BTreeSet<ServiceId>>,
}

impl ObjectStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces one object. Objects that cannot be keyed (no name) or
    /// indexed (slice without service label) are not kept, and are reported;
    /// a slice that loses its label is removed.
    pub fn upsert(&mut self, obj: Object) -> (BTreeSet<ServiceId>, Vec<ModelError>) {
        let mut affected = BTreeSet::new();
        let mut errors = Vec::new();
        let Some((namespace, name)) = key(&obj) else {
            errors.push(unkeyed(&obj));
            return (affected, errors);
        };
        match obj {
            Object::Service(mut svc) => {
                normalize(&mut svc.metadata);
                let id = ServiceId { namespace, name };
                if self.services.get(&id) != Some(&*svc) {
                    affected.extend(self.set_service(&id, Some(*svc)));
                }
            }
            Object::EndpointSlice(mut slice) => {
                normalize(&mut slice.metadata);
                let key = (namespace, name);
                let Some(service) = slice_service(&key.0, &slice) else {
                    errors.push(ModelError::Invalid {
                        kind: "EndpointSlice",
                        object: format!("{}/{}", key.0, key.1),
                        reason: format!("no {LABEL_SERVICE_NAME} label; ignored"),
                    });
                    affected.extend(self.remove_slice(&key));
                    return (affected, errors);
                };
                if let Some(old) = self.slices.get(&key) {
                    if old.service == service && old.slice == *slice {
                        return (affected, errors);
                    }
                }
                // A slice whose label changed leaves its old Service.
                affected.extend(self.remove_slice(&key));
                let index = self.slices_by_service.entry(service.clone());
                index.or_default().insert(key.clone());
                let slice = *slice;
                let stored = StoredSlice {
                    service: service.clone(),
                    slice,
                };
                self.slices.insert(key, stored);
                affected.insert(service);
            }
            Object::Node(mut node) => {
                normalize(&mut node.metadata);
                // Translations read this node's zone and addresses through
                // NodeContext; the agent resyncs every Service when those
                // change, so no Service is affected here.
                self.nodes.insert(name, *node);
            }
        }
        (affected, errors)
    }

    /// Removes the object with obj's kind, namespace and name, if stored.
    pub fn delete(&mut self, obj: &Object) -> BTreeSet<ServiceId> {
        let mut affected = BTreeSet::new();
        let Some((namespace, name)) = key(obj) else {
            return affected;
        };
        match obj {
            Object::Service(_) => {
                let id = ServiceId { namespace, name };
                if self.services.contains_key(&id) {
                    affected.extend(self.set_service(&id, None));
                }
            }
            Object::EndpointSlice(_) => affected.extend(self.remove_slice(&(namespace, name))),
            Object::Node(_) => {
                self.nodes.remove(&name);
            }
        }
        affected
    }

    /// Makes the store hold exactly `objs` (a full listing, e.g. after a
    /// watch restart or a manifests reload): upserts all of them and deletes
    /// whatever is not among them.
    pub fn replace_all(&mut self, objs: Vec<Object>) -> (BTreeSet<ServiceId>, Vec<ModelError>) {
        let mut services = BTreeSet::new();
        let mut slices = BTreeSet::new();
        let mut nodes = BTreeSet::new();
        let mut affected = BTreeSet::new();
        let mut errors = Vec::new();
        for obj in objs {
            if let Some((namespace, name)) = key(&obj) {
                match obj {
                    Object::Service(_) => services.insert(ServiceId { namespace, name }),
                    Object::EndpointSlice(_) => slices.insert((namespace, name)),
                    Object::Node(_) => nodes.insert(name),
                };
            }
            let (a, e) = self.upsert(obj);
            affected.extend(a);
            errors.extend(e);
        }
        let gone: Vec<ServiceId> = (self.services.keys())
            .filter(|id| !services.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            affected.extend(self.set_service(&id, None));
        }
        let gone: Vec<SliceKey> = (self.slices.keys())
            .filter(|key| !slices.contains(*key))
            .cloned()
            .collect();
        for key in gone {
            affected.extend(self.remove_slice(&key));
        }
        self.nodes.retain(|name, _| nodes.contains(name));
        (affected, errors)
    }

    /// Makes the store hold exactly `objs` among the objects of `kind` (the
    /// result of one watch's relist), leaving the other kinds alone: upserts
    /// all of `objs` and deletes the stored objects of `kind` not among them.
    /// Like every mutation, re-delivering identical objects affects nothing.
    pub fn replace_kind(
        &mut self,
        kind: ObjectKind,
        objs: Vec<Object>,
    ) -> (BTreeSet<ServiceId>, Vec<ModelError>) {
        let listed: BTreeSet<(String, String)> = (objs.iter())
            .filter(|obj| obj.object_kind() == kind)
            .filter_map(key)
            .collect();
        let mut affected = BTreeSet::new();
        let mut errors = Vec::new();
        for obj in objs {
            let (a, e) = self.upsert(obj);
            affected.extend(a);
            errors.extend(e);
        }
        let stored: Vec<(String, String)> = match kind {
            ObjectKind::Service => (self.services.keys())
                .map(|id| (id.namespace.clone(), id.name.clone()))
                .collect(),
            ObjectKind::EndpointSlice => self.slices.keys().cloned().collect(),
            ObjectKind::Node => (self.nodes.keys())
                .map(|name| (String::new(), name.clone()))
                .collect(),
        };
        // Through delete(), so that what a deletion affects is decided in
        // one place.
        for (namespace, name) in stored.into_iter().filter(|k| !listed.contains(k)) {
            affected.extend(self.delete(&named(kind, namespace, name)));
        }
        (affected, errors)
    }

    /// The node whose frontends Services claim: `node` must be the one
    /// later given to [`ObjectStore::translate`] for NodePort conflicts to
    /// be resolved. Returns the Services whose owned frontends changed.
    pub fn set_node(&mut self, node: &NodeContext) -> BTreeSet<ServiceId> {
        if *node == self.node {
            return BTreeSet::new();
        }
        self.node = node.clone();
        let ids: Vec<ServiceId> = self.services.keys().cloned().collect();
        let mut affected = BTreeSet::new();
        for id in ids {
            let svc = self.services.get(&id).cloned();
            affected.extend(self.set_service(&id, svc));
        }
        affected
    }

    /// The Service's translation from the stored objects, without the
    /// frontends another Service owns (each left out with a warning); None
    /// when the Service is not stored.
    pub fn translate(&self, id: &ServiceId, node: &NodeContext) -> Option<Translation> {
        let svc = self.services.get(id)?;
        let mut t = translate(svc, &self.slices_of(id), node);
        t.frontends.retain(|f| match self.owner(&f.key) {
            Some(owner) if owner != id => {
                t.warnings.push(ModelError::FrontendConflict {
                    service: id.clone(),
                    frontend: f.key,
                    owner: owner.clone(),
                });
                false
            }
            _ => true,
        });
        t.warnings.sort();
        Some(t)
    }

    /// The Service that owns a frontend, when any claims it (see
    /// [`ObjectStore`]).
    fn owner(&self, key: &FrontendKey) -> Option<&ServiceId> {
        let claimants = self.claimants.get(key)?;
        claimants.iter().min_by_key(|id| {
            let created =
                (self.services.get(*id)).and_then(|svc| svc.metadata.creation_timestamp.as_ref());
            (created.is_none(), created, *id)
        })
    }

    /// Stores (Some) or removes (None) a Service and its frontend claims.
    /// Returns it and every Service claiming a frontend whose owner changed.
    fn set_service(&mut self, id: &ServiceId, svc: Option<Service>) -> BTreeSet<ServiceId> {
        let new = (svc.as_ref())
            .map(|svc| frontend_keys(svc, &self.node))
            .unwrap_or_default();
        let old = self.claims.remove(id).unwrap_or_default();
        // The creation timestamp may have changed too: look at every frontend.
        let touched: Vec<FrontendKey> = old.union(&new).copied().collect();
        let owners_before: Vec<Option<ServiceId>> =
            touched.iter().map(|k| self.owner(k).cloned()).collect();
        match svc {
            Some(svc) => self.services.insert(id.clone(), svc),
            None => self.services.remove(id),
        };
        for key in &old {
            if let Some(ids) = self.claimants.get_mut(key) {
                ids.remove(id);
                if ids.is_empty() {
                    self.claimants.remove(key);
                }
            }
        }
        for key in &new {
            self.claimants.entry(*key).or_default().insert(id.clone());
        }
        if !new.is_empty() {
            self.claims.insert(id.clone(), new);
        }
        let mut affected = BTreeSet::from([id.clone()]);
        for (key, before) in touched.iter().zip(owners_before) {
            if self.owner(key) != before.as_ref() {
                affected.extend(before);
                affected.extend(self.claimants.get(key).into_iter().flatten().cloned());
            }
        }
        affected
    }

    /// Every health check server this node must run, by port, plus a
    /// warning for each Service that wants one and cannot have it. Two
    /// Services claiming one port: the first by namespace/name keeps it, so
    /// the choice does not depend on the order objects arrived in.
    pub fn health_checks(&self, node: &NodeContext) -> (Vec<HealthCheck>, Vec<ModelError>) {
        let mut checks: BTreeMap<u16, HealthCheck> = BTreeMap::new();
        let mut warnings = Vec::new();
        // self.services iterates in namespace/name order.
        for (id, svc) in &self.services {
            match health_check(svc, &self.slices_of(id), node) {
                Ok(None) => {}
                Ok(Some(hc)) => match checks.get(&hc.port) {
                    Some(first) => warnings.push(ModelError::Invalid {
                        kind: "Service",
                        object: id.to_string(),
                        reason: format!(
                            "healthCheckNodePort {} is already used by {}; no health check server",
                            hc.port, first.service
                        ),
                    }),
                    None => {
                        checks.insert(hc.port, hc);
                    }
                },
                Err(e) => warnings.push(e),
            }
        }
        (checks.into_values().collect(), warnings)
    }

    fn slices_of(&self, id: &ServiceId) -> Vec<&EndpointSlice> {
        let keys = self.slices_by_service.get(id).into_iter().flatten();
        keys.filter_map(|key| self.slices.get(key))
            .map(|stored| &stored.slice)
            .collect()
    }

    /// Stored Services, in order.
    pub fn service_ids(&self) -> impl Iterator<Item = &ServiceId> {
        self.services.keys()
    }

    pub fn service(&self, id: &ServiceId) -> Option<&Service> {
        self.services.get(id)
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name)
    }

    /// Removes a slice and returns the Service it belonged to.
    fn remove_slice(&mut self, key: &SliceKey) -> Option<ServiceId> {
        let stored = self.slices.remove(key)?;
        if let Some(keys) = self.slices_by_service.get_mut(&stored.service) {
            keys.remove(key);
            if keys.is_empty() {
                self.slices_by_service.remove(&stored.service);
            }
        }
        Some(stored.service)
    }
}

/// (namespace, name); Nodes have namespace "". None without a name.
fn key(obj: &Object) -> Option<(String, String)> {
    let meta = obj.metadata();
    let name = meta.name.clone().filter(|n| !n.is_empty())?;
    let namespace = match obj {
        Object::Node(_) => String::new(),
        _ => namespace(meta).to_string(),
    };
    Some((namespace, name))
}

/// Objects without a namespace are in "default", as kubectl would put them.
fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
}

fn slice_service(namespace: &str, slice: &EndpointSlice) -> Option<ServiceId> {
    let labels = slice.metadata.labels.as_ref()?;
    let name = labels.get(LABEL_SERVICE_NAME).filter(|n| !n.is_empty())?;
    Some(ServiceId {
        namespace: namespace.to_string(),
        name: name.clone(),
    })
}

/// Drops the metadata that changes on every write without changing the
/// object, so that re-delivering an object (watch restart, relist) is a no-op.
fn normalize(meta: &mut ObjectMeta) {
    meta.resource_version = None;
    meta.managed_fields = None;
}

/// An object with only kind, namespace and name: enough for delete().
fn named(kind: ObjectKind, namespace: String, name: String) -> Object {
    let metadata = ObjectMeta {
        name: Some(name),
        namespace: Some(namespace).filter(|n| !n.is_empty()),
        ..ObjectMeta::default()
    };
    match kind {
        ObjectKind::Service => Object::Service(Box::new(Service {
            metadata,
            ..Service::default()
        })),
        ObjectKind::EndpointSlice => Object::EndpointSlice(Box::new(EndpointSlice {
            metadata,
            ..EndpointSlice::default()
        })),
        ObjectKind::Node => Object::Node(Box::new(Node {
            metadata,
            ..Node::default()
        })),
    }
}

fn unkeyed(obj: &Object) -> ModelError {
    let object = match obj {
        Object::Node(_) => "<unnamed>".to_string(),
        _ => format!("{}/<unnamed>", namespace(obj.metadata())),
    };
    ModelError::Invalid {
        kind: obj.kind(),
        object,
        reason: "metadata.name is missing; ignored".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(name: &str, ip: &str, resource_version: &str) -> Object {
        let v = json!({
            "metadata": {"name": name, "namespace": "demo", "resourceVersion": resource_version},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]},
        });
        Object::Service(Box::new(serde_json::from_value(v).unwrap()))
    }

    fn slice(name: &str, service: &str, addr: &str) -> Object {
        let v = json!({
            "metadata": {
                "name": name,
                "namespace": "demo",
                "labels": {LABEL_SERVICE_NAME: service},
            },
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [{"addresses": [addr]}],
        });
        Object::EndpointSlice(Box::new(serde_json::from_value(v).unwrap()))
    }

    fn node(name: &str) -> Object {
        let v = json!({"metadata": {"name": name}});
        Object::Node(Box::new(serde_json::from_value(v).unwrap()))
    }

    fn ids(names: &[&str]) -> BTreeSet<ServiceId> {
        let id = |name: &&str| ServiceId {
            namespace: "demo".to_string(),
            name: name.to_string(),
        };
        names.iter().map(id).collect()
    }

    fn replace(
        store: &mut ObjectStore,
        kind: ObjectKind,
        objs: Vec<Object>,
    ) -> BTreeSet<ServiceId> {
        let (affected, errors) = store.replace_kind(kind, objs);
        assert!(errors.is_empty(), "{errors:?}");
        affected
    }

    #[test]
    fn replace_kind_replaces_only_that_kind() {
        let mut store = ObjectStore::new();
        let (affected, _) = store.replace_all(vec![
            svc("a", "198.18.0.10", "1"),
            svc("b", "198.18.0.11", "1"),
            slice("sa", "a", "198.19.0.1"),
            slice("sb", "b", "198.19.0.2"),
            node("n1"),
        ]);
        assert_eq!(affected, ids(&["a", "b"]));

        // A relist: a unchanged but for its resourceVersion, b gone, c new.
        // Slices and nodes stay.
        let services = || vec![svc("a", "198.18.0.10", "7"), svc("c", "198.18.0.12", "7")];
        assert_eq!(
            replace(&mut store, ObjectKind::Service, services()),
            ids(&["b", "c"])
        );
        let stored: BTreeSet<ServiceId> = store.service_ids().cloned().collect();
        assert_eq!(stored, ids(&["a", "c"]));
        assert!(store.node("n1").is_some());
        let node_ctx = NodeContext::default();
        let a = store.translate(&ids(&["a"]).pop_first().unwrap(), &node_ctx);
        assert_eq!(a.unwrap().frontends[0].backends.len(), 1);

        // The same relist again changes nothing: no map writes follow.
        assert_eq!(
            replace(&mut store, ObjectKind::Service, services()),
            ids(&[])
        );

        // Slices: sb's removal affects b (which is gone, translate says None).
        let slices = || vec![slice("sa", "a", "198.19.0.1")];
        assert_eq!(
            replace(&mut store, ObjectKind::EndpointSlice, slices()),
            ids(&["b"])
        );
        assert_eq!(
            replace(&mut store, ObjectKind::EndpointSlice, slices()),
            ids(&[])
        );
        assert_eq!(store.service_ids().count(), 2);

        assert_eq!(
            replace(&mut store, ObjectKind::Node, vec![node("n1")]),
            ids(&[])
        );
        assert!(store.node("n1").is_some());
        assert_eq!(replace(&mut store, ObjectKind::Node, vec![]), ids(&[]));
        assert!(store.node("n1").is_none());
        assert_eq!(store.service_ids().count(), 2);
    }

    #[test]
    fn health_checks_one_server_per_port_first_service_wins() {
        let lb = |ns: &str, name: &str, port: i64| {
            let v = json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": {"clusterIP": "198.18.0.10", "type": "LoadBalancer",
                         "externalTrafficPolicy": "Local", "healthCheckNodePort": port,
                         "ports": [{"port": 80}]},
            });
            Object::Service(Box::new(serde_json::from_value(v).unwrap()))
        };
        let local = |name: &str, service: &str| {
            let v = json!({
                "metadata": {"name": name, "namespace": "b",
                             "labels": {LABEL_SERVICE_NAME: service}},
                "addressType": "IPv4",
                "ports": [{"port": 8080}],
                "endpoints": [{"addresses": ["198.19.0.1"], "nodeName": "n1"}],
            });
            Object::EndpointSlice(Box::new(serde_json::from_value(v).unwrap()))
        };
        let mut store = ObjectStore::new();
        // Arrival order is not sorted order.
        store.replace_all(vec![
            lb("b", "web", 32001),
            lb("b", "api", 32000),
            lb("a", "zzz", 32001),
            lb("c", "bad", 70000),
            local("web-1", "web"),
        ]);
        let node = NodeContext {
            name: "n1".into(),
            ..NodeContext::default()
        };
        let (checks, warnings) = store.health_checks(&node);
        let got: Vec<(u16, String, usize)> = (checks.iter())
            .map(|c| (c.port, c.service.to_string(), c.local_endpoints))
            .collect();
        assert_eq!(
            got,
            [(32000, "b/api".into(), 0), (32001, "a/zzz".into(), 0)]
        );
        let warnings: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            [
                "Service b/web: healthCheckNodePort 32001 is already used by a/zzz; no health check server",
                "Service c/bad: healthCheckNodePort 70000 must be 1-65535; no health check server",
            ]
        );

        // The winner goes: the other Service gets the port, with its count.
        store.delete(&lb("a", "zzz", 32001));
        let (checks, warnings) = store.health_checks(&node);
        assert_eq!(checks[1].service.to_string(), "b/web");
        assert_eq!((checks[1].port, checks[1].local_endpoints), (32001, 1));
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn replace_kind_keys_match_upsert() {
        // A Service without namespace is stored in "default"; relisting it
        // must find it there rather than delete and re-add it.
        let mut store = ObjectStore::new();
        let web = || {
            let v = json!({"metadata": {"name": "web"}, "spec": {"clusterIP": "198.18.0.10"}});
            vec![Object::Service(Box::new(
                serde_json::from_value(v).unwrap(),
            ))]
        };
        assert_eq!(replace(&mut store, ObjectKind::Service, web()).len(), 1);
        assert_eq!(replace(&mut store, ObjectKind::Service, web()), ids(&[]));
        assert_eq!(replace(&mut store, ObjectKind::Service, vec![]).len(), 1);
        assert_eq!(store.service_ids().count(), 0);
    }
}
