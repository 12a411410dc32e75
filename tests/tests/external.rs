//! Traffic from outside the cluster, through XDP and tc on the nodes'
//! external devices: two attached nodes, an external client on the fabric,
//! NodePort / LoadBalancer / ExternalIP services with both traffic policies.
//!
//! Backends report the client address they saw, so source-IP preservation
//! (and SNAT for remote backends) is observable.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use svclb_tests::manifests::to_yaml;
use svclb_tests::{
    by_error, by_server, dropped_errno, kernel_at_least, poll_until, Cluster, Connect,
    EndpointSpec, ExternalClient, Hold, HttpResult, Node, Pod, PortSpec, ProbeResult, Proto,
    ServiceSpec, SliceSpec, EXT_IF,
};

const CLUSTER_IP: &str = "198.19.0.30";
const LB_IP: &str = "198.19.5.5";
const EXTERNAL_IP: &str = "198.19.6.6";
const NODE_PORT: u16 = 30080;
const DEADLINE: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

/// Two nodes with one backend pod each (b1 on n1, b2 on n2), an external
/// client, agents with XDP on ext0.
struct Env {
    cluster: Cluster,
    nodes: Vec<Node>,
    backends: Vec<Pod>,
    client: ExternalClient,
}

/// None (the test is skipped, with a message) on kernels older than svclb
/// supports (see the README's kernel table).
fn setup(label: &str) -> Result<Option<Env>> {
    if !kernel_at_least(5, 10) {
        eprintln!("skipped: svclb needs Linux 5.10+");
        return Ok(None);
    }
    let cluster = Cluster::new(label)?;
    let mut nodes = Vec::new();
    let mut backends = Vec::new();
    for n in 1..=2 {
        let node = cluster.add_node(&format!("n{n}"))?;
        node.attach_external()?;
        let pod = node.add_pod(&format!("b{n}"))?;
        pod.spawn_server(&format!("b{n}"), &[8080])?;
        node.write_node_object(&[])?;
        nodes.push(node);
        backends.push(pod);
    }
    let client = cluster.add_external_client("x1")?;
    Ok(Some(Env {
        cluster,
        nodes,
        backends,
        client,
    }))
}

impl Env {
    /// Service "web": type LoadBalancer (so also NodePort 30080), with an
    /// external IP and a load-balancer IP, TCP and UDP on port 80.
    fn service(&self, extra: Value) -> Result<()> {
        let mut svc = ServiceSpec::new("web", &[ip(CLUSTER_IP)], Vec::new());
        let mut spec = json!({
            "type": "LoadBalancer",
            "externalIPs": [EXTERNAL_IP],
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": NODE_PORT},
                {"name": "dns", "port": 80, "protocol": "UDP", "targetPort": 8080, "nodePort": NODE_PORT},
            ],
        });
        for (k, v) in extra.as_object().expect("object") {
            spec[k] = v.clone();
        }
        svc.extra_spec = Some(spec);
        let mut v = svc.to_json();
        v["status"] = json!({"loadBalancer": {"ingress": [{"ip": LB_IP}]}});
        self.cluster
            .manifests()
            .write(&svc.file_name(), &to_yaml(&v))
    }

    /// The slice of "web": the given backends (0-based), each on its node.
    fn slice(&self, backends: &[usize]) -> Result<()> {
        let eps = backends
            .iter()
            .map(|&i| EndpointSpec {
                node_name: Some(self.nodes[i].name().to_string()),
                ..EndpointSpec::ready(self.backends[i].ipv4().into())
            })
            .collect();
        let ports = vec![
            PortSpec::tcp("http", 8080),
            PortSpec::new("dns", 8080, Proto::Udp),
        ];
        let slice = SliceSpec::new("web-1", "web", ports, eps);
        self.cluster.manifests().write_slice(&slice).map(drop)
    }

    fn start_agents(&self) -> Result<()> {
        for node in &self.nodes {
            node.start_agent_with_devices(self.cluster.manifests().dir(), &[EXT_IF])?;
        }
        Ok(())
    }

    fn connect(&self, c: &Connect) -> Result<Vec<ProbeResult>> {
        self.client.connect(c)
    }

    /// Poll until a batch satisfies `done`; fail with the last batch and
    /// the agents' logs otherwise.
    fn converge(
        &self,
        what: &str,
        c: &Connect,
        done: impl Fn(&[ProbeResult]) -> bool,
    ) -> Result<Vec<ProbeResult>> {
        let mut last = Vec::new();
        let seen = poll_until(DEADLINE, || {
            last = self.connect(c)?;
            Ok(done(&last).then_some(()))
        })?;
        if seen.is_none() {
            let logs: Vec<String> = self
                .nodes
                .iter()
                .filter_map(|n| n.agent().map(|a| a.log()))
                .collect();
            bail!(
                "{what}: ok {:?} errors {:?}\nclients seen {:?}\n{}",
                by_server(&last),
                by_error(&last),
                clients_seen(&last),
                logs.join("\n---\n")
            );
        }
        Ok(last)
    }
}

