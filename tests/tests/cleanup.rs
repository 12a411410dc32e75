//! `svclb cleanup` on the real kernel: an agent with `--devices` on a
//! simulated node is killed (as a crash would), then cleanup, run in the
//! node's network namespace, must leave no svclb program, tc filter, clsact
//! qdisc it added, pin, cgroup link or changed sysctl, keep what others
//! added, and find nothing the second time. With `--kube-proxy` it removes
//! a kube-proxy-shaped iptables (legacy and nft backends) and nftables
//! ruleset and keeps the other rules.
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{ensure, Result};
use svclb_tests::agent::svclb_bin;
use svclb_tests::cmd::{self, Placement};
use svclb_tests::netns;
use svclb_tests::{kernel_at_least, Cluster, Node, PortSpec, ServiceSpec, EXT_IF};
use svclb_userspace::cleanup::bpf;

const ACCEPT_LOCAL: &str = "/proc/sys/net/ipv4/conf/ext0/accept_local";

/// `svclb cleanup --bpffs DIR [extra]` in the node's netns (setns only, as
/// the agent runs): its stdout; fails unless it exits 0.
fn cleanup(node: &Node, dir: &std::path::Path, extra: &[&str]) -> Result<String> {
    let mut c = Command::new(svclb_bin()?);
    c.arg("cleanup").arg("--bpffs").arg(dir).args(extra);
    c.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = std::time::Instant::now();
    let child = cmd::spawn_placed(
        &mut c,
        &Placement {
            netns: Some(&node.netns_path()),
            cgroup: None,
        },
    )?;
    let out = cmd::wait_output(&c, child, Duration::from_secs(60))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "svclb cleanup ({:?}):\n{stdout}{}",
        started.elapsed(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Run `args` in the node's netns.
fn in_node(node: &Node, args: &[&str]) -> Result<String> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", node.netns_name()]).args(args);
    cmd::run(&mut c)
}

fn in_node_with_input(node: &Node, args: &[&str], input: &str) -> Result<()> {
    use std::io::Write;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", node.netns_name()]).args(args);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{}: {}\n{input}",
        cmd::describe(&c),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn accept_local(node: &Node) -> Result<String> {
    let value = netns::in_netns(node.netns_name(), || {
        Ok(std::fs::read_to_string(ACCEPT_LOCAL)?)
    })?;
    Ok(value.trim().to_string())
}

/// Whether every one of `tools` is on PATH, as iproute2's/netfilter's own
/// (the vm-test initramfs has busybox and `ip` only): else the test is
/// skipped, saying so.
fn have(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| {
            Command::new(t).arg("-V").output().map_or(true, |o| {
                let text = String::from_utf8_lossy(&o.stdout) + String::from_utf8_lossy(&o.stderr);
                // "iproute2-6.1.0", "ip6tables-restore v1.8.9", "nftables v1.0.6"
                !(text.contains("iproute2") || text.contains("tables"))
            })
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("skipped: missing {missing:?}");
    }
    missing.is_empty()
}

/// cgroup links on the node's cgroup (a cgroup's id is its inode number).
fn cgroup_links(node: &Node) -> Result<usize> {
    let id = std::fs::metadata(node.cgroup())?.ino();
    Ok(bpf::links()
        .iter()
        .filter(|(l, _)| l.kind == bpf::LINK_TYPE_CGROUP && l.cgroup_id == id)
        .count())
}

/// What the node's ext0 shows: (XDP attached, tc egress filters, qdiscs).
fn ext0(node: &Node) -> Result<(bool, String, String)> {
    let link = in_node(node, &["ip", "-d", "link", "show", "dev", EXT_IF])?;
    let qdiscs = in_node(node, &["tc", "qdisc", "show", "dev", EXT_IF])?;
    // With no clsact qdisc there can be no egress filter (and tc fails).
    let filters = if qdiscs.contains("clsact") {
        in_node(node, &["tc", "filter", "show", "dev", EXT_IF, "egress"])?
    } else {
        String::new()
    };
    Ok((link.contains("prog/xdp"), filters, qdiscs))
}

/// A node on the fabric with a NodePort service in its manifests.
fn setup(label: &str) -> Result<Option<(Cluster, Node)>> {
    if !kernel_at_least(5, 10) {
        eprintln!("skipped: svclb needs Linux 5.10+");
        return Ok(None);
    }
    if !have(&["tc"]) {
        return Ok(None);
    }
    let cluster = Cluster::new(label)?;
    let node = cluster.add_node("n1")?;
    node.attach_external()?;
    node.write_node_object(&[])?;
    let mut svc = ServiceSpec::new(
        "web",
        &["198.19.0.40".parse()?],
        vec![PortSpec::tcp("http", 80).target(8080)],
    );
    svc.extra_spec = Some(serde_json::json!({
        "type": "NodePort",
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30090}],
    }));
    cluster.manifests().write_service(&svc)?;
    Ok(Some((cluster, node)))
}

