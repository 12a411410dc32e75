//! Packet fixtures for the external path: the real eBPF programs, maps
//! filled by the real Writer, packets run through BPF_PROG_RUN. Each
//! fixture sends one packet in and compares the verdict and the packet that
//! comes out, byte for byte, with one built independently (checksums
//! computed from scratch, MACs from the test node's neighbours).
//!
//! Needs root (BPF, network namespaces) and Linux 5.15+ (BPF_PROG_RUN with
//! an XDP context); skipped otherwise. Each test runs
//! in a network namespace of its own (see `prog_test::TestNode`), where
//! `bpf_fib_lookup` finds fixed routes and permanent neighbours. Nothing
//! is sent anywhere: BPF_PROG_RUN only reports the verdict.
use std::net::{IpAddr, SocketAddr};

use svclb_common::{ct_state, flow_hash, stats, FLOW_EGRESS, PROTO_TCP, PROTO_UDP};
use svclb_tests::prog_test::packet::{self, Packet, IP4_MF, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
use svclb_tests::prog_test::{
    ProgTest, Run, TestNode, EXT_MAC, NODE2_V4, NODE_V4, NODE_V6, PEER_MAC, ROUTER_MAC, TC_ACT_OK,
    XDP_DROP, XDP_PASS, XDP_TX,
};
use svclb_userspace::dataplane::abi::addr_to_abi;
use svclb_userspace::dataplane::conntrack::{now_ticks, SweepReport, Timeouts};
use svclb_userspace::dataplane::maglev;
use svclb_userspace::model::{
    Backend, Cidr, Frontend, FrontendKey, FrontendKind, Protocol, Scope, WhenEmpty,
};

const SNAT_PORTS: (u16, u16) = (61000, 65535);
const CLIENT4: &str = "198.18.128.10:40000";
const CLIENT6: &str = "[fd00:250::10]:40000";
const LOCAL4: &str = "198.18.1.5:8080";
const REMOTE4: &str = "198.18.2.5:8080";
const REMOTE6: &str = "[fd00:2::5]:8080";
const LB4: &str = "198.19.100.10:80";
const EXTERNAL_IP4: &str = "198.19.100.20:80";

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn nodeport4() -> SocketAddr {
    SocketAddr::new(NODE_V4.into(), 30080)
}

/// Run `f` in a new test node's namespace with the programs loaded and the
/// SNAT addresses set; skipped (with a message) when not root.
fn fixture(f: impl FnOnce(&mut ProgTest, &TestNode) + Send) {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: XDP fixtures need root (BPF, network namespaces)");
        return;
    }
    // BPF_PROG_RUN takes an XDP context (the ingress device, which the FIB
    // lookup starts from) from Linux 5.15 on.
    if aya::util::KernelVersion::current()
        .is_ok_and(|v| v < aya::util::KernelVersion::new(5, 15, 0))
    {
        eprintln!("skipped: XDP fixtures need BPF_PROG_RUN with an xdp_md context (Linux 5.15+)");
        return;
    }
    let node = TestNode::create().expect("creating the test node's namespace");
    node.in_netns(|| {
        let mut t = ProgTest::load(4096).expect("loading the programs");
        t.set_snat(Some(NODE_V4), Some(NODE_V6), SNAT_PORTS)
            .expect("setting the SNAT addresses");
        f(&mut t, &node);
    })
    .expect("entering the test node's namespace");
}

fn frontend(kind: FrontendKind, at: SocketAddr, proto: Protocol, backends: &[Backend]) -> Frontend {
    let mut backends = backends.to_vec();
    backends.sort();
    Frontend {
        key: FrontendKey {
            addr: at.ip(),
            port: at.port(),
            protocol: proto,
            scope: Scope::External,
        },
        kind,
        backends,
        when_empty: WhenEmpty::Refuse,
        affinity_timeout: None,
        source_ranges: Vec::new(),
        draining: Vec::new(),
        port_name: String::new(),
    }
}

fn backend(addr: &str, local: bool) -> Backend {
    let a = sa(addr);
    Backend {
        addr: a.ip(),
        port: a.port(),
        terminating: false,
        local,
    }
}

fn remote(addrs: &[SocketAddr]) -> Vec<Backend> {
    addrs
        .iter()
        .map(|a| backend(&a.to_string(), false))
        .collect()
}

/// A packet from `src` to `dst` as it arrives at ext0 from the router.
fn inbound(proto: u8, src: SocketAddr, dst: SocketAddr) -> Packet {
    let mut p = Packet::tcp(src, dst);
    p.proto = proto;
    p.src_mac = ROUTER_MAC;
    p.dst_mac = EXT_MAC;
    p
}

/// A TCP NodePort with the one backend `b`, and a client's SYN to it.
fn tcp_nodeport_to(t: &mut ProgTest, b: Backend) -> Packet {
    let fe = frontend(FrontendKind::NodePort, nodeport4(), Protocol::Tcp, &[b]);
    t.apply("np", &[fe]).unwrap();
    inbound(PROTO_TCP, sa(CLIENT4), nodeport4())
}

fn xdp(t: &ProgTest, node: &TestNode, p: &[u8]) -> Run {
    t.run_xdp(p, Some(node.ext_ifindex)).expect("BPF_PROG_RUN")
}

/// `p` translated to `src` -> `dst` and sent back out of ext0 (XDP_TX) to
/// `next_hop`: MACs from the FIB, TTL decremented.
fn transmitted(p: &Packet, src: SocketAddr, dst: SocketAddr, next_hop: [u8; 6]) -> Vec<u8> {
    Packet {
        src,
        dst,
        src_mac: EXT_MAC,
        dst_mac: next_hop,
        ttl: p.ttl - 1,
        ..p.clone()
    }
    .build()
}

