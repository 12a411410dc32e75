//! Malformed input, fuzzed: batches of Service / EndpointSlice / Node JSON
//! shaped like the real objects, then mutated (wrong types, missing and
//! extra fields, huge and negative ports, bad addresses, unknown protocols,
//! duplicate names, empty and unicode strings, long lists), go through both
//! source paths (manifests: `parse_manifest`; API: serde into k8s-openapi
//! types, as kube-rs does) into the object store, and every Service is
//! translated. Whatever the batch: nothing panics, every warning names its
//! object (or file), and a valid Service in the same batch translates
//! exactly as it does alone.
//!
//! Runs `FUZZ_CASES` batches; `PROPTEST_CASES=N` runs more.
//! Addresses: 198.18.0.0/15 and fd00::/8.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::Config;
use serde_json::{json, Value};
use svclb_userspace::model::{
    ModelError, NodeContext, Object, ObjectStore, ServiceId, Translation,
};
use svclb_userspace::source::manifests::{parse_manifest, ManifestError};

/// Enough to run in a few seconds in a debug build.
const FUZZ_CASES: u32 = 128;
const ORIGIN: &str = "fuzz.yaml";
const NODE: &str = "n1";
/// Only the valid Service and its slice live here: nothing generated can
/// legitimately change its translation.
const VALID_NAMESPACE: &str = "valid";

fn valid_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": VALID_NAMESPACE},
        "spec": {
            "type": "NodePort",
            "clusterIP": "198.18.100.1", "clusterIPs": ["198.18.100.1"],
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}],
        },
    })
}

fn valid_slice() -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-1", "namespace": VALID_NAMESPACE,
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["198.18.101.1"], "nodeName": NODE, "conditions": {"ready": true}},
            {"addresses": ["198.18.101.2"], "nodeName": "n2", "conditions": {"ready": true}},
        ],
    })
}

fn valid_id() -> ServiceId {
    ServiceId {
        namespace: VALID_NAMESPACE.into(),
        name: "web".into(),
    }
}

// ---- generators: objects of the right shape, then mutated ----

fn name() -> impl Strategy<Value = Value> {
    // Few names, so that duplicates happen.
    prop_oneof![
        4 => prop_oneof![Just("web"), Just("db"), Just(NODE), Just("")].prop_map(Value::from),
        1 => "\\PC{0,8}".prop_map(Value::from),
    ]
}

fn namespace() -> impl Strategy<Value = Value> {
    prop_oneof![Just("demo"), Just("default"), Just(""), Just("ünï")].prop_map(Value::from)
}

fn ip() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (0u8..3, 0u8..3).prop_map(|(a, b)| format!("198.18.{a}.{b}")),
        3 => (0u8..4).prop_map(|a| format!("fd00::{a:x}")),
        1 => Just("198.18.0.999".to_string()),
        1 => Just("::ffff:198.18.0.1".to_string()),
        1 => Just("fd00::/8".to_string()),
        1 => Just("None".to_string()),
        1 => Just(String::new()),
        1 => "\\PC{0,12}",
    ]
    .prop_map(Value::from)
}

fn port() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => (1i64..4).prop_map(Value::from),
        1 => Just(json!(0)),
        1 => Just(json!(-1)),
        1 => Just(json!(65536)),
        1 => Just(json!(u64::MAX)),
        1 => Just(json!("http")),
        1 => any::<i64>().prop_map(Value::from),
    ]
}

fn protocol() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just("TCP"),
        Just("UDP"),
        Just("SCTP"),
        Just("tcp"),
        Just("ICMP"),
        Just("")
    ]
    .prop_map(Value::from)
}

fn service_port() -> impl Strategy<Value = Value> {
    (prop_oneof![Just("http"), Just(""), Just("dns")], port(), port(), port(), protocol()).prop_map(
        |(name, port, target, node_port, protocol)| {
            json!({"name": name, "port": port, "targetPort": target, "nodePort": node_port, "protocol": protocol})
        },
    )
}

