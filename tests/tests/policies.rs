//! kube-proxy Service semantics beyond plain ClusterIP, end to end through
//! the real agent and socket programs: traffic policies, session affinity,
//! topology hints, and NodePort / externalIP / load-balancer addresses
//! reached from a pod on the node.
//!
//! One simulated node n1; endpoints name their node in the slice, so an
//! endpoint "on n2" is remote as far as svclb is concerned.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use svclb_tests::manifests::to_yaml;
use svclb_tests::{
    by_error, by_server, dropped_errno, kernel_at_least, poll_until, refused_errno, Agent, Cluster,
    Connect, EndpointSpec, Node, Pod, PortSpec, ProbeResult, ServiceSpec, SliceSpec,
};

const SVC: &str = "198.19.0.20";
const DEADLINE: Duration = Duration::from_secs(1);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

struct Env {
    cluster: Cluster,
    node: Node,
    clients: Vec<Pod>,
    backends: Vec<Pod>,
}

fn setup(label: &str, clients: usize, backends: usize) -> Result<Env> {
    let cluster = Cluster::new(label)?;
    let node = cluster.add_node("n1")?;
    let clients = (1..=clients)
        .map(|i| node.add_pod(&format!("c{i}")))
        .collect::<Result<_>>()?;
    let mut pods = Vec::new();
    for i in 1..=backends {
        let pod = node.add_pod(&format!("b{i}"))?;
        pod.spawn_server(&format!("b{i}"), &[8080])?;
        pods.push(pod);
    }
    Ok(Env {
        cluster,
        node,
        clients,
        backends: pods,
    })
}

impl Env {
    /// A Service "web" on SVC:80 with extra spec fields and an optional status.
    fn service(&self, extra: Value, status: Option<Value>) -> Result<()> {
        let mut svc = ServiceSpec::new("web", &[ip(SVC)], vec![PortSpec::tcp("http", 80)]);
        svc.extra_spec = Some(extra);
        let mut v = svc.to_json();
        if let Some(status) = status {
            v["status"] = status;
        }
        self.cluster
            .manifests()
            .write(&svc.file_name(), &to_yaml(&v))
    }

