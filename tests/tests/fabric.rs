//! Self-tests of the harness's external network (the fabric): nodes
//! connected to each other and to clients outside the cluster. No svclb
//! involved: plain routing only.

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;
use serde_json::{json, Value};
use svclb_tests::{netns, Cluster, Connect, ExternalClient, Node, Pod, ProbeResult, EXT_IF};

/// Every attempt reached server `name`, which saw `client` as the source.
fn assert_reached(results: &[ProbeResult], c: &Connect, name: &str, client: IpAddr) {
    assert_eq!(results.len(), c.count as usize, "{c:?}");
    for r in results {
        assert!(r.ok, "{c:?}: {r:?}");
        assert_eq!(r.server.as_deref(), Some(name), "{c:?}");
        let seen: SocketAddr = r.client.as_deref().unwrap().parse().unwrap();
        assert_eq!(seen.ip(), client, "{c:?}: source address not preserved");
    }
}

fn both_families(pod: &Pod) -> [IpAddr; 2] {
    [pod.ipv4().into(), pod.ipv6().into()]
}

#[test]
fn pods_on_different_nodes_reach_each_other_by_pod_ip() -> Result<()> {
    let cluster = Cluster::new("fabric-pods")?;
    let (n1, n2) = (cluster.add_node("n1")?, cluster.add_node("n2")?);
    // One pod made before its node is attached, one after.
    let b = n2.add_pod("b")?;
    n1.attach_external()?;
    n2.attach_external()?;
    let a = n1.add_pod("a")?;
    b.spawn_server("b", &[8080])?;
    a.spawn_server("a", &[8080])?;
    for (from, node, to, name) in [(&a, &n1, &b, "b"), (&b, &n2, &a, "a")] {
        for addr in both_families(to) {
            for c in [
                Connect::tcp(addr, 8080).count(3),
                Connect::udp(addr, 8080).count(3),
            ] {
                let r = from.connect(node, &c)?;
                assert_reached(&r, &c, name, from.ip_like(addr));
            }
        }
    }
    Ok(())
}

#[test]
fn external_client_reaches_nodes_and_routed_pod_subnets() -> Result<()> {
    let cluster = Cluster::new("fabric-client")?;
    let node = cluster.add_node("n1")?;
    node.attach_external()?;
    let pod = node.add_pod("web")?;
    pod.spawn_server("web", &[8080])?;
    node.spawn_server("host", &[9090])?;
    let client = cluster.add_external_client("ext")?;
    assert_eq!(client.ipv4().to_string(), "198.18.0.200");
    assert_eq!(client.ipv6().to_string(), "fd00:20::c8");

    // The node's ext0 addresses are on the client's subnet.
    for addr in [node.ext_ipv4().into(), node.ext_ipv6().into()] {
        for c in [
            Connect::tcp(addr, 9090).count(3),
            Connect::udp(addr, 9090).count(3),
        ] {
            assert_reached(&client.connect(&c)?, &c, "host", client.ip_like(addr));
        }
    }

    // Pod subnets are not routed from outside until the test says so.
    for addr in both_families(&pod) {
        let r = client.connect(&Connect::tcp(addr, 8080))?;
        assert_eq!(r[0].error.as_deref(), Some("ENETUNREACH"), "{r:?}");
    }
    client.route_via("198.18.1.0/24", &node)?;
    client.route_via("fd00:0:0:1::/64", &node)?;
    for addr in both_families(&pod) {
        for c in [
            Connect::tcp(addr, 8080).count(3),
            Connect::udp(addr, 8080).count(3),
        ] {
            assert_reached(&client.connect(&c)?, &c, "web", client.ip_like(addr));
        }
    }
    // Probes work from the client as from pods.
    let who: Vec<Value> = client.run_client_as(&["whoami"])?;
    assert!(who[0]["pid"].as_u64().is_some(), "{who:?}");
    Ok(())
}

#[test]
fn vip_route_moves_between_nodes() -> Result<()> {
    let cluster = Cluster::new("fabric-vip")?;
    let (n1, n2) = (cluster.add_node("n1")?, cluster.add_node("n2")?);
    n1.attach_external()?;
    n2.attach_external()?;
    // The "VIP" is each node's own ext address here; what matters is which
    // node the client's route sends it to.
    n1.spawn_server("n1", &[9090])?;
    n2.spawn_server("n2", &[9090])?;
    n1.ip(&["addr", "add", "198.19.8.8/32", "dev", "lo"])?;
    n2.ip(&["addr", "add", "198.19.8.8/32", "dev", "lo"])?;
    let client = cluster.add_external_client("lb")?;
    let c = Connect::tcp("198.19.8.8".parse::<IpAddr>()?, 9090);
    client.route_via("198.19.8.8/32", &n1)?;
    assert_reached(&client.connect(&c)?, &c, "n1", client.ipv4().into());
    client.route_via("198.19.8.8/32", &n2)?;
    assert_reached(&client.connect(&c)?, &c, "n2", client.ipv4().into());
    Ok(())
}