fn service() -> impl Strategy<Value = Value> {
    let type_ = prop_oneof![
        Just("ClusterIP"),
        Just("NodePort"),
        Just("LoadBalancer"),
        Just("ExternalName"),
        Just("Bogus")
    ];
    let policy = prop_oneof![Just("Cluster"), Just("Local"), Just("Neither")];
    (
        (name(), namespace(), type_, ip(), vec(ip(), 0..3)),
        (
            vec(service_port(), 0..4),
            vec(ip(), 0..3),
            policy.clone(),
            policy,
        ),
        (
            vec(ip(), 0..2),
            prop_oneof![Just("None"), Just("ClientIP"), Just("x")],
        ),
    )
        .prop_map(
            |((name, ns, type_, ip, ips), (ports, external, etp, itp), (ingress, affinity))| {
                let ingress: Vec<Value> = ingress.into_iter().map(|ip| json!({"ip": ip})).collect();
                json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {
                        "type": type_, "clusterIP": ip, "clusterIPs": ips, "ports": ports,
                        "externalIPs": external, "externalTrafficPolicy": etp,
                        "internalTrafficPolicy": itp, "sessionAffinity": affinity,
                        "healthCheckNodePort": 30500,
                        "loadBalancerSourceRanges": ["198.18.0.0/16", "fd00::/64", "bad"],
                    },
                    "status": {"loadBalancer": {"ingress": ingress}},
                })
            },
        )
}

fn endpoint() -> impl Strategy<Value = Value> {
    let conditions = (any::<bool>(), any::<bool>(), any::<bool>());
    (
        vec(ip(), 0..3),
        conditions,
        prop_oneof![Just(NODE), Just("n2"), Just("")],
    )
        .prop_map(|(addresses, (ready, serving, terminating), node)| {
            json!({
                "addresses": addresses, "nodeName": node,
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
                "hints": {"forZones": [{"name": "zone-a"}]},
            })
        })
}

fn slice() -> impl Strategy<Value = Value> {
    let address_type = prop_oneof![Just("IPv4"), Just("IPv6"), Just("FQDN"), Just("IPv5")];
    let ports = vec(
        (
            prop_oneof![Just("http"), Just(""), Just("dns")],
            port(),
            protocol(),
        ),
        0..3,
    );
    // Mostly short endpoint lists; sometimes a long one.
    let endpoints = prop_oneof![
        8 => vec(endpoint(), 0..5),
        1 => (endpoint(), 200usize..2000).prop_map(|(e, n)| vec![e; n]),
    ];
    (
        name(),
        namespace(),
        name(),
        address_type,
        ports,
        endpoints,
    )
        .prop_map(|(name, ns, service, address_type, ports, endpoints)| {
            let ports: Vec<Value> = (ports.into_iter())
                .map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol}))
                .collect();
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": name, "namespace": ns,
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": address_type, "ports": ports, "endpoints": endpoints,
            })
        })
}

fn node() -> impl Strategy<Value = Value> {
    (name(), vec(ip(), 0..3), any::<bool>()).prop_map(|(name, addresses, tainted)| {
        let addresses: Vec<Value> = (addresses.into_iter())
            .map(|a| json!({"type": "InternalIP", "address": a}))
            .collect();
        let taints = if tainted {
            json!([{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}])
        } else {
            json!([])
        };
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": "zone-a"}},
            "spec": {"taints": taints},
            "status": {"addresses": addresses},
        })
    })
}

/// A value of any JSON type, often the wrong one for where it lands.
fn junk() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(65536)),
        Just(json!(1.5e300)),
        "\\PC{0,16}".prop_map(Value::from),
        ip(),
        protocol(),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec(("[a-zA-Z]{1,6}", inner), 0..4)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    /// Replace the value at the chosen place.
    Replace(Value),
    /// Remove the chosen field or list item.
    Remove,
    /// Add a field (to the chosen object, or else the root).
    Add(String, Value),
}

