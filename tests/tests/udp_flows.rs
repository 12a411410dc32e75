//! Unconnected UDP flows through the socket hooks: one socket's datagrams
//! to a service stay on one backend (as conntrack keeps a UDP 5-tuple on
//! kube-proxy nodes) while that backend stays in the service and the flow
//! is not idle past --udp-timeout (--udp-stream-timeout once a reply was
//! read); SCTP Services through the connect hook.
//!
//! Needs root, the svclb binary and svclb-probe (see clusterip.rs).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Result};
use svclb_tests::{
    by_error, by_server, poll_until, Cluster, Connect, EndpointSpec, Node, Pod, PortSpec,
    ProbeResult, Proto, ServiceSpec, SliceSpec,
};

const SVC4: &str = "198.19.0.20";
const SVC6: &str = "fd00:5::20";
const SVC4_EMPTY: &str = "198.19.0.21";
/// How fast manifest changes must reach the dataplane.
const CHANGE_DEADLINE: Duration = Duration::from_secs(1);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("valid address literal")
}

struct Env {
    cluster: Cluster,
    node: Node,
    client: Pod,
    backends: Vec<Pod>,
}

/// One node, a client pod and backends b1..bN serving `port`, and a
/// Service "dns" on SVC4:53 -> `port` over `proto` with all of them ready.
fn setup(label: &str, backends: usize, proto: PortSpec, port: u16) -> Result<Env> {
    let cluster = Cluster::new(label)?;
    let node = cluster.add_node("n1")?;
    let client = node.add_pod("client")?;
    let mut pods = Vec::new();
    for i in 1..=backends {
        let name = format!("b{i}");
        let pod = node.add_pod(&name)?;
        pod.spawn_server(&name, &[port])?;
        pods.push(pod);
    }
    let env = Env {
        cluster,
        node,
        client,
        backends: pods,
    };
    let svc = ServiceSpec::new("dns", &[ip(SVC4)], vec![proto.clone().target(port)]);
    env.cluster.manifests().write_service(&svc)?;
    env.write_slice(&(1..=backends).collect::<Vec<_>>(), &proto, port)?;
    Ok(env)
}

impl Env {
    /// The Service's endpoints: backends `which` (1-based).
    fn write_slice(&self, which: &[usize], proto: &PortSpec, port: u16) -> Result<()> {
        let endpoints = which
            .iter()
            .map(|&i| EndpointSpec::ready(self.backends[i - 1].ip_like(ip(SVC4))))
            .collect();
        let ep_port = PortSpec::new(&proto.name, port, proto.protocol);
        let slice = SliceSpec::new("dns-1", "dns", vec![ep_port], endpoints);
        self.cluster.manifests().write_slice(&slice)?;
        Ok(())
    }