/// `p` with only its addresses and ports changed (handed to the stack).
fn translated(p: &Packet, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    Packet {
        src,
        dst,
        ..p.clone()
    }
    .build()
}

fn assert_packet(run: &Run, verdict: u32, expected: &[u8]) {
    assert_eq!(run.verdict, verdict, "verdict");
    // Hex, so a failure shows where the bytes differ. Expected packets
    // are built with checksums computed from scratch: equal bytes mean
    // the program's incremental checksum updates are right too.
    assert_eq!(hex(&run.packet), hex(expected), "packet out");
}

fn hex(p: &[u8]) -> String {
    p.iter().map(|b| format!("{b:02x}")).collect()
}

fn snat_source(run: &Run) -> SocketAddr {
    let s = packet::summary(&run.packet).expect("an IP packet");
    assert!(
        (SNAT_PORTS.0..=SNAT_PORTS.1).contains(&s.src.port()),
        "SNAT port {} outside {SNAT_PORTS:?}",
        s.src.port()
    );
    s.src
}

/// The backend Maglev picks for `client` among `backends` (sorted as the
/// model sorts them), computed in userspace from the table every node builds.
fn maglev_pick(backends: &[SocketAddr], client: SocketAddr, proto: u8) -> SocketAddr {
    let mut sorted = backends.to_vec();
    sorted.sort();
    let names: Vec<Vec<u8>> = sorted
        .iter()
        .map(|b| {
            let mut name = match b.ip() {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            };
            name.extend_from_slice(&b.port().to_be_bytes());
            name
        })
        .collect();
    // Sized per frontend, up to the default --maglev-table-size.
    let size = maglev::size_for(sorted.len(), maglev::DEFAULT_TABLE_SIZE);
    let table = maglev::table(&names, size);
    let hash = flow_hash(&addr_to_abi(client.ip()), client.port(), proto);
    sorted[usize::from(table[(hash % size) as usize])]
}

fn pods(n: u8) -> Vec<SocketAddr> {
    (1..=n)
        .map(|i| SocketAddr::new([198, 18, 2, i].into(), 8080))
        .collect()
}

#[test]
fn nodeport_to_local_backend_is_dnat_only_and_tc_translates_the_reply() {
    fixture(|t, node| {
        let p = tcp_nodeport_to(t, backend(LOCAL4, true));
        let run = xdp(t, node, &p.build());
        // Client address kept; pod veths are not TX devices: to the stack.
        assert_packet(&run, XDP_PASS, &translated(&p, sa(CLIENT4), sa(LOCAL4)));
        assert_eq!(t.stat(stats::CT_CREATED), 1);
        let egress: Vec<_> = t
            .conntrack()
            .into_iter()
            .filter(|(_, f)| f.direction == FLOW_EGRESS)
            .collect();
        assert_eq!(egress.len(), 1, "one reply entry for tc");

        // The backend's reply leaves through tc egress as frontend -> client.
        let reply = Packet {
            src_mac: [0x02, 0, 0, 0, 0x01, 0x05],
            dst_mac: EXT_MAC,
            ..Packet::tcp(sa(LOCAL4), sa(CLIENT4))
        };
        let run = t.run_tc(&reply.build()).expect("BPF_PROG_RUN of tc");
        assert_packet(
            &run,
            TC_ACT_OK,
            &translated(&reply, nodeport4(), sa(CLIENT4)),
        );
        packet::verify_checksums(&run.packet).expect("valid checksums");
    });
}

/// A client that reuses its port to reach the pod directly (no service):
/// the SYN drops the old flow's reply entry, so tc leaves the pod's replies
/// alone instead of dressing them up as the NodePort's; a later SYN through
/// the service on the same tuple brings the entry back.
#[test]
fn direct_connection_reusing_a_tuple_is_not_rewritten() {
    fixture(|t, node| {
        let fe = frontend(
            FrontendKind::NodePort,
            nodeport4(),
            Protocol::Tcp,
            &[backend(LOCAL4, true)],
        );
        t.apply("np", &[fe]).unwrap();
        let via_service = inbound(PROTO_TCP, sa(CLIENT4), nodeport4());
        assert_eq!(xdp(t, node, &via_service.build()).verdict, XDP_PASS);
        let reply = Packet::tcp(sa(LOCAL4), sa(CLIENT4)).build();
        let before = t.run_tc(&reply).expect("BPF_PROG_RUN of tc");
        assert_ne!(
            before.packet, reply,
            "the service flow's reply is rewritten"
        );

        // Same client address and port, straight to the pod: a SYN that
        // hits no frontend passes untouched and forgets the reply entry.
        let direct = inbound(PROTO_TCP, sa(CLIENT4), sa(LOCAL4)).build();
        let run = xdp(t, node, &direct);
        assert_eq!((run.verdict, &run.packet), (XDP_PASS, &direct));
        let after = t.run_tc(&reply).expect("BPF_PROG_RUN of tc");
        assert_eq!(
            after.packet, reply,
            "the direct connection's reply is left alone"
        );

        // And back through the service on the same tuple: conntrack still
        // has the flow, and the SYN restores its reply entry.
        assert_eq!(xdp(t, node, &via_service.build()).verdict, XDP_PASS);
        let again = t.run_tc(&reply).expect("BPF_PROG_RUN of tc");
        assert_eq!(
            again.packet, before.packet,
            "rewritten as the NodePort's again"
        );
    });
}

