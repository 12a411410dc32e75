//! Tests of the model: translation rules (table-driven), the object store,
//! and properties of translate over generated (often garbage) input.
//!
//! Objects are written as JSON, the way they appear in the API, so a case
//! reads like the manifest it stands for. Addresses: 198.18.0.0/15, fd00::/8.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{json, Value};
use svclb_common::MAX_BACKENDS_PER_FRONTEND;

use super::*;

fn service(v: Value) -> Service {
    serde_json::from_value(v).expect("test Service")
}

fn slice(v: Value) -> EndpointSlice {
    serde_json::from_value(v).expect("test EndpointSlice")
}

/// A ClusterIP Service demo/web with the given spec fields.
fn web(spec: Value) -> Value {
    json!({"metadata": {"name": "web", "namespace": "demo"}, "spec": spec})
}

/// An IPv4 slice of demo/web.
fn web_slice(name: &str, ports: Value, endpoints: Value) -> Value {
    typed_slice(name, "IPv4", ports, endpoints)
}

fn typed_slice(name: &str, address_type: &str, ports: Value, endpoints: Value) -> Value {
    json!({
        "metadata": {
            "name": name,
            "namespace": "demo",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": address_type,
        "ports": ports,
        "endpoints": endpoints,
    })
}

/// Ready endpoints, one per address.
fn ready(addrs: &[&str]) -> Value {
    addrs
        .iter()
        .map(|a| json!({"addresses": [a], "conditions": {"ready": true}}))
        .collect()
}

fn run(svc: Value, slices: &[Value]) -> Translation {
    let svc = service(svc);
    let slices: Vec<EndpointSlice> = slices.iter().cloned().map(slice).collect();
    let refs: Vec<&EndpointSlice> = slices.iter().collect();
    translate(&svc, &refs, &NodeContext::default())
}

/// "frontend -> backend, backend (t)" lines, (t) marking terminating ones.
fn render(t: &Translation) -> Vec<String> {
    let backend = |b: &Backend| {
        let mark = if b.terminating { " (t)" } else { "" };
        format!("{}{mark}", SocketAddr::new(b.addr, b.port))
    };
    let frontend = |f: &Frontend| {
        let backends: Vec<String> = f.backends.iter().map(backend).collect();
        format!("{} -> {}", f.key, backends.join(", "))
    };
    // Socket-scope frontends; `render_external` shows the XDP ones.
    t.frontends
        .iter()
        .filter(|f| f.key.scope == Scope::Socket)
        .map(frontend)
        .collect()
}

fn warnings(t: &Translation) -> Vec<String> {
    t.warnings.iter().map(ToString::to_string).collect()
}

struct Case {
    name: &'static str,
    svc: Value,
    slices: Vec<Value>,
    frontends: &'static [&'static str],
    /// Each warning must contain the respective text; the count must match.
    warnings: &'static [&'static str],
}

fn check(cases: Vec<Case>) {
    for case in cases {
        let t = run(case.svc, &case.slices);
        assert_eq!(render(&t), case.frontends, "case {:?}", case.name);
        assert_eq!(t.skipped, None, "case {:?}", case.name);
        let got = warnings(&t);
        assert_eq!(
            got.len(),
            case.warnings.len(),
            "case {:?}: {got:#?}",
            case.name
        );
        for want in case.warnings {
            assert!(
                got.iter().any(|w| w.contains(want)),
                "case {:?}: no warning contains {want:?}: {got:#?}",
                case.name
            );
        }
    }
}

#[test]
fn frontends_and_backends() {
    let http = json!([{"name": "http", "port": 8080, "protocol": "TCP"}]);
    check(vec![
        Case {
            name: "single port",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]})),
            slices: vec![web_slice(
                "a",
                http.clone(),
                ready(&["198.19.0.2", "198.19.0.1"]),
            )],
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080, 198.19.0.2:8080"],
            warnings: &[],
        },
        Case {
            name: "no slices: empty backend list (connections refused)",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"port": 80}]})),
            slices: vec![],
            frontends: &["198.18.0.10:80/TCP -> "],
            warnings: &[],
        },
        Case {
            name: "no ports: nothing to proxy",
            svc: web(json!({"clusterIP": "198.18.0.10"})),
            slices: vec![],
            frontends: &[],
            warnings: &[],
        },
        Case {
            name: "dual stack: each family from its own slices",
            svc: web(json!({
                "clusterIP": "fd00::10",
                "clusterIPs": ["fd00::10", "198.18.0.10"],
                "ports": [{"name": "http", "port": 80}],
            })),
            slices: vec![
                typed_slice("v6", "IPv6", http.clone(), ready(&["fd00::1:1"])),
                web_slice("v4", http.clone(), ready(&["198.19.0.1"])),
            ],
            frontends: &[
                "198.18.0.10:80/TCP -> 198.19.0.1:8080",
                "[fd00::10]:80/TCP -> [fd00::1:1]:8080",
            ],
            warnings: &[],
        },
        Case {
            name: "clusterIP alone is used when clusterIPs is unset",
            svc: web(json!({"clusterIP": "fd00::10", "ports": [{"port": 80}]})),
            slices: vec![typed_slice(
                "v6",
                "IPv6",
                json!([{"port": 81}]),
                ready(&["fd00::1:1"]),
            )],
            frontends: &["[fd00::10]:80/TCP -> [fd00::1:1]:81"],
            warnings: &[],
        },
        Case {
            name: "multiple ports and protocols, matched by name and protocol",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [
                {"name": "http", "port": 80, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ]})),
            slices: vec![web_slice(
                "a",
                json!([
                    {"name": "dns", "port": 5353, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 5354, "protocol": "TCP"},
                    {"name": "http", "port": 8080},
                ]),
                ready(&["198.19.0.1"]),
            )],
            frontends: &[
                "198.18.0.10:53/TCP -> 198.19.0.1:5354",
                "198.18.0.10:53/UDP -> 198.19.0.1:5353",
                "198.18.0.10:80/TCP -> 198.19.0.1:8080",
            ],
            warnings: &[],
        },
        Case {
            name: "named targetPort: the slice port of the same name wins, targetPort is not used",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [
                {"name": "web", "port": 80, "targetPort": "http-alt"},
                {"port": 81, "targetPort": 9999},
            ]})),
            slices: vec![
                web_slice(
                    "a",
                    json!([{"name": "web", "port": 9090}]),
                    ready(&["198.19.0.1"]),
                ),
                // An unnamed service port matches an unnamed ("" or unset) slice port.
                web_slice(
                    "b",
                    json!([{"name": "", "port": 9091}]),
                    ready(&["198.19.0.2"]),
                ),
                web_slice("c", json!([{"port": 9092}]), ready(&["198.19.0.3"])),
            ],
            frontends: &[
                "198.18.0.10:80/TCP -> 198.19.0.1:9090",
                "198.18.0.10:81/TCP -> 198.19.0.2:9091, 198.19.0.3:9092",
            ],
            warnings: &[],
        },
        Case {
            name: "port name or protocol mismatch: no backends",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [
                {"name": "http", "port": 80},
                {"name": "dns", "port": 53, "protocol": "UDP"},
            ]})),
            slices: vec![web_slice(
                "a",
                json!([{"name": "metrics", "port": 9100}, {"name": "dns", "port": 53, "protocol": "TCP"}]),
                ready(&["198.19.0.1"]),
            )],
            frontends: &["198.18.0.10:53/UDP -> ", "198.18.0.10:80/TCP -> "],
            warnings: &[],
        },
        Case {
            name: "multiple slices merge; the same endpoint twice counts once",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]})),
            slices: vec![
                web_slice("b", http.clone(), ready(&["198.19.0.3", "198.19.0.1"])),
                web_slice(
                    "a",
                    http.clone(),
                    ready(&["198.19.0.2", "198.19.0.1", "198.19.0.1"]),
                ),
            ],
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080, 198.19.0.2:8080, 198.19.0.3:8080"],
            warnings: &[],
        },
        Case {
            name: "slices disagreeing on the port number give both",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]})),
            slices: vec![
                web_slice("a", http.clone(), ready(&["198.19.0.1"])),
                web_slice(
                    "b",
                    json!([{"name": "http", "port": 8081}]),
                    ready(&["198.19.0.1"]),
                ),
            ],
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080, 198.19.0.1:8081"],
            warnings: &[],
        },
        Case {
            name: "only the first address of an endpoint is used",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]})),
            slices: vec![web_slice(
                "a",
                http.clone(),
                json!([{"addresses": ["198.19.0.5", "198.19.0.4"]}]),
            )],
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.5:8080"],
            warnings: &[],
        },
        Case {
            name: "FQDN slices are ignored",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]})),
            slices: vec![typed_slice(
                "f",
                "FQDN",
                http.clone(),
                json!([{"addresses": ["example.com"]}]),
            )],
            frontends: &["198.18.0.10:80/TCP -> "],
            warnings: &[],
        },
        Case {
            name: "LoadBalancer services get cluster IP and NodePort (loopback) frontends",
            svc: web(json!({
                "type": "LoadBalancer",
                "clusterIP": "198.18.0.10",
                "ports": [{"port": 80, "nodePort": 30080}],
            })),
            slices: vec![],
            frontends: &["127.0.0.1:30080/TCP -> ", "198.18.0.10:80/TCP -> "],
            warnings: &[],
        },
        Case {
            name: "type NodePort",
            svc: web(
                json!({"type": "NodePort", "clusterIP": "198.18.0.10", "ports": [{"port": 80}]}),
            ),
            slices: vec![],
            frontends: &["198.18.0.10:80/TCP -> "],
            warnings: &[],
        },
    ]);
}