/// Backend name -> the client addresses (without port) it saw.
fn clients_seen(results: &[ProbeResult]) -> BTreeMap<String, BTreeSet<String>> {
    let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in results.iter().filter(|r| r.ok) {
        let client = r.client.clone().unwrap_or_default();
        let host = client.rsplit_once(':').map_or(client.clone(), |(h, _)| {
            h.trim_matches(['[', ']']).to_string()
        });
        m.entry(r.server.clone().unwrap_or_default())
            .or_default()
            .insert(host);
    }
    m
}

fn all_ok(r: &[ProbeResult]) -> bool {
    !r.is_empty() && r.iter().all(|r| r.ok)
}

/// externalTrafficPolicy Cluster: a node balances over both backends; the
/// local one sees the client's address, the remote one the node's (SNAT),
/// and replies come back from the address the client connected to.
#[test]
fn cluster_policy_reaches_remote_backends_through_snat() -> Result<()> {
    let Some(env) = setup("extcl")? else {
        return Ok(());
    };
    env.service(json!({}))?;
    env.slice(&[0, 1])?;
    env.start_agents()?;
    let n1 = &env.nodes[0];
    let c = Connect::tcp(n1.ext_ipv4(), NODE_PORT)
        .count(40)
        .timeout_ms(1000);
    let r = env.converge("NodePort on n1 reaches b1 and b2", &c, |r| {
        all_ok(r) && by_server(r).len() == 2
    })?;
    let seen = clients_seen(&r);
    assert_eq!(
        seen["b1"],
        BTreeSet::from([env.client.ipv4().to_string()]),
        "the local backend sees the client"
    );
    assert_eq!(
        seen["b2"],
        BTreeSet::from([n1.ext_ipv4().to_string()]),
        "the remote backend sees n1 (SNAT)"
    );
    for p in &r {
        assert_eq!(
            p.peer.as_deref(),
            Some(format!("{}:{NODE_PORT}", n1.ext_ipv4()).as_str()),
            "replies come from the NodePort"
        );
    }
    // UDP through the same path.
    let u = Connect::udp(n1.ext_ipv4(), NODE_PORT)
        .count(40)
        .timeout_ms(1000);
    env.converge("UDP NodePort on n1 reaches b1 and b2", &u, |r| {
        all_ok(r) && by_server(r).len() == 2
    })?;
    // `svclb maps dump` shows the external frontend, which backend is
    // local, and the tracked flows.
    let dump = n1.dump_json()?;
    let external: Vec<&Value> = dump["frontends"]
        .as_array()
        .context("frontends")?
        .iter()
        .filter(|f| f["scope"] == "external" && f["port"] == NODE_PORT && f["protocol"] == "TCP")
        .collect();
    assert_eq!(external.len(), 1, "{dump:#}");
    let local: BTreeMap<String, bool> = external[0]["backends"]
        .as_array()
        .context("backends")?
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap_or_default().to_string(),
                b["local"] == true,
            )
        })
        .collect();
    assert_eq!(
        local,
        BTreeMap::from([
            (env.backends[0].ipv4().to_string(), true),
            (env.backends[1].ipv4().to_string(), false)
        ])
    );
    assert!(
        dump["conntrack"]["entries"].as_u64() >= Some(80),
        "{dump:#}"
    );
    Ok(())
}