    fn log_tail(&self) -> String {
        let log = self.node.agent().map(|a| a.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- agent log (tail) ---\n{tail}")
    }

    fn flow(&self, count: u32, interval_ms: u64, no_peer: bool) -> Vec<String> {
        let mut a = vec![
            "udp-flow".to_string(),
            "--addr".into(),
            SVC4.into(),
            "--port".into(),
            "53".into(),
            "--count".into(),
            count.to_string(),
            "--interval-ms".into(),
            interval_ms.to_string(),
        ];
        if no_peer {
            a.push("--no-peer".into());
        }
        a
    }
}

fn servers(results: &[ProbeResult]) -> Vec<String> {
    results
        .iter()
        .map(|r| r.server.clone().unwrap_or_default())
        .collect()
}

fn distinct(results: &[ProbeResult]) -> BTreeSet<String> {
    servers(results).into_iter().collect()
}

fn all_ok(results: &[ProbeResult]) -> bool {
    results.iter().all(|r| r.ok)
}

#[test]
fn one_udp_socket_stays_on_one_backend() -> Result<()> {
    let env = setup("udpone", 3, PortSpec::udp("dns", 53), 5353)?;
    env.node.start_agent(env.cluster.manifests().dir())?;
    let r = env.client.run_client(&env.node, &env.flow(100, 0, false))?;
    assert_eq!(r.len(), 100);
    assert!(all_ok(&r), "errors {:?}\n{}", by_error(&r), env.log_tail());
    assert_eq!(
        distinct(&r).len(),
        1,
        "one socket, 100 datagrams: {:?}\n{}",
        by_server(&r),
        env.log_tail()
    );
    let dump = env.node.dump_json()?;
    assert!(
        dump["udp_flows"]["entries"].as_u64() >= Some(1),
        "svclb maps dump shows no UDP flow: {}",
        dump["udp_flows"]
    );
    // Each of 30 sockets picks on its own: the spread over backends stays.
    let r = env
        .client
        .connect(&env.node, &Connect::udp(ip(SVC4), 53).count(30))?;
    assert!(all_ok(&r), "errors {:?}", by_error(&r));
    assert!(
        distinct(&r).len() > 1,
        "30 sockets all reached {:?}",
        by_server(&r)
    );
    Ok(())
}

/// The flow keeps its backend when another backend leaves (slots move then:
/// a check by slot would move it) and moves to one remaining backend, and
/// keeps to it, when its own leaves.
#[test]
fn udp_flow_follows_its_backend_membership() -> Result<()> {
    let proto = PortSpec::udp("dns", 53);
    let env = setup("udpmove", 4, proto.clone(), 5353)?;
    env.node.start_agent(env.cluster.manifests().dir())?;
    let client = env
        .client
        .spawn_client(&env.node, &env.flow(0, 20, false))?;
    let seen = poll_until(Duration::from_secs(10), || {
        let r: Vec<ProbeResult> = client.so_far()?;
        Ok((r.len() >= 10).then_some(r))
    })?;
    let Some((first, _)) = seen else {
        bail!("udp-flow printed fewer than 10 results in 10 s");
    };
    let x = first[0].server.clone().unwrap_or_default();
    let index = |name: &str| name[1..].parse::<usize>().expect("b<i>");
    let xi = index(&x);
    // Remove b1 (or b2 when the flow is on b1): the slots after it move.
    let other = if xi == 1 { 2 } else { 1 };
    let keep: Vec<usize> = (1..=4).filter(|&i| i != other).collect();
    env.write_slice(&keep, &proto, 5353)?;
    thread::sleep(CHANGE_DEADLINE * 2);
    let before_own: usize = client.so_far::<ProbeResult>()?.len();
    // Now its own backend leaves.
    let rest: Vec<usize> = keep.iter().copied().filter(|&i| i != xi).collect();
    env.write_slice(&rest, &proto, 5353)?;
    thread::sleep(CHANGE_DEADLINE);
    let after_deadline: usize = client.so_far::<ProbeResult>()?.len();
    thread::sleep(CHANGE_DEADLINE);
    let r: Vec<ProbeResult> = client.finish()?;
    assert!(all_ok(&r), "errors {:?}\n{}", by_error(&r), env.log_tail());
    let names = servers(&r);
    assert!(
        names[..before_own].iter().all(|n| *n == x),
        "another backend left, the flow moved: {:?}\n{}",
        names[..before_own].to_vec(),
        env.log_tail()
    );
    let moved = &names[after_deadline..];
    let to: BTreeSet<&String> = moved.iter().collect();
    assert!(
        moved.len() >= 10 && to.len() == 1 && !to.contains(&x),
        "its backend {x} left: after {CHANGE_DEADLINE:?} the flow went to {to:?} ({} datagrams)\n{}",
        moved.len(),
        env.log_tail()
    );
    let y = moved[0].clone();
    assert!(rest.contains(&index(&y)), "{y} is not a remaining backend");
    Ok(())
}

/// With --udp-timeout 1s and --udp-stream-timeout 10s: a flow whose
/// replies are read with their address (recvfrom: svclb sees the reply)
/// keeps its backend over 2 s gaps; one that reads them without (recv) is
/// idle past 1 s at each gap and picks anew, so 12 picks over 3 backends
/// land on more than one (all on one: 3^-11).
#[test]
fn idle_udp_flows_expire_and_replied_ones_last_longer() -> Result<()> {
    let env = setup("udpidle", 3, PortSpec::udp("dns", 53), 5353)?;
    env.node.start_agent_with(
        env.cluster.manifests().dir(),
        &[],
        &["--udp-timeout", "1s", "--udp-stream-timeout", "10s"],
    )?;
    let replied = env
        .client
        .spawn_client(&env.node, &env.flow(12, 2000, false))?;
    let unreplied = env
        .client
        .spawn_client(&env.node, &env.flow(12, 2000, true))?;
    let replied: Vec<ProbeResult> = replied.finish()?;
    let unreplied: Vec<ProbeResult> = unreplied.finish()?;
    for (what, r) in [("replied", &replied), ("unreplied", &unreplied)] {
        assert_eq!(r.len(), 12, "{what}");
        assert!(
            all_ok(r),
            "{what}: errors {:?}\n{}",
            by_error(r),
            env.log_tail()
        );
    }
    assert_eq!(
        distinct(&replied).len(),
        1,
        "a replied flow moved within the stream timeout: {:?}",
        servers(&replied)
    );
    assert!(
        distinct(&unreplied).len() > 1,
        "an unreplied flow idle past the timeout never picked anew: {:?}",
        servers(&unreplied)
    );
    Ok(())
}

/// Whether this kernel has SCTP (the host kernel may not; the VM kernels
/// load the module).
fn kernel_has_sctp() -> bool {
    // SAFETY: socket(2) has no memory arguments; the descriptor is closed.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP);
        if fd < 0 {
            return false;
        }
        libc::close(fd);
        true
    }
}