#[test]
fn cleanup_after_a_crash_leaves_nothing_of_svclb() -> Result<()> {
    let Some((cluster, node)) = setup("cleanup")? else {
        return Ok(());
    };
    assert_eq!(accept_local(&node)?, "0");
    let agent = node.start_agent_with_devices(cluster.manifests().dir(), &[EXT_IF])?;
    // What the agent added, so the checks below can fail.
    let (xdp, filters, qdiscs) = ext0(&node)?;
    assert!(xdp, "no XDP program on ext0");
    assert!(filters.contains("svclb_tc_egress"), "{filters}");
    assert!(qdiscs.contains("clsact"), "{qdiscs}");
    assert_eq!(accept_local(&node)?, "1");
    assert_eq!(cgroup_links(&node)?, 8);
    assert!(node.pin_dir().exists());

    agent.kill();
    let out = cleanup(&node, node.pin_dir(), &[])?;
    for expected in [
        "detached cgroup link of svclb_connect4",
        "detached XDP link of svclb_xdp",
        "tc egress filter svclb_tc_egress on ext0",
        "clsact qdisc on ext0",
        "sysctl net.ipv4.conf.ext0.accept_local set back to 0",
        "SVCLB_SERVICES",
    ] {
        assert!(out.contains(expected), "{expected:?} not in:\n{out}");
    }
    let (xdp, filters, qdiscs) = ext0(&node)?;
    assert!(!xdp, "XDP still attached");
    assert!(filters.is_empty(), "{filters}");
    assert!(!qdiscs.contains("clsact"), "{qdiscs}");
    assert_eq!(accept_local(&node)?, "0");
    assert_eq!(cgroup_links(&node)?, 0);
    assert!(!node.pin_dir().exists(), "pin dir left");

    assert_eq!(cleanup(&node, node.pin_dir(), &[])?, "nothing to remove\n");
    Ok(())
}

#[test]
fn cleanup_keeps_what_others_added_and_finds_filters_without_pins() -> Result<()> {
    let Some((cluster, node)) = setup("cleanup-keep")? else {
        return Ok(());
    };
    // Someone else's clsact qdisc with an ingress filter, and the sysctl
    // already as svclb wants it.
    in_node(&node, &["tc", "qdisc", "add", "dev", EXT_IF, "clsact"])?;
    in_node(
        &node,
        &[
            "tc", "filter", "add", "dev", EXT_IF, "ingress", "protocol", "all", "prio", "7", "u32",
            "match", "u32", "0", "0", "classid", "1:1",
        ],
    )?;
    netns::sysctls(
        node.netns_name(),
        &[("net.ipv4.conf.ext0.accept_local", "1")],
    )?;
    let agent = node.start_agent_with_devices(cluster.manifests().dir(), &[EXT_IF])?;
    assert!(ext0(&node)?.1.contains("svclb_tc_egress"));
    agent.kill();
    // What the README used to say was enough: the tc filter stays.
    std::fs::remove_dir_all(node.pin_dir())?;
    assert!(ext0(&node)?.1.contains("svclb_tc_egress"));

    let out = cleanup(&node, node.pin_dir(), &[])?;
    assert!(
        out.contains("tc egress filter svclb_tc_egress on ext0"),
        "{out}"
    );
    let (xdp, filters, qdiscs) = ext0(&node)?;
    assert!(!xdp);
    assert!(!filters.contains("svclb"), "{filters}");
    assert!(
        qdiscs.contains("clsact"),
        "someone else's qdisc went: {qdiscs}"
    );
    let ingress = in_node(&node, &["tc", "filter", "show", "dev", EXT_IF, "ingress"])?;
    assert!(
        ingress.contains("u32"),
        "someone else's filter went: {ingress}"
    );
    assert_eq!(accept_local(&node)?, "1");
    assert_eq!(cgroup_links(&node)?, 0);
    assert_eq!(cleanup(&node, node.pin_dir(), &[])?, "nothing to remove\n");
    Ok(())
}

#[test]
fn a_device_left_out_of_devices_is_given_back() -> Result<()> {
    let Some((cluster, node)) = setup("cleanup-dev")? else {
        return Ok(());
    };
    let agent = node.start_agent_with_devices(cluster.manifests().dir(), &[EXT_IF])?;
    assert_eq!(accept_local(&node)?, "1");
    agent.kill();
    // The next agent without --devices: ext0 is as before the first.
    let agent = node.start_agent(cluster.manifests().dir())?;
    let (xdp, filters, qdiscs) = ext0(&node)?;
    assert!(!xdp, "XDP still attached");
    assert!(filters.is_empty(), "{filters}");
    assert!(!qdiscs.contains("clsact"), "{qdiscs}");
    assert_eq!(accept_local(&node)?, "0");
    agent.stop()
}