/// Established external connections survive an agent crash and restart:
/// conntrack, maps and program links are pinned.
#[test]
fn agent_restart_keeps_external_connections() -> Result<()> {
    let Some(env) = setup("extrs")? else {
        return Ok(());
    };
    env.service(json!({}))?;
    env.slice(&[0, 1])?;
    env.start_agents()?;
    let n1 = &env.nodes[0];
    let c = Connect::tcp(n1.ext_ipv4(), NODE_PORT).count(10);
    env.converge("n1 serves", &c, |r| all_ok(r) && by_server(r).len() == 2)?;
    let hold = env
        .client
        .spawn_hold(&Hold::new(IpAddr::V4(n1.ext_ipv4()), NODE_PORT, 120_000, 20).until_eof())?;
    std::thread::sleep(Duration::from_millis(300));
    n1.agent().context("agent")?.kill();
    std::thread::sleep(Duration::from_millis(300));
    n1.start_agent_with_devices(env.cluster.manifests().dir(), &[EXT_IF])?;
    std::thread::sleep(Duration::from_millis(300));
    n1.restart_agent()?;
    std::thread::sleep(Duration::from_millis(300));
    let s = hold.finish_hold()?;
    assert!(s.requests >= 20 && s.new_connections >= 20, "{s:?}");
    assert_eq!((s.failures, s.new_connection_failures), (0, 0), "{s:?}");
    Ok(())
}

/// externalTrafficPolicy Local: only this node's backend, with the client's
/// address; a node without a local endpoint drops.
#[test]
fn local_policy_keeps_the_client_address_and_drops_without_local_endpoints() -> Result<()> {
    let Some(env) = setup("extlo")? else {
        return Ok(());
    };
    env.service(json!({"externalTrafficPolicy": "Local"}))?;
    env.slice(&[0])?;
    env.start_agents()?;
    let (n1, n2) = (&env.nodes[0], &env.nodes[1]);
    let c = Connect::tcp(n1.ext_ipv4(), NODE_PORT)
        .count(20)
        .timeout_ms(1000);
    let r = env.converge("NodePort on n1 reaches b1", &c, all_ok)?;
    assert_eq!(by_server(&r).keys().collect::<Vec<_>>(), ["b1"]);
    assert_eq!(
        clients_seen(&r)["b1"],
        BTreeSet::from([env.client.ipv4().to_string()])
    );
    // n2 has no local endpoint: dropped, so the client times out.
    let c2 = Connect::tcp(n2.ext_ipv4(), NODE_PORT)
        .count(2)
        .timeout_ms(500);
    let r2 = env.connect(&c2)?;
    assert!(
        r2.iter()
            .all(|r| !r.ok && r.error.as_deref() == Some("ETIMEDOUT")),
        "n2 drops: {:?} (dropped_errno for socket hooks is {})",
        by_error(&r2),
        dropped_errno()
    );
    Ok(())
}

/// LoadBalancer and external IPs routed to a node reach the service too.
#[test]
fn load_balancer_and_external_ips_from_outside() -> Result<()> {
    let Some(env) = setup("extlb")? else {
        return Ok(());
    };
    env.service(json!({}))?;
    env.slice(&[0, 1])?;
    env.start_agents()?;
    let n2 = &env.nodes[1];
    env.client.route_via(&format!("{LB_IP}/32"), n2)?;
    env.client.route_via(&format!("{EXTERNAL_IP}/32"), n2)?;
    for addr in [LB_IP, EXTERNAL_IP] {
        let c = Connect::tcp(ip(addr), 80).count(40).timeout_ms(1000);
        let r = env.converge(&format!("{addr} via n2"), &c, |r| {
            all_ok(r) && by_server(r).len() == 2
        })?;
        for p in &r {
            assert_eq!(p.peer.as_deref(), Some(format!("{addr}:80").as_str()));
        }
    }
    Ok(())
}

