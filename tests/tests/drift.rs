//! Drift: the pinned maps changed behind the agent's back (as bpftool
//! would), `svclb verify` reports every change, and the agent's periodic
//! check repairs them within one sync period. On the real kernel, one node
//! with XDP on its external device (so Maglev tables exist).

use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde_json::{json, Value};
use svclb_common::{maps, Backend, MaglevChunk, MaglevKey, RevNat, ServiceKey, ServiceValue};
use svclb_tests::agent::svclb_bin;
use svclb_tests::cmd::{self, Placement};
use svclb_tests::{
    by_server, kernel_at_least, netns, poll_until, Cluster, Connect, EndpointSpec, PortSpec,
    ServiceSpec, SliceSpec, EXT_IF,
};
use svclb_userspace::dataplane::abi::{addr_to_abi, service_key};
use svclb_userspace::dataplane::map_path;
use svclb_userspace::model::{FrontendKey, Protocol};

const WEB_IP: &str = "198.19.0.40";
const STICKY_IP: &str = "198.19.0.41";
const SYNC_PERIOD: Duration = Duration::from_secs(2);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

fn open<K: aya::Pod, V: aya::Pod>(bpffs: &Path, name: &str) -> BpfHashMap<MapData, K, V> {
    let data = MapData::from_pin(map_path(bpffs, name)).expect(name);
    BpfHashMap::try_from(Map::HashMap(data)).expect(name)
}

