//! ClusterIP behaviour of the svclb agent, end to end: real agent, real
//! cgroup programs, real sockets in network namespaces. Each test builds
//! its own cluster (one node, a client pod and backend pods).
//!
//! Needs root and the svclb binary (SVCLB_BIN, or a debug build in the
//! target dir).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use svclb_tests::{
    by_error, by_server, poll_until, refused_errno, Agent, Cluster, Connect, EndpointSpec, Hold,
    Node, Pod, PortSpec, ProbeResult, Proto, ServiceSpec, SliceSpec,
};

const SVC4: &str = "198.19.0.10";
const SVC6: &str = "fd00:5::10";
/// How fast manifest changes must reach the dataplane.
const CHANGE_DEADLINE: Duration = Duration::from_secs(1);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("valid address literal")
}

/// One node, a client pod and backend pods b1..bN, each serving `ports`.
struct Env {
    cluster: Cluster,
    node: Node,
    client: Pod,
    backends: Vec<Pod>,
}

fn setup(label: &str, backends: usize, ports: &[u16]) -> Result<Env> {
    let cluster = Cluster::new(label)?;
    let node = cluster.add_node("n1")?;
    let client = node.add_pod("client")?;
    let mut pods = Vec::new();
    for i in 1..=backends {
        let name = format!("b{i}");
        let pod = node.add_pod(&name)?;
        pod.spawn_server(&name, ports)?;
        pods.push(pod);
    }
    Ok(Env {
        cluster,
        node,
        client,
        backends: pods,
    })
}

impl Env {
    fn service(&self, name: &str, ips: &[&str], ports: Vec<PortSpec>) -> Result<ServiceSpec> {
        let ips: Vec<IpAddr> = ips.iter().map(|s| ip(s)).collect();
        let svc = ServiceSpec::new(name, &ips, ports);
        self.cluster.manifests().write_service(&svc)?;
        Ok(svc)
    }

    fn slice(
        &self,
        name: &str,
        service: &str,
        ports: Vec<PortSpec>,
        endpoints: Vec<EndpointSpec>,
    ) -> Result<SliceSpec> {
        let slice = SliceSpec::new(name, service, ports, endpoints);
        self.cluster.manifests().write_slice(&slice)?;
        Ok(slice)
    }

    /// Backend `i` (1-based, as in its name b<i>) in the family of `like`.
    fn addr(&self, i: usize, like: &str) -> IpAddr {
        self.backends[i - 1].ip_like(ip(like))
    }

    /// Ready endpoints for backends `which` (1-based) in the family of `like`.
    fn ready(&self, which: &[usize], like: &str) -> Vec<EndpointSpec> {
        which
            .iter()
            .map(|&i| EndpointSpec::ready(self.addr(i, like)))
            .collect()
    }

    fn start(&self) -> Result<Agent> {
        self.node.start_agent(self.cluster.manifests().dir())
    }

    fn run(&self, c: Connect) -> Result<Vec<ProbeResult>> {
        self.client.connect(&self.node, &c)
    }

