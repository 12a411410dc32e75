//! Health check node ports, as kube-proxy's ServiceHealthServer
//! (pkg/proxy/healthcheck/service_health.go) decides them.
//!
//! A cloud load balancer in front of a LoadBalancer Service with
//! externalTrafficPolicy Local probes spec.healthCheckNodePort on every node
//! and sends traffic only to nodes that answer 200, i.e. nodes with a ready
//! endpoint of the Service. This module says which ports to serve and what
//! count to report; the servers themselves are in
//! [`crate::serve::health_check_ports`].

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::translate::skip_reason;
use super::{ModelError, NodeContext, ServiceId};

/// One health check server this node must run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub service: ServiceId,
    pub port: u16,
    /// Ready endpoints of the Service on this node, counted by address.
    pub local_endpoints: usize,
}

/// The health check `svc` needs on this node: None unless it is a proxied
/// LoadBalancer Service with externalTrafficPolicy Local and a
/// healthCheckNodePort; an error (naming the Service) when that port is out
/// of range. `slices` must all belong to the Service, in any order.
pub fn health_check(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeContext,
) -> Result<Option<HealthCheck>, ModelError> {
    let meta = &svc.metadata;
    // Unnamed Services are reported by translate; nothing to serve for them.
    let Some(name) = meta.name.clone().filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    let namespace = (meta.namespace.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let service = ServiceId { namespace, name };
    let Some(spec) = svc.spec.as_ref() else {
        return Ok(None);
    };
    // kube-proxy's NeedsHealthCheck, for the Services it proxies at all.
    let needs = skip_reason(svc).is_none()
        && spec.type_.as_deref() == Some("LoadBalancer")
        && spec.external_traffic_policy.as_deref() == Some("Local");
    if !needs {
        return Ok(None);
    }
    // 0 is Go's "unset": kube-proxy serves nothing for it.
    let port = match spec.health_check_node_port {
        None | Some(0) => return Ok(None),
        Some(p) => u16::try_from(p).map_err(|_| ModelError::Invalid {
            kind: "Service",
            object: service.to_string(),
            reason: format!("healthCheckNodePort {p} must be 1-65535; no health check server"),
        })?,
    };
    Ok(Some(HealthCheck {
        service,
        port,
        local_endpoints: local_ready_endpoints(slices, node),
    }))
}

/// kube-proxy's LocalReadyEndpoints: distinct addresses of ready endpoints
/// on this node. Terminating endpoints do not count even while they serve,
/// so a load balancer stops sending new traffic to a node being drained.
fn local_ready_endpoints(slices: &[&EndpointSlice], node: &NodeContext) -> usize {
    if node.name.is_empty() {
        return 0;
    }
    let mut addrs = BTreeSet::new();
    for slice in slices {
        // FQDN slices have no addresses to proxy; kube-proxy ignores them.
        let ip_slice = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
        // Endpoints reach kube-proxy's endpoint map through the slice's
        // ports: a slice without a usable port contributes nothing.
        let ports = slice.ports.as_deref().unwrap_or_default();
        let has_port = ports
            .iter()
            .any(|p| p.port.is_some_and(|n| (1..=65535).contains(&n)));
        if !ip_slice || !has_port {
            continue;
        }
        for e in &slice.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let local = e.node_name.as_deref() == Some(node.name.as_str());
            // The first address only, as in translation.
            let addr = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok());
            if let (true, true, Some(addr)) = (ready, local, addr) {
                addrs.insert(addr);
            }
        }
    }
    addrs.len()
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    /// demo/web, type LoadBalancer with externalTrafficPolicy Local and
    /// healthCheckNodePort 32000, with `spec` fields merged over that.
    fn lb(spec: Value) -> Value {
        let mut base = json!({
            "clusterIP": "198.18.0.10",
            "type": "LoadBalancer",
            "externalTrafficPolicy": "Local",
            "healthCheckNodePort": 32000,
            "ports": [{"port": 80, "nodePort": 30080}],
        });
        for (k, v) in spec.as_object().unwrap() {
            base[k] = v.clone();
        }
        json!({"metadata": {"name": "web", "namespace": "demo"}, "spec": base})
    }

    fn slice(address_type: &str, ports: Value, endpoints: Value) -> Value {
        json!({
            "metadata": {"name": "web-x", "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": address_type,
            "ports": ports,
            "endpoints": endpoints,
        })
    }

    fn http() -> Value {
        json!([{"name": "", "port": 8080, "protocol": "TCP"}])
    }

    fn ep(addr: &str, node: &str, conditions: Value) -> Value {
        json!({"addresses": [addr], "nodeName": node, "conditions": conditions})
    }

    fn n1() -> NodeContext {
        NodeContext {
            name: "n1".into(),
            ..NodeContext::default()
        }
    }

    fn run(
        svc: Value,
        slices: &[Value],
        node: &NodeContext,
    ) -> Result<Option<HealthCheck>, String> {
        let svc: Service = serde_json::from_value(svc).unwrap();
        let slices: Vec<EndpointSlice> = (slices.iter().cloned())
            .map(|s| serde_json::from_value(s).unwrap())
            .collect();
        let refs: Vec<&EndpointSlice> = slices.iter().collect();
        health_check(&svc, &refs, node).map_err(|e| e.to_string())
    }

    /// (port, local endpoints) or the error.
    fn summary(r: Result<Option<HealthCheck>, String>) -> Result<Option<(u16, usize)>, String> {
        r.map(|hc| hc.map(|hc| (hc.port, hc.local_endpoints)))
    }

    /// (port, local endpoints), or the start of the error.
    type Want = Result<Option<(u16, usize)>, &'static str>;

    #[test]
    fn which_services_get_a_health_check() {
        let ready = || json!([ep("198.19.0.1", "n1", json!({"ready": true}))]);
        let cases: Vec<(&str, Value, Want)> = vec![
            ("LoadBalancer, Local, port set", lb(json!({})), Ok(Some((32000, 1)))),
            (
                "externalTrafficPolicy Cluster",
                lb(json!({"externalTrafficPolicy": "Cluster"})),
                Ok(None),
            ),
            (
                "externalTrafficPolicy unset (Cluster)",
                lb(json!({"externalTrafficPolicy": null})),
                Ok(None),
            ),
            ("type NodePort", lb(json!({"type": "NodePort"})), Ok(None)),
            ("port unset", lb(json!({"healthCheckNodePort": null})), Ok(None)),
            ("port 0 (Go's unset)", lb(json!({"healthCheckNodePort": 0})), Ok(None)),
            (
                "headless",
                lb(json!({"clusterIP": "None"})),
                Ok(None),
            ),
            (
                "port 65536",
                lb(json!({"healthCheckNodePort": 65536})),
                Err("Service demo/web: healthCheckNodePort 65536 must be 1-65535; no health check server"),
            ),
            (
                "negative port",
                lb(json!({"healthCheckNodePort": -1})),
                Err("Service demo/web: healthCheckNodePort -1 must be 1-65535"),
            ),
        ];
        for (name, svc, want) in cases {
            let got = summary(run(svc, &[slice("IPv4", http(), ready())], &n1()));
            match (got, want) {
                (Err(got), Err(want)) => assert!(got.starts_with(want), "{name}: {got}"),
                (got, want) => assert_eq!(got, want.map_err(String::from), "{name}"),
            }
        }

        // Another proxy's Service: not ours to health-check either.
        let mut svc = lb(json!({}));
        svc["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "other"});
        assert_eq!(summary(run(svc, &[], &n1())), Ok(None));
    }

    #[test]
    fn counts_ready_endpoints_on_this_node_by_address() {
        let ready = json!({"ready": true});
        let cases: Vec<(&str, Vec<Value>, usize)> = vec![
            ("no slices", vec![], 0),
            (
                "ready and unset conditions count",
                vec![slice(
                    "IPv4",
                    http(),
                    json!([
                        ep("198.19.0.1", "n1", ready.clone()),
                        ep("198.19.0.2", "n1", json!({}))
                    ]),
                )],
                2,
            ),
            (
                "terminating (still serving) and not-ready do not",
                vec![slice(
                    "IPv4",
                    http(),
                    json!([
                        ep(
                            "198.19.0.1",
                            "n1",
                            json!({"ready": false, "serving": true, "terminating": true})
                        ),
                        ep("198.19.0.2", "n1", json!({"ready": false})),
                    ]),
                )],
                0,
            ),
            (
                "endpoints on other nodes or on no node do not",
                vec![slice(
                    "IPv4",
                    http(),
                    json!([
                        ep("198.19.0.1", "n2", ready.clone()),
                        {"addresses": ["198.19.0.2"], "conditions": ready.clone()},
                    ]),
                )],
                0,
            ),
            (
                "one address in two slices (two ports) counts once",
                vec![
                    slice(
                        "IPv4",
                        http(),
                        json!([ep("198.19.0.1", "n1", ready.clone())]),
                    ),
                    slice(
                        "IPv4",
                        json!([{"name": "https", "port": 8443}]),
                        json!([ep("198.19.0.1", "n1", ready.clone())]),
                    ),
                ],
                1,
            ),
            (
                "IPv6 slices count",
                vec![slice(
                    "IPv6",
                    http(),
                    json!([ep("fd00::1:2", "n1", ready.clone())]),
                )],
                1,
            ),
            (
                "slices without ports or of type FQDN do not",
                vec![
                    slice(
                        "IPv4",
                        json!([]),
                        json!([ep("198.19.0.1", "n1", ready.clone())]),
                    ),
                    slice(
                        "FQDN",
                        http(),
                        json!([ep("web.example", "n1", ready.clone())]),
                    ),
                ],
                0,
            ),
        ];
        for (name, slices, want) in cases {
            let got = summary(run(lb(json!({})), &slices, &n1()));
            assert_eq!(got, Ok(Some((32000, want))), "{name}");
        }
        // Without a node name nothing is local.
        let slices = [slice("IPv4", http(), json!([ep("198.19.0.1", "", ready)]))];
        let got = summary(run(lb(json!({})), &slices, &NodeContext::default()));
        assert_eq!(got, Ok(Some((32000, 0))));
    }
}