    /// The slice of "web": backend i (1-based) on node `nodes[i]`, with
    /// optional zone hints.
    fn slice(&self, endpoints: &[(usize, &str, Option<&str>)]) -> Result<()> {
        let eps = endpoints
            .iter()
            .map(|&(i, node, _)| EndpointSpec {
                node_name: Some(node.to_string()),
                ..EndpointSpec::ready(self.backends[i - 1].ipv4().into())
            })
            .collect();
        let slice = SliceSpec::new("web-1", "web", vec![PortSpec::tcp("http", 8080)], eps);
        let mut v = slice.to_json();
        for (e, &(_, _, zone)) in v["endpoints"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .zip(endpoints)
        {
            if let Some(zone) = zone {
                e["hints"] = json!({"forZones": [{"name": zone}]});
            }
        }
        self.cluster
            .manifests()
            .write(&slice.file_name(), &to_yaml(&v))
    }

    /// This node's Node object: zone label and its bridge addresses as InternalIPs.
    fn node_object(&self, zone: &str) -> Result<()> {
        self.node
            .write_node_object(&[("topology.kubernetes.io/zone", zone)])
            .map(drop)
    }

    fn start(&self) -> Result<Agent> {
        self.node.start_agent(self.cluster.manifests().dir())
    }

    fn connect(
        &self,
        client: usize,
        addr: &str,
        port: u16,
        count: u32,
    ) -> Result<Vec<ProbeResult>> {
        let c = Connect::tcp(ip(addr), port).count(count).timeout_ms(500);
        self.clients[client].connect(&self.node, &c)
    }

    /// Poll until a batch satisfies `done` (the agent applies changes
    /// asynchronously); fail with the last batch otherwise.
    fn converge(
        &self,
        what: &str,
        addr: &str,
        port: u16,
        done: impl Fn(&[ProbeResult]) -> bool,
    ) -> Result<Vec<ProbeResult>> {
        let mut last = Vec::new();
        let seen = poll_until(DEADLINE, || {
            last = self.connect(0, addr, port, 20)?;
            Ok(done(&last).then_some(()))
        })?;
        if seen.is_none() {
            let log = self.node.agent().map(|a| a.log()).unwrap_or_default();
            bail!(
                "{what}: ok {:?} errors {:?}\n{log}",
                by_server(&last),
                by_error(&last)
            );
        }
        Ok(last)
    }
}

fn servers(results: &[ProbeResult]) -> BTreeSet<String> {
    by_server(results).into_keys().collect()
}

fn all_ok(results: &[ProbeResult]) -> bool {
    results.iter().all(|r| r.ok)
}

fn all_failed_with(results: &[ProbeResult], errno: &str) -> bool {
    results
        .iter()
        .all(|r| !r.ok && r.error.as_deref() == Some(errno))
}

#[test]
fn internal_traffic_policy_local_uses_this_nodes_endpoints_and_drops_without_them() -> Result<()> {
    let env = setup("itp", 1, 2)?;
    env.service(json!({"internalTrafficPolicy": "Local"}), None)?;
    env.slice(&[(1, "n1", None), (2, "n2", None)])?;
    let _agent = env.start()?;
    let r = env.connect(0, SVC, 80, 60)?;
    assert!(all_ok(&r), "{:?}", by_error(&r));
    assert_eq!(
        servers(&r),
        BTreeSet::from(["b1".to_string()]),
        "only the local endpoint"
    );

    // Endpoints only elsewhere: kube-proxy drops (the client times out);
    // svclb fails the connect at once with ETIMEDOUT (EPERM before 5.18).
    env.slice(&[(2, "n2", None)])?;
    env.converge("ITP Local, no local endpoint", SVC, 80, |r| {
        all_failed_with(r, dropped_errno())
    })?;

    // No endpoints at all: refused, as for any service.
    env.slice(&[])?;
    env.converge("no endpoints", SVC, 80, |r| {
        all_failed_with(r, refused_errno())
    })?;
    Ok(())
}

#[test]
fn session_affinity_keeps_each_client_on_one_backend_and_can_be_switched() -> Result<()> {
    let env = setup("aff", 2, 3)?;
    env.service(json!({"sessionAffinity": "ClientIP"}), None)?;
    env.slice(&[(1, "n1", None), (2, "n1", None), (3, "n1", None)])?;
    let _agent = env.start()?;
    for client in 0..2 {
        let r = env.connect(client, SVC, 80, 40)?;
        assert!(all_ok(&r), "{:?}", by_error(&r));
        assert_eq!(
            servers(&r).len(),
            1,
            "client {client} stuck to one backend: {:?}",
            by_server(&r)
        );
    }

    // Affinity off at runtime: connections spread again.
    env.service(json!({}), None)?;
    env.converge("affinity off", SVC, 80, |r| {
        all_ok(r) && servers(r).len() > 1
    })?;

    // On again with a 1 s timeout: within it a client sticks; after it the
    // choice is made afresh (over 8 expiries, more than one backend shows up
    // unless chance picked the same one 8 times in a row: p = 3^-7).
    env.service(json!({"sessionAffinity": "ClientIP", "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 1}}}), None)?;
    env.converge("affinity on", SVC, 80, |r| {
        all_ok(r) && servers(r).len() == 1
    })?;
    let mut seen = BTreeSet::new();
    for _ in 0..8 {
        thread::sleep(Duration::from_millis(1300));
        let r = env.connect(0, SVC, 80, 5)?;
        assert!(
            all_ok(&r) && servers(&r).len() == 1,
            "sticks within the timeout: {:?}",
            by_server(&r)
        );
        seen.extend(servers(&r));
    }
    assert!(
        seen.len() > 1,
        "a new backend is chosen after the timeout: {seen:?}"
    );
    Ok(())
}

#[test]
fn topology_hints_keep_traffic_in_this_zone() -> Result<()> {
    let env = setup("topo", 1, 2)?;
    env.node_object("zone-a")?;
    env.service(json!({"trafficDistribution": "PreferClose"}), None)?;
    env.slice(&[(1, "n1", Some("zone-a")), (2, "n2", Some("zone-b"))])?;
    let _agent = env.start()?;
    let r = env.connect(0, SVC, 80, 60)?;
    assert!(all_ok(&r), "{:?}", by_error(&r));
    assert_eq!(
        servers(&r),
        BTreeSet::from(["b1".to_string()]),
        "only the zone-a endpoint"
    );

    // An endpoint without hints: kube-proxy ignores hints, all are used.
    env.slice(&[(1, "n1", Some("zone-a")), (2, "n2", None)])?;
    env.converge("hints ignored", SVC, 80, |r| {
        all_ok(r) && servers(r).len() == 2
    })?;
    Ok(())
}

#[test]
fn node_port_external_ip_and_load_balancer_ip_from_a_pod_on_the_node() -> Result<()> {
    let env = setup("ext", 1, 2)?;
    env.node_object("zone-a")?;
    let node_ip = env.node.bridge_ipv4().to_string();
    env.service(
        json!({"type": "LoadBalancer", "externalIPs": ["198.19.7.7"],
               "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}]}),
        Some(json!({"loadBalancer": {"ingress": [{"ip": "198.19.8.8"}, {"ip": "198.19.9.9", "ipMode": "Proxy"}]}})),
    )?;
    env.slice(&[(1, "n1", None), (2, "n2", None)])?;
    let _agent = env.start()?;
    let both = BTreeSet::from(["b1".to_string(), "b2".to_string()]);
    for (what, addr, port) in [
        ("NodePort on the node's address", node_ip.as_str(), 30080),
        ("externalIP", "198.19.7.7", 80),
        ("load balancer IP", "198.19.8.8", 80),
        ("cluster IP", SVC, 80),
    ] {
        let r = env.connect(0, addr, port, 60)?;
        assert!(all_ok(&r), "{what}: {:?}", by_error(&r));
        assert_eq!(servers(&r), both, "{what}: spread over both endpoints");
    }
    // Loopback node ports are the host's (as kube-proxy's
    // route_localnet rules): translated for the node's own processes, while
    // a pod's localhost stays its own (kernels with SO_NETNS_COOKIE, 5.14+;
    // before, the pod's is translated too).
    let c = Connect::tcp(ip("127.0.0.1"), 30080)
        .count(60)
        .timeout_ms(500);
    let r = env.node.connect(&c)?;
    assert!(all_ok(&r), "loopback from the node: {:?}", by_error(&r));
    assert_eq!(
        servers(&r),
        both,
        "loopback from the node: spread over both endpoints"
    );
    let r = env.connect(0, "127.0.0.1", 30080, 3)?;
    if kernel_at_least(5, 14) {
        assert!(
            r.iter().all(|r| !r.ok),
            "a pod's own 127.0.0.1 is not translated: {:?}",
            by_server(&r)
        );
    } else {
        assert_eq!(
            servers(&r),
            both,
            "before 5.14 a pod's loopback is translated too"
        );
    }
    // ipMode Proxy: the load balancer delivers to the node, so svclb leaves
    // that address alone (and nothing in the test network answers it).
    let r = env.connect(0, "198.19.9.9", 80, 3)?;
    assert!(
        r.iter().all(|r| !r.ok),
        "ipMode Proxy is not translated: {:?}",
        by_server(&r)
    );
    Ok(())
}