#[test]
fn endpoint_conditions() {
    let svc = || web(json!({"clusterIP": "198.18.0.10", "ports": [{"port": 80}]}));
    let one = |endpoints: Value| vec![web_slice("a", json!([{"port": 8080}]), endpoints)];
    let ep = |addr: &str, conditions: Value| json!({"addresses": [addr], "conditions": conditions});
    check(vec![
        Case {
            name: "conditions unset: ready",
            svc: svc(),
            slices: one(json!([{"addresses": ["198.19.0.1"]}, ep("198.19.0.2", json!({}))])),
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080, 198.19.0.2:8080"],
            warnings: &[],
        },
        Case {
            name: "not ready endpoints are left out while any is ready",
            svc: svc(),
            slices: one(json!([
                ep("198.19.0.1", json!({"ready": true})),
                ep("198.19.0.2", json!({"ready": false, "serving": false})),
                ep(
                    "198.19.0.3",
                    json!({"ready": false, "serving": true, "terminating": true})
                ),
            ])),
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080"],
            warnings: &[],
        },
        Case {
            name: "ready and terminating counts as ready",
            svc: svc(),
            slices: one(json!([ep(
                "198.19.0.1",
                json!({"ready": true, "terminating": true})
            )])),
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080"],
            warnings: &[],
        },
        Case {
            name: "none ready: fall back to serving and terminating",
            svc: svc(),
            slices: one(json!([
                ep(
                    "198.19.0.1",
                    json!({"ready": false, "serving": true, "terminating": true})
                ),
                ep(
                    "198.19.0.2",
                    json!({"ready": false, "serving": false, "terminating": true})
                ),
                ep(
                    "198.19.0.3",
                    json!({"ready": false, "serving": true, "terminating": false})
                ),
                ep(
                    "198.19.0.4",
                    json!({"ready": false, "serving": true, "terminating": true})
                ),
            ])),
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080 (t), 198.19.0.4:8080 (t)"],
            warnings: &[],
        },
        Case {
            name: "ready in another slice beats terminating",
            svc: svc(),
            slices: vec![
                web_slice(
                    "a",
                    json!([{"port": 8080}]),
                    json!([ep(
                        "198.19.0.1",
                        json!({"ready": false, "serving": true, "terminating": true})
                    )]),
                ),
                web_slice("b", json!([{"port": 8080}]), ready(&["198.19.0.2"])),
            ],
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.2:8080"],
            warnings: &[],
        },
        Case {
            name: "serving unset means serving (as kube-proxy): not ready + terminating is serving-terminating",
            svc: svc(),
            slices: one(json!([ep(
                "198.19.0.1",
                json!({"ready": false, "terminating": true})
            )])),
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080 (t)"],
            warnings: &[],
        },
        Case {
            name: "nothing usable: empty list",
            svc: svc(),
            slices: one(json!([ep("198.19.0.1", json!({"ready": false}))])),
            frontends: &["198.18.0.10:80/TCP -> "],
            warnings: &[],
        },
    ]);
}

#[test]
fn sctp_ports_get_socket_frontends() {
    check(vec![Case {
        name: "SCTP beside TCP on a ClusterIP",
        svc: web(json!({"clusterIP": "198.18.0.10", "ports": [
            {"name": "sig", "port": 80, "protocol": "SCTP", "targetPort": 3868},
            {"name": "http", "port": 81},
        ]})),
        slices: vec![web_slice(
            "a",
            json!([{"name": "sig", "port": 3868, "protocol": "SCTP"}, {"name": "http", "port": 8080}]),
            ready(&["198.19.0.1"]),
        )],
        frontends: &[
            "198.18.0.10:80/SCTP -> 198.19.0.1:3868",
            "198.18.0.10:81/TCP -> 198.19.0.1:8080",
        ],
        warnings: &["Service demo/web: SCTP ports get socket frontends only"],
    }]);
}

/// XDP passes SCTP untouched: an SCTP port gets socket frontends on every
/// address (node ports, external IPs too) but no external ones, and the
/// Service is warned about once, however many SCTP ports and addresses.
#[test]
fn sctp_gets_no_external_frontends_and_one_warning() {
    let t = run(
        web(json!({"type": "NodePort", "clusterIP": "198.18.0.10",
            "externalIPs": ["198.18.9.1", "198.18.9.2"], "ports": [
            {"name": "sig", "port": 80, "protocol": "SCTP", "nodePort": 30080},
            {"name": "sig2", "port": 82, "protocol": "SCTP", "nodePort": 30082},
            {"name": "http", "port": 81, "nodePort": 30081},
        ]})),
        &[web_slice(
            "a",
            json!([{"name": "sig", "port": 80, "protocol": "SCTP"},
                   {"name": "sig2", "port": 82, "protocol": "SCTP"},
                   {"name": "http", "port": 81}]),
            ready(&["198.19.0.1"]),
        )],
    );
    let addrs = |protocol: Protocol, scope: Scope| -> BTreeSet<std::net::IpAddr> {
        (t.frontends.iter())
            .filter(|f| f.key.protocol == protocol && f.key.scope == scope)
            .map(|f| f.key.addr)
            .collect()
    };
    let tcp_socket = addrs(Protocol::Tcp, Scope::Socket);
    assert!(
        tcp_socket.len() >= 3,
        "cluster IP and external IPs at least"
    );
    assert_eq!(addrs(Protocol::Sctp, Scope::Socket), tcp_socket);
    assert!(addrs(Protocol::Sctp, Scope::External).is_empty());
    assert!(!addrs(Protocol::Tcp, Scope::External).is_empty());
    let w = warnings(&t);
    assert_eq!(w.len(), 1, "{w:#?}");
    assert!(w[0].contains("demo/web") && w[0].contains("SCTP"), "{w:#?}");
}

#[test]
fn invalid_parts_are_skipped_with_a_warning() {
    let http = json!([{"name": "http", "port": 8080}]);
    check(vec![
        Case {
            name: "unknown protocol",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"port": 80, "protocol": "tcp"}]})),
            slices: vec![],
            frontends: &[],
            warnings: &["Service demo/web: port 80 (\"\"): unknown protocol \"tcp\""],
        },
        Case {
            name: "unparsable clusterIP skipped, the other family kept",
            svc: web(json!({
                "clusterIP": "198.18.0.10",
                "clusterIPs": ["198.18.0.10", "fd00::zz"],
                "ports": [{"port": 80}],
            })),
            slices: vec![],
            frontends: &["198.18.0.10:80/TCP -> "],
            warnings: &["Service demo/web: clusterIP \"fd00::zz\" is not an IP address"],
        },
        Case {
            name: "clusterIP listed twice",
            svc: web(json!({"clusterIPs": ["198.18.0.10", "198.18.0.10"], "ports": [{"port": 80}]})),
            slices: vec![],
            frontends: &["198.18.0.10:80/TCP -> "],
            warnings: &["clusterIP 198.18.0.10 is listed twice"],
        },
        Case {
            name: "port out of range",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [
                {"name": "zero", "port": 0},
                {"name": "big", "port": 65536},
                {"name": "neg", "port": -1},
                {"name": "max", "port": 65535},
            ]})),
            slices: vec![],
            frontends: &["198.18.0.10:65535/TCP -> "],
            warnings: &[
                "port 0 (\"zero\"): port must be 1-65535",
                "port 65536 (\"big\"): port must be 1-65535",
                "port -1 (\"neg\"): port must be 1-65535",
            ],
        },
        Case {
            name: "duplicate port and protocol: the first is kept",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [
                {"name": "http", "port": 80},
                {"name": "again", "port": 80, "protocol": "TCP"},
                {"name": "udp", "port": 80, "protocol": "UDP"},
            ]})),
            slices: vec![web_slice("a", http.clone(), ready(&["198.19.0.1"]))],
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080", "198.18.0.10:80/UDP -> "],
            warnings: &["port 80 (\"again\"): duplicate of an earlier TCP port"],
        },
        Case {
            name: "bad endpoints skipped, good ones kept",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]})),
            slices: vec![web_slice(
                "a",
                http.clone(),
                json!([
                    {"addresses": ["198.19.0.1"]},
                    {"addresses": ["198.19.0.300"]},
                    {"addresses": ["fd00::1"]},
                    {"addresses": []},
                ]),
            )],
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.1:8080"],
            warnings: &[
                "EndpointSlice demo/a: endpoint address \"198.19.0.300\" is not an IP address",
                "EndpointSlice demo/a: endpoint address fd00::1 does not match the slice's addressType",
                "EndpointSlice demo/a: endpoint has no addresses",
            ],
        },
        Case {
            name: "bad slice ports skipped",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]})),
            slices: vec![
                web_slice("a", json!([{"name": "http", "port": 0}]), ready(&["198.19.0.1"])),
                web_slice("b", json!([{"name": "http"}]), ready(&["198.19.0.2"])),
                web_slice("c", json!([{"name": "http", "port": 70000}]), ready(&["198.19.0.3"])),
                web_slice("d", http.clone(), ready(&["198.19.0.4"])),
            ],
            frontends: &["198.18.0.10:80/TCP -> 198.19.0.4:8080"],
            warnings: &[
                "EndpointSlice demo/a: port \"http\" is 0",
                "EndpointSlice demo/b: port \"http\" is unset",
                "EndpointSlice demo/c: port \"http\" is 70000",
            ],
        },
        Case {
            name: "unknown addressType",
            svc: web(json!({"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]})),
            slices: vec![typed_slice("a", "IPv5", http.clone(), ready(&["198.19.0.1"]))],
            frontends: &["198.18.0.10:80/TCP -> "],
            warnings: &["EndpointSlice demo/a: unknown addressType \"IPv5\""],
        },
        Case {
            name: "unknown type",
            svc: web(json!({"type": "Magic", "clusterIP": "198.18.0.10", "ports": [{"port": 80}]})),
            slices: vec![],
            frontends: &[],
            warnings: &["Service demo/web: unknown type \"Magic\""],
        },
        Case {
            name: "no namespace means default",
            svc: json!({"metadata": {"name": "web"}, "spec": {"clusterIP": "bogus"}}),
            slices: vec![],
            frontends: &[],
            warnings: &["Service default/web: clusterIP \"bogus\""],
        },
        Case {
            name: "no name: nothing",
            svc: json!({"metadata": {"namespace": "demo"}, "spec": {"clusterIP": "198.18.0.10", "ports": [{"port": 80}]}}),
            slices: vec![],
            frontends: &[],
            warnings: &["Service demo/<unnamed>: metadata.name is missing"],
        },
    ]);
}