#[test]
fn tc_reply_translation_ipv6_and_udp_zero_checksum() {
    fixture(|t, _node| {
        let np6 = SocketAddr::new(NODE_V6.into(), 30053);
        let local6 = "[fd00:1::5]:5353";
        let np4 = SocketAddr::new(NODE_V4.into(), 30053);
        t.apply(
            "dns",
            &[
                frontend(
                    FrontendKind::NodePort,
                    np4,
                    Protocol::Udp,
                    &[backend("198.18.1.5:5353", true)],
                ),
                frontend(
                    FrontendKind::NodePort,
                    np6,
                    Protocol::Udp,
                    &[backend(local6, true)],
                ),
            ],
        )
        .unwrap();
        let mut q4 = inbound(PROTO_UDP, sa(CLIENT4), np4);
        q4.udp_no_checksum = true;
        assert_eq!(t.run_xdp(&q4.build(), None).unwrap().verdict, XDP_PASS);
        let q6 = inbound(PROTO_UDP, sa(CLIENT6), np6);
        assert_eq!(t.run_xdp(&q6.build(), None).unwrap().verdict, XDP_PASS);

        let mut r4 = Packet::udp(sa("198.18.1.5:5353"), sa(CLIENT4));
        r4.udp_no_checksum = true;
        let run = t.run_tc(&r4.build()).unwrap();
        // Still without a checksum.
        assert_packet(&run, TC_ACT_OK, &translated(&r4, np4, sa(CLIENT4)));
        let r6 = Packet::udp(sa(local6), sa(CLIENT6));
        let run = t.run_tc(&r6.build()).unwrap();
        assert_packet(&run, TC_ACT_OK, &translated(&r6, np6, sa(CLIENT6)));
    });
}

#[test]
fn nodeport_to_remote_backend_is_snat_dnat_tx_and_the_reply_comes_back() {
    fixture(|t, node| {
        let p = tcp_nodeport_to(t, backend(REMOTE4, false));
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        assert_eq!(snat.ip(), IpAddr::from(NODE_V4));
        assert_packet(&run, XDP_TX, &transmitted(&p, snat, sa(REMOTE4), PEER_MAC));

        // The backend's reply to node:snat_port goes back to the client
        // from the frontend.
        let reply = Packet {
            src_mac: PEER_MAC,
            dst_mac: EXT_MAC,
            ..Packet::tcp(sa(REMOTE4), snat)
        };
        let run = xdp(t, node, &reply.build());
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&reply, nodeport4(), sa(CLIENT4), ROUTER_MAC),
        );
        assert_eq!(t.stat(stats::XDP_FORWARDED), 2);
    });
}

#[test]
fn load_balancer_and_external_ip_hits() {
    fixture(|t, node| {
        let lb = frontend(
            FrontendKind::LoadBalancer,
            sa(LB4),
            Protocol::Tcp,
            &[backend(REMOTE4, false)],
        );
        let eip = frontend(
            FrontendKind::ExternalIp,
            sa(EXTERNAL_IP4),
            Protocol::Tcp,
            &[backend(LOCAL4, true)],
        );
        t.apply("web", &[lb, eip]).unwrap();

        let p = inbound(PROTO_TCP, sa(CLIENT4), sa(LB4));
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        assert_packet(&run, XDP_TX, &transmitted(&p, snat, sa(REMOTE4), PEER_MAC));
        let reply = Packet {
            src_mac: PEER_MAC,
            dst_mac: EXT_MAC,
            ..Packet::tcp(sa(REMOTE4), snat)
        };
        let run = xdp(t, node, &reply.build());
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&reply, sa(LB4), sa(CLIENT4), ROUTER_MAC),
        );

        let p = inbound(PROTO_TCP, sa(CLIENT4), sa(EXTERNAL_IP4));
        let run = xdp(t, node, &p.build());
        assert_packet(&run, XDP_PASS, &translated(&p, sa(CLIENT4), sa(LOCAL4)));
    });
}

#[test]
fn misses_pass_untouched() {
    fixture(|t, node| {
        let np = frontend(
            FrontendKind::NodePort,
            nodeport4(),
            Protocol::Tcp,
            &[backend(REMOTE4, false)],
        );
        // A socket-scope frontend (ClusterIP) is not for XDP.
        let cluster_ip = Frontend::cluster_ip(
            FrontendKey::new("198.19.0.10".parse().unwrap(), 80, Protocol::Tcp),
            vec![backend(REMOTE4, false)],
        );
        t.apply("np", &[np, cluster_ip]).unwrap();
        for dst in [
            SocketAddr::new(NODE_V4.into(), 30081),  // another port
            SocketAddr::new(NODE2_V4.into(), 30080), // another node address
            sa("198.19.0.10:80"),
        ] {
            let p = inbound(PROTO_TCP, sa(CLIENT4), dst).build();
            assert_packet(&xdp(t, node, &p), XDP_PASS, &p);
        }
        // UDP to a TCP frontend.
        let p = inbound(PROTO_UDP, sa(CLIENT4), nodeport4()).build();
        assert_packet(&xdp(t, node, &p), XDP_PASS, &p);
        assert!(t.conntrack().is_empty());
    });
}