/// `svclb verify --output json` in the node's netns (where the agent's
/// metrics address is), against the agent or a saved desired state.
fn verify(netns: &Path, bpffs: &Path, desired: Option<&Path>) -> Result<(i32, Value)> {
    let mut cmd = Command::new(svclb_bin()?);
    cmd.args(["verify", "--output", "json", "--bpffs"])
        .arg(bpffs)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(file) = desired {
        cmd.arg("--desired").arg(file);
    }
    let place = Placement {
        netns: Some(netns),
        cgroup: None,
    };
    let out = cmd::spawn_placed(&mut cmd, &place)?.wait_with_output()?;
    let code = out.status.code().unwrap_or(-1);
    if code == 2 {
        bail!("verify failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok((code, serde_json::from_slice(&out.stdout)?))
}

/// The (map, kind) pairs of a verify report.
fn kinds(report: &Value) -> Vec<(String, String)> {
    report["differences"]
        .as_array()
        .expect("differences")
        .iter()
        .map(|d| {
            (
                d["map"].as_str().unwrap_or_default().to_string(),
                d["kind"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

#[test]
fn changed_maps_are_reported_and_repaired() -> Result<()> {
    if !kernel_at_least(5, 10) {
        eprintln!("skipped: svclb needs Linux 5.10+");
        return Ok(());
    }
    let cluster = Cluster::new("drift")?;
    let node = cluster.add_node("n1")?;
    node.attach_external()?;
    node.write_node_object(&[])?;
    let client = node.add_pod("client")?;
    let mut backends = Vec::new();
    for name in ["b1", "b2"] {
        let pod = node.add_pod(name)?;
        pod.spawn_server(name, &[8080])?;
        backends.push(pod);
    }
    let ready: Vec<EndpointSpec> = backends
        .iter()
        .map(|p| EndpointSpec::ready(p.ipv4().into()))
        .collect();
    let manifests = cluster.manifests();
    // A NodePort service (socket and external frontends, Maglev tables)
    // and a ClusterIP one with session affinity (affinity members).
    let web = ServiceSpec::new("web", &[ip(WEB_IP)], Vec::new())
        .with_spec("type", json!("NodePort"))
        .with_spec(
            "ports",
            json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30090}]),
        );
    manifests.write_service(&web)?;
    let sticky = ServiceSpec::new(
        "sticky",
        &[ip(STICKY_IP)],
        vec![PortSpec::tcp("http", 80).target(8080)],
    )
    .with_spec("sessionAffinity", json!("ClientIP"));
    manifests.write_service(&sticky)?;
    for svc in ["web", "sticky"] {
        let slice = SliceSpec::new(
            &format!("{svc}-1"),
            svc,
            vec![PortSpec::tcp("http", 8080)],
            ready.clone(),
        );
        manifests.write_slice(&slice)?;
    }
    let period = format!("{}s", SYNC_PERIOD.as_secs());
    let agent = node.start_agent_with(manifests.dir(), &[EXT_IF], &["--sync-period", &period])?;
    let bpffs = node.pin_dir().to_path_buf();
    let ns = node.netns_name().to_string();
    let ns_path = node.netns_path();

    let (code, report) = verify(&ns_path, &bpffs, None)?;
    assert_eq!(code, 0, "fresh agent: {report:#}");
    assert!(report["frontends"].as_u64().unwrap_or(0) >= 3, "{report:#}");
    // What the agent wants, saved for checking while it is stopped.
    let desired = netns::in_netns(&ns, || {
        svclb_userspace::verify::fetch_desired("http://127.0.0.1:10249")
    })?;
    let desired_file = cluster.tmp_dir().join("desired.json");
    std::fs::write(&desired_file, serde_json::to_string(&desired)?)?;

    // Stopped, the agent can't repair anything while the maps are changed
    // and verified.
    signal(agent.pid(), libc::SIGSTOP);
    let web_key = FrontendKey::new(ip(WEB_IP), 80, Protocol::Tcp);
    let sticky_key = FrontendKey::new(ip(STICKY_IP), 80, Protocol::Tcp);
    let mut services: BpfHashMap<_, ServiceKey, ServiceValue> = open(&bpffs, maps::SERVICES);
    let sticky_rev_nat = services.get(&service_key(&sticky_key, 0), 0)?.rev_nat_id;
    // A slot of web's ClusterIP frontend deleted.
    services.remove(&service_key(&web_key, 2))?;
    // A frontend nobody asked for.
    let extra = FrontendKey::new(ip("198.19.9.9"), 99, Protocol::Tcp);
    services.insert(service_key(&extra, 0), ServiceValue::default(), 0)?;
    // b1's backend entry now names another port; an unknown backend added.
    let mut backend_map: BpfHashMap<_, u32, Backend> = open(&bpffs, maps::BACKENDS);
    let b1 = addr_to_abi(backends[0].ipv4().into());
    let (b1_id, mut b1_entry) = backend_map
        .iter()
        .filter_map(Result::ok)
        .find(|(_, b)| b.addr == b1)
        .context("b1's backend entry")?;
    b1_entry.port = 9999;
    backend_map.insert(b1_id, b1_entry, 0)?;
    backend_map.insert(
        999_999,
        Backend {
            port: 1,
            ..b1_entry
        },
        0,
    )?;
    // sticky's rev-NAT entry deleted.
    let mut rev_nat: BpfHashMap<_, u32, RevNat> = open(&bpffs, maps::REV_NAT);
    rev_nat.remove(&sticky_rev_nat)?;
    // A Maglev entry names the table's other backend.
    let mut maglev: BpfHashMap<_, MaglevKey, MaglevChunk> = open(&bpffs, maps::MAGLEV);
    let chunk_key = maglev.keys().next().context("a Maglev chunk")??;
    let mut chunk = maglev.get(&chunk_key, 0)?;
    let first = chunk.backend_ids[0];
    let other = *chunk
        .backend_ids
        .iter()
        .find(|id| **id != first && **id != 0)
        .context("two backends in the table")?;
    chunk.backend_ids[0] = other;
    maglev.insert(chunk_key, chunk, 0)?;

    let (code, report) = verify(&ns_path, &bpffs, Some(&desired_file))?;
    assert_eq!(code, 1, "{report:#}");
    let found = kinds(&report);
    for (map, kind) in [
        (maps::SERVICES, "missing"),
        (maps::SERVICES, "extra"),
        (maps::BACKENDS, "wrong"),
        (maps::BACKENDS, "extra"),
        (maps::REV_NAT, "missing"),
        (maps::MAGLEV, "wrong"),
    ] {
        assert!(
            found.contains(&(map.to_string(), kind.to_string())),
            "{kind} {map} not reported: {report:#}"
        );
    }
    eprintln!("verify reported {} differences", found.len());

    // Running again, the agent repairs within one sync period (its next
    // check may be due at once: it slept through the last one).
    signal(agent.pid(), libc::SIGCONT);
    let resumed = Instant::now();
    let deadline = SYNC_PERIOD + Duration::from_secs(2);
    let repaired = poll_until(deadline, || {
        let (code, _) = verify(&ns_path, &bpffs, None)?;
        Ok((code == 0).then_some(()))
    })?;
    let log = agent.log();
    assert!(
        repaired.is_some(),
        "not repaired within {deadline:?}: {:#}\n{log}",
        verify(&ns_path, &bpffs, None)?.1
    );
    eprintln!("repaired {:?} after the agent resumed", resumed.elapsed());
    assert!(log.contains("map drift"), "drift is logged:\n{log}");
    let metrics = netns::in_netns(&ns, || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:10249")?;
        use std::io::{Read, Write};
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })?;
    assert!(
        metrics.contains(&format!(
            "svclb_map_drift_total{{map=\"{}\"}}",
            maps::MAGLEV
        )),
        "drift counted by map"
    );

    // And traffic reaches both backends again, on their right port.
    for addr in [WEB_IP, STICKY_IP] {
        let r = client.connect(
            &node,
            &Connect::tcp(ip(addr), 80).count(if addr == WEB_IP { 60 } else { 5 }),
        )?;
        assert!(
            r.iter()
                .all(|r| r.error.is_none() && r.server_port == Some(8080)),
            "{addr}: {r:?}"
        );
        if addr == WEB_IP {
            assert_eq!(
                by_server(&r).len(),
                2,
                "{addr}: both backends: {:?}",
                by_server(&r)
            );
        }
    }
    Ok(())
}