#[test]
fn skipped_services() {
    let ports = json!([{"port": 80}]);
    let labelled = |label: &str| {
        json!({
            "metadata": {"name": "web", "namespace": "demo", "labels": {label: ""}},
            "spec": {"clusterIP": "198.18.0.10", "ports": ports},
        })
    };
    let cases = [
        (
            web(json!({"type": "ExternalName", "externalName": "example.com", "ports": ports})),
            skip::EXTERNAL_NAME,
        ),
        (
            web(json!({"type": "ExternalName", "clusterIP": "198.18.0.10", "ports": ports})),
            skip::EXTERNAL_NAME,
        ),
        (
            web(json!({"clusterIP": "None", "ports": ports})),
            skip::HEADLESS,
        ),
        (
            web(json!({"clusterIP": "None", "clusterIPs": ["None"], "ports": ports})),
            skip::HEADLESS,
        ),
        (
            web(json!({"clusterIP": "", "ports": ports})),
            skip::HEADLESS,
        ),
        (web(json!({"ports": ports})), skip::HEADLESS),
        (
            web(json!({"clusterIPs": [], "ports": ports})),
            skip::HEADLESS,
        ),
        (json!({"metadata": {"name": "web"}}), skip::HEADLESS),
        (labelled(LABEL_SERVICE_PROXY_NAME), skip::PROXY_NAME_LABEL),
        (labelled(LABEL_HEADLESS), skip::HEADLESS_LABEL),
    ];
    let slices = [web_slice(
        "a",
        json!([{"port": 8080}]),
        ready(&["198.19.0.1"]),
    )];
    for (svc, reason) in cases {
        let t = run(svc.clone(), &slices);
        let want = Translation {
            skipped: Some(reason),
            ..Translation::default()
        };
        assert_eq!(t, want, "{svc}");
    }
}

#[test]
fn backend_cap() {
    let max = usize::from(MAX_BACKENDS_PER_FRONTEND);
    // Listed in reverse so the truncation visibly happens after sorting.
    let addrs: Vec<String> = (0..=max)
        .rev()
        .map(|i| format!("198.19.{}.{}", i / 256, i % 256))
        .collect();
    let endpoints: Value = addrs.iter().map(|a| json!({"addresses": [a]})).collect();
    let t = run(
        web(json!({"clusterIP": "198.18.0.10", "ports": [{"port": 80}]})),
        &[web_slice("a", json!([{"port": 8080}]), endpoints)],
    );
    let backends = &t.frontends[0].backends;
    assert_eq!(backends.len(), max);
    assert_eq!(backends[0].addr, "198.19.0.0".parse::<IpAddr>().unwrap());
    assert_eq!(
        backends[max - 1].addr.to_string(),
        format!("198.19.{}.{}", (max - 1) / 256, (max - 1) % 256)
    );
    assert_eq!(
        warnings(&t),
        [format!(
            "Service demo/web: frontend 198.18.0.10:80/TCP has {} backends; only the first {max} are used",
            max + 1
        )]
    );
}

#[test]
fn slice_order_does_not_matter() {
    let svc = web(
        json!({"clusterIPs": ["198.18.0.10", "fd00::10"], "ports": [{"name": "http", "port": 80}]}),
    );
    let slices = [
        web_slice(
            "a",
            json!([{"name": "http", "port": 8080}]),
            ready(&["198.19.0.2", "bad"]),
        ),
        web_slice(
            "b",
            json!([{"name": "http", "port": 8080}]),
            ready(&["198.19.0.1", "also bad"]),
        ),
        typed_slice(
            "c",
            "IPv6",
            json!([{"name": "http", "port": 0}]),
            ready(&["fd00::1"]),
        ),
    ];
    let forward = run(svc.clone(), &slices);
    let mut reversed = slices.clone();
    reversed.reverse();
    assert_eq!(forward, run(svc, &reversed));
    assert_eq!(forward.warnings.len(), 3);
}

// ---- ObjectStore ----

fn svc_obj(name: &str, ip: &str) -> Object {
    let svc = json!({
        "metadata": {"name": name, "namespace": "demo", "resourceVersion": "1"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]},
    });
    Object::Service(Box::new(service(svc)))
}

fn slice_obj(name: &str, service_name: Option<&str>, addr: &str) -> Object {
    let mut v = json!({
        "metadata": {"name": name, "namespace": "demo"},
        "addressType": "IPv4",
        "ports": [{"port": 8080}],
        "endpoints": [{"addresses": [addr]}],
    });
    if let Some(s) = service_name {
        v["metadata"]["labels"] = json!({"kubernetes.io/service-name": s});
    }
    Object::EndpointSlice(Box::new(slice(v)))
}

fn node_obj(name: &str) -> Object {
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Object::Node(Box::new(node))
}

fn id(name: &str) -> ServiceId {
    ServiceId {
        namespace: "demo".to_string(),
        name: name.to_string(),
    }
}

fn ids(names: &[&str]) -> BTreeSet<ServiceId> {
    names.iter().map(|n| id(n)).collect()
}

/// The store's translation of demo/NAME, rendered; None if absent.
fn rendered(store: &ObjectStore, name: &str) -> Option<Vec<String>> {
    let t = store.translate(&id(name), &NodeContext::default())?;
    Some(render(&t))
}

fn upsert(store: &mut ObjectStore, obj: Object) -> BTreeSet<ServiceId> {
    let (affected, errors) = store.upsert(obj);
    assert!(errors.is_empty(), "{errors:?}");
    affected
}

#[test]
fn store_upsert_and_identical_upsert() {
    let mut store = ObjectStore::new();
    assert_eq!(
        upsert(&mut store, svc_obj("web", "198.18.0.10")),
        ids(&["web"])
    );
    assert_eq!(upsert(&mut store, svc_obj("web", "198.18.0.10")), ids(&[]));

    // Only resourceVersion and managedFields differ: still the same object.
    let Object::Service(mut svc) = svc_obj("web", "198.18.0.10") else {
        unreachable!()
    };
    svc.metadata.resource_version = Some("2".to_string());
    svc.metadata.managed_fields = Some(vec![Default::default()]);
    assert_eq!(upsert(&mut store, Object::Service(svc)), ids(&[]));

    assert_eq!(
        upsert(&mut store, svc_obj("web", "198.18.0.11")),
        ids(&["web"])
    );
    assert_eq!(rendered(&store, "web").unwrap(), ["198.18.0.11:80/TCP -> "]);

    assert_eq!(
        upsert(&mut store, slice_obj("web-a", Some("web"), "198.19.0.1")),
        ids(&["web"])
    );
    assert_eq!(
        upsert(&mut store, slice_obj("web-a", Some("web"), "198.19.0.1")),
        ids(&[])
    );
    assert_eq!(
        rendered(&store, "web").unwrap(),
        ["198.18.0.11:80/TCP -> 198.19.0.1:8080"]
    );

    // Nodes feed no translation yet.
    assert_eq!(upsert(&mut store, node_obj("n1")), ids(&[]));
    assert!(store.node("n1").is_some());
    assert_eq!(store.delete(&node_obj("n1")), ids(&[]));
    assert!(store.node("n1").is_none());
}

#[test]
fn store_slice_before_service() {
    let mut store = ObjectStore::new();
    assert_eq!(
        upsert(&mut store, slice_obj("web-a", Some("web"), "198.19.0.1")),
        ids(&["web"])
    );
    assert_eq!(rendered(&store, "web"), None);
    assert_eq!(store.service_ids().count(), 0);
    assert_eq!(
        upsert(&mut store, svc_obj("web", "198.18.0.10")),
        ids(&["web"])
    );
    assert_eq!(
        rendered(&store, "web").unwrap(),
        ["198.18.0.10:80/TCP -> 198.19.0.1:8080"]
    );
}