#[test]
fn established_flow_keeps_its_backend_when_the_maglev_table_changes() {
    fixture(|t, node| {
        let (old, new) = (pods(3), pods(10));
        // The new table is of another size, too (tables are sized from
        // their backend count).
        let size = |n| maglev::size_for(n, maglev::DEFAULT_TABLE_SIZE);
        assert_ne!(size(old.len()), size(new.len()));
        // A client whose new Maglev choice differs from its old one.
        let client = (40000..41000)
            .map(|port| SocketAddr::new([198, 18, 128, 10].into(), port))
            .find(|c| maglev_pick(&old, *c, PROTO_TCP) != maglev_pick(&new, *c, PROTO_TCP))
            .expect("some client moves");
        let first = maglev_pick(&old, client, PROTO_TCP);
        let np = |b: &[SocketAddr]| {
            frontend(
                FrontendKind::NodePort,
                nodeport4(),
                Protocol::Tcp,
                &remote(b),
            )
        };
        t.apply("np", &[np(&old)]).unwrap();
        let p = inbound(PROTO_TCP, client, nodeport4());
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        assert_packet(&run, XDP_TX, &transmitted(&p, snat, first, PEER_MAC));

        t.apply("np", &[np(&new)]).unwrap();
        let run = xdp(t, node, &p.build());
        assert_packet(&run, XDP_TX, &transmitted(&p, snat, first, PEER_MAC));
        assert_eq!(t.stat(stats::CT_CREATED), 1, "no new flow");

        // A new flow from the same client follows the new table.
        let other = SocketAddr::new(client.ip(), client.port() + 1000);
        let p = inbound(PROTO_TCP, other, nodeport4());
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        let pick = maglev_pick(&new, other, PROTO_TCP);
        assert_packet(&run, XDP_TX, &transmitted(&p, snat, pick, PEER_MAC));
    });
}

#[test]
fn flow_whose_backend_was_removed_picks_a_new_one() {
    fixture(|t, node| {
        let all = pods(4);
        let client = sa(CLIENT4);
        let first = maglev_pick(&all, client, PROTO_TCP);
        let rest: Vec<SocketAddr> = all.iter().copied().filter(|b| *b != first).collect();
        let np = |b: &[SocketAddr]| {
            frontend(
                FrontendKind::NodePort,
                nodeport4(),
                Protocol::Tcp,
                &remote(b),
            )
        };
        t.apply("np", &[np(&all)]).unwrap();
        let p = inbound(PROTO_TCP, client, nodeport4());
        let run = xdp(t, node, &p.build());
        assert_eq!(packet::summary(&run.packet).unwrap().dst, first);

        t.apply("np", &[np(&rest)]).unwrap();
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        let pick = maglev_pick(&rest, client, PROTO_TCP);
        assert_packet(&run, XDP_TX, &transmitted(&p, snat, pick, PEER_MAC));
        assert_eq!(t.stat(stats::CT_CREATED), 2);
    });
}

/// Graceful termination: a backend that left the table but still serves
/// (draining) keeps its established flow; a new connection on the same
/// client tuple (a SYN) goes to a backend new flows use.
#[test]
fn established_flow_stays_on_a_draining_backend_but_a_new_syn_does_not() {
    fixture(|t, node| {
        let all = pods(4);
        let client = sa(CLIENT4);
        let first = maglev_pick(&all, client, PROTO_TCP);
        let rest: Vec<SocketAddr> = all.iter().copied().filter(|b| *b != first).collect();
        let np = |b: &[SocketAddr], draining: &[SocketAddr]| {
            let mut f = frontend(
                FrontendKind::NodePort,
                nodeport4(),
                Protocol::Tcp,
                &remote(b),
            );
            f.draining = remote(draining);
            f
        };
        t.apply("np", &[np(&all, &[])]).unwrap();
        let syn = inbound(PROTO_TCP, client, nodeport4());
        let run = xdp(t, node, &syn.build());
        let snat = snat_source(&run);
        assert_eq!(packet::summary(&run.packet).unwrap().dst, first);

        t.apply("np", &[np(&rest, &[first])]).unwrap();
        let ack = Packet {
            tcp_flags: TCP_ACK,
            ..syn.clone()
        };
        let run = xdp(t, node, &ack.build());
        assert_packet(&run, XDP_TX, &transmitted(&ack, snat, first, PEER_MAC));
        assert_eq!(t.stat(stats::CT_CREATED), 1, "the established flow stays");

        let run = xdp(t, node, &syn.build());
        let pick = maglev_pick(&rest, client, PROTO_TCP);
        assert_eq!(packet::summary(&run.packet).unwrap().dst, pick);
        assert_eq!(t.stat(stats::CT_CREATED), 2, "a new SYN is a new flow");
    });
}

#[test]
fn established_flows_pick_up_a_new_next_hop_within_the_route_lifetime() {
    fixture(|t, node| {
        let p = tcp_nodeport_to(t, backend(REMOTE4, false));
        let established = Packet {
            tcp_flags: TCP_ACK,
            ..p.clone()
        };
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        let run = xdp(t, node, &established.build());
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&established, snat, sa(REMOTE4), PEER_MAC),
        );

        // The peer node's MAC changes: new flows see it at once.
        const NEW_PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
        node.set_neighbour("198.19.200.2".parse().unwrap(), NEW_PEER_MAC)
            .unwrap();
        let other = inbound(PROTO_TCP, sa("198.18.128.11:40000"), nodeport4());
        let run = xdp(t, node, &other.build());
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&other, snat_source(&run), sa(REMOTE4), NEW_PEER_MAC),
        );
        // The established flow, whose route is cached, within 256 jiffies
        // (2.56 s at the lowest HZ, 100).
        std::thread::sleep(std::time::Duration::from_millis(2700));
        let run = xdp(t, node, &established.build());
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&established, snat, sa(REMOTE4), NEW_PEER_MAC),
        );
    });
}