fn mutation() -> impl Strategy<Value = (usize, Mutation)> {
    let m = prop_oneof![
        3 => junk().prop_map(Mutation::Replace),
        2 => Just(Mutation::Remove),
        1 => ("[a-zA-Z]{1,8}", junk()).prop_map(|(k, v)| Mutation::Add(k, v)),
    ];
    (any::<usize>(), m)
}

/// JSON pointers of every value below the root.
fn paths(v: &Value, here: String, out: &mut Vec<String>) {
    let children: Vec<(String, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, c)| (escape(k), c)).collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, c)| (i.to_string(), c))
            .collect(),
        _ => return,
    };
    // Long lists: their first items stand for the rest.
    for (key, child) in children.into_iter().take(8) {
        let path = format!("{here}/{key}");
        out.push(path.clone());
        paths(child, path, out);
    }
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn mutate(v: &mut Value, (pick, m): (usize, Mutation)) {
    let mut all = Vec::new();
    paths(v, String::new(), &mut all);
    let Some(path) = all.get(pick % all.len().max(1)).cloned() else {
        return;
    };
    match m {
        Mutation::Replace(new) => {
            if let Some(slot) = v.pointer_mut(&path) {
                *slot = new;
            }
        }
        Mutation::Remove => {
            let (parent, last) = path.rsplit_once('/').expect("a pointer below the root");
            match v.pointer_mut(parent) {
                Some(Value::Object(m)) => {
                    m.remove(&last.replace("~1", "/").replace("~0", "~"));
                }
                Some(Value::Array(a)) => {
                    a.remove(last.parse::<usize>().expect("an index"));
                }
                _ => {}
            }
        }
        Mutation::Add(key, new) => match v.pointer_mut(&path) {
            Some(Value::Object(m)) => {
                m.insert(key, new);
            }
            _ => {
                if let Value::Object(m) = v {
                    m.insert(key, new);
                }
            }
        },
    }
    // Keep generated objects out of the valid Service's namespace.
    if let Some(ns) = v.pointer_mut("/metadata/namespace") {
        if ns == VALID_NAMESPACE {
            *ns = json!("demo");
        }
    }
}

fn mutated(object: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    (object, vec(mutation(), 0..4)).prop_map(|(mut v, mutations)| {
        for m in mutations {
            mutate(&mut v, m);
        }
        v
    })
}

/// Generated objects with the valid Service and its slice somewhere among them.
fn batch() -> impl Strategy<Value = Vec<Value>> {
    let object = prop_oneof![
        3 => mutated(service()),
        3 => mutated(slice()),
        1 => mutated(node()),
    ];
    vec(object, 0..8).prop_flat_map(|mut objects| {
        objects.push(valid_service());
        objects.push(valid_slice());
        Just(objects).prop_shuffle()
    })
}

// ---- the two source paths, the store, translation ----

/// What the manifests source makes of the batch (one file).
fn through_manifests(batch: &[Value]) -> (Vec<Object>, Vec<ManifestError>) {
    let docs: Vec<String> = batch.iter().map(Value::to_string).collect();
    parse_manifest(&docs.join("\n---\n"), ORIGIN)
}

/// What the API source makes of the batch: kube-rs deserializes each object
/// into its k8s-openapi type; one that does not deserialize is a watch error
/// (logged and retried) and never reaches the store.
fn through_api(batch: &[Value]) -> Vec<Object> {
    let typed = |v: &Value| -> Option<Object> {
        match v.get("kind")?.as_str()? {
            "Service" => serde_json::from_value::<Service>(v.clone())
                .ok()
                .map(|o| Object::Service(Box::new(o))),
            "EndpointSlice" => serde_json::from_value::<EndpointSlice>(v.clone())
                .ok()
                .map(|o| Object::EndpointSlice(Box::new(o))),
            "Node" => serde_json::from_value::<Node>(v.clone())
                .ok()
                .map(|o| Object::Node(Box::new(o))),
            _ => None,
        }
    };
    batch.iter().filter_map(typed).collect()
}

/// This node as the store knows it.
fn node_context(store: &ObjectStore) -> NodeContext {
    NodeContext::from_node(NODE, store.node(NODE))
}