/// Both nodes pick the same backend for the same client address and UDP port
/// (Maglev over the same backend set), whichever node address it reached.
#[test]
fn maglev_picks_the_same_backend_on_either_node() -> Result<()> {
    let Some(env) = setup("extmg")? else {
        return Ok(());
    };
    env.service(json!({}))?;
    env.slice(&[0, 1])?;
    env.start_agents()?;
    let (n1, n2) = (&env.nodes[0], &env.nodes[1]);
    let warm = Connect::tcp(n1.ext_ipv4(), NODE_PORT).count(4);
    env.converge("n1 serves", &warm, all_ok)?;
    let warm2 = Connect::tcp(n2.ext_ipv4(), NODE_PORT).count(4);
    env.converge("n2 serves", &warm2, all_ok)?;
    let mut chosen = BTreeSet::new();
    for port in 41000..41030u16 {
        let via = |node: &Node| -> Result<String> {
            let c = Connect::udp(node.ext_ipv4(), NODE_PORT)
                .source_port(port)
                .timeout_ms(1000);
            let r = env.connect(&c)?;
            r.first()
                .filter(|r| r.ok)
                .and_then(|r| r.server.clone())
                .with_context(|| format!("port {port} via {}: {r:?}", node.name()))
        };
        let (a, b) = (via(n1)?, via(n2)?);
        assert_eq!(a, b, "client port {port}: n1 chose {a}, n2 chose {b}");
        chosen.insert(a);
    }
    assert_eq!(chosen.len(), 2, "flows spread over both backends");
    Ok(())
}

/// A backend's ICMP port unreachable (UDP to a closed port) reaches the
/// client translated, so its connected socket sees ECONNREFUSED: from a
/// local backend through tc egress, from a remote one through XDP.
#[test]
fn icmp_errors_from_backends_are_translated_back() -> Result<()> {
    let Some(env) = setup("exticmp")? else {
        return Ok(());
    };
    // Dual stack; target port 9999: nothing listens there.
    let mut svc = ServiceSpec::new("closed", &[ip("198.19.0.31"), ip("fd00:5::31")], Vec::new());
    svc.extra_spec = Some(json!({
        "type": "NodePort",
        "ports": [{"name": "u", "port": 81, "protocol": "UDP", "targetPort": 9999, "nodePort": 30081}],
    }));
    env.cluster
        .manifests()
        .write(&svc.file_name(), &to_yaml(&svc.to_json()))?;
    let slices = |backend: usize| -> Result<()> {
        let node_name = Some(env.nodes[backend].name().to_string());
        let pod = &env.backends[backend];
        for (name, addr) in [
            ("closed-v4", IpAddr::V4(pod.ipv4())),
            ("closed-v6", IpAddr::V6(pod.ipv6())),
        ] {
            let eps = vec![EndpointSpec {
                node_name: node_name.clone(),
                ..EndpointSpec::ready(addr)
            }];
            let ports = vec![PortSpec::new("u", 9999, Proto::Udp)];
            let s = SliceSpec::new(name, "closed", ports, eps);
            env.cluster.manifests().write_slice(&s)?;
        }
        Ok(())
    };
    slices(0)?;
    env.start_agents()?;
    let n1 = &env.nodes[0];
    let refused = |r: &[ProbeResult]| {
        !r.is_empty() && r.iter().all(|r| r.error.as_deref() == Some("ECONNREFUSED"))
    };
    let families = [IpAddr::V4(n1.ext_ipv4()), IpAddr::V6(n1.ext_ipv6())];
    for addr in families {
        let c = Connect::udp(addr, 30081)
            .connected()
            .count(3)
            .timeout_ms(1000);
        env.converge(
            &format!("local backend's port unreachable via {addr}"),
            &c,
            refused,
        )?;
    }
    // Now the only backend is on n2: n1 SNATs, n2's pod answers n1.
    slices(1)?;
    for addr in families {
        let c = Connect::udp(addr, 30081)
            .connected()
            .count(3)
            .timeout_ms(1000);
        env.converge(
            &format!("remote backend's port unreachable via {addr}"),
            &c,
            refused,
        )?;
    }
    Ok(())
}