#[test]
fn empty_frontends_drop_or_pass() {
    fixture(|t, node| {
        // externalTrafficPolicy Local, no local endpoint: drop.
        let mut local = frontend(FrontendKind::NodePort, nodeport4(), Protocol::Tcp, &[]);
        local.when_empty = WhenEmpty::Drop;
        // No endpoints at all: on a node port the stack refuses (nothing
        // listens there), so pass untouched; a LoadBalancer IP is dropped.
        let none = frontend(
            FrontendKind::NodePort,
            SocketAddr::new(NODE_V4.into(), 30081),
            Protocol::Tcp,
            &[],
        );
        let lb = frontend(FrontendKind::LoadBalancer, sa(LB4), Protocol::Tcp, &[]);
        t.apply("empty", &[local, none, lb]).unwrap();

        let p = inbound(PROTO_TCP, sa(CLIENT4), nodeport4()).build();
        assert_eq!(xdp(t, node, &p).verdict, XDP_DROP);
        let p = inbound(
            PROTO_TCP,
            sa(CLIENT4),
            SocketAddr::new(NODE_V4.into(), 30081),
        )
        .build();
        assert_packet(&xdp(t, node, &p), XDP_PASS, &p);
        let p = inbound(PROTO_TCP, sa(CLIENT4), sa(LB4)).build();
        assert_eq!(xdp(t, node, &p).verdict, XDP_DROP);
        assert_eq!(t.stat(stats::NO_BACKEND), 3);
        assert!(t.conntrack().is_empty());
    });
}

#[test]
fn ipv6_nodeport_to_remote_backend_and_back() {
    fixture(|t, node| {
        let np6 = SocketAddr::new(NODE_V6.into(), 30080);
        let fe = frontend(
            FrontendKind::NodePort,
            np6,
            Protocol::Tcp,
            &[backend(REMOTE6, false)],
        );
        t.apply("np6", &[fe]).unwrap();
        let p = inbound(PROTO_TCP, sa(CLIENT6), np6);
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        assert_eq!(snat.ip(), IpAddr::from(NODE_V6));
        assert_packet(&run, XDP_TX, &transmitted(&p, snat, sa(REMOTE6), PEER_MAC));
        let reply = Packet {
            src_mac: PEER_MAC,
            dst_mac: EXT_MAC,
            ..Packet::tcp(sa(REMOTE6), snat)
        };
        let run = xdp(t, node, &reply.build());
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&reply, np6, sa(CLIENT6), ROUTER_MAC),
        );
    });
}

#[test]
fn udp_without_checksum_stays_without_one() {
    fixture(|t, node| {
        let np = SocketAddr::new(NODE_V4.into(), 30053);
        let fe = frontend(
            FrontendKind::NodePort,
            np,
            Protocol::Udp,
            &[backend("198.18.2.5:5353", false)],
        );
        t.apply("dns", &[fe]).unwrap();
        let mut p = inbound(PROTO_UDP, sa(CLIENT4), np);
        p.udp_no_checksum = true;
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&p, snat, sa("198.18.2.5:5353"), PEER_MAC),
        );
        // And with a checksum, a correct one.
        p.udp_no_checksum = false;
        p.src = SocketAddr::new(p.src.ip(), 40001);
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&p, snat, sa("198.18.2.5:5353"), PEER_MAC),
        );
    });
}

#[test]
fn load_balancer_source_ranges_allow_and_deny() {
    fixture(|t, node| {
        let mut lb = frontend(
            FrontendKind::LoadBalancer,
            sa(LB4),
            Protocol::Tcp,
            &[backend(REMOTE4, false)],
        );
        lb.source_ranges = vec![
            Cidr {
                addr: "198.18.128.0".parse().unwrap(),
                prefix: 24,
            },
            Cidr {
                addr: "fd00:250::".parse().unwrap(),
                prefix: 64,
            },
        ];
        t.apply("lb", &[lb]).unwrap();
        let allowed = inbound(PROTO_TCP, sa(CLIENT4), sa(LB4));
        let run = xdp(t, node, &allowed.build());
        let snat = snat_source(&run);
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&allowed, snat, sa(REMOTE4), PEER_MAC),
        );
        let denied = inbound(PROTO_TCP, sa("198.18.129.10:40000"), sa(LB4)).build();
        assert_eq!(xdp(t, node, &denied).verdict, XDP_DROP);
        assert_eq!(t.stat(stats::SOURCE_RANGE_DENIED), 1);
    });
}

#[test]
fn unsupported_and_broken_packets_pass_untouched() {
    fixture(|t, node| {
        let np6 = SocketAddr::new(NODE_V6.into(), 30080);
        t.apply(
            "np",
            &[
                frontend(
                    FrontendKind::NodePort,
                    nodeport4(),
                    Protocol::Tcp,
                    &[backend(REMOTE4, false)],
                ),
                frontend(
                    FrontendKind::NodePort,
                    nodeport4(),
                    Protocol::Udp,
                    &[backend(REMOTE4, false)],
                ),
                frontend(
                    FrontendKind::NodePort,
                    np6,
                    Protocol::Tcp,
                    &[backend(REMOTE6, false)],
                ),
            ],
        )
        .unwrap();
        let tcp4 = inbound(PROTO_TCP, sa(CLIENT4), nodeport4());
        let udp4 = inbound(PROTO_UDP, sa(CLIENT4), nodeport4());
        let tcp6 = inbound(PROTO_TCP, sa(CLIENT6), np6);
        let (t4, u4, t6) = (tcp4.build(), udp4.build(), tcp6.build());
        let options = Packet {
            ip4_options: vec![1, 1, 1, 0], // NOP, NOP, NOP, end of options
            ..tcp4.clone()
        };
        let first_fragment = Packet {
            ip4_frag: IP4_MF,
            ..tcp4.clone()
        };
        let later_fragment = Packet {
            ip4_frag: 185, // offset 1480 bytes
            ..tcp4.clone()
        };
        let fragment6 = Packet {
            ip6_fragment: true,
            ..tcp6.clone()
        };
        let unsupported = [
            options.build(),
            first_fragment.build(),
            later_fragment.build(),
            fragment6.build(),
        ];
        let broken: Vec<Vec<u8>> = vec![
            t4[..14].to_vec(),      // Ethernet only
            t4[..14 + 10].to_vec(), // half an IPv4 header
            t4[..34 + 10].to_vec(), // half a TCP header
            t4[..34 + 19].to_vec(), // a TCP header one byte short
            u4[..34 + 7].to_vec(),  // a UDP header one byte short
            t6[..14 + 30].to_vec(), // half an IPv6 header
            t6[..54 + 10].to_vec(), // half a TCP header
        ];
        for p in unsupported.iter().chain(&broken) {
            assert_packet(&xdp(t, node, p), XDP_PASS, p);
        }
        assert_eq!(t.stat(stats::UNSUPPORTED), unsupported.len() as u64);
        assert!(t.conntrack().is_empty());
        // The good packet still translates.
        assert_eq!(xdp(t, node, &t4).verdict, XDP_TX);
    });
}