#[test]
fn store_slice_moves_between_services() {
    let mut store = ObjectStore::new();
    upsert(&mut store, svc_obj("a", "198.18.0.10"));
    upsert(&mut store, svc_obj("b", "198.18.0.11"));
    upsert(&mut store, slice_obj("s", Some("a"), "198.19.0.1"));
    assert_eq!(
        upsert(&mut store, slice_obj("s", Some("b"), "198.19.0.1")),
        ids(&["a", "b"])
    );
    assert_eq!(rendered(&store, "a").unwrap(), ["198.18.0.10:80/TCP -> "]);
    assert_eq!(
        rendered(&store, "b").unwrap(),
        ["198.18.0.11:80/TCP -> 198.19.0.1:8080"]
    );
}

#[test]
fn store_slice_without_label() {
    let mut store = ObjectStore::new();
    upsert(&mut store, svc_obj("a", "198.18.0.10"));
    let (affected, errors) = store.upsert(slice_obj("s", None, "198.19.0.1"));
    assert_eq!(affected, ids(&[]));
    let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(
        errors,
        ["EndpointSlice demo/s: no kubernetes.io/service-name label; ignored"]
    );

    // A labelled slice that loses its label is dropped from its service.
    upsert(&mut store, slice_obj("s", Some("a"), "198.19.0.1"));
    let (affected, errors) = store.upsert(slice_obj("s", None, "198.19.0.1"));
    assert_eq!((affected, errors.len()), (ids(&["a"]), 1));
    assert_eq!(rendered(&store, "a").unwrap(), ["198.18.0.10:80/TCP -> "]);
}

#[test]
fn store_delete() {
    let mut store = ObjectStore::new();
    upsert(&mut store, svc_obj("a", "198.18.0.10"));
    upsert(&mut store, slice_obj("s", Some("a"), "198.19.0.1"));

    assert_eq!(store.delete(&slice_obj("s", None, "ignored")), ids(&["a"]));
    assert_eq!(store.delete(&slice_obj("s", None, "ignored")), ids(&[]));
    upsert(&mut store, slice_obj("s", Some("a"), "198.19.0.1"));

    // Only kind, namespace and name of the deleted object matter.
    assert_eq!(store.delete(&svc_obj("a", "whatever")), ids(&["a"]));
    assert_eq!(rendered(&store, "a"), None);
    assert_eq!(store.delete(&svc_obj("a", "whatever")), ids(&[]));

    // Slices outlive their service and are picked up when it returns.
    upsert(&mut store, svc_obj("a", "198.18.0.10"));
    assert_eq!(
        rendered(&store, "a").unwrap(),
        ["198.18.0.10:80/TCP -> 198.19.0.1:8080"]
    );
}

// ---- frontend conflicts ----

/// A Service in demo with one port on one clusterIP, created at `created`.
fn claimant(name: &str, created: Option<&str>, ip: &str, port: u16, protocol: &str) -> Object {
    let mut svc = json!({
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"clusterIP": ip, "ports": [{"port": port, "protocol": protocol}]},
    });
    if let Some(t) = created {
        svc["metadata"]["creationTimestamp"] = json!(t);
    }
    Object::Service(Box::new(service(svc)))
}

/// Which of `names` have the frontend in their translation (rendered
/// without backends), and every warning.
fn holders(store: &ObjectStore, names: &[&str]) -> (Vec<String>, Vec<String>) {
    let mut holding = Vec::new();
    let mut warned = Vec::new();
    for name in names {
        let t = store.translate(&id(name), &node_n1()).unwrap();
        if !t.frontends.is_empty() {
            holding.push(name.to_string());
        }
        warned.extend(warnings(&t));
    }
    (holding, warned)
}

const EARLY: &str = "2026-01-01T00:00:00Z";
const LATE: &str = "2026-06-01T00:00:00Z";

#[test]
fn frontend_conflict_owner_by_age_then_name_in_any_order() {
    // (case, a's timestamp, b's timestamp, owner)
    let cases = [
        ("older wins", Some(LATE), Some(EARLY), "b"),
        ("older wins, other way", Some(EARLY), Some(LATE), "a"),
        ("same time: first by name", Some(EARLY), Some(EARLY), "a"),
        ("no timestamp sorts last", None, Some(LATE), "b"),
        ("neither has one: first by name", None, None, "a"),
    ];
    for (case, a_created, b_created, owner) in cases {
        let a = || claimant("a", a_created, "198.18.0.10", 80, "TCP");
        let b = || claimant("b", b_created, "198.18.0.10", 80, "TCP");
        let loser = if owner == "a" { "b" } else { "a" };
        for order in [[a(), b()], [b(), a()]] {
            let mut store = ObjectStore::new();
            for obj in order {
                upsert(&mut store, obj);
            }
            let (holding, warned) = holders(&store, &["a", "b"]);
            assert_eq!(holding, [owner], "case {case:?}");
            assert_eq!(
                warned,
                [format!(
                    "Service demo/{loser}: frontend 198.18.0.10:80/TCP already belongs to \
                     service demo/{owner} (older, or first by namespace/name); left out"
                )],
                "case {case:?}"
            );
        }
    }
}

#[test]
fn frontend_conflict_needs_same_address_port_and_protocol() {
    let cases = [
        (
            "other port",
            claimant("b", Some(EARLY), "198.18.0.10", 81, "TCP"),
        ),
        (
            "other protocol",
            claimant("b", Some(EARLY), "198.18.0.10", 80, "UDP"),
        ),
        (
            "other address",
            claimant("b", Some(EARLY), "198.18.0.11", 80, "TCP"),
        ),
    ];
    for (case, b) in cases {
        let mut store = ObjectStore::new();
        upsert(
            &mut store,
            claimant("a", Some(LATE), "198.18.0.10", 80, "TCP"),
        );
        assert_eq!(upsert(&mut store, b), ids(&["b"]), "case {case:?}");
        let (holding, warned) = holders(&store, &["a", "b"]);
        assert_eq!(holding, ["a", "b"], "case {case:?}");
        assert!(warned.is_empty(), "case {case:?}: {warned:?}");
    }
}

#[test]
fn frontend_hands_over_when_the_owner_lets_go() {
    let mut store = ObjectStore::new();
    upsert(
        &mut store,
        claimant("a", Some(EARLY), "198.18.0.10", 80, "TCP"),
    );
    // A younger claimant affects only itself: the owner stays.
    assert_eq!(
        upsert(
            &mut store,
            claimant("b", Some(LATE), "198.18.0.10", 80, "TCP")
        ),
        ids(&["b"])
    );
    assert_eq!(
        upsert(&mut store, claimant("c", None, "198.18.0.10", 80, "TCP")),
        ids(&["c"])
    );
    assert_eq!(holders(&store, &["a", "b", "c"]).0, ["a"]);

    // The owner moves to another port: the next oldest takes over, and
    // every claimant is re-translated (c's warning now names b).
    assert_eq!(
        upsert(
            &mut store,
            claimant("a", Some(EARLY), "198.18.0.10", 8080, "TCP")
        ),
        ids(&["a", "b", "c"])
    );
    let (holding, warned) = holders(&store, &["a", "b", "c"]);
    assert_eq!(holding, ["a", "b"]);
    assert_eq!(warned.len(), 1);
    assert!(
        warned[0].contains("demo/c: frontend 198.18.0.10:80/TCP already belongs to service demo/b")
    );

    // The owner is deleted: the loser takes over.
    assert_eq!(
        store.delete(&claimant("b", None, "", 0, "")),
        ids(&["b", "c"])
    );
    assert_eq!(
        holders(&store, &["a", "c"]),
        (vec!["a".into(), "c".into()], vec![])
    );

    // A new, older Service claims it: the holder loses it.
    assert_eq!(
        upsert(
            &mut store,
            claimant("d", Some(EARLY), "198.18.0.10", 80, "TCP")
        ),
        ids(&["c", "d"])
    );
    assert_eq!(holders(&store, &["c", "d"]).0, ["d"]);

    // Gone in a relist: handed over too.
    let (affected, _) = store.replace_all(vec![claimant("c", None, "198.18.0.10", 80, "TCP")]);
    assert_eq!(affected, ids(&["a", "d", "c"]));
    assert_eq!(holders(&store, &["c"]).0, ["c"]);
}

