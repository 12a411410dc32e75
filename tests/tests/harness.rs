//! Self-tests of the netns harness itself: no svclb involved.

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Result;
use serde_json::Value;
use svclb_tests::{mounts, netns, Cluster, Connect, Hold, Node, Pod, ProbeResult};

fn check_direct(client: &Pod, node: &Node, server: &Pod, c: Connect) -> Result<()> {
    let results = client.connect(node, &c.clone().count(5))?;
    assert_eq!(results.len(), 5, "{c:?}");
    for r in &results {
        let want_peer = SocketAddr::new(server.ip_like(c.addr), c.port).to_string();
        let want_client = client.ip_like(c.addr);
        assert!(r.ok, "{c:?}: {r:?}");
        assert_eq!(r.server.as_deref(), Some("b"), "{c:?}");
        assert_eq!(r.server_port, Some(c.port));
        assert_eq!(r.peer.as_deref(), Some(want_peer.as_str()), "{c:?}");
        let seen: SocketAddr = r.client.as_deref().unwrap().parse()?;
        assert_eq!(seen.ip(), want_client, "{c:?}");
    }
    Ok(())
}

#[test]
fn pods_reach_each_other_directly() -> Result<()> {
    let cluster = Cluster::new("direct")?;
    let node = cluster.add_node("n1")?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    b.spawn_server("b", &[8080, 9090])?;
    for addr in [IpAddr::from(b.ipv4()), IpAddr::from(b.ipv6())] {
        check_direct(&a, &node, &b, Connect::tcp(addr, 8080))?;
        check_direct(&a, &node, &b, Connect::tcp(addr, 9090))?;
        check_direct(&a, &node, &b, Connect::udp(addr, 8080))?;
        check_direct(&a, &node, &b, Connect::udp(addr, 8080).connected())?;
    }
    // Nothing listens on 7070: refused, and reported as such.
    let r = a.connect(&node, &Connect::tcp(b.ipv4(), 7070))?;
    assert_eq!(r[0].error.as_deref(), Some("ECONNREFUSED"), "{r:?}");
    Ok(())
}

#[test]
fn client_runs_in_node_netns_and_cgroup() -> Result<()> {
    let cluster = Cluster::new("placement")?;
    let node = cluster.add_node("n1")?;
    let pod = node.add_pod("a")?;
    let out: Vec<Value> = pod.run_client_as(&node, &["whoami"])?;
    let cgroup = out[0]["cgroup"].as_str().unwrap();
    let rel = node.cgroup().strip_prefix(mounts::cgroup2_root()?)?;
    let want = format!("0::/{}", rel.display());
    assert!(
        cgroup.lines().any(|l| l == want),
        "{cgroup:?} lacks {want:?}"
    );
    let ino = std::fs::metadata(pod.netns_path())?.ino();
    assert_eq!(out[0]["netns"], format!("net:[{ino}]"));
    Ok(())
}

#[test]
fn hold_reports_requests_and_connections() -> Result<()> {
    let cluster = Cluster::new("hold")?;
    let node = cluster.add_node("n1")?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    b.spawn_server("b", &[8080])?;
    // A fixed run (1 s, a request every 20 ms) that ends by itself: counting
    // works however slowly the machine runs (the VM matrix emulates CPUs).
    let hold = a.spawn_hold(&node, &Hold::new(b.ipv6(), 8080, 1_000, 20))?;
    let s = hold.finish_hold()?;
    assert!(s.requests >= 3 && s.new_connections >= 3, "{s:?}");
    assert_eq!((s.failures, s.new_connection_failures), (0, 0), "{s:?}");
    assert!(s.servers.contains_key("b"), "{s:?}");
    Ok(())
}

