//! Connected UDP sockets leave a backend that stops being usable: a socket
//! connect()ed to a ClusterIP is translated once, to one backend; when that
//! backend is removed from the service (or stops serving), the socket must
//! not keep sending into nothing. svclb destroys it (sock_diag SOCK_DESTROY
//! in the pod's network namespace), so the application's next send/recv
//! fails and it can reconnect. A socket connected to the pod's own address
//! and TCP connections through the service are left alone.
//!
//! Needs root and the svclb binary (SVCLB_BIN, or a debug build in the
//! target dir).

use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Result};
use serde_json::Value;
use svclb_tests::{Cluster, EndpointSpec, PortSpec, ServiceSpec, SliceSpec};

const SVC4: &str = "198.19.0.10";
const SVC6: &str = "fd00:5::10";
/// The deadline: from the EndpointSlice change to the socket leaving
/// the backend.
const DEADLINE_MS: u64 = 1000;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("valid address literal")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How backend b1 stops being usable.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// Removed from the EndpointSlice.
    Deleted,
    /// Still listed, with serving=false (and not ready).
    NotServing,
    /// Terminating but still serving, while b2 is ready: kube-proxy keeps
    /// its UDP conntrack, so the socket must stay on b1 (control case).
    Terminating,
}

/// One node, a client pod, backends b1 and b2 (TCP and UDP on 8080); a
/// dual-stack service whose only endpoint is b1 at first. The client holds
/// connected UDP sockets to the service (both families) and to b1's own
/// addresses, and a TCP connection through the service; then b1 leaves.
fn run(label: &str, change: Change) -> Result<()> {
    let cluster = Cluster::new(label)?;
    let node = cluster.add_node("n1")?;
    let client = node.add_pod("client")?;
    let b1 = node.add_pod("b1")?;
    let b2 = node.add_pod("b2")?;
    b1.spawn_server("b1", &[8080])?;
    b2.spawn_server("b2", &[8080])?;
    let svc_ports = vec![
        PortSpec::tcp("http", 80).target(8080),
        PortSpec::udp("dns", 53).target(8080),
    ];
    let ep_ports = vec![PortSpec::tcp("http", 8080), PortSpec::udp("dns", 8080)];
    let manifests = cluster.manifests();
    manifests.write_service(&ServiceSpec::new("svc", &[ip(SVC4), ip(SVC6)], svc_ports))?;
    let slice = |name: &str, eps: Vec<EndpointSpec>| {
        manifests.write_slice(&SliceSpec::new(name, "svc", ep_ports.clone(), eps))
    };
    let ready = |pod: &svclb_tests::Pod, like: &str| EndpointSpec::ready(pod.ip_like(ip(like)));
    slice("svc-v4", vec![ready(&b1, SVC4)])?;
    slice("svc-v6", vec![ready(&b1, SVC6)])?;
    let agent = node.start_agent(manifests.dir())?;

    let udp_frontends = [SocketAddr::new(ip(SVC4), 53), SocketAddr::new(ip(SVC6), 53)];
    let udp_direct = [
        SocketAddr::new(b1.ip_like(ip(SVC4)), 8080),
        SocketAddr::new(b1.ip_like(ip(SVC6)), 8080),
    ];
    let tcp_frontend = SocketAddr::new(ip(SVC4), 80);
    let mut args: Vec<String> = vec!["watch".into(), "--interval-ms".into(), "50".into()];
    for t in udp_frontends.iter().chain(&udp_direct) {
        args.extend(["--udp".into(), t.to_string()]);
    }
    args.extend(["--tcp".into(), tcp_frontend.to_string()]);
    let watch = client.spawn_client(&node, &args)?;
    thread::sleep(Duration::from_millis(700));

    let gone = |pod: &svclb_tests::Pod, like: &str| match change {
        Change::Deleted => vec![ready(&b2, like)],
        Change::NotServing => vec![
            EndpointSpec::not_ready(pod.ip_like(ip(like))),
            ready(&b2, like),
        ],
        Change::Terminating => vec![
            EndpointSpec::terminating(pod.ip_like(ip(like))),
            ready(&b2, like),
        ],
    };
    slice("svc-v4", gone(&b1, SVC4))?;
    slice("svc-v6", gone(&b1, SVC6))?;
    let changed = unix_ms();
    thread::sleep(Duration::from_millis(2 * DEADLINE_MS));
    let lines: Vec<Value> = watch.finish()?;

    let log = || {
        let log = agent.log();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "--- agent log (tail) ---\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    };
    let of = |target: String| -> Vec<&Value> {
        lines
            .iter()
            .filter(|l| l["target"] == target.as_str())
            .collect()
    };
    let show = |rs: &[&Value]| -> String {
        rs.iter()
            .map(|r| {
                let at = r["unix_ms"].as_u64().unwrap_or(0) as i64 - changed as i64;
                match r["ok"].as_bool() {
                    Some(true) => format!("{at:+}ms {}", r["server"]),
                    _ => format!("{at:+}ms {} ({})", r["error"], r["stage"]),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let at = |r: &Value| r["unix_ms"].as_u64().unwrap_or(0);
    let from_b1 = |r: &Value| r["ok"] == true && r["server"] == "b1";

    if let Change::Terminating = change {
        for t in udp_frontends {
            let rs = of(format!("udp {t}"));
            ensure!(
                rs.iter().any(|r| at(r) >= changed + DEADLINE_MS) && rs.iter().all(|r| from_b1(r)),
                "{t}: a socket connected to a terminating but serving backend must stay on it: {}\n{}",
                show(&rs),
                log()
            );
        }
        return Ok(());
    }
    for t in udp_frontends {
        let rs = of(format!("udp {t}"));
        let before: Vec<&Value> = rs.iter().copied().filter(|r| at(r) < changed).collect();
        ensure!(
            !before.is_empty() && before.iter().all(|r| from_b1(r)),
            "{change:?} {t}: before the change every request must reach b1: {}\n{}",
            show(&rs),
            log()
        );
        // From the deadline on: never b1, never silence; an error (the
        // socket was destroyed) or a remaining backend.
        let late: Vec<&Value> = rs
            .iter()
            .copied()
            .filter(|r| at(r) >= changed + DEADLINE_MS)
            .collect();
        let left = |r: &Value| !from_b1(r) && r["error"] != "ETIMEDOUT";
        ensure!(
            !late.is_empty() && late.iter().all(|r| left(r)),
            "{change:?} {t}: the connected socket still uses b1 (or times out) {DEADLINE_MS} ms after the change: {}\n{}",
            show(&rs),
            log()
        );
        let first = rs.iter().find(|r| at(r) >= changed && left(r));
        eprintln!(
            "{change:?} {t}: left b1 at {:?} ms after the change (first: {})",
            first.map(|r| at(r) - changed),
            first.map(|r| show(&[r])).unwrap_or_default()
        );
    }
    for t in udp_direct {
        let rs = of(format!("udp {t}"));
        ensure!(
            !rs.is_empty() && rs.iter().all(|r| from_b1(r)),
            "{change:?} {t}: a socket connected to the pod itself must be untouched: {}\n{}",
            show(&rs),
            log()
        );
    }
    let rs = of(format!("tcp {tcp_frontend}"));
    ensure!(
        rs.iter().any(|r| at(r) >= changed + DEADLINE_MS) && rs.iter().all(|r| from_b1(r)),
        "{change:?}: a TCP connection through the service must be untouched: {}\n{}",
        show(&rs),
        log()
    );
    Ok(())
}

#[test]
fn connected_udp_leaves_a_deleted_backend() -> Result<()> {
    run("udpdel", Change::Deleted)
}

#[test]
fn connected_udp_leaves_a_backend_that_stops_serving() -> Result<()> {
    run("udpsrv", Change::NotServing)
}

#[test]
fn connected_udp_stays_on_a_terminating_serving_backend() -> Result<()> {
    run("udpterm", Change::Terminating)
}