/// An SCTP Service: connect() to the ClusterIP reaches a backend and data
/// flows both ways; the peer address is the service's.
#[test]
fn sctp_connects_through_a_cluster_ip() -> Result<()> {
    if !kernel_has_sctp() {
        println!(
            "skipped: this kernel has no SCTP (socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP) fails)"
        );
        return Ok(());
    }
    let env = setup("sctp", 2, PortSpec::sctp("sig", 53), 3868)?;
    let svc = ServiceSpec::new(
        "dns",
        &[ip(SVC4), ip(SVC6)],
        vec![PortSpec::sctp("sig", 53).target(3868)],
    );
    env.cluster.manifests().write_service(&svc)?;
    let v6: Vec<EndpointSpec> = env
        .backends
        .iter()
        .map(|b| EndpointSpec::ready(b.ip_like(ip(SVC6))))
        .collect();
    let slice6 = SliceSpec::new("dns-6", "dns", vec![PortSpec::sctp("sig", 3868)], v6);
    env.cluster.manifests().write_slice(&slice6)?;
    // A Service without endpoints: a connect the hook sees is refused.
    let none = ServiceSpec::new(
        "none",
        &[ip(SVC4_EMPTY)],
        vec![PortSpec::sctp("sig", 53).target(3868)],
    );
    env.cluster.manifests().write_service(&none)?;
    env.node.start_agent(env.cluster.manifests().dir())?;
    let c = Connect::new(Proto::Sctp, ip(SVC4_EMPTY), 53).timeout_ms(500);
    let r = env.client.connect(&env.node, &c)?;
    println!("sctp connect to a service without endpoints: {r:?}");
    // svclb's part is there: the frontend, in the socket scope.
    let dump = env.node.dump_json()?;
    let written = dump["frontends"].as_array().is_some_and(|fs| {
        fs.iter().any(|f| {
            f["address"] == SVC4_EMPTY && f["protocol"] == "SCTP" && f["scope"] == "socket"
        })
    });
    assert!(written, "no SCTP socket frontend in {dump}");
    if r.iter().all(|x| x.error.as_deref() == Some("ETIMEDOUT")) {
        // Seen on 5.10 and 6.12: net/sctp/socket.c runs no cgroup connect
        // hook (SCTP's proto has no pre_connect), so nothing translates.
        println!(
            "skipped: this kernel runs no cgroup connect hook for SCTP (a connect to a service \
             without endpoints timed out instead of being refused)"
        );
        return Ok(());
    }
    assert!(
        r.iter()
            .all(|x| matches!(x.error.as_deref(), Some("ECONNREFUSED" | "EPERM"))),
        "{r:?}"
    );
    for svc in [SVC4, SVC6] {
        let c = Connect::new(Proto::Sctp, ip(svc), 53).count(20);
        let r = env.client.connect(&env.node, &c)?;
        assert!(
            all_ok(&r),
            "sctp {svc}: errors {:?}\n{}",
            by_error(&r),
            env.log_tail()
        );
        assert_eq!(
            distinct(&r),
            BTreeSet::from(["b1".into(), "b2".into()]),
            "{svc}"
        );
        for x in &r {
            assert_eq!(x.server_port, Some(3868));
            let peer: std::net::SocketAddr = x.peer.as_deref().unwrap_or_default().parse()?;
            assert_eq!(peer.ip(), ip(svc), "getpeername shows the service: {x:?}");
        }
    }
    Ok(())
}