fn tx_csum(ns: &str, ifname: &str) -> bool {
    netns::tx_checksum(ns, ifname).unwrap_or_else(|e| panic!("{ns} {ifname}: {e:#}"))
}

#[test]
fn tx_checksum_offload_is_off_on_every_external_veth() -> Result<()> {
    let cluster = Cluster::new("fabric-csum")?;
    let (n1, n2) = (cluster.add_node("n1")?, cluster.add_node("n2")?);
    let before = n1.add_pod("before")?;
    n1.attach_external()?;
    let after = n1.add_pod("after")?;
    let inside = n2.add_pod("inside")?;
    let client: ExternalClient = cluster.add_external_client("ext")?;

    // Veths are created with the offload on: the check can see a difference.
    assert!(tx_csum(inside.netns_name(), "eth0"));
    assert!(tx_csum(n2.netns_name(), "vp0"));
    // Off on the attached node's veth ends, its pods', and the client's.
    assert!(!tx_csum(n1.netns_name(), EXT_IF));
    for (k, pod) in [&before, &after].iter().enumerate() {
        assert!(!tx_csum(pod.netns_name(), "eth0"), "{}", pod.name());
        assert!(
            !tx_csum(n1.netns_name(), &format!("vp{k}")),
            "{}",
            pod.name()
        );
    }
    assert!(!tx_csum(client.netns_name(), "eth0"));
    // The fabric-side peers: the only veths in the fabric netns.
    let fabric = cluster.fabric_netns_name();
    for peer in ["n1", "c0"] {
        assert!(!tx_csum(&fabric, peer), "fabric {peer}");
    }
    // Switching back on works too (the setter really sets).
    netns::set_tx_checksum(client.netns_name(), "eth0", true)?;
    assert!(tx_csum(client.netns_name(), "eth0"));
    Ok(())
}

fn read_node_object(cluster: &Cluster, node: &Node) -> Result<Value> {
    let file = node.write_node_object(&[("topology.kubernetes.io/zone", "z1")])?;
    let text = std::fs::read_to_string(cluster.manifests().dir().join(file))?;
    Ok(serde_saphyr::from_str(&text)?)
}

#[test]
fn node_object_lists_ext_addresses_once_attached() -> Result<()> {
    let cluster = Cluster::new("fabric-nodeobj")?;
    let node = cluster.add_node("n1")?;
    let v = read_node_object(&cluster, &node)?;
    assert_eq!(v["kind"], "Node");
    assert_eq!(v["metadata"]["name"], "n1");
    assert_eq!(v["metadata"]["labels"]["topology.kubernetes.io/zone"], "z1");
    assert_eq!(
        v["status"]["addresses"],
        json!([{"type": "InternalIP", "address": "198.18.1.1"},
               {"type": "InternalIP", "address": "fd00:0:0:1::1"}])
    );
    node.attach_external()?;
    let v = read_node_object(&cluster, &node)?;
    assert_eq!(
        v["status"]["addresses"],
        json!([{"type": "InternalIP", "address": "198.18.0.1"},
               {"type": "InternalIP", "address": "fd00:20::1"}])
    );
    Ok(())
}

#[test]
fn cleanup_removes_fabric_and_clients() -> Result<()> {
    let cluster = Cluster::new("fabric-clean")?;
    let node = cluster.add_node("n1")?;
    node.attach_external()?;
    let client = cluster.add_external_client("ext")?;
    let hold = client.spawn_client(&["serve", "--name", "x", "--port", "7070"])?;
    let paths = cluster.owned_paths();
    // node netns, cgroup, pin dir, fabric, client.
    assert_eq!(paths.len(), 5, "{paths:?}");
    assert!(paths.iter().all(|p| p.exists()), "{paths:?}");
    let pid = hold.pid();
    drop(cluster);
    for p in &paths {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    assert!(
        status.is_empty() || status.contains("State:\tZ"),
        "pid {pid} still running"
    );
    Ok(())
}