#[test]
fn node_port_conflicts_follow_the_node_addresses() {
    let node_port = |name: &str, created: &str, node_port: u16| {
        let svc = json!({
            "metadata": {"name": name, "namespace": "demo", "creationTimestamp": created},
            "spec": {"type": "NodePort", "clusterIP": format!("198.18.0.{}", node_port - 30000),
                     "ports": [{"port": 80, "nodePort": node_port}]},
        });
        Object::Service(Box::new(service(svc)))
    };
    // An externalIP on the node's address, on the port another Service
    // has as its nodePort.
    let external = json!({
        "metadata": {"name": "ext", "namespace": "demo", "creationTimestamp": LATE},
        "spec": {"clusterIP": "198.18.0.99", "externalIPs": ["198.18.9.1"],
                 "ports": [{"port": 30001}]},
    });
    let mut store = ObjectStore::new();
    upsert(&mut store, node_port("np", EARLY, 30001));
    upsert(&mut store, Object::Service(Box::new(service(external))));
    let frontends = |store: &ObjectStore, name: &str| -> Vec<String> {
        let t = store.translate(&id(name), &node_n1()).unwrap();
        t.frontends.iter().map(|f| f.key.to_string()).collect()
    };
    // Before the store knows the node's addresses, no conflict is seen.
    assert!(frontends(&store, "ext").contains(&"198.18.9.1:30001/TCP".to_string()));
    let affected = store.set_node(&node_n1());
    assert!(affected.contains(&id("ext")), "{affected:?}");
    assert_eq!(
        frontends(&store, "ext"),
        ["198.18.0.99:30001/TCP"],
        "the node's address is np's node port"
    );
    assert!(frontends(&store, "np").contains(&"198.18.9.1:30001/TCP (external)".to_string()));
}

#[test]
fn store_replace_all() {
    let mut store = ObjectStore::new();
    let (affected, errors) = store.replace_all(vec![
        svc_obj("a", "198.18.0.10"),
        svc_obj("b", "198.18.0.11"),
        slice_obj("sa", Some("a"), "198.19.0.1"),
        slice_obj("sb", Some("b"), "198.19.0.2"),
        node_obj("n1"),
    ]);
    assert_eq!((affected, errors), (ids(&["a", "b"]), vec![]));

    // a unchanged, b gone (with its slice), c new, slice of c before c,
    // one bad object reported.
    let (affected, errors) = store.replace_all(vec![
        slice_obj("sc", Some("c"), "198.19.0.3"),
        svc_obj("a", "198.18.0.10"),
        slice_obj("sa", Some("a"), "198.19.0.1"),
        svc_obj("c", "198.18.0.12"),
        slice_obj("bad", None, "198.19.0.4"),
    ]);
    assert_eq!(affected, ids(&["b", "c"]));
    assert_eq!(errors.len(), 1);
    assert_eq!(
        store.service_ids().cloned().collect::<BTreeSet<_>>(),
        ids(&["a", "c"])
    );
    assert_eq!(rendered(&store, "b"), None);
    assert_eq!(
        rendered(&store, "c").unwrap(),
        ["198.18.0.12:80/TCP -> 198.19.0.3:8080"]
    );
    assert!(store.node("n1").is_none());

    // Removing only a slice affects its service.
    let (affected, _) = store.replace_all(vec![
        svc_obj("a", "198.18.0.10"),
        svc_obj("c", "198.18.0.12"),
    ]);
    assert_eq!(affected, ids(&["a", "c"]));
}

#[test]
fn store_unnamed_objects_are_reported() {
    let mut store = ObjectStore::new();
    let svc: Service = service(json!({"metadata": {}, "spec": {"clusterIP": "198.18.0.10"}}));
    let (affected, errors) = store.upsert(Object::Service(Box::new(svc)));
    assert!(affected.is_empty());
    assert_eq!(
        errors[0].to_string(),
        "Service default/<unnamed>: metadata.name is missing; ignored"
    );
    assert_eq!(store.service_ids().count(), 0);
}

#[test]
fn store_default_namespace() {
    let mut store = ObjectStore::new();
    let svc = service(json!({"metadata": {"name": "web"}, "spec": {"clusterIP": "198.18.0.10"}}));
    let (affected, _) = store.upsert(Object::Service(Box::new(svc)));
    let default_web = ServiceId {
        namespace: "default".to_string(),
        name: "web".to_string(),
    };
    assert_eq!(affected, [default_web.clone()].into());
    assert!(store
        .translate(&default_web, &NodeContext::default())
        .is_some());
}

// ---- properties ----

mod properties {
    use proptest::collection::vec;
    use proptest::option::of;
    use proptest::prelude::*;

    use super::*;

    /// Mostly valid test addresses (few, so duplicates happen), plus the
    /// special and garbage strings real input may hold.
    fn ip_text() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => (0u8..3, 0u8..3).prop_map(|(a, b)| format!("198.18.{a}.{b}")),
            4 => (0u8..5).prop_map(|a| format!("fd00::{a:x}")),
            1 => Just("None".to_string()),
            1 => Just(String::new()),
            1 => Just("::ffff:198.18.0.1".to_string()),
            1 => ".{0,16}",
        ]
    }

    fn port() -> impl Strategy<Value = i32> {
        prop_oneof![4 => 1i32..4, 1 => Just(0), 1 => Just(65536), 1 => any::<i32>()]
    }

    fn protocol() -> impl Strategy<Value = Option<String>> {
        of(prop_oneof![
            Just("TCP".to_string()),
            Just("UDP".to_string()),
            Just("SCTP".to_string()),
            "[a-zA-Z]{0,4}",
        ])
    }

    fn port_name() -> impl Strategy<Value = Option<String>> {
        of(prop_oneof![
            Just(String::new()),
            Just("a".to_string()),
            Just("b".to_string())
        ])
    }

    fn service_strategy() -> impl Strategy<Value = Value> {
        let ports = vec((port_name(), port(), protocol()), 0..4);
        let labels = prop_oneof![Just(LABEL_SERVICE_PROXY_NAME), Just(LABEL_HEADLESS)];
        let type_ = of(prop_oneof![
            Just("ClusterIP".to_string()),
            Just("NodePort".to_string()),
            Just("LoadBalancer".to_string()),
            Just("ExternalName".to_string()),
            ".{0,8}",
        ]);
        (
            of(prop_oneof![Just("web"), Just("")]),
            type_,
            of(ip_text()),
            of(vec(ip_text(), 0..3)),
            ports,
            proptest::option::weighted(0.1, labels),
        )
            .prop_map(|(name, type_, ip, ips, ports, label)| {
                let ports: Vec<Value> = ports
                    .into_iter()
                    .map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol}))
                    .collect();
                let labels: serde_json::Map<String, Value> =
                    label.into_iter().map(|l| (l.to_string(), json!("x"))).collect();
                json!({
                    "metadata": {"name": name, "namespace": "demo", "labels": labels},
                    "spec": {"type": type_, "clusterIP": ip, "clusterIPs": ips, "ports": ports},
                })
            })
    }

    fn slice_strategy() -> impl Strategy<Value = Value> {
        let address_type = prop_oneof![
            3 => Just("IPv4".to_string()),
            3 => Just("IPv6".to_string()),
            1 => Just("FQDN".to_string()),
            1 => ".{0,5}",
        ];
        let ports = of(vec((port_name(), of(port()), protocol()), 0..3));
        let conditions = of((of(any::<bool>()), of(any::<bool>()), of(any::<bool>())));
        let endpoints = vec((vec(ip_text(), 0..3), conditions), 0..5);
        (address_type, ports, endpoints, "[a-c]").prop_map(|(address_type, ports, endpoints, name)| {
            let ports: Option<Vec<Value>> = ports.map(|ports| {
                ports
                    .into_iter()
                    .map(|(name, port, protocol)| json!({"name": name, "port": port, "protocol": protocol}))
                    .collect()
            });
            let endpoints: Vec<Value> = endpoints
                .into_iter()
                .map(|(addresses, c)| {
                    let conditions = c.map(|(r, s, t)| json!({"ready": r, "serving": s, "terminating": t}));
                    json!({"addresses": addresses, "conditions": conditions})
                })
                .collect();
            json!({
                "metadata": {"name": name, "namespace": "demo"},
                "addressType": address_type,
                "ports": ports,
                "endpoints": endpoints,
            })
        })
    }

    /// A Service, its slices, and the same slices in another order.
    fn input() -> impl Strategy<Value = (Value, Vec<Value>, Vec<Value>)> {
        (service_strategy(), vec(slice_strategy(), 0..4)).prop_flat_map(|(svc, slices)| {
            let shuffled = Just(slices.clone()).prop_shuffle();
            (Just(svc), Just(slices), shuffled)
        })
    }

    proptest! {
        #[test]
        fn translate_is_total_deterministic_and_well_formed((svc, slices, shuffled) in input()) {
            let t = run(svc.clone(), &slices);
            prop_assert_eq!(&t, &run(svc.clone(), &slices));
            prop_assert_eq!(&t, &run(svc, &shuffled));

            if t.skipped.is_some() {
                prop_assert!(t.frontends.is_empty() && t.warnings.is_empty());
            }
            for pair in t.frontends.windows(2) {
                prop_assert!(pair[0].key < pair[1].key, "frontends sorted and unique");
            }
            for f in &t.frontends {
                prop_assert!(f.key.port != 0);
                prop_assert!(f.backends.len() <= usize::from(MAX_BACKENDS_PER_FRONTEND));
                for b in &f.backends {
                    prop_assert_eq!(b.addr.is_ipv4(), f.key.addr.is_ipv4(), "family of {}", f.key);
                    prop_assert!(b.port != 0);
                    prop_assert_eq!(b.terminating, f.backends[0].terminating);
                }
                for pair in f.backends.windows(2) {
                    prop_assert!(pair[0] < pair[1], "backends sorted and unique");
                }
            }
        }

        /// The store gives the same translation as translate itself, and an
        /// identical re-upsert changes nothing, whatever the objects.
        #[test]
        fn store_matches_translate((svc, _, shuffled) in input()) {
            prop_assume!(svc["metadata"]["name"] == "web");
            let mut store = ObjectStore::new();
            // Slice names may repeat; the store keeps the last of each.
            let mut latest = BTreeMap::new();
            for mut s in shuffled {
                s["metadata"]["labels"] = json!({"kubernetes.io/service-name": "web"});
                latest.insert(s["metadata"]["name"].to_string(), s.clone());
                store.upsert(Object::EndpointSlice(Box::new(slice(s))));
            }
            store.upsert(Object::Service(Box::new(service(svc.clone()))));
            let latest: Vec<Value> = latest.into_values().collect();
            let got = store.translate(&id("web"), &NodeContext::default());
            prop_assert_eq!(got, Some(run(svc.clone(), &latest)));
            let (affected, _) = store.upsert(Object::Service(Box::new(service(svc))));
            prop_assert!(affected.is_empty());
        }
    }
}