#[test]
fn maglev_choice_is_the_same_through_every_node_address() {
    fixture(|t, node| {
        let backends = pods(5);
        let at = [nodeport4(), SocketAddr::new(NODE2_V4.into(), 30080)];
        let fes: Vec<Frontend> = at
            .iter()
            .map(|a| {
                frontend(
                    FrontendKind::NodePort,
                    *a,
                    Protocol::Tcp,
                    &remote(&backends),
                )
            })
            .collect();
        t.apply("np", &fes).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for port in 40000..40032 {
            let client = SocketAddr::new([198, 18, 128, 10].into(), port);
            let expected = maglev_pick(&backends, client, PROTO_TCP);
            seen.insert(expected);
            for frontend in at {
                let run = xdp(t, node, &inbound(PROTO_TCP, client, frontend).build());
                assert_eq!(run.verdict, XDP_TX);
                let dst = packet::summary(&run.packet).unwrap().dst;
                assert_eq!(dst, expected, "client {client} via {frontend}");
            }
        }
        assert!(seen.len() > 1, "the clients spread over several backends");
    });
}

#[test]
fn packets_whose_ttl_runs_out_go_to_the_stack_translated() {
    fixture(|t, node| {
        // A new flow's first packet and an established flow's (cached
        // route) both leave the TTL to the stack, which answers "time
        // exceeded"; their addresses are translated and checksums right.
        let p = Packet {
            ttl: 1,
            ..tcp_nodeport_to(t, backend(REMOTE4, false))
        };
        let run = xdp(t, node, &p.build());
        let snat = snat_source(&run);
        assert_packet(&run, XDP_PASS, &translated(&p, snat, sa(REMOTE4)));
        let ack = Packet {
            tcp_flags: TCP_ACK,
            ..p.clone()
        };
        let run = xdp(t, node, &ack.build());
        assert_packet(&run, XDP_PASS, &translated(&ack, snat, sa(REMOTE4)));
        assert_eq!(t.stat(stats::XDP_PASSED), 2);
        // With one hop left, it is forwarded.
        let ack = Packet { ttl: 2, ..ack };
        let run = xdp(t, node, &ack.build());
        assert_packet(
            &run,
            XDP_TX,
            &transmitted(&ack, snat, sa(REMOTE4), PEER_MAC),
        );
    });
}

// Conntrack states, expiry and SNAT port reuse. The sweeper runs on the
// test's maps at a chosen time (`sweep_at`), so nothing waits for a clock.

/// Default lifetimes, in ticks (2^30 ns): the sweeper's and the tests'.
fn ticks() -> [u32; 8] {
    Timeouts::default().to_ticks()
}

/// A client's segment with `flags` to the NodePort.
fn client_segment(client: SocketAddr, flags: u8) -> Packet {
    Packet {
        tcp_flags: flags,
        ..inbound(PROTO_TCP, client, nodeport4())
    }
}

/// The remote backend's segment with `flags` to the SNAT address `snat`.
fn backend_segment(snat: SocketAddr, flags: u8) -> Packet {
    Packet {
        src_mac: PEER_MAC,
        dst_mac: EXT_MAC,
        tcp_flags: flags,
        ..Packet::tcp(sa(REMOTE4), snat)
    }
}

/// Flows by state as a sweep at `at` (ticks) counts them, after it
/// removes what expired; and what it removed.
fn sweep(t: &ProgTest, at: u32) -> SweepReport {
    t.sweeper(&Timeouts::default())
        .expect("opening the sweeper")
        .sweep_at(at)
        .expect("sweeping")
}