/// Builds a cluster with everything that needs cleaning: processes in
/// pods and in the node cgroup, and files in the pin dir.
fn busy_cluster(label: &str) -> Result<(Cluster, Vec<PathBuf>, Vec<u32>)> {
    let cluster = Cluster::new(label)?;
    let node = cluster.add_node("n1")?;
    let a = node.add_pod("a")?;
    let b = node.add_pod("b")?;
    let server = b.spawn_server("b", &[8080])?;
    let hold = a.spawn_hold(&node, &Hold::new(b.ipv4(), 8080, 60_000, 50))?;
    std::fs::create_dir(node.pin_dir().join("sub"))?;
    pin_array_map(&node.pin_dir().join("sub/map"))?;
    let paths = cluster.owned_paths();
    assert_eq!(paths.len(), 5);
    assert!(paths.iter().all(|p| p.exists()), "{paths:?}");
    Ok((cluster, paths, vec![server.pid(), hold.pid()]))
}

/// Create a tiny BPF array map and pin it at `path`, as an agent would
/// (bpffs only holds directories and pinned objects).
fn pin_array_map(path: &std::path::Path) -> Result<()> {
    use std::ffi::CString;
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
    }
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    // SAFETY: bpf(2) with a correctly laid out (prefix of) union bpf_attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            size_of::<MapCreate>(),
        )
    };
    anyhow::ensure!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())?;
    let pin = ObjPin {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    // SAFETY: as above; c_path outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_PIN,
            &pin as *const ObjPin,
            size_of::<ObjPin>(),
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the map fd we created; the pin keeps the map alive.
    unsafe { libc::close(fd as libc::c_int) };
    anyhow::ensure!(rc == 0, "BPF_OBJ_PIN {}: {err}", path.display());
    Ok(())
}

fn assert_gone(paths: &[PathBuf], pids: &[u32]) {
    for p in paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        // Gone, or at most a zombie nobody reaped yet.
        assert!(
            status.is_empty() || status.contains("State:\tZ"),
            "pid {pid} still running"
        );
    }
}

#[test]
fn cleanup_on_drop_leaves_nothing() -> Result<()> {
    let (cluster, paths, pids) = busy_cluster("drop")?;
    drop(cluster);
    assert_gone(&paths, &pids);
    Ok(())
}

#[test]
fn cleanup_after_panic_leaves_nothing() {
    let seen: Mutex<Option<(Vec<PathBuf>, Vec<u32>)>> = Mutex::new(None);
    let r = panic::catch_unwind(AssertUnwindSafe(|| {
        let (_cluster, paths, pids) = busy_cluster("panic").unwrap();
        *seen.lock().unwrap() = Some((paths, pids));
        panic!("deliberate");
    }));
    assert!(r.is_err());
    let (paths, pids) = seen.lock().unwrap().take().expect("cluster was built");
    assert_gone(&paths, &pids);
}

#[test]
fn leftovers_of_dead_runs_are_swept() -> Result<()> {
    // Above any pid_max, so this "owner" is certainly dead.
    let dead_pid: u32 = 4_194_304 + 1000;
    let mut b36 = String::new();
    let mut n = dead_pid;
    while n > 0 {
        b36.insert(0, char::from_digit(n % 36, 36).unwrap());
        n /= 36;
    }
    let name = format!("svt{b36}-0-n1");
    // A failed earlier run of this test may have left the same names.
    svclb_tests::cluster::sweep_leftovers()?;
    netns::create(&name)?;
    let cg = mounts::cgroup2_root()?.join(&name);
    std::fs::create_dir(&cg)?;
    let pin = mounts::ensure_bpffs()?.join(&name);
    std::fs::create_dir(&pin)?;
    std::fs::create_dir(pin.join("inner"))?;
    svclb_tests::cluster::sweep_leftovers()?;
    assert_gone(&[netns::path(&name), cg, pin], &[]);
    Ok(())
}

#[test]
fn probe_failure_line_parses() {
    // The probe's failure line parses into ProbeResult.
    let r: ProbeResult = serde_json::from_str(
        r#"{"ok":false,"error":"ECONNREFUSED","stage":"connect","detail":"x"}"#,
    )
    .unwrap();
    assert!(!r.ok && r.server.is_none());
}