/// This node: n1 in zone-a with one address per family.
fn node_n1() -> NodeContext {
    NodeContext {
        name: "n1".into(),
        zone: Some("zone-a".into()),
        addresses: vec!["198.18.9.1".parse().unwrap(), "fd00:9::1".parse().unwrap()],
    }
}

/// An endpoint on `node` with zone hints.
fn ep(addr: &str, node: &str, ready: bool, terminating: bool, zones: &[&str]) -> Value {
    let mut e = json!({
        "addresses": [addr],
        "nodeName": node,
        "conditions": {"ready": ready, "serving": ready || terminating, "terminating": terminating},
    });
    if !zones.is_empty() {
        let zones: Vec<Value> = zones.iter().map(|z| json!({"name": z})).collect();
        e["hints"] = json!({"forZones": zones});
    }
    e
}

/// A ready endpoint on `node` with zone and node hints.
fn hinted(addr: &str, node: &str, zones: &[&str], nodes: &[&str]) -> Value {
    let mut e = ep(addr, node, true, false, zones);
    if !nodes.is_empty() {
        let nodes: Vec<Value> = nodes.iter().map(|n| json!({"name": n})).collect();
        e["hints"]["forNodes"] = json!(nodes);
    }
    e
}

/// "kind frontend -> backends [drop] [affinity N]" for every socket-scope
/// frontend.
fn render_full(t: &Translation) -> Vec<String> {
    render_scope(t, Scope::Socket)
}

/// Like `render_full`, for one scope; local backends marked "(l)", source
/// ranges appended.
fn render_scope(t: &Translation, scope: Scope) -> Vec<String> {
    t.frontends
        .iter()
        .filter(|f| f.key.scope == scope)
        .map(|f| {
            let backends: Vec<String> = f
                .backends
                .iter()
                .map(|b| {
                    let mut mark = if b.terminating { " (t)" } else { "" }.to_string();
                    if scope == Scope::External && b.local {
                        mark.push_str(" (l)");
                    }
                    format!("{}{mark}", SocketAddr::new(b.addr, b.port))
                })
                .collect();
            let mut line = format!("{:?} {} -> {}", f.kind, f.key, backends.join(", "));
            if f.when_empty == WhenEmpty::Drop {
                line.push_str(" [drop]");
            }
            if let Some(t) = f.affinity_timeout {
                line.push_str(&format!(" [affinity {t}]"));
            }
            if !f.source_ranges.is_empty() {
                let ranges: Vec<String> = f.source_ranges.iter().map(ToString::to_string).collect();
                line.push_str(&format!(" [from {}]", ranges.join(" ")));
            }
            if !f.draining.is_empty() {
                let draining: Vec<String> = f
                    .draining
                    .iter()
                    .map(|b| SocketAddr::new(b.addr, b.port).to_string())
                    .collect();
                line.push_str(&format!(" [draining {}]", draining.join(", ")));
            }
            line
        })
        .collect()
}

fn run_on(node: &NodeContext, svc: Value, endpoints: Value) -> Translation {
    let svc = service(svc);
    let slices = [slice(web_slice("a", json!([{"port": 8080}]), endpoints))];
    let refs: Vec<&EndpointSlice> = slices.iter().collect();
    translate(&svc, &refs, node)
}