    /// The end of the agent's log, for assertion messages.
    fn log_tail(&self) -> String {
        let log = self.node.agent().map(|a| a.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- agent log (tail) ---\n{tail}")
    }

    /// `batch` attempts until `done` holds for a batch, within the change
    /// deadline; fails with the last batch and the agent log otherwise.
    fn converge(
        &self,
        what: &str,
        c: Connect,
        done: impl Fn(&[ProbeResult]) -> bool,
    ) -> Result<Duration> {
        let mut last = Vec::new();
        let seen = poll_until(CHANGE_DEADLINE, || {
            last = self.run(c.clone())?;
            Ok(done(&last).then_some(()))
        })?;
        match seen {
            Some(((), t)) => Ok(t),
            None => bail!(
                "{what}: not within {CHANGE_DEADLINE:?}; last batch: ok {:?} errors {:?}\n{}",
                by_server(&last),
                by_error(&last),
                self.log_tail()
            ),
        }
    }
}

/// All attempts succeeded and every one of `names` got at least `min_share`.
fn assert_spread(env: &Env, what: &str, results: &[ProbeResult], names: &[&str], min_share: f64) {
    let counts = by_server(results);
    let ctx = || {
        format!(
            "{what}: ok {counts:?} errors {:?}\n{}",
            by_error(results),
            env.log_tail()
        )
    };
    assert!(results.iter().all(|r| r.ok), "{}", ctx());
    let want: BTreeSet<&str> = names.iter().copied().collect();
    let got: BTreeSet<&str> = counts.keys().map(String::as_str).collect();
    assert_eq!(got, want, "{}", ctx());
    let min = (results.len() as f64 * min_share).ceil() as usize;
    for (name, n) in &counts {
        assert!(*n >= min, "{name} got {n} < {min}; {}", ctx());
    }
}

/// Only `names` answered, and every attempt succeeded.
fn only(results: &[ProbeResult], names: &[&str]) -> bool {
    let want: BTreeSet<&str> = names.iter().copied().collect();
    results.iter().all(|r| r.ok)
        && by_server(results)
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
            == want
}

fn http() -> Vec<PortSpec> {
    vec![PortSpec::tcp("http", 80).target(8080)]
}

fn http_ep() -> Vec<PortSpec> {
    vec![PortSpec::tcp("http", 8080)]
}

#[test]
fn tcp_v4_reaches_every_backend() -> Result<()> {
    let env = setup("tcp4", 3, &[8080])?;
    env.service("web", &[SVC4], http())?;
    env.slice("web-1", "web", http_ep(), env.ready(&[1, 2, 3], SVC4))?;
    env.start()?;
    let r = env.run(Connect::tcp(ip(SVC4), 80).count(300))?;
    assert_spread(&env, "tcp4", &r, &["b1", "b2", "b3"], 0.15);
    assert!(r.iter().all(|r| r.server_port == Some(8080)));
    Ok(())
}

#[test]
fn udp_v4_reaches_every_backend() -> Result<()> {
    let env = setup("udp4", 3, &[5353])?;
    env.service("dns", &[SVC4], vec![PortSpec::udp("dns", 53).target(5353)])?;
    env.slice(
        "dns-1",
        "dns",
        vec![PortSpec::udp("dns", 5353)],
        env.ready(&[1, 2, 3], SVC4),
    )?;
    env.start()?;
    let r = env.run(Connect::udp(ip(SVC4), 53).count(300))?;
    assert_spread(&env, "udp4 sendto", &r, &["b1", "b2", "b3"], 0.15);
    let r = env.run(Connect::udp(ip(SVC4), 53).count(300).connected())?;
    assert_spread(&env, "udp4 connected", &r, &["b1", "b2", "b3"], 0.15);
    Ok(())
}

#[test]
fn dual_stack_v6_reaches_every_backend() -> Result<()> {
    let env = setup("dual", 3, &[8080])?;
    let svc_ports = vec![
        PortSpec::tcp("http", 80).target(8080),
        PortSpec::udp("dns", 53).target(8080),
    ];
    let ep_ports = vec![PortSpec::tcp("http", 8080), PortSpec::udp("dns", 8080)];
    env.service("web", &[SVC4, SVC6], svc_ports)?;
    env.slice(
        "web-v4",
        "web",
        ep_ports.clone(),
        env.ready(&[1, 2, 3], SVC4),
    )?;
    env.slice("web-v6", "web", ep_ports, env.ready(&[1, 2, 3], SVC6))?;
    env.start()?;
    let all = ["b1", "b2", "b3"];
    let r = env.run(Connect::tcp(ip(SVC6), 80).count(300))?;
    assert_spread(&env, "tcp6", &r, &all, 0.15);
    let r = env.run(Connect::udp(ip(SVC6), 53).count(300))?;
    assert_spread(&env, "udp6", &r, &all, 0.15);
    // The IPv4 side of the same service works too, and each family's
    // connections land on that family's endpoint addresses.
    let r = env.run(Connect::tcp(ip(SVC4), 80).count(60))?;
    assert_spread(&env, "tcp4 of dual-stack", &r, &all, 0.05);
    let r6 = env.run(Connect::tcp(ip(SVC6), 80).count(10))?;
    for x in r.iter().chain(&r6) {
        let client: SocketAddr = x.client.as_deref().unwrap_or_default().parse()?;
        let want = env.client.ip_like(client.ip());
        assert_eq!(client.ip(), want, "{x:?}");
    }
    Ok(())
}

#[test]
fn peer_address_is_the_service_address() -> Result<()> {
    let env = setup("peer", 2, &[8080])?;
    let svc_ports = vec![
        PortSpec::tcp("http", 80).target(8080),
        PortSpec::udp("dns", 53).target(8080),
    ];
    let ep_ports = vec![PortSpec::tcp("http", 8080), PortSpec::udp("dns", 8080)];
    env.service("web", &[SVC4, SVC6], svc_ports)?;
    env.slice("web-v4", "web", ep_ports.clone(), env.ready(&[1, 2], SVC4))?;
    env.slice("web-v6", "web", ep_ports, env.ready(&[1, 2], SVC6))?;
    env.start()?;
    for svc in [SVC4, SVC6] {
        let cases = [
            ("tcp getpeername", Connect::tcp(ip(svc), 80)),
            ("udp recvfrom", Connect::udp(ip(svc), 53)),
            ("udp getpeername", Connect::udp(ip(svc), 53).connected()),
        ];
        for (what, c) in cases {
            let port = c.port;
            let r = env.run(c.count(20))?;
            let want = SocketAddr::new(ip(svc), port).to_string();
            for x in &r {
                assert!(x.ok, "{what} {svc}: {x:?}\n{}", env.log_tail());
                assert_eq!(
                    x.peer.as_deref(),
                    Some(want.as_str()),
                    "{what} {svc}: {x:?}"
                );
                // The backend saw the client pod itself (no SNAT).
                let client: SocketAddr = x.client.as_deref().unwrap_or_default().parse()?;
                assert_eq!(client.ip(), env.client.ip_like(ip(svc)), "{what}: {x:?}");
                assert_eq!(x.server_port, Some(8080), "{what}: {x:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn multi_port_service_routes_each_port_to_its_target() -> Result<()> {
    // 80 and 9090 also listen, so a missed port translation shows up as a
    // wrong server_port instead of a refused connection.
    let env = setup("multiport", 2, &[80, 8080, 9090, 9100])?;
    env.service(
        "web",
        &[SVC4, SVC6],
        vec![
            PortSpec::tcp("http", 80).target(8080),
            PortSpec::tcp("metrics", 9090).target(9100),
        ],
    )?;
    // Slice ports in the opposite order: matching is by name, not index.
    let ep_ports = vec![PortSpec::tcp("metrics", 9100), PortSpec::tcp("http", 8080)];
    env.slice("web-v4", "web", ep_ports.clone(), env.ready(&[1, 2], SVC4))?;
    env.slice("web-v6", "web", ep_ports, env.ready(&[1, 2], SVC6))?;
    env.start()?;
    for svc in [SVC4, SVC6] {
        for (port, target) in [(80, 8080), (9090, 9100)] {
            let r = env.run(Connect::tcp(ip(svc), port).count(50))?;
            assert_spread(&env, &format!("{svc}:{port}"), &r, &["b1", "b2"], 0.1);
            let ports: BTreeSet<_> = r.iter().map(|x| x.server_port).collect();
            assert_eq!(ports, BTreeSet::from([Some(target)]), "{svc}:{port}");
        }
    }
    Ok(())
}

#[test]
fn same_port_different_protocol_routes_by_protocol() -> Result<()> {
    let env = setup("sameport", 2, &[53, 5353, 5354])?;
    env.service(
        "dns",
        &[SVC4, SVC6],
        vec![
            PortSpec::tcp("dns-tcp", 53).target(5353),
            PortSpec::udp("dns", 53).target(5354),
        ],
    )?;
    let ep_ports = vec![PortSpec::udp("dns", 5354), PortSpec::tcp("dns-tcp", 5353)];
    env.slice("dns-v4", "dns", ep_ports.clone(), env.ready(&[1, 2], SVC4))?;
    env.slice("dns-v6", "dns", ep_ports, env.ready(&[1, 2], SVC6))?;
    env.start()?;
    for svc in [SVC4, SVC6] {
        for (c, target) in [
            (Connect::tcp(ip(svc), 53), 5353),
            (Connect::udp(ip(svc), 53), 5354),
            (Connect::udp(ip(svc), 53).connected(), 5354),
        ] {
            let what = format!("{svc} {:?} connected={}", c.proto, c.udp_connected);
            let r = env.run(c.count(40))?;
            assert_spread(&env, &what, &r, &["b1", "b2"], 0.1);
            let ports: BTreeSet<_> = r.iter().map(|x| x.server_port).collect();
            assert_eq!(ports, BTreeSet::from([Some(target)]), "{what}");
        }
    }
    Ok(())
}

#[test]
fn endpoint_and_service_changes_apply_within_one_second() -> Result<()> {
    let env = setup("changes", 3, &[8080])?;
    env.service("web", &[SVC4], http())?;
    env.slice("web-1", "web", http_ep(), env.ready(&[1], SVC4))?;
    env.start()?;
    let batch = || Connect::tcp(ip(SVC4), 80).count(20).timeout_ms(300);
    let r = env.run(batch())?;
    assert!(only(&r, &["b1"]), "{:?} {:?}", by_server(&r), by_error(&r));

    env.slice("web-1", "web", http_ep(), env.ready(&[1, 2], SVC4))?;
    let t = env.converge("add b2", batch(), |r| only(r, &["b1", "b2"]))?;
    eprintln!("add endpoint: {t:?}");

    env.slice("web-1", "web", http_ep(), env.ready(&[2], SVC4))?;
    let t = env.converge("remove b1", batch(), |r| only(r, &["b2"]))?;
    eprintln!("remove endpoint: {t:?}");
    // Stays removed.
    let r = env.run(batch().count(50))?;
    assert!(only(&r, &["b2"]), "{:?} {:?}", by_server(&r), by_error(&r));

    // Update in place: same endpoint slot, different address.
    env.slice("web-1", "web", http_ep(), env.ready(&[3], SVC4))?;
    let t = env.converge("b2 -> b3", batch(), |r| only(r, &["b3"]))?;
    eprintln!("update endpoint: {t:?}");

    // A second slice of the same service adds to the first.
    env.slice("web-2", "web", http_ep(), env.ready(&[1], SVC4))?;
    let t = env.converge("second slice", batch(), |r| only(r, &["b1", "b3"]))?;
    eprintln!("add slice: {t:?}");

    // A new service appears.
    env.service("api", &["198.19.0.11"], http())?;
    env.slice("api-1", "api", http_ep(), env.ready(&[2], SVC4))?;
    let api = || {
        Connect::tcp(ip("198.19.0.11"), 80)
            .count(10)
            .timeout_ms(300)
    };
    let t = env.converge("new service", api(), |r| only(r, &["b2"]))?;
    eprintln!("add service: {t:?}");

    // Deleting the service: nothing translates any more, so connects to the
    // (unrouted) service address fail. The other service is unaffected.
    env.cluster
        .manifests()
        .remove(&ServiceSpec::new("web", &[], vec![]).file_name())?;
    let gone = || Connect::tcp(ip(SVC4), 80).count(5).timeout_ms(200);
    let t = env.converge("delete service", gone(), |r| r.iter().all(|x| !x.ok))?;
    eprintln!("delete service: {t:?}");
    let r = env.run(api())?;
    assert!(only(&r, &["b2"]), "{:?} {:?}", by_server(&r), by_error(&r));
    Ok(())
}

#[test]
fn service_without_endpoints_refuses_connections() -> Result<()> {
    let env = setup("noeps", 1, &[8080])?;
    // No slice at all.
    env.service("empty", &[SVC4, SVC6], http())?;
    // Only endpoints that are neither ready nor serving.
    env.service("down", &["198.19.0.11", "fd00:5::11"], http())?;
    env.slice(
        "down-1",
        "down",
        http_ep(),
        vec![EndpointSpec::not_ready(env.addr(1, SVC4))],
    )?;
    env.start()?;
    for addr in [SVC4, SVC6, "198.19.0.11", "fd00:5::11"] {
        let r = env.run(Connect::tcp(ip(addr), 80).count(5))?;
        let errors = by_error(&r);
        assert_eq!(
            errors,
            BTreeMap::from([(refused_errno().to_string(), 5)]),
            "{addr}: {r:?}\n{}",
            env.log_tail()
        );
    }
    // UDP to a frontend without backends must not reach anything.
    let r = env.run(Connect::udp(ip(SVC4), 80).count(3).timeout_ms(200))?;
    assert!(r.iter().all(|x| !x.ok), "{r:?}");

    // Endpoints arriving later are used right away.
    env.slice("empty-1", "empty", http_ep(), env.ready(&[1], SVC4))?;
    env.converge("first endpoint", Connect::tcp(ip(SVC4), 80).count(5), |r| {
        only(r, &["b1"])
    })?;
    Ok(())
}

#[test]
fn terminating_endpoints_only_when_nothing_is_ready() -> Result<()> {
    let env = setup("terminating", 3, &[8080])?;
    // "drain": everything terminating (but serving) -> use them.
    env.service("drain", &[SVC4], http())?;
    env.slice(
        "drain-1",
        "drain",
        http_ep(),
        vec![
            EndpointSpec::terminating(env.addr(1, SVC4)),
            EndpointSpec::terminating(env.addr(2, SVC4)),
        ],
    )?;
    // "mixed": one ready, one terminating, one not ready -> only the ready one.
    env.service("mixed", &["198.19.0.11"], http())?;
    env.slice(
        "mixed-1",
        "mixed",
        http_ep(),
        vec![
            EndpointSpec::ready(env.addr(1, SVC4)),
            EndpointSpec::terminating(env.addr(2, SVC4)),
            EndpointSpec::not_ready(env.addr(3, SVC4)),
        ],
    )?;
    env.start()?;
    let r = env.run(Connect::tcp(ip(SVC4), 80).count(100))?;
    assert_spread(&env, "terminating-only", &r, &["b1", "b2"], 0.15);
    let r = env.run(Connect::tcp(ip("198.19.0.11"), 80).count(100))?;
    assert!(
        only(&r, &["b1"]),
        "mixed: {:?} {:?}\n{}",
        by_server(&r),
        by_error(&r),
        env.log_tail()
    );

    // A ready endpoint appears in "drain": the terminating ones stop
    // getting new connections.
    let mut eps = vec![
        EndpointSpec::terminating(env.addr(1, SVC4)),
        EndpointSpec::terminating(env.addr(2, SVC4)),
    ];
    eps.push(EndpointSpec::ready(env.addr(3, SVC4)));
    env.slice("drain-1", "drain", http_ep(), eps)?;
    env.converge(
        "ready endpoint replaces terminating ones",
        Connect::tcp(ip(SVC4), 80).count(20),
        |r| only(r, &["b3"]),
    )?;
    Ok(())
}

#[test]
fn agent_restart_loses_no_request_or_connection() -> Result<()> {
    let env = setup("restart", 3, &[8080])?;
    env.service("web", &[SVC4, SVC6], http())?;
    env.slice("web-v4", "web", http_ep(), env.ready(&[1, 2, 3], SVC4))?;
    env.slice("web-v6", "web", http_ep(), env.ready(&[1, 2, 3], SVC6))?;
    let agent = env.start()?;
    let holds = [SVC4, SVC6].map(|svc| {
        env.client
            .spawn_hold(&env.node, &Hold::new(ip(svc), 80, 120_000, 20).until_eof())
    });
    thread::sleep(Duration::from_millis(300));

    // Crash: SIGKILL, a moment without any agent, then a fresh one.
    agent.kill();
    thread::sleep(Duration::from_millis(300));
    env.start()?;
    thread::sleep(Duration::from_millis(300));
    // And a graceful restart (SIGTERM) for good measure.
    env.node.restart_agent()?;
    thread::sleep(Duration::from_millis(300));

    for (svc, hold) in [SVC4, SVC6].iter().zip(holds) {
        let s = hold?.finish_hold()?;
        assert!(s.requests >= 20 && s.new_connections >= 20, "{svc}: {s:?}");
        assert_eq!(
            (s.failures, s.new_connection_failures),
            (0, 0),
            "{svc}: {s:?}\n{}",
            env.log_tail()
        );
    }
    // The restarted agent owns the reused maps: changes still apply.
    env.slice("web-v4", "web", http_ep(), env.ready(&[2], SVC4))?;
    env.converge(
        "change after restart",
        Connect::tcp(ip(SVC4), 80).count(20),
        |r| only(r, &["b2"]),
    )?;
    Ok(())
}

fn warned_about(log: &str, needle: &str) -> bool {
    log.lines().any(|l| {
        let upper = l.to_ascii_uppercase();
        (upper.contains("WARN") || upper.contains("ERROR")) && l.contains(needle)
    })
}

#[test]
fn bad_manifests_are_logged_and_do_not_break_others() -> Result<()> {
    let env = setup("badmanifests", 2, &[8080])?;
    let m = env.cluster.manifests();
    env.service("good", &[SVC4], http())?;
    env.slice("good-1", "good", http_ep(), env.ready(&[1, 2], SVC4))?;

    let mut bad_ip = ServiceSpec::new("bad-ip", &[ip("198.19.0.20")], http()).to_json();
    bad_ip["spec"]["clusterIP"] = "not-an-ip".into();
    bad_ip["spec"]["clusterIPs"] = serde_json::json!(["not-an-ip"]);
    m.write("bad-ip.yaml", &svclb_tests::manifests::to_yaml(&bad_ip))?;
    env.service("bad-port", &["198.19.0.21"], vec![PortSpec::tcp("http", 0)])?;
    m.write(
        "garbage.yaml",
        "kind: Service\nmetadata: {name: [unclosed\n  : : :\n",
    )?;
    let mut orphan =
        SliceSpec::new("orphan-slice", "good", http_ep(), env.ready(&[1], SVC4)).to_json();
    orphan["metadata"]
        .as_object_mut()
        .context("metadata")?
        .remove("labels");
    m.write("orphan.yaml", &svclb_tests::manifests::to_yaml(&orphan))?;

    let agent = env.start()?;
    let needles = [
        "default/bad-ip",
        "default/bad-port",
        "garbage.yaml",
        "default/orphan-slice",
    ];
    let logged = poll_until(Duration::from_secs(2), || {
        let log = agent.log();
        Ok(needles.iter().all(|n| warned_about(&log, n)).then_some(()))
    })?;
    let log = agent.log();
    for n in needles {
        assert!(
            logged.is_some() || warned_about(&log, n),
            "no warning naming {n}:\n{log}"
        );
    }
    let r = env.run(Connect::tcp(ip(SVC4), 80).count(50))?;
    assert_spread(&env, "good service", &r, &["b1", "b2"], 0.1);

    // While running: another bad one and a new good one.
    let mut bad2 = ServiceSpec::new("bad-ip-2", &[ip("198.19.0.22")], http()).to_json();
    bad2["spec"]["clusterIP"] = "300.1.2.3".into();
    bad2["spec"]["clusterIPs"] = serde_json::json!(["300.1.2.3"]);
    m.write("bad-ip-2.yaml", &svclb_tests::manifests::to_yaml(&bad2))?;
    env.service("good2", &["198.19.0.12"], http())?;
    env.slice("good2-1", "good2", http_ep(), env.ready(&[2], SVC4))?;
    env.converge(
        "good service next to a bad one",
        Connect::tcp(ip("198.19.0.12"), 80).count(10),
        |r| only(r, &["b2"]),
    )?;
    let logged = poll_until(CHANGE_DEADLINE, || {
        Ok(warned_about(&agent.log(), "default/bad-ip-2").then_some(()))
    })?;
    assert!(
        logged.is_some(),
        "no warning naming default/bad-ip-2:\n{}",
        agent.log()
    );
    let r = env.run(Connect::tcp(ip(SVC4), 80).count(20))?;
    assert_spread(&env, "good service after", &r, &["b1", "b2"], 0.05);
    assert!(agent.is_running(), "agent died:\n{}", agent.log());
    Ok(())
}

#[test]
fn non_service_traffic_is_untouched() -> Result<()> {
    let env = setup("passthrough", 3, &[8080])?;
    env.service("web", &[SVC4, SVC6], http())?;
    env.slice("web-v4", "web", http_ep(), env.ready(&[1, 2], SVC4))?;
    env.slice("web-v6", "web", http_ep(), env.ready(&[1, 2], SVC6))?;
    env.start()?;
    for fam in [SVC4, SVC6] {
        // b3 is no backend; b1 is one, but addressed directly it must not be
        // load-balanced.
        for (i, name) in [(3, "b3"), (1, "b1")] {
            let addr = env.addr(i, fam);
            for c in [
                Connect::tcp(addr, 8080),
                Connect::udp(addr, 8080),
                Connect::udp(addr, 8080).connected(),
            ] {
                let what = format!("{addr} {:?}", c.proto);
                let r = env.run(c.count(20))?;
                assert!(only(&r, &[name]), "{what}: {r:?}");
                let want = SocketAddr::new(addr, 8080).to_string();
                assert!(
                    r.iter().all(|x| x.peer.as_deref() == Some(want.as_str())),
                    "{what}: {r:?}"
                );
            }
        }
        // The service address on a port the service does not have is not
        // translated (and, unrouted, fails instead of reaching a backend).
        let r = env.run(Connect::tcp(ip(fam), 81).count(3).timeout_ms(300))?;
        assert!(r.iter().all(|x| !x.ok), "{fam}:81 {r:?}");
    }
    Ok(())
}

/// The dump's frontend for address/port/protocol.
fn frontend<'a>(dump: &'a Value, addr: &str, port: u16, proto: Proto) -> Option<&'a Value> {
    dump["frontends"].as_array()?.iter().find(|f| {
        f["address"].as_str().map(ip) == Some(ip(addr))
            && f["port"] == port
            && f["protocol"] == proto.k8s()
    })
}

/// (address, port, state) of a frontend's backends.
fn backends_of(f: &Value) -> BTreeSet<(IpAddr, u64, String)> {
    f["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            (
                b["address"].as_str().map(ip).unwrap_or(ip("0.0.0.0")),
                b["port"].as_u64().unwrap_or(0),
                b["state"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[test]
fn maps_dump_shows_services_and_backends() -> Result<()> {
    let env = setup("dump", 3, &[8080])?;
    env.service("web", &[SVC4, SVC6], http())?;
    env.slice("web-v4", "web", http_ep(), env.ready(&[1, 2], SVC4))?;
    env.slice("web-v6", "web", http_ep(), env.ready(&[1, 2], SVC6))?;
    env.service(
        "drain",
        &["198.19.0.11"],
        vec![PortSpec::udp("dns", 53).target(8080)],
    )?;
    env.slice(
        "drain-1",
        "drain",
        vec![PortSpec::udp("dns", 8080)],
        vec![EndpointSpec::terminating(env.addr(3, SVC4))],
    )?;
    let agent = env.start()?;

    let check = |dump: &Value| {
        let active = |fam: &str| -> BTreeSet<(IpAddr, u64, String)> {
            [1, 2]
                .iter()
                .map(|&i| (env.addr(i, fam), 8080, "active".to_string()))
                .collect()
        };
        let mut ids = BTreeSet::new();
        for fam in [SVC4, SVC6] {
            let f = frontend(dump, fam, 80, Proto::Tcp)
                .unwrap_or_else(|| panic!("no frontend {fam}:80/TCP in {dump:#}"));
            assert!(f["rev_nat_id"].as_u64().is_some_and(|id| id > 0), "{f:#}");
            assert_eq!(backends_of(f), active(fam), "{f:#}");
            for b in f["backends"].as_array().into_iter().flatten() {
                ids.insert(b["id"].as_u64().expect("backend id"));
            }
        }
        assert_eq!(ids.len(), 4, "backend ids must be distinct: {dump:#}");
        let f = frontend(dump, "198.19.0.11", 53, Proto::Udp)
            .unwrap_or_else(|| panic!("no frontend 198.19.0.11:53/UDP in {dump:#}"));
        let want = BTreeSet::from([(env.addr(3, SVC4), 8080, "terminating".to_string())]);
        assert_eq!(backends_of(f), want, "{f:#}");
        assert!(frontend(dump, SVC4, 81, Proto::Tcp).is_none());
    };
    check(&env.node.dump_json()?);

    // The maps stay pinned (and readable) after the agent stops.
    agent.stop()?;
    check(&env.node.dump_json()?);
    Ok(())
}