/// Graceful termination (issue 12): a socket's flow stays on its backend
/// while that backend is terminating but still serving, as conntrack keeps
/// a UDP flow to a serving endpoint; new sockets avoid it.
#[test]
fn udp_flow_stays_on_a_terminating_backend_new_ones_avoid_it() -> Result<()> {
    let proto = PortSpec::udp("dns", 53);
    let env = setup("udpterm", 3, proto.clone(), 5353)?;
    env.node.start_agent(env.cluster.manifests().dir())?;
    let client = env
        .client
        .spawn_client(&env.node, &env.flow(40, 100, false))?;
    let seen = poll_until(Duration::from_secs(10), || {
        let r: Vec<ProbeResult> = client.so_far()?;
        Ok((r.len() >= 5).then_some(r))
    })?;
    let Some((first, _)) = seen else {
        bail!("udp-flow printed fewer than 5 results in 10 s");
    };
    let x = first[0].server.clone().unwrap_or_default();
    let xi: usize = x[1..].parse().expect("b<i>");
    // x terminates, still serving; the others stay ready.
    let endpoints = (1..=3)
        .map(|i| {
            let addr = env.backends[i - 1].ip_like(ip(SVC4));
            match i == xi {
                true => EndpointSpec::terminating(addr),
                false => EndpointSpec::ready(addr),
            }
        })
        .collect();
    let ep_port = PortSpec::new(&proto.name, 5353, proto.protocol);
    let slice = SliceSpec::new("dns-1", "dns", vec![ep_port], endpoints);
    env.cluster.manifests().write_slice(&slice)?;
    thread::sleep(CHANGE_DEADLINE);
    let fresh = env
        .client
        .connect(&env.node, &Connect::udp(ip(SVC4), 53).count(30))?;
    assert!(all_ok(&fresh), "errors {:?}", by_error(&fresh));
    assert!(
        !distinct(&fresh).contains(&x),
        "a new socket reached terminating {x}: {:?}\n{}",
        by_server(&fresh),
        env.log_tail()
    );
    let r: Vec<ProbeResult> = client.finish()?;
    assert_eq!(r.len(), 40);
    assert!(all_ok(&r), "errors {:?}\n{}", by_error(&r), env.log_tail());
    assert_eq!(
        distinct(&r),
        BTreeSet::from([x.clone()]),
        "the flow left terminating {x}: {:?}\n{}",
        servers(&r),
        env.log_tail()
    );
    Ok(())
}
