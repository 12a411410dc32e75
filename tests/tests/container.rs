//! The image under a real container runtime (podman with runc), run as
//! deploy/svclb.yaml's DaemonSet runs it (`svclb_tests::podman` turns the
//! DaemonSet into `podman run` flags): not privileged, only its
//! capabilities, its seccomp setting, its host mounts (read-only where it
//! has them so), a read-only root filesystem; the host network replaced by
//! a simulated node's netns, the API server by the manifests directory.
//! The scenarios are those of clusterip.rs and external.rs, on the same
//! harness. (Every test of those files can also be run against the image:
//! `SVCLB_AGENT_IMAGE=IMAGE cargo test -p svclb-tests --test clusterip`.)
//!
//! The image: $SVCLB_TEST_IMAGE (`cargo xtask test` builds it and sets
//! this), else the DaemonSet's. Skipped with a message without podman, or
//! without the DaemonSet's image when $SVCLB_TEST_IMAGE is not set.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::json;
use svclb_tests::manifests::to_yaml;
use svclb_tests::{
    by_error, by_server, cmd, podman, poll_until, AgentRuntime, Cluster, Connect, EndpointSpec,
    Hold, Node, PortSpec, ProbeResult, Proto, ServiceSpec, SliceSpec, EXT_IF,
};

const SVC4: &str = "198.19.0.10";
const SVC6: &str = "fd00:5::10";
const NODE_PORT: u16 = 30080;
const DEADLINE: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

/// The image to test, or None (skipped, with the reason printed).
fn image() -> Result<Option<String>> {
    if !podman::available() {
        eprintln!("skipped: podman is not installed (`cargo xtask setup` installs it)");
        return Ok(None);
    }
    if let Ok(image) = std::env::var("SVCLB_TEST_IMAGE") {
        if !podman::image_exists(&image) {
            bail!("SVCLB_TEST_IMAGE={image} is not in podman's storage");
        }
        return Ok(Some(image));
    }
    let ds = podman::daemonset()?;
    let image = ds.image().context("the DaemonSet names no image")?;
    if !podman::image_exists(&image) {
        eprintln!("skipped: no image {image} (build it with `cargo xtask image`)");
        return Ok(None);
    }
    Ok(Some(image))
}

fn cluster(label: &str) -> Result<Option<Cluster>> {
    let Some(image) = image()? else {
        return Ok(None);
    };
    Ok(Some(Cluster::with_runtime(
        label,
        AgentRuntime::Podman { image },
    )?))
}

/// Capability numbers of linux/capability.h, by the DaemonSet's names.
fn cap_bit(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("capability {other}: add its number here"),
    }
}

/// A line "Key:\tvalue" of /proc/PID/status.
fn status_field(pid: u32, key: &str) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// Mount options of the mount at `point` as the process `pid` sees it.
fn mount_options(pid: u32, point: &str) -> Result<Vec<String>> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
    // The last mount at a point is the one in effect.
    info.lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(point))
        .and_then(|l| l.split(' ').nth(5))
        .map(|o| o.split(',').map(str::to_string).collect())
        .with_context(|| format!("no mount at {point} for pid {pid}"))
}

fn accept_local(node: &Node, dev: &str) -> Result<String> {
    let path = format!("/proc/sys/net/ipv4/conf/{dev}/accept_local");
    let out = cmd::run(
        Command::new("ip")
            .args(["netns", "exec", node.netns_name(), "cat"])
            .arg(&path),
    )?;
    Ok(out.trim().to_string())
}

fn only(results: &[ProbeResult], names: &[&str]) -> bool {
    let want: BTreeSet<&str> = names.iter().copied().collect();
    results.iter().all(|r| r.ok)
        && by_server(results)
            .keys()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
            == want
}