/// kube-proxy's CategorizeEndpoints and traffic-policy cases, one per row:
/// (name, extra spec fields / metadata, endpoints, expected frontends).
#[test]
fn traffic_policies_topology_and_external_frontends() {
    let node = node_n1();
    let base = |extra: Value| {
        let mut spec = json!({"clusterIP": "198.18.0.10", "ports": [{"port": 80}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        web(spec)
    };
    let local = |a: &str| ep(a, "n1", true, false, &[]);
    let remote = |a: &str| ep(a, "n2", true, false, &[]);
    let cases: Vec<(&str, Value, Value, Vec<&str>)> = vec![
        (
            "ITP Cluster uses every ready endpoint",
            base(json!({})),
            json!([local("198.18.1.2"), remote("198.18.2.2")]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080, 198.18.2.2:8080"],
        ),
        (
            "ITP Local uses only this node's endpoints",
            base(json!({"internalTrafficPolicy": "Local"})),
            json!([local("198.18.1.2"), remote("198.18.2.2")]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080"],
        ),
        (
            "ITP Local without local endpoints drops (endpoints exist elsewhere)",
            base(json!({"internalTrafficPolicy": "Local"})),
            json!([remote("198.18.2.2")]),
            vec!["ClusterIp 198.18.0.10:80/TCP ->  [drop]"],
        ),
        (
            "ITP Local with no endpoints at all refuses",
            base(json!({"internalTrafficPolicy": "Local"})),
            json!([]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> "],
        ),
        (
            "ITP Local falls back to local serving-terminating endpoints, not remote ready ones",
            base(json!({"internalTrafficPolicy": "Local"})),
            json!([ep("198.18.1.2", "n1", false, true, &[]), remote("198.18.2.2")]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080 (t)"],
        ),
        (
            "topology: hints used when all ready endpoints have them and one is for this zone",
            base(json!({"trafficDistribution": "PreferClose"})),
            json!([ep("198.18.1.2", "n1", true, false, &["zone-a"]), ep("198.18.2.2", "n2", true, false, &["zone-b"])]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080"],
        ),
        (
            "topology: the topology-mode Auto annotation enables hints too",
            json!({"metadata": {"name": "web", "namespace": "demo", "annotations": {"service.kubernetes.io/topology-mode": "Auto"}},
                   "spec": {"clusterIP": "198.18.0.10", "ports": [{"port": 80}]}}),
            json!([ep("198.18.1.2", "n1", true, false, &["zone-a"]), ep("198.18.2.2", "n2", true, false, &["zone-b"])]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080"],
        ),
        (
            "topology: hints used whenever every ready endpoint has them (kube-proxy 1.33+), asked for or not",
            base(json!({})),
            json!([ep("198.18.1.2", "n1", true, false, &["zone-a"]), ep("198.18.2.2", "n2", true, false, &["zone-b"])]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080"],
        ),
        (
            "topology: forNodes hints (PreferSameNode) naming this node win over zone hints",
            base(json!({"trafficDistribution": "PreferSameNode"})),
            json!([
                hinted("198.18.1.2", "n1", &["zone-a"], &["n1"]),
                hinted("198.18.1.3", "n3", &["zone-a"], &["n3"]),
                hinted("198.18.2.2", "n2", &["zone-b"], &["n2"]),
            ]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080"],
        ),
        (
            "topology: forNodes hints none of which names this node fall back to zone hints",
            base(json!({"trafficDistribution": "PreferSameNode"})),
            json!([
                hinted("198.18.1.3", "n3", &["zone-a"], &["n3"]),
                hinted("198.18.2.2", "n2", &["zone-b"], &["n2"]),
            ]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.3:8080"],
        ),
        (
            "topology: one ready endpoint without node hints disables node hints",
            base(json!({"trafficDistribution": "PreferSameNode"})),
            json!([
                hinted("198.18.1.2", "n1", &[], &["n1"]),
                hinted("198.18.2.2", "n2", &[], &[]),
            ]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080, 198.18.2.2:8080"],
        ),
        (
            "topology: one ready endpoint without hints disables them",
            base(json!({"trafficDistribution": "PreferClose"})),
            json!([ep("198.18.1.2", "n1", true, false, &["zone-a"]), ep("198.18.2.2", "n2", true, false, &[])]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080, 198.18.2.2:8080"],
        ),
        (
            "topology: no hint for this zone disables them",
            base(json!({"trafficDistribution": "PreferClose"})),
            json!([ep("198.18.1.2", "n1", true, false, &["zone-b"]), ep("198.18.2.2", "n2", true, false, &["zone-c"])]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080, 198.18.2.2:8080"],
        ),
        (
            "NodePort: node addresses and loopback of the service's family",
            base(json!({"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]})),
            json!([remote("198.18.2.2")]),
            vec![
                "NodePort 127.0.0.1:30080/TCP -> 198.18.2.2:8080",
                "ClusterIp 198.18.0.10:80/TCP -> 198.18.2.2:8080",
                "NodePort 198.18.9.1:30080/TCP -> 198.18.2.2:8080",
            ],
        ),
        (
            "externalIPs and LB ingress (ipMode Proxy ignored); ETP Local still uses all endpoints from inside the node",
            json!({"metadata": {"name": "web", "namespace": "demo"},
                   "spec": {"type": "LoadBalancer", "clusterIP": "198.18.0.10", "externalTrafficPolicy": "Local",
                            "externalIPs": ["198.19.7.7"], "ports": [{"port": 80}]},
                   "status": {"loadBalancer": {"ingress": [{"ip": "198.19.8.8"}, {"ip": "198.19.9.9", "ipMode": "Proxy"}]}}}),
            json!([local("198.18.1.2"), remote("198.18.2.2")]),
            vec![
                "ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080, 198.18.2.2:8080",
                "ExternalIp 198.19.7.7:80/TCP -> 198.18.1.2:8080, 198.18.2.2:8080",
                "LoadBalancer 198.19.8.8:80/TCP -> 198.18.1.2:8080, 198.18.2.2:8080",
            ],
        ),
        (
            "ETP Local and ITP Local: from inside the node external addresses still use every endpoint (kube-proxy's short-circuit)",
            base(json!({"externalTrafficPolicy": "Local", "internalTrafficPolicy": "Local", "externalIPs": ["198.19.7.7"]})),
            json!([local("198.18.1.2"), remote("198.18.2.2")]),
            vec![
                "ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080",
                "ExternalIp 198.19.7.7:80/TCP -> 198.18.1.2:8080, 198.18.2.2:8080",
            ],
        ),
        (
            "ITP Local with a node port: the node port from inside the node uses every endpoint",
            base(json!({"type": "NodePort", "internalTrafficPolicy": "Local", "ports": [{"port": 80, "nodePort": 30080}]})),
            json!([local("198.18.1.2"), remote("198.18.2.2")]),
            vec![
                "NodePort 127.0.0.1:30080/TCP -> 198.18.1.2:8080, 198.18.2.2:8080",
                "ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080",
                "NodePort 198.18.9.1:30080/TCP -> 198.18.1.2:8080, 198.18.2.2:8080",
            ],
        ),
        (
            "session affinity ClientIP defaults to 10800 s",
            base(json!({"sessionAffinity": "ClientIP"})),
            json!([local("198.18.1.2")]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080 [affinity 10800]"],
        ),
        (
            "session affinity with a timeout",
            base(json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}})),
            json!([local("198.18.1.2")]),
            vec!["ClusterIp 198.18.0.10:80/TCP -> 198.18.1.2:8080 [affinity 60]"],
        ),
    ];
    for (name, svc, endpoints, want) in cases {
        let t = run_on(&node, svc, endpoints);
        assert_eq!(render_full(&t), want, "case {name:?}");
        assert!(t.warnings.is_empty(), "case {name:?}: {:?}", t.warnings);
    }
}

/// Frontends for traffic from outside (XDP), per externalTrafficPolicy:
/// Local keeps this node's endpoints (drop when there are none here),
/// Cluster uses all of them, marking the local ones (no SNAT for those).
#[test]
fn external_frontends_follow_the_external_traffic_policy() {
    let node = node_n1();
    let lb = |extra: Value| {
        let mut spec = json!({"type": "LoadBalancer", "clusterIP": "198.18.0.10",
            "ports": [{"port": 80, "nodePort": 30080}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let mut svc = web(spec);
        svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "198.19.5.5"}]}});
        svc
    };
    let local = |a: &str| ep(a, "n1", true, false, &[]);
    let remote = |a: &str| ep(a, "n2", true, false, &[]);
    let cases: Vec<(&str, Value, Value, Vec<&str>)> = vec![
        (
            "Cluster: every endpoint, local ones marked; no loopback frontend",
            lb(json!({})),
            json!([local("198.18.1.2"), remote("198.18.2.2")]),
            vec![
                "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.2:8080 (l), 198.18.2.2:8080",
                "LoadBalancer 198.19.5.5:80/TCP (external) -> 198.18.1.2:8080 (l), 198.18.2.2:8080",
            ],
        ),
        (
            "Local: only this node's endpoints (others kept for established flows)",
            lb(json!({"externalTrafficPolicy": "Local"})),
            json!([local("198.18.1.2"), remote("198.18.2.2")]),
            vec![
                "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.2:8080 (l) [draining 198.18.2.2:8080]",
                "LoadBalancer 198.19.5.5:80/TCP (external) -> 198.18.1.2:8080 (l) [draining 198.18.2.2:8080]",
            ],
        ),
        (
            "Local without local endpoints drops",
            lb(json!({"externalTrafficPolicy": "Local"})),
            json!([remote("198.18.2.2")]),
            vec![
                "NodePort 198.18.9.1:30080/TCP (external) ->  [drop] [draining 198.18.2.2:8080]",
                "LoadBalancer 198.19.5.5:80/TCP (external) ->  [drop] [draining 198.18.2.2:8080]",
            ],
        ),
        (
            "Local with only terminating local endpoints uses them",
            lb(json!({"externalTrafficPolicy": "Local"})),
            json!([ep("198.18.1.2", "n1", false, true, &[]), remote("198.18.2.2")]),
            vec![
                "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.2:8080 (t) (l) [draining 198.18.2.2:8080]",
                "LoadBalancer 198.19.5.5:80/TCP (external) -> 198.18.1.2:8080 (t) (l) [draining 198.18.2.2:8080]",
            ],
        ),
        (
            "no endpoints at all refuses",
            lb(json!({"externalTrafficPolicy": "Local"})),
            json!([]),
            vec![
                "NodePort 198.18.9.1:30080/TCP (external) -> ",
                "LoadBalancer 198.19.5.5:80/TCP (external) -> ",
            ],
        ),
        (
            "source ranges apply to the load-balancer IP only, host bits cleared",
            lb(json!({"loadBalancerSourceRanges": ["198.18.7.3/16", " 198.19.128.0/24 ", "fd00::/8"]})),
            json!([remote("198.18.2.2")]),
            vec![
                "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.2.2:8080",
                "LoadBalancer 198.19.5.5:80/TCP (external) -> 198.18.2.2:8080 [from 198.18.0.0/16 198.19.128.0/24]",
            ],
        ),
        (
            "affinity carries over",
            lb(json!({"sessionAffinity": "ClientIP"})),
            json!([remote("198.18.2.2")]),
            vec![
                "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.2.2:8080 [affinity 10800]",
                "LoadBalancer 198.19.5.5:80/TCP (external) -> 198.18.2.2:8080 [affinity 10800]",
            ],
        ),
    ];
    for (name, svc, endpoints, want) in cases {
        let t = run_on(&node, svc, endpoints);
        assert_eq!(render_scope(&t, Scope::External), want, "case {name:?}");
        assert!(t.warnings.is_empty(), "case {name:?}: {:?}", t.warnings);
    }
    // A bad range is skipped with a warning naming the service.
    let t = run_on(
        &node,
        lb(json!({"loadBalancerSourceRanges": ["198.18.0.0/15", "not-a-cidr"]})),
        json!([remote("198.18.2.2")]),
    );
    assert!(render_scope(&t, Scope::External)[1].ends_with("[from 198.18.0.0/15]"));
    assert!(warnings(&t)[0].contains("demo/web") && warnings(&t)[0].contains("not-a-cidr"));
}

/// Graceful termination: a rolling update, step by step. External
/// frontends keep every endpoint that still serves for established flows
/// ("draining"); new flows use the ready ones (else the serving and
/// terminating ones). An endpoint leaves once it stops serving or is gone.
/// TCP socket frontends need no draining set (a connected socket is on its
/// backend); UDP ones have one, see the next test.
#[test]
fn external_flows_keep_serving_terminating_endpoints() {
    let node = node_n1();
    let np = |extra: Value| {
        let mut spec = json!({"type": "NodePort", "clusterIP": "198.18.0.10",
            "ports": [{"port": 80, "nodePort": 30080}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        web(spec)
    };
    let ready = |a: &str, n: &str| ep(a, n, true, false, &[]);
    let terminating = |a: &str, n: &str| ep(a, n, false, true, &[]);
    let gone = |a: &str, n: &str| {
        let mut e = ep(a, n, false, true, &[]);
        e["conditions"]["serving"] = json!(false);
        e
    };
    let cases: Vec<(&str, Value, Value, &str)> = vec![
        (
            "before: two ready endpoints, nothing draining",
            np(json!({})),
            json!([ready("198.18.1.2", "n1"), ready("198.18.2.2", "n2")]),
            "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.2:8080 (l), 198.18.2.2:8080",
        ),
        (
            "all terminating, none ready: they serve new flows too",
            np(json!({})),
            json!([terminating("198.18.1.2", "n1"), terminating("198.18.2.2", "n2")]),
            "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.2:8080 (t) (l), 198.18.2.2:8080 (t)",
        ),
        (
            "new ones ready: old ones drain",
            np(json!({})),
            json!([terminating("198.18.1.2", "n1"), terminating("198.18.2.2", "n2"),
                   ready("198.18.1.3", "n1"), ready("198.18.2.3", "n2")]),
            "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.3:8080 (l), 198.18.2.3:8080 [draining 198.18.1.2:8080, 198.18.2.2:8080]",
        ),
        (
            "one stops serving: it no longer drains",
            np(json!({})),
            json!([gone("198.18.1.2", "n1"), terminating("198.18.2.2", "n2"),
                   ready("198.18.1.3", "n1"), ready("198.18.2.3", "n2")]),
            "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.3:8080 (l), 198.18.2.3:8080 [draining 198.18.2.2:8080]",
        ),
        (
            "old ones deleted: nothing draining",
            np(json!({})),
            json!([ready("198.18.1.3", "n1"), ready("198.18.2.3", "n2")]),
            "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.3:8080 (l), 198.18.2.3:8080",
        ),
        (
            "Local policy: remote endpoints still serving are kept for flows made under Cluster",
            np(json!({"externalTrafficPolicy": "Local"})),
            json!([ready("198.18.1.2", "n1"), ready("198.18.2.2", "n2"), terminating("198.18.1.4", "n1")]),
            "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.2:8080 (l) [draining 198.18.1.4:8080, 198.18.2.2:8080]",
        ),
        (
            "topology: endpoints of other zones are kept for existing flows",
            np(json!({})),
            json!([ep("198.18.1.2", "n1", true, false, &["zone-a"]), ep("198.18.2.2", "n2", true, false, &["zone-b"])]),
            "NodePort 198.18.9.1:30080/TCP (external) -> 198.18.1.2:8080 (l) [draining 198.18.2.2:8080]",
        ),
    ];
    for (name, svc, endpoints, want) in cases {
        let t = run_on(&node, svc, endpoints);
        let external = render_scope(&t, Scope::External);
        assert_eq!(external, vec![want], "case {name:?}");
        assert!(
            t.frontends
                .iter()
                .filter(|f| f.key.scope == Scope::Socket)
                .all(|f| f.draining.is_empty()),
            "case {name:?}: TCP socket frontends drain nothing"
        );
    }
}

/// A UDP socket connected through a ClusterIP to an endpoint that turns
/// terminating but still serves keeps it (kube-proxy keeps UDP conntrack to
/// serving endpoints): the draining set tells the dataplane not to destroy
/// it. Once the endpoint stops serving, it is no longer listed.
#[test]
fn udp_socket_frontends_drain_serving_endpoints() {
    let svc = web(json!({"clusterIP": "198.18.0.10",
        "ports": [{"port": 53, "protocol": "UDP"}]}));
    let endpoints = |serving: bool| {
        let mut old = ep("198.18.1.2", "n1", false, true, &[]);
        old["conditions"]["serving"] = json!(serving);
        json!([old, ep("198.18.1.3", "n1", true, false, &[])])
    };
    let draining = |serving: bool| {
        let slices = [self::slice(web_slice(
            "a",
            json!([{"port": 5353, "protocol": "UDP"}]),
            endpoints(serving),
        ))];
        let refs: Vec<&EndpointSlice> = slices.iter().collect();
        let t = translate(&service(svc.clone()), &refs, &node_n1());
        let f = t
            .frontends
            .iter()
            .find(|f| f.key.scope == Scope::Socket)
            .unwrap();
        let addrs: Vec<String> = f.draining.iter().map(|b| b.addr.to_string()).collect();
        (f.backends.len(), addrs)
    };
    assert_eq!(draining(true), (1, vec!["198.18.1.2".to_string()]));
    assert_eq!(draining(false), (1, vec![]));
}

#[test]
fn invalid_affinity_timeout_warns_and_uses_the_default() {
    let svc = web(
        json!({"clusterIP": "198.18.0.10", "ports": [{"port": 80}], "sessionAffinity": "ClientIP",
                         "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
    );
    let t = run_on(&node_n1(), svc, json!([]));
    assert_eq!(t.frontends[0].affinity_timeout, Some(10_800));
    assert!(warnings(&t)[0].contains("demo/web") && warnings(&t)[0].contains("timeoutSeconds"));
}

#[test]
fn node_context_from_node_object() {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        "status": {"addresses": [
            {"type": "InternalIP", "address": "198.18.9.1"},
            {"type": "Hostname", "address": "n1"},
            {"type": "ExternalIP", "address": "fd00:9::1"},
        ]},
    }))
    .unwrap();
    assert_eq!(NodeContext::from_node("n1", Some(&node)), node_n1());
    assert_eq!(
        NodeContext::from_node("n1", None),
        NodeContext {
            name: "n1".into(),
            ..Default::default()
        }
    );
}

#[test]
fn node_eligibility() {
    use k8s_openapi::api::core::v1::{NodeSpec, Taint};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    let node = |deleting: bool, taints: &[&str]| Node {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some("n1".into()),
            deletion_timestamp: deleting.then(|| Time(Default::default())),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(
                taints
                    .iter()
                    .map(|k| Taint {
                        key: k.to_string(),
                        effect: "NoSchedule".into(),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(node_eligible(&Node::default()));
    assert!(node_eligible(&node(false, &[])));
    assert!(node_eligible(&node(
        false,
        &["node.kubernetes.io/unschedulable"]
    )));
    assert!(!node_eligible(&node(true, &[])));
    assert!(!node_eligible(&node(false, &[TO_BE_DELETED_TAINT])));
    assert!(!node_eligible(&node(true, &[TO_BE_DELETED_TAINT])));
}

#[test]
fn trigger_time_annotation() {
    use std::time::{Duration, UNIX_EPOCH};
    let slice = |value: Option<&str>| {
        let mut s = EndpointSlice::default();
        s.metadata.annotations =
            value.map(|v| [(LAST_CHANGE_TRIGGER_TIME.to_owned(), v.to_owned())].into());
        s
    };
    assert_eq!(
        last_change_trigger_time(&slice(Some("2024-02-29T12:34:56.5Z"))),
        Some(UNIX_EPOCH + Duration::from_millis(1_709_210_096_500))
    );
    assert_eq!(
        last_change_trigger_time(&slice(Some("2024-02-29T13:34:56+01:00"))),
        Some(UNIX_EPOCH + Duration::from_secs(1_709_210_096))
    );
    assert_eq!(last_change_trigger_time(&slice(Some("yesterday"))), None);
    assert_eq!(last_change_trigger_time(&slice(None)), None);
}

/// Slice details kube-proxy reads in a particular way.
#[test]
fn slice_ports_duplicates_and_families_as_kube_proxy() {
    let node = node_n1();
    let run_slices = |svc: Value, slices: Vec<Value>| {
        let svc = service(svc);
        let slices: Vec<EndpointSlice> = slices.into_iter().map(slice).collect();
        let refs: Vec<&EndpointSlice> = slices.iter().collect();
        translate(&svc, &refs, &node)
    };
    // An unnamed slice port matches only an unnamed service port.
    let t = run_slices(
        web(json!({"clusterIP": "198.18.0.10", "ports": [{"name": "http", "port": 80}]})),
        vec![web_slice(
            "a",
            json!([{"port": 8080}]),
            ready(&["198.19.0.1"]),
        )],
    );
    assert_eq!(render(&t), ["198.18.0.10:80/TCP -> "]);
    let t = run_slices(
        web(json!({"clusterIP": "198.18.0.10", "ports": [{"port": 80}]})),
        vec![web_slice(
            "a",
            json!([{"name": "http", "port": 8080}]),
            ready(&["198.19.0.1"]),
        )],
    );
    assert_eq!(render(&t), ["198.18.0.10:80/TCP -> "]);

    // The same endpoint in two slices is local if either says so, in any order.
    let svc = json!({"metadata": {"name": "web", "namespace": "demo"},
        "spec": {"clusterIP": "198.18.0.10", "externalTrafficPolicy": "Local", "type": "NodePort",
                 "ports": [{"port": 80, "nodePort": 30080}]}});
    let remote = web_slice(
        "a",
        json!([{"port": 8080}]),
        json!([ep("198.19.0.1", "n2", true, false, &[])]),
    );
    let local = web_slice(
        "b",
        json!([{"port": 8080}]),
        json!([ep("198.19.0.1", "n1", true, false, &[])]),
    );
    for slices in [vec![remote.clone(), local.clone()], vec![local, remote]] {
        let t = run_slices(svc.clone(), slices);
        assert_eq!(
            render_scope(&t, Scope::External),
            ["NodePort 198.18.9.1:30080/TCP (external) -> 198.19.0.1:8080 (l)"]
        );
    }

    // externalIPs and load-balancer IPs of a family the Service lacks are
    // ignored with a warning naming the Service, not given frontends.
    let t = run_slices(
        json!({"metadata": {"name": "web", "namespace": "demo"},
               "spec": {"type": "LoadBalancer", "clusterIP": "198.18.0.10", "externalIPs": ["198.19.7.7", "fd00:7::7"],
                        "ports": [{"port": 80, "nodePort": 30080}]},
               "status": {"loadBalancer": {"ingress": [{"ip": "fd00:8::8"}]}}}),
        vec![web_slice(
            "a",
            json!([{"port": 8080}]),
            ready(&["198.19.0.1"]),
        )],
    );
    assert!(
        t.frontends.iter().all(|f| f.key.addr.is_ipv4()),
        "{:?}",
        render_full(&t)
    );
    assert!(render_full(&t)
        .iter()
        .any(|l| l.starts_with("ExternalIp 198.19.7.7:80")));
    let w = warnings(&t);
    assert_eq!(w.len(), 2, "{w:#?}");
    assert!(
        w.iter()
            .all(|w| w.contains("demo/web") && w.contains("IPv6")),
        "{w:#?}"
    );
}
