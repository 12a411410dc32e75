//! Issue 13: the API server goes away under client traffic and comes back
//! with a changed state, end to end in the netns cluster: a real agent
//! (in the node's netns) watching the mock API server (listening in that
//! netns), a client pod making TCP and UDP connections to a ClusterIP.
//! (kube_source.rs has the other API faults without traffic.)
//!
//! Needs root and the svclb binary (SVCLB_BIN, or a debug build in the
//! target dir).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};
use svclb_tests::agent::frontends;
use svclb_tests::mock_api::{MockApi, ALL};
use svclb_tests::{by_error, AgentSource, Cluster, Connect, Hold, Node, ProbeResult};

const WEB: &str = "198.19.0.10";
const API: &str = "198.19.0.20";
/// How long the API server is away (issue 13).
const OUTAGE: Duration = Duration::from_secs(30);
/// Reconnecting waits for kube-rs' backoff: up to 30 s plus as much jitter.
const RECONNECT_DEADLINE: Duration = Duration::from_secs(90);
/// Issue 13: converged within 1 s of the reconnect.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(1);

/// A Service with port 80 over TCP and UDP, to target port 8080.
fn service(name: &str, ip: &str) -> Value {
    json!({
        "kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
            "ports": [
                {"name": "tcp", "port": 80, "protocol": "TCP", "targetPort": 8080},
                {"name": "udp", "port": 80, "protocol": "UDP", "targetPort": 8080},
            ],
        },
    })
}

fn slice(name: &str, service: &str, addrs: &[IpAddr]) -> Value {
    let endpoints: Vec<Value> = (addrs.iter())
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}}))
        .collect();
    json!({
        "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
        "metadata": {
            "name": name, "namespace": "demo",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "tcp", "port": 8080, "protocol": "TCP"},
            {"name": "udp", "port": 8080, "protocol": "UDP"},
        ],
        "endpoints": endpoints,
    })
}

/// The frontends of `ip` (TCP and UDP) to `backends`, as
/// [`frontends`] prints them.
fn lines(ip: &str, backends: &[IpAddr]) -> Vec<String> {
    let to: Vec<String> = backends.iter().map(|b| format!("{b}:8080")).collect();
    ["TCP", "UDP"]
        .iter()
        .map(|p| format!("{ip}:80/{p} -> {}", to.join(" ")))
        .collect()
}

fn wait_for_maps(node: &Node, want: &[String], within: Duration) -> Result<Instant> {
    let mut want = want.to_vec();
    want.sort();
    let deadline = Instant::now() + within;
    loop {
        let now = frontends(node.pin_dir())?;
        if now == want {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("maps not {want:#?} within {within:?}: {now:#?}");
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn api_outage_under_traffic_then_restart_with_changes() -> Result<()> {
    let cluster = Cluster::new("api-outage")?;
    let node = cluster.add_node("n1")?;
    let client = node.add_pod("client")?;
    let (b1, b2) = (node.add_pod("b1")?, node.add_pod("b2")?);
    b1.spawn_server("b1", &[8080])?;
    b2.spawn_server("b2", &[8080])?;
    let (b1, b2): (IpAddr, IpAddr) = (b1.ipv4().into(), b2.ipv4().into());

    let mock = MockApi::start_in(&node.netns_path());
    mock.apply(node.node_object(&[]));
    mock.apply(service("web", WEB));
    mock.apply(slice("web-a", "web", &[b1]));
    let kubeconfig = cluster.tmp_dir().join("kubeconfig");
    std::fs::write(&kubeconfig, mock.kubeconfig())?;
    let agent = node.start_agent_from(AgentSource::Api(kubeconfig), &[], &[])?;
    let before = lines(WEB, &[b1]);
    wait_for_maps(&node, &before, Duration::from_secs(10))?;

    // Traffic from here to the end: TCP (a long-lived connection and a new
    // one every 20 ms) and UDP (5 datagrams from a new socket at a time).
    let web: IpAddr = WEB.parse()?;
    let hold = client.spawn_hold(&node, &Hold::new(web, 80, 300_000, 20).until_eof())?;
    let stop = Arc::new(AtomicBool::new(false));
    let udp = {
        let (client, node, stop) = (client.clone(), node.clone(), stop.clone());
        thread::spawn(move || -> Result<Vec<ProbeResult>> {
            let mut results = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                results.extend(client.connect(&node, &Connect::udp(web, 80).count(5))?);
                thread::sleep(Duration::from_millis(100));
            }
            Ok(results)
        })
    };
    thread::sleep(Duration::from_millis(500));

    // Killed: the listener closes, every watch connection is cut. The
    // maps stay as they are; the agent stays up and says so.
    mock.stop();
    let down = Instant::now();
    while down.elapsed() < OUTAGE {
        assert_eq!(frontends(node.pin_dir())?, before, "the maps changed");
        assert!(agent.is_running(), "the agent exited:\n{}", agent.log());
        thread::sleep(Duration::from_millis(500));
    }
    assert!(agent.log().contains("watch failed"), "the outage is logged");

    // Restarted with a changed state: the slice moved to b2, a new service,
    // and the old resourceVersions are gone (a new API server's watch
    // cache), so every watch gets 410 and relists.
    mock.apply(slice("web-a", "web", &[b2]));
    mock.apply(service("api", API));
    mock.apply(slice("api-a", "api", &[b1, b2]));
    for r in ALL {
        mock.expire(r);
    }
    mock.restart();
    let back = Instant::now();
    let mut after = lines(WEB, &[b2]);
    after.extend(lines(API, &[b1, b2]));
    let converged = wait_for_maps(&node, &after, RECONNECT_DEADLINE)?;
    let reconnect = mock
        .first_answer_since(back)
        .expect("no request since the restart");
    eprintln!(
        "API back -> first answered request {:?}; -> maps converged {:?} ({:?} after the API's return)",
        reconnect - back,
        converged - reconnect,
        converged - back
    );
    assert!(
        converged - reconnect <= CONVERGE_DEADLINE,
        "converged {:?} after the reconnect\n{}",
        converged - reconnect,
        agent.log()
    );
    thread::sleep(Duration::from_millis(500));

    stop.store(true, Ordering::Relaxed);
    let udp = udp.join().expect("UDP client thread")?;
    let tcp = hold.finish_hold()?;
    eprintln!(
        "TCP: {} requests on the long-lived connection, {} new connections; UDP: {} exchanges",
        tcp.requests,
        tcp.new_connections,
        udp.len()
    );
    assert_eq!(
        (tcp.failures, tcp.new_connection_failures),
        (0, 0),
        "{tcp:?}"
    );
    assert!(tcp.new_connections >= 1000, "{tcp:?}");
    assert!(udp.len() >= 100, "{} UDP exchanges", udp.len());
    assert_eq!(by_error(&udp), Default::default(), "UDP failures");
    assert!(agent.is_running());
    Ok(())
}