/// loadBalancerSourceRanges: only listed clients reach the load-balancer
/// IP; the node port stays open to everyone, as with kube-proxy.
#[test]
fn source_ranges_allow_listed_clients_only() -> Result<()> {
    let Some(env) = setup("extsr")? else {
        return Ok(());
    };
    let other = env.cluster.add_external_client("x2")?;
    let allowed = format!("{}/32", env.client.ipv4());
    env.service(json!({"loadBalancerSourceRanges": [allowed]}))?;
    env.slice(&[0, 1])?;
    env.start_agents()?;
    let n1 = &env.nodes[0];
    for c in [&env.client, &other] {
        c.route_via(&format!("{LB_IP}/32"), n1)?;
    }
    let lb = Connect::tcp(ip(LB_IP), 80).count(10).timeout_ms(1000);
    env.converge("listed client reaches the LB IP", &lb, all_ok)?;
    let denied = other.connect(&Connect::tcp(ip(LB_IP), 80).count(2).timeout_ms(500))?;
    assert!(
        denied
            .iter()
            .all(|r| r.error.as_deref() == Some("ETIMEDOUT")),
        "unlisted client is dropped: {:?}",
        by_error(&denied)
    );
    let np = other.connect(&Connect::tcp(n1.ext_ipv4(), NODE_PORT).count(5))?;
    assert!(all_ok(&np), "node port unaffected: {:?}", by_error(&np));
    // Dropping the restriction opens the LB IP to everyone.
    env.service(json!({}))?;
    let mut last = Vec::new();
    let opened = poll_until(DEADLINE, || {
        last = other.connect(&Connect::tcp(ip(LB_IP), 80).count(3).timeout_ms(500))?;
        Ok(all_ok(&last).then_some(()))
    })?;
    assert!(opened.is_some(), "still denied: {:?}", by_error(&last));
    Ok(())
}