/// The container holds exactly the DaemonSet's privileges, and the agent
/// works with them: it attached, synced, and warned about nothing.
#[test]
fn the_agent_runs_with_the_daemonsets_privileges_only() -> Result<()> {
    let Some(cluster) = cluster("ctpriv")? else {
        return Ok(());
    };
    let node = cluster.add_node("n1")?;
    node.attach_external()?;
    let agent = node.start_agent_with_devices(cluster.manifests().dir(), &[EXT_IF])?;
    let pid = podman::container_pid(agent.container().context("not in a container")?)?;

    let ds = podman::daemonset()?;
    let granted: u64 = ds
        .capabilities()
        .iter()
        .map(|c| 1u64 << cap_bit(c))
        .fold(0, |a, b| a | b);
    // A runtime can only grant what its own bounding set holds (this
    // sandbox's lacks SYS_RESOURCE, which kernels since 5.11 don't need).
    let ours = u64::from_str_radix(&status_field(std::process::id(), "CapBnd")?, 16)?;
    let want = granted & ours;
    if want != granted {
        eprintln!(
            "note: capabilities {:#x} of the DaemonSet are not in this host's bounding set",
            granted & !ours
        );
    }
    for key in ["CapEff", "CapPrm", "CapBnd"] {
        let got = u64::from_str_radix(&status_field(pid, key)?, 16)?;
        assert_eq!(
            got, want,
            "{key}: {got:#x}, the DaemonSet grants {granted:#x}"
        );
    }
    assert_eq!(status_field(pid, "NoNewPrivs")?, "1");
    // Seccomp: 0 disabled (the DaemonSet's Unconfined), 2 filtered.
    let seccomp = ds.security_context().seccomp_profile.map(|s| s.type_);
    let want_seccomp = if seccomp.as_deref() == Some("Unconfined") {
        "0"
    } else {
        "2"
    };
    assert_eq!(status_field(pid, "Seccomp")?, want_seccomp);
    assert!(mount_options(pid, "/")?.contains(&"ro".into()), "root fs");
    assert!(
        mount_options(pid, "/run/svclb/cgroup")?.contains(&"ro".into()),
        "cgroup mount"
    );
    assert!(mount_options(pid, "/proc/sys")?.contains(&"ro".into()));

    // /proc/sys is read-only in the container: accept_local is set through
    // rtnetlink.
    assert_eq!(accept_local(&node, EXT_IF)?, "1");
    let log = agent.log();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(warnings.is_empty(), "warnings:\n{}", warnings.join("\n"));
    agent.stop()?;
    Ok(())
}

/// clusterip.rs's scenarios through the containerized agent: TCP, UDP
/// (sendto and connected) and IPv6 reach every backend; a change applies;
/// connections survive a crash (SIGKILL of the container) and a graceful
/// restart, since maps and links are pinned on the host's bpffs.
#[test]
fn cluster_ip_services() -> Result<()> {
    let Some(cluster) = cluster("ctcip")? else {
        return Ok(());
    };
    let node = cluster.add_node("n1")?;
    let client = node.add_pod("client")?;
    let mut backends = Vec::new();
    for i in 1..=3 {
        let pod = node.add_pod(&format!("b{i}"))?;
        pod.spawn_server(&format!("b{i}"), &[8080])?;
        backends.push(pod);
    }
    let ready = |which: &[usize], like: &str| -> Vec<EndpointSpec> {
        which
            .iter()
            .map(|&i| EndpointSpec::ready(backends[i - 1].ip_like(ip(like))))
            .collect()
    };
    let m = cluster.manifests();
    m.write_service(&ServiceSpec::new(
        "web",
        &[ip(SVC4), ip(SVC6)],
        vec![
            PortSpec::tcp("http", 80).target(8080),
            PortSpec::udp("dns", 53).target(8080),
        ],
    ))?;
    let ports = || vec![PortSpec::tcp("http", 8080), PortSpec::udp("dns", 8080)];
    m.write_slice(&SliceSpec::new(
        "web-v4",
        "web",
        ports(),
        ready(&[1, 2, 3], SVC4),
    ))?;
    m.write_slice(&SliceSpec::new(
        "web-v6",
        "web",
        ports(),
        ready(&[1, 2, 3], SVC6),
    ))?;
    let agent = node.start_agent(m.dir())?;

    let all = ["b1", "b2", "b3"];
    for c in [
        Connect::tcp(ip(SVC4), 80),
        Connect::tcp(ip(SVC6), 80),
        Connect::udp(ip(SVC4), 53),
        Connect::udp(ip(SVC4), 53).connected(),
        Connect::udp(ip(SVC6), 53),
    ] {
        let r = client.connect(&node, &c.clone().count(60))?;
        assert!(
            only(&r, &all),
            "{c:?}: ok {:?} errors {:?}\n{}",
            by_server(&r),
            by_error(&r),
            agent.log()
        );
    }

    let holds = [SVC4, SVC6]
        .map(|svc| client.spawn_hold(&node, &Hold::new(ip(svc), 80, 120_000, 20).until_eof()));
    thread::sleep(Duration::from_millis(300));
    agent.kill();
    thread::sleep(Duration::from_millis(300));
    node.start_agent(m.dir())?;
    thread::sleep(Duration::from_millis(300));
    node.restart_agent()?;
    thread::sleep(Duration::from_millis(300));
    for (svc, hold) in [SVC4, SVC6].iter().zip(holds) {
        let s = hold?.finish_hold()?;
        assert!(s.requests >= 20 && s.new_connections >= 20, "{svc}: {s:?}");
        assert_eq!(
            (s.failures, s.new_connection_failures),
            (0, 0),
            "{svc}: {s:?}"
        );
    }

    m.write_slice(&SliceSpec::new("web-v4", "web", ports(), ready(&[2], SVC4)))?;
    let c = Connect::tcp(ip(SVC4), 80).count(20);
    let seen = poll_until(DEADLINE, || {
        Ok(only(&client.connect(&node, &c)?, &["b2"]).then_some(()))
    })?;
    assert!(seen.is_some(), "change after restart not applied");
    node.agent().context("agent")?.stop()?;
    Ok(())
}