#[test]
fn tcp_flow_states_follow_syn_reply_fin_and_expire_after_time_wait() {
    fixture(|t, node| {
        t.apply(
            "np",
            &[frontend(
                FrontendKind::NodePort,
                nodeport4(),
                Protocol::Tcp,
                &[backend(REMOTE4, false)],
            )],
        )
        .unwrap();
        let client = sa(CLIENT4);
        let run = xdp(t, node, &client_segment(client, TCP_SYN).build());
        let snat = snat_source(&run);
        let now = now_ticks();
        let state = |t: &ProgTest| {
            let r = sweep(t, now);
            let states: Vec<usize> = (0..ct_state::COUNT)
                .filter(|&s| r.flows_by_state[s] > 0)
                .collect();
            states
        };
        assert_eq!(state(t), [ct_state::TCP_SYN_SENT]);
        assert_eq!(
            xdp(t, node, &backend_segment(snat, TCP_SYN | TCP_ACK).build()).verdict,
            XDP_TX
        );
        assert_eq!(state(t), [ct_state::TCP_ESTABLISHED]);
        // Established flows live a day.
        assert_eq!(
            sweep(t, now + 1000).flows_by_state[ct_state::TCP_ESTABLISHED],
            1
        );
        xdp(t, node, &client_segment(client, TCP_FIN | TCP_ACK).build());
        assert_eq!(state(t), [ct_state::TCP_CLOSE_WAIT]);
        xdp(t, node, &backend_segment(snat, TCP_FIN | TCP_ACK).build());
        assert_eq!(state(t), [ct_state::TCP_TIME_WAIT]);
        // The last ACK still goes through; TIME_WAIT passes.
        assert_eq!(
            xdp(t, node, &client_segment(client, TCP_ACK).build()).verdict,
            XDP_TX
        );
        let wait = ticks()[ct_state::TCP_TIME_WAIT];
        assert_eq!(
            sweep(t, now + wait - 1).flows_by_state[ct_state::TCP_TIME_WAIT],
            1
        );
        let r = sweep(t, now + wait + 2);
        assert_eq!(r.expired[ct_state::TCP_TIME_WAIT], 1);
        assert_eq!(t.conntrack(), [], "both entries removed");
    });
}

#[test]
fn tcp_flow_reset_is_reclaimed_within_the_close_timeout() {
    fixture(|t, node| {
        tcp_nodeport_to(t, backend(REMOTE4, false));
        let client = sa(CLIENT4);
        let run = xdp(t, node, &client_segment(client, TCP_SYN).build());
        let snat = snat_source(&run);
        xdp(t, node, &backend_segment(snat, TCP_SYN | TCP_ACK).build());
        xdp(t, node, &backend_segment(snat, TCP_RST).build());
        let now = now_ticks();
        assert_eq!(sweep(t, now).flows_by_state[ct_state::TCP_CLOSE], 1);
        // 10 s: 10 ticks (rounded up), plus the tick the entries were seen in.
        let r = sweep(t, now + ticks()[ct_state::TCP_CLOSE] + 2);
        assert_eq!(r.expired[ct_state::TCP_CLOSE], 1);
        assert_eq!(t.conntrack(), []);
    });
}

#[test]
fn udp_flows_expire_after_30_s_unreplied_and_120_s_replied() {
    fixture(|t, node| {
        let fe = frontend(
            FrontendKind::NodePort,
            nodeport4(),
            Protocol::Udp,
            &[backend(REMOTE4, false)],
        );
        t.apply("np", &[fe]).unwrap();
        let datagram = |client: &str| Packet::udp(sa(client), nodeport4());
        let from_router = |p: Packet| Packet {
            src_mac: ROUTER_MAC,
            dst_mac: EXT_MAC,
            ..p
        };
        xdp(
            t,
            node,
            &from_router(datagram("198.18.128.10:5000")).build(),
        );
        let run = xdp(
            t,
            node,
            &from_router(datagram("198.18.128.11:5000")).build(),
        );
        let snat = snat_source(&run);
        let reply = Packet {
            src_mac: PEER_MAC,
            dst_mac: EXT_MAC,
            ..Packet::udp(sa(REMOTE4), snat)
        };
        assert_eq!(xdp(t, node, &reply.build()).verdict, XDP_TX);
        let now = now_ticks();
        let r = sweep(t, now);
        assert_eq!(r.flows_by_state[ct_state::UDP_UNREPLIED], 1);
        assert_eq!(r.flows_by_state[ct_state::UDP_REPLIED], 1);
        // 30 s later (28 ticks, plus the one the flows were seen in): the
        // unreplied flow is gone, the replied one stays until 120 s.
        let r = sweep(t, now + ticks()[ct_state::UDP_UNREPLIED] + 2);
        assert_eq!(r.expired[ct_state::UDP_UNREPLIED], 1);
        assert_eq!(r.flows_by_state[ct_state::UDP_REPLIED], 1);
        assert_eq!(t.conntrack().len(), 2);
        let r = sweep(t, now + ticks()[ct_state::UDP_REPLIED] + 2);
        assert_eq!(r.expired[ct_state::UDP_REPLIED], 1);
        assert_eq!(t.conntrack(), []);
    });
}

#[test]
fn a_closed_flows_snat_port_goes_to_the_next_flow() {
    fixture(|t, node| {
        // One SNAT port: a second flow needs the first one's.
        t.set_snat(Some(NODE_V4), None, (61000, 61000)).unwrap();
        tcp_nodeport_to(t, backend(REMOTE4, false));
        let (a, b) = (sa("198.18.128.10:40000"), sa("198.18.128.11:40000"));
        let run = xdp(t, node, &client_segment(a, TCP_SYN).build());
        let snat = snat_source(&run);
        xdp(t, node, &backend_segment(snat, TCP_SYN | TCP_ACK).build());
        assert_eq!(
            xdp(t, node, &client_segment(b, TCP_SYN).build()).verdict,
            XDP_DROP
        );
        assert_eq!(
            t.stat(stats::SNAT_EXHAUSTED),
            1,
            "the port is held by a live flow"
        );
        // A closes (FIN both ways): its port is free for B at once.
        xdp(t, node, &client_segment(a, TCP_FIN | TCP_ACK).build());
        xdp(t, node, &backend_segment(snat, TCP_FIN | TCP_ACK).build());
        let run = xdp(t, node, &client_segment(b, TCP_SYN).build());
        assert_eq!(run.verdict, XDP_TX);
        assert_eq!(snat_source(&run), snat);
        assert_eq!(t.stat(stats::SNAT_RECLAIMED), 1);
        // A's entries went with it; B's two are all there is.
        let entries = t.conntrack();
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert!(entries.iter().all(|(k, _)| k.src != addr_to_abi(a.ip())));
        // And after a RST the same.
        xdp(t, node, &client_segment(b, TCP_RST).build());
        let run = xdp(t, node, &client_segment(a, TCP_SYN).build());
        assert_eq!(run.verdict, XDP_TX);
        assert_eq!(t.stat(stats::SNAT_RECLAIMED), 2);
        assert_eq!(t.conntrack().len(), 2);
    });
}