/// The health check node port of a Local LoadBalancer service, asked from
/// outside as a cloud load balancer would: 200 on the node with a ready
/// local endpoint, 503 elsewhere and once the endpoint only terminates.
#[test]
fn health_check_node_port_from_outside() -> Result<()> {
    const HC_PORT: u16 = 32001;
    let Some(env) = setup("exthc")? else {
        return Ok(());
    };
    env.service(json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": HC_PORT}))?;
    env.slice(&[0])?;
    env.start_agents()?;
    let get = |node: &Node| -> Result<HttpResult> {
        let args = [
            "http-get".to_string(),
            "--addr".into(),
            node.ext_ipv4().to_string(),
            "--port".into(),
            HC_PORT.to_string(),
            "--timeout-ms".into(),
            "1000".into(),
        ];
        let mut lines = env.client.run_client_as::<HttpResult, _>(&args)?;
        lines.pop().context("no http-get result")
    };
    let expect = |node: &Node, status: u16, local: usize| -> Result<()> {
        let mut last = HttpResult::default();
        let seen = poll_until(DEADLINE, || {
            last = get(node)?;
            let body = last.body.as_deref().unwrap_or_default();
            Ok((last.status == Some(status)
                && body.contains(&format!("\"localEndpoints\": {local}")))
            .then_some(()))
        })?;
        if seen.is_none() {
            bail!(
                "{}: wanted {status} with {local} local endpoints, got {last:?}",
                node.name()
            );
        }
        Ok(())
    };
    expect(&env.nodes[0], 200, 1)?;
    expect(&env.nodes[1], 503, 0)?;
    // b1 terminating (still serving): no longer counted.
    let eps = vec![EndpointSpec {
        node_name: Some("n1".into()),
        ..EndpointSpec::terminating(env.backends[0].ipv4().into())
    }];
    let ports = vec![
        PortSpec::tcp("http", 8080),
        PortSpec::new("dns", 8080, Proto::Udp),
    ];
    env.cluster
        .manifests()
        .write_slice(&SliceSpec::new("web-1", "web", ports, eps))?;
    expect(&env.nodes[0], 503, 0)?;
    // Ready again: counted again.
    env.slice(&[0])?;
    expect(&env.nodes[0], 200, 1)?;
    Ok(())
}

/// A ClientIP affinity service keeps a client on one backend whatever its
/// source port; without affinity the ports spread.
#[test]
fn session_affinity_keeps_a_client_on_one_backend() -> Result<()> {
    let Some(env) = setup("extaf")? else {
        return Ok(());
    };
    env.service(json!({"sessionAffinity": "ClientIP"}))?;
    env.slice(&[0, 1])?;
    env.start_agents()?;
    let c = Connect::tcp(env.nodes[0].ext_ipv4(), NODE_PORT)
        .count(30)
        .timeout_ms(1000);
    let r = env.converge("affinity service answers", &c, all_ok)?;
    assert_eq!(
        by_server(&r).len(),
        1,
        "one backend for one client: {:?}",
        by_server(&r)
    );
    env.service(json!({}))?;
    env.converge("without affinity both backends serve", &c, |r| {
        all_ok(r) && by_server(r).len() == 2
    })?;
    Ok(())
}

/// IPv6 NodePort from outside, with SNAT to the node's IPv6 address.
#[test]
fn ipv6_node_port() -> Result<()> {
    let Some(env) = setup("ext6")? else {
        return Ok(());
    };
    let mut svc = ServiceSpec::new("web6", &[ip("fd00:5::30")], Vec::new());
    svc.extra_spec = Some(json!({
        "type": "NodePort",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30090}],
    }));
    env.cluster
        .manifests()
        .write(&svc.file_name(), &to_yaml(&svc.to_json()))?;
    let eps = (0..2)
        .map(|i| EndpointSpec {
            node_name: Some(env.nodes[i].name().to_string()),
            ..EndpointSpec::ready(env.backends[i].ipv6().into())
        })
        .collect();
    let slice = SliceSpec::new("web6-1", "web6", vec![PortSpec::tcp("http", 8080)], eps);
    env.cluster.manifests().write_slice(&slice)?;
    env.start_agents()?;
    let n1 = &env.nodes[0];
    let c = Connect::tcp(n1.ext_ipv6(), 30090)
        .count(40)
        .timeout_ms(1000);
    let r = env.converge("IPv6 NodePort reaches both backends", &c, |r| {
        all_ok(r) && by_server(r).len() == 2
    })?;
    let seen = clients_seen(&r);
    assert_eq!(seen["b1"], BTreeSet::from([env.client.ipv6().to_string()]));
    assert_eq!(seen["b2"], BTreeSet::from([n1.ext_ipv6().to_string()]));
    Ok(())
}

/// The addresses `svclb maps dump` lists as draining (kept for established
/// external flows only).
fn draining(node: &Node) -> Result<BTreeSet<String>> {
    let dump = node.dump_json()?;
    let list = dump["draining"].as_array().context("draining")?;
    Ok(list
        .iter()
        .map(|b| b["address"].as_str().unwrap_or_default().to_string())
        .collect())
}