/// Every Service's translation and every warning, the agent's way.
fn translate_all(store: &ObjectStore) -> (Vec<(ServiceId, Translation)>, Vec<ModelError>) {
    let node = node_context(store);
    let mut warnings = Vec::new();
    let mut out = Vec::new();
    for id in store.service_ids() {
        let t = store.translate(id, &node).expect("a stored Service");
        warnings.extend(t.warnings.iter().cloned());
        out.push((id.clone(), t));
    }
    let (_, hc_warnings) = store.health_checks(&node);
    warnings.extend(hc_warnings);
    (out, warnings)
}

/// The names a warning may give: kind and namespace/name (Nodes: name) of
/// an input object, or namespace/<unnamed> when it has no name.
fn object_names(objects: &[Object]) -> BTreeSet<(&'static str, String)> {
    let mut names = BTreeSet::new();
    for obj in objects {
        let meta = obj.metadata();
        let namespace = (meta.namespace.as_deref())
            .filter(|n| !n.is_empty())
            .unwrap_or("default");
        let name = meta.name.as_deref().filter(|n| !n.is_empty());
        let name = name.unwrap_or("<unnamed>");
        let object = match obj {
            Object::Node(_) => name.to_string(),
            _ => format!("{namespace}/{name}"),
        };
        names.insert((obj.kind(), object));
    }
    names
}

fn check_names(warnings: &[ModelError], objects: &[Object]) -> Result<(), TestCaseError> {
    let names = object_names(objects);
    for w in warnings {
        prop_assert!(
            names.contains(&w.object()),
            "warning does not name an input object: {w}"
        );
    }
    Ok(())
}

/// The valid Service's translation in a store that holds only it and its slice.
fn valid_alone(node: &NodeContext) -> Translation {
    let (objects, errors) = through_manifests(&[valid_service(), valid_slice()]);
    assert!(errors.is_empty(), "{errors:?}");
    let mut store = ObjectStore::new();
    store.replace_all(objects);
    store
        .translate(&valid_id(), node)
        .expect("the valid Service")
}

fn check_store(store: &ObjectStore, objects: &[Object]) -> Result<(), TestCaseError> {
    let (translations, warnings) = translate_all(store);
    check_names(&warnings, objects)?;
    let valid = translations.iter().find(|(id, _)| *id == valid_id());
    let expected = valid_alone(&node_context(store));
    prop_assert!(!expected.frontends.is_empty() && expected.warnings.is_empty());
    prop_assert_eq!(valid.map(|(_, t)| t), Some(&expected));
    Ok(())
}

proptest! {
    #![proptest_config(Config {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(FUZZ_CASES),
        ..Config::default()
    })]

    #[test]
    fn malformed_input_through_manifests(batch in batch()) {
        let (objects, errors) = through_manifests(&batch);
        for e in &errors {
            prop_assert!(e.to_string().starts_with(&format!("{ORIGIN}: ")), "{e}");
        }
        // A snapshot (manifests mode), as one and object by object.
        let mut store = ObjectStore::new();
        let (_, store_errors) = store.replace_all(objects.clone());
        check_names(&store_errors, &objects)?;
        check_store(&store, &objects)?;
        let mut one_by_one = ObjectStore::new();
        for obj in objects.iter().cloned() {
            let (_, store_errors) = one_by_one.upsert(obj);
            check_names(&store_errors, &objects)?;
        }
        check_store(&one_by_one, &objects)?;
    }

    #[test]
    fn malformed_input_through_the_api(batch in batch()) {
        let objects = through_api(&batch);
        let mut store = ObjectStore::new();
        for obj in objects.iter().cloned() {
            let (_, store_errors) = store.upsert(obj);
            check_names(&store_errors, &objects)?;
        }
        check_store(&store, &objects)?;
        // Deleting every generated object leaves the valid Service as it was.
        for obj in objects.iter().filter(|o| o.metadata().namespace.as_deref() != Some(VALID_NAMESPACE)) {
            store.delete(obj);
        }
        check_store(&store, &objects)?;
    }
}