/// kube-proxy's filter, mangle and ip6tables pieces, plus chains that are
/// not kube-proxy's (kubelet's KUBE-FIREWALL, OTHER) which must stay.
const FILTER_AND_MORE: &str = r#"*filter
:KUBE-FORWARD - [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-EXTERNAL-SERVICES - [0:0]
:KUBE-FIREWALL - [0:0]
:OTHER - [0:0]
-A INPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -j OTHER
-A OUTPUT -m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A OTHER -s 198.18.0.0/15 -j ACCEPT
-A KUBE-FORWARD -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FIREWALL -m mark --mark 0x8000/0x8000 -j DROP
COMMIT
*mangle
:KUBE-PROXY-CANARY - [0:0]
COMMIT
*nat
:OTHER-NAT - [0:0]
-A PREROUTING -j OTHER-NAT
-A OTHER-NAT -s 198.18.0.0/15 -j RETURN
COMMIT
"#;
const IP6: &str = r#"*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-0123456789ABCDEF - [0:0]
-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
-A KUBE-SERVICES -d fd00:30::10/128 -p tcp -m tcp --dport 80 -j KUBE-SVC-0123456789ABCDEF
COMMIT
"#;

#[test]
fn kube_proxy_rules_go_and_the_others_stay() -> Result<()> {
    use svclb_tests::{kubeproxy_iptables, kubeproxy_nft};
    let tools = [
        "iptables-legacy-restore",
        "iptables-nft-restore",
        "ip6tables-legacy-restore",
        "ip6tables-nft-restore",
        "nft",
    ];
    if !have(&tools) {
        return Ok(());
    }
    let cluster = Cluster::new("cleanup-kp")?;
    let node = cluster.add_node("n1")?;
    let services = kubeproxy_iptables::filler_services(3, 2);
    let nat = kubeproxy_iptables::ruleset(&services, "198.18.0.0/16");
    for backend in ["legacy", "nft"] {
        let restore = format!("iptables-{backend}-restore");
        in_node_with_input(&node, &[&restore], &nat)?;
        in_node_with_input(&node, &[&restore, "--noflush"], FILTER_AND_MORE)?;
        in_node_with_input(&node, &[&format!("ip6tables-{backend}-restore")], IP6)?;
    }
    let nft = kubeproxy_nft::ruleset(&services, "198.18.0.0/16")
        + "table inet other {\n  chain c {\n    type filter hook input priority 0; policy accept;\n  }\n}\n";
    in_node_with_input(&node, &["nft", "-f", "-"], &nft)?;
    // IPVS mode's device (a dummy there; no dummy module here, and it goes
    // by name).
    node.ip(&[
        "link",
        "add",
        "kube-ipvs0",
        "type",
        "veth",
        "peer",
        "name",
        "kipvs-peer",
    ])?;
    let saved = |tool: &str| in_node(&node, &[tool]);
    assert!(saved("iptables-legacy-save")?.contains(":KUBE-SEP-"));
    assert!(in_node(&node, &["nft", "list", "tables"])?.contains("table ip6 kube-proxy"));

    let pins = cluster.tmp_dir().join("no-pins");
    let out = cleanup(&node, &pins, &["--kube-proxy"])?;
    assert!(out.contains("nftables table ip kube-proxy"), "{out}");
    let links = node.ip(&["-o", "link", "show"])?;
    assert!(!links.contains("kube-ipvs0"), "{links}");
    for tool in [
        "iptables-legacy-save",
        "iptables-nft-save",
        "ip6tables-legacy-save",
        "ip6tables-nft-save",
    ] {
        let text = saved(tool)?;
        let left: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("KUBE-") && !l.contains("KUBE-FIREWALL"))
            .collect();
        assert!(left.is_empty(), "{tool}: kube-proxy rules left: {left:?}");
        if tool.starts_with("iptables") {
            for kept in [
                ":KUBE-FIREWALL",
                "-A INPUT -j KUBE-FIREWALL",
                "-A FORWARD -j OTHER",
                "-A OTHER -s 198.18.0.0/15 -j ACCEPT",
                "-A PREROUTING -j OTHER-NAT",
            ] {
                assert!(text.contains(kept), "{tool}: {kept:?} went:\n{text}");
            }
        }
    }
    let tables = in_node(&node, &["nft", "list", "tables"])?;
    assert!(!tables.contains("kube-proxy"), "{tables}");
    assert!(tables.contains("table inet other"), "{tables}");

    // Again, leaving svclb's state alone (as while migrating, with the
    // agent running): nothing left of kube-proxy's.
    assert_eq!(
        cleanup(&node, &pins, &["--kube-proxy-only"])?,
        "nothing to remove\n"
    );
    Ok(())
}