/// Graceful termination during a rolling update: 20 long-lived external
/// TCP connections (echoing every 50 ms) and a stream of new ones through
/// n1's NodePort, over a local (b1) and a remote (b2, SNAT) backend. Every
/// backend turns terminating (still serving), new ones (b3 on n1, b4 on n2)
/// become ready, n1's agent restarts, later the old ones go. No connection
/// is reset, no new one fails; the long-lived ones stay on their backend
/// (new ones move to the new backends), which stays in the maps as draining
/// until it is removed.
#[test]
fn rolling_update_keeps_established_external_flows() -> Result<()> {
    let Some(env) = setup("extroll")? else {
        return Ok(());
    };
    let (n1, n2) = (&env.nodes[0], &env.nodes[1]);
    let b3 = n1.add_pod("b3")?;
    b3.spawn_server("b3", &[8080])?;
    let b4 = n2.add_pod("b4")?;
    b4.spawn_server("b4", &[8080])?;
    let on = |pod: &Pod, node: &Node, spec: fn(IpAddr) -> EndpointSpec| EndpointSpec {
        node_name: Some(node.name().to_string()),
        ..spec(pod.ipv4().into())
    };
    let write = |eps: Vec<EndpointSpec>| -> Result<()> {
        let ports = vec![
            PortSpec::tcp("http", 8080),
            PortSpec::new("dns", 8080, Proto::Udp),
        ];
        let slice = SliceSpec::new("web-1", "web", ports, eps);
        env.cluster.manifests().write_slice(&slice).map(drop)
    };
    let (b1, b2) = (&env.backends[0], &env.backends[1]);
    env.service(json!({}))?;
    env.slice(&[0, 1])?;
    env.start_agents()?;
    let c = Connect::tcp(n1.ext_ipv4(), NODE_PORT)
        .count(20)
        .timeout_ms(1000);
    env.converge("n1 reaches b1 and b2", &c, |r| {
        all_ok(r) && by_server(r).len() == 2
    })?;
    let hold = env.client.spawn_hold(
        &Hold::new(IpAddr::V4(n1.ext_ipv4()), NODE_PORT, 120_000, 50)
            .connections(20)
            .until_eof(),
    )?;
    std::thread::sleep(Duration::from_millis(1000));

    // Every backend terminating, none ready yet: they still take new flows.
    write(vec![
        on(b1, n1, EndpointSpec::terminating),
        on(b2, n2, EndpointSpec::terminating),
    ])?;
    std::thread::sleep(Duration::from_millis(1000));
    // New ones ready: new flows go there, the old ones drain.
    write(vec![
        on(b1, n1, EndpointSpec::terminating),
        on(b2, n2, EndpointSpec::terminating),
        on(&b3, n1, EndpointSpec::ready),
        on(&b4, n2, EndpointSpec::ready),
    ])?;
    let old = BTreeSet::from([b1.ipv4().to_string(), b2.ipv4().to_string()]);
    let mut last = BTreeSet::new();
    let drained = poll_until(DEADLINE, || {
        last = draining(n1)?;
        Ok((last == old).then_some(()))
    })?;
    assert!(drained.is_some(), "n1 drains {last:?}, want {old:?}");
    std::thread::sleep(Duration::from_millis(700));
    // A restarted agent keeps the draining backends (with their ids).
    n1.restart_agent()?;
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(draining(n1)?, old, "after a restart");
    let s = hold.finish_hold()?;
    eprintln!("rolling update: {s:?}");
    assert_eq!(
        (s.failures, s.new_connection_failures),
        (0, 0),
        "no reset, no failed new connection: {s:?}"
    );
    let first: BTreeSet<&str> = s.long_servers.iter().map(String::as_str).collect();
    assert_eq!(
        first,
        BTreeSet::from(["b1", "b2"]),
        "the long-lived connections were on the old backends, local and remote: {s:?}"
    );
    assert!(
        s.servers.contains_key("b3") && s.servers.contains_key("b4"),
        "new connections moved to the new backends: {s:?}"
    );

    // The old ones go: no longer kept, new connections unaffected.
    write(vec![
        on(&b3, n1, EndpointSpec::ready),
        on(&b4, n2, EndpointSpec::ready),
    ])?;
    let gone = poll_until(DEADLINE, || {
        last = draining(n1)?;
        Ok(last.is_empty().then_some(()))
    })?;
    assert!(gone.is_some(), "still draining {last:?}");
    env.converge("n1 reaches b3 and b4 only", &c, |r| {
        all_ok(r) && by_server(r).keys().eq(["b3", "b4"].iter())
    })?;
    Ok(())
}