#[test]
fn snat_allocation_succeeds_at_high_occupancy() {
    fixture(|t, node| {
        // 1,000 ports (more than the tries, so each try is a random port),
        // 900 held by live flows toward the backend.
        let (min, max) = (61000u16, 61999u16);
        t.set_snat(Some(NODE_V4), None, (min, max)).unwrap();
        tcp_nodeport_to(t, backend(REMOTE4, false));
        let held = svclb_common::Flow {
            direction: svclb_common::FLOW_INGRESS,
            state: svclb_common::CT_SEEN,
            last_seen: now_ticks(),
            ..Default::default()
        };
        for port in (min..=max).step_by(10).flat_map(|p| p..p + 9) {
            let key = svclb_common::FlowKey {
                src: addr_to_abi(sa(REMOTE4).ip()),
                dst: addr_to_abi(NODE_V4.into()),
                sport: sa(REMOTE4).port(),
                dport: port,
                proto: PROTO_TCP,
                _pad: 0,
                _pad2: 0,
            };
            t.track(&key, &held).unwrap();
        }
        assert_eq!(t.conntrack().len(), 900);
        // 20 new flows, from 90% to 92% in use: each fails with
        // probability below 0.92^256 (5e-10).
        for c in 0..20u16 {
            let client = SocketAddr::new([198, 18, 128, 10].into(), 20000 + c);
            let run = xdp(t, node, &client_segment(client, TCP_SYN).build());
            assert_eq!(run.verdict, XDP_TX, "flow {c}");
            // Held: ports ending in 0-8; free: those ending in 9.
            assert_eq!(snat_source(&run).port() % 10, 9, "a free port");
        }
        assert_eq!(t.stat(stats::SNAT_EXHAUSTED), 0);
    });
}

#[test]
fn the_sweeper_removes_entries_left_alone() {
    fixture(|t, node| {
        tcp_nodeport_to(t, backend(REMOTE4, false));
        let run = xdp(t, node, &client_segment(sa(CLIENT4), TCP_SYN).build());
        let snat = snat_source(&run);
        let run2 = xdp(
            t,
            node,
            &client_segment(sa("198.18.128.11:40000"), TCP_SYN).build(),
        );
        let snat2 = snat_source(&run2);
        let reply_key = |snat: SocketAddr| svclb_common::FlowKey {
            src: addr_to_abi(sa(REMOTE4).ip()),
            dst: addr_to_abi(snat.ip()),
            sport: sa(REMOTE4).port(),
            dport: snat.port(),
            proto: PROTO_TCP,
            _pad: 0,
            _pad2: 0,
        };
        // Flow 1 loses its reply entry, flow 2 its forward entry.
        t.untrack(&reply_key(snat)).unwrap();
        let forward2 = t
            .conntrack()
            .into_iter()
            .find(|(_, f)| f.backend_id != 0 && f.sport == snat2.port())
            .expect("flow 2's forward entry")
            .0;
        t.untrack(&forward2).unwrap();
        let mut sweeper = t.sweeper(&Timeouts::default()).unwrap();
        let now = now_ticks();
        // A forward entry alone goes at once; a reply entry alone at the
        // next sweep (a new flow's reply entry comes just before its
        // forward one).
        let r = sweeper.sweep_at(now).unwrap();
        assert_eq!(r.orphans_removed, 1);
        assert_eq!(t.conntrack().len(), 1);
        let r = sweeper.sweep_at(now).unwrap();
        assert_eq!(r.orphans_removed, 1);
        assert_eq!(t.conntrack(), []);
    });
}

#[test]
fn an_expired_flows_snat_port_goes_to_the_next_flow_after_the_sweep() {
    fixture(|t, node| {
        t.set_snat(Some(NODE_V4), None, (61000, 61000)).unwrap();
        tcp_nodeport_to(t, backend(REMOTE4, false));
        let (a, b) = (sa("198.18.128.10:40000"), sa("198.18.128.11:40000"));
        let run = xdp(t, node, &client_segment(a, TCP_SYN).build());
        let snat = snat_source(&run);
        xdp(t, node, &backend_segment(snat, TCP_SYN | TCP_ACK).build());
        // Established, never closed: the port is A's until A expires.
        assert_eq!(
            xdp(t, node, &client_segment(b, TCP_SYN).build()).verdict,
            XDP_DROP
        );
        let r = sweep(t, now_ticks() + ticks()[ct_state::TCP_ESTABLISHED] + 2);
        assert_eq!(r.expired[ct_state::TCP_ESTABLISHED], 1);
        let run = xdp(t, node, &client_segment(b, TCP_SYN).build());
        assert_eq!(run.verdict, XDP_TX);
        assert_eq!(snat_source(&run), snat);
        assert_eq!(t.stat(stats::SNAT_RECLAIMED), 0, "freed by the sweeper");
    });
}