/// external.rs's scenarios through the containerized agents (XDP and tc on
/// `--devices`): NodePort with the Cluster policy reaches the remote
/// backend through SNAT and the local one with the client's address; with
/// the Local policy only the local backend answers, seeing the client.
#[test]
fn node_ports_from_outside() -> Result<()> {
    let Some(cluster) = cluster("ctext")? else {
        return Ok(());
    };
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
    let write = |policy: &str| -> Result<()> {
        let mut svc = ServiceSpec::new("web", &[ip("198.19.0.30")], Vec::new());
        svc.extra_spec = Some(json!({
            "type": "NodePort",
            "externalTrafficPolicy": policy,
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": NODE_PORT},
                {"name": "dns", "port": 80, "protocol": "UDP", "targetPort": 8080, "nodePort": NODE_PORT},
            ],
        }));
        cluster
            .manifests()
            .write(&svc.file_name(), &to_yaml(&svc.to_json()))
    };
    write("Cluster")?;
    let eps = (0..2)
        .map(|i| EndpointSpec {
            node_name: Some(nodes[i].name().to_string()),
            ..EndpointSpec::ready(backends[i].ipv4().into())
        })
        .collect();
    let ports = vec![
        PortSpec::tcp("http", 8080),
        PortSpec::new("dns", 8080, Proto::Udp),
    ];
    cluster
        .manifests()
        .write_slice(&SliceSpec::new("web-1", "web", ports, eps))?;
    for node in &nodes {
        node.start_agent_with_devices(cluster.manifests().dir(), &[EXT_IF])?;
    }
    let n1 = &nodes[0];
    let seen_clients = |r: &[ProbeResult], server: &str| -> BTreeSet<String> {
        r.iter()
            .filter(|p| p.ok && p.server.as_deref() == Some(server))
            .filter_map(|p| {
                p.client
                    .as_ref()?
                    .rsplit_once(':')
                    .map(|(h, _)| h.to_string())
            })
            .collect()
    };
    let converge = |what: &str, c: &Connect, done: &dyn Fn(&[ProbeResult]) -> bool| {
        let mut last = Vec::new();
        let seen = poll_until(DEADLINE, || {
            last = client.connect(c)?;
            Ok(done(&last).then_some(()))
        })?;
        if seen.is_none() {
            let logs: Vec<String> = nodes
                .iter()
                .filter_map(|n| n.agent().map(|a| a.log()))
                .collect();
            bail!(
                "{what}: ok {:?} errors {:?}\n{}",
                by_server(&last),
                by_error(&last),
                logs.join("\n---\n")
            );
        }
        Ok(last)
    };

    for c in [
        Connect::tcp(n1.ext_ipv4(), NODE_PORT),
        Connect::udp(n1.ext_ipv4(), NODE_PORT),
    ] {
        let c = c.count(40).timeout_ms(1000);
        let r = converge("Cluster policy reaches b1 and b2", &c, &|r| {
            only(r, &["b1", "b2"])
        })?;
        assert_eq!(
            seen_clients(&r, "b1"),
            BTreeSet::from([client.ipv4().to_string()])
        );
        assert_eq!(
            seen_clients(&r, "b2"),
            BTreeSet::from([n1.ext_ipv4().to_string()])
        );
    }

    write("Local")?;
    let c = Connect::tcp(n1.ext_ipv4(), NODE_PORT)
        .count(20)
        .timeout_ms(1000);
    let r = converge("Local policy reaches b1 only", &c, &|r| only(r, &["b1"]))?;
    assert_eq!(
        seen_clients(&r, "b1"),
        BTreeSet::from([client.ipv4().to_string()])
    );
    for node in &nodes {
        node.agent().context("agent")?.stop()?;
    }
    Ok(())
}