/// The SNAT source follows the route, not the Node object: n1's Node lists
/// an ExternalIP that no device of n1 has (a NAT'd public address, here
/// the lowest address, which svclb used to take) and its bridge address as
/// InternalIP. Cluster-policy traffic through n1 to the remote backend
/// works, and the backend sees the source of n1's route toward it (its
/// ext0 address).
#[test]
fn snat_source_is_the_route_source() -> Result<()> {
    let Some(env) = setup("extsrc")? else {
        return Ok(());
    };
    let n1 = &env.nodes[0];
    let not_on_node = "198.18.0.0";
    let mut node = n1.node_object(&[]);
    node["status"]["addresses"] = json!([
        {"type": "InternalIP", "address": n1.bridge_ipv4().to_string()},
        {"type": "ExternalIP", "address": not_on_node},
    ]);
    env.cluster
        .manifests()
        .write(&format!("node-{}.yaml", n1.name()), &to_yaml(&node))?;
    env.service(json!({}))?;
    // Only the backend on n2: every flow through n1 is SNATed.
    env.slice(&[1])?;
    env.start_agents()?;
    // The node ports are on the Node's addresses now; the load-balancer IP
    // is routed to n1.
    env.client.route_via(&format!("{LB_IP}/32"), n1)?;
    let c = Connect::tcp(ip(LB_IP), 80).count(20).timeout_ms(1000);
    let r = env.converge("the LB IP via n1 reaches b2", &c, all_ok)?;
    assert_eq!(
        clients_seen(&r)["b2"],
        BTreeSet::from([n1.ext_ipv4().to_string()]),
        "b2 sees the source of n1's route toward it"
    );
    let u = Connect::udp(ip(LB_IP), 80).count(20).timeout_ms(1000);
    env.converge("UDP too", &u, all_ok)?;
    Ok(())
}

/// Conntrack entries expire and SNAT ports are reused: with a range of
/// 100 ports, 10,000 short TCP flows (one after another) from one client
/// through n1 to the remote backend b2 all succeed, each closed flow's port
/// going to a later one; once traffic stops and the (short) timeouts
/// pass, the sweeper leaves n1's conntrack maps empty: no half pair leaks.
#[test]
fn snat_ports_of_finished_flows_are_reused_and_conntrack_empties() -> Result<()> {
    let Some(env) = setup("extct")? else {
        return Ok(());
    };
    env.service(json!({}))?;
    // Only b2 (on n2): every flow through n1 is SNATed.
    env.slice(&[1])?;
    let short = [
        "--snat-ports",
        "62000-62099",
        "--ct-tcp-syn-sent",
        "2s",
        "--ct-tcp-established",
        "2s",
        "--ct-tcp-close-wait",
        "2s",
        "--ct-tcp-time-wait",
        "2s",
        "--ct-tcp-close",
        "2s",
        "--ct-sweep-interval",
        "1s",
    ];
    let n1 = &env.nodes[0];
    n1.start_agent_with(env.cluster.manifests().dir(), &[EXT_IF], &short)?;
    env.nodes[1].start_agent_with_devices(env.cluster.manifests().dir(), &[EXT_IF])?;
    let one = Connect::tcp(n1.ext_ipv4(), NODE_PORT).timeout_ms(2000);
    env.converge("NodePort on n1 reaches b2", &one, all_ok)?;

    let started = std::time::Instant::now();
    let r = env.connect(&one.clone().count(10_000))?;
    eprintln!(
        "10,000 flows through 100 SNAT ports in {:.1?}",
        started.elapsed()
    );
    assert_eq!(r.len(), 10_000);
    assert_eq!(by_error(&r), BTreeMap::new(), "failed flows");
    assert!(r.iter().all(|p| p.server.as_deref() == Some("b2")));
    let stats = svclb_userspace::dataplane::read_external_stats(n1.pin_dir())?;
    assert_eq!(stats.counter(svclb_common::stats::SNAT_EXHAUSTED), 0);
    assert!(
        stats.counter(svclb_common::stats::SNAT_RECLAIMED) >= 9_000,
        "closed flows' ports were reused: {stats:?}"
    );

    // 2 s timeouts (2 ticks of 1.07 s), sweeps every second: empty well
    // within 15 s.
    let mut last = stats.conntrack_entries;
    let empty = poll_until(Duration::from_secs(15), || {
        last = svclb_userspace::dataplane::read_external_stats(n1.pin_dir())?.conntrack_entries;
        Ok((last == 0).then_some(()))
    })?;
    assert!(
        empty.is_some(),
        "{last} conntrack entries left on n1\n{}",
        n1.agent().map(|a| a.log()).unwrap_or_default()
    );
    Ok(())
}
