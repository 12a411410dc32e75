//! `cargo xtask bench xdp`: the per-packet cost of `svclb_xdp`, measured by
//! BPF_PROG_RUN (the kernel's own timing), for a miss, a new flow and an
//! established flow at 1, 1,000 and 10,000 external NodePort services with
//! 10 remote backends each (so new flows take the SNAT path and every
//! translated packet goes through bpf_fib_lookup and XDP_TX), beside a
//! trivial XDP_DROP program measured the same way in the same run.
//!
//! BPF_PROG_RUN with repeat > 1 runs again on the packet the previous run
//! left, so translated paths are measured one call at a time (repeat = 1,
//! many calls, the kernel's duration per call); the miss path, which leaves
//! the packet alone, with a large repeat. Runs in a network namespace of
//! its own (prog_test::TestNode); nothing is sent. Timings are printed,
//! never asserted.
//!
//! Then the Maglev tables' kernel memory and set-up time at
//! `--maglev-services` NodePort services with `--maglev-backends` backends:
//! tables sized per frontend (`maglev::size_for`) beside every table at the
//! largest size (as before), and beside kube-proxy's iptables-restore of the
//! same services, in the same run.
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use svclb_common::MAGLEV_CHUNK;
use svclb_tests::prog_test::packet::{Packet, TCP_ACK, TCP_SYN};
use svclb_tests::prog_test::{
    ProgTest, TestNode, EXT_MAC, NODE_V4, ROUTER_MAC, XDP_DROP, XDP_PASS, XDP_TX,
};
use svclb_userspace::dataplane::maglev::{self, DEFAULT_TABLE_SIZE};
use svclb_userspace::model::{Backend, Frontend, FrontendKey, FrontendKind, Protocol, Scope};

#[derive(Parser)]
struct Args {
    /// Service counts to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000,10000")]
    services: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    backends: usize,
    /// Calls (one packet each) per translated case.
    #[arg(long, default_value_t = 20_000)]
    calls: usize,
    /// Miss path: batches of `--repeat` runs each.
    #[arg(long, default_value_t = 20)]
    batches: usize,
    #[arg(long, default_value_t = 10_000)]
    repeat: u32,
    /// The largest Maglev table (a prime): --maglev-table-size.
    #[arg(long, default_value_t = DEFAULT_TABLE_SIZE)]
    maglev_size: u32,
    /// Services and backends each of the Maglev set-up comparison.
    #[arg(long, default_value_t = 10_000)]
    maglev_services: usize,
    #[arg(long, default_value_t = 3)]
    maglev_backends: usize,
    /// The iptables-restore of the set-up comparison ("" to skip it).
    #[arg(long, default_value = "iptables-restore")]
    iptables_restore: String,
    /// Conntrack entries (two per flow) the sweeper's cost is measured on.
    #[arg(long, default_value_t = 1_000_000)]
    sweep_entries: usize,
}

/// Mean and median of per-packet times, in ns.
#[derive(Clone, Copy)]
struct Stat {
    mean: f64,
    p50: f64,
    /// The fastest batch: on a shared machine, the least disturbed
    /// estimate of what the code itself costs.
    min: f64,
}

fn stat(mut ns: Vec<f64>) -> Stat {
    ns.sort_by(f64::total_cmp);
    Stat {
        mean: ns.iter().sum::<f64>() / ns.len() as f64,
        p50: ns[ns.len() / 2],
        min: ns[0],
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this benchmark loads BPF programs and creates a network namespace: run it as root");
    }
    let node = TestNode::create().context("creating the benchmark's network namespace")?;
    node.in_netns(|| run(&args, &node))?
}

fn run(args: &Args, node: &TestNode) -> Result<()> {
    let ifindex = node.ext_ifindex;
    let drop = DropProgram::load()?;
    // Traffic to the node itself, of its own established connections.
    let miss_packet = Packet {
        tcp_flags: TCP_ACK,
        ..inbound(client(0), SocketAddr::new(NODE_V4.into(), 9))
    }
    .build();
    let drop_loop = stat(
        (0..args.calls)
            .map(|_| drop.run(&miss_packet, ifindex, 1))
            .collect::<Result<_>>()?,
    );
    let drop_repeat = stat(
        (0..args.batches)
            .map(|_| drop.run(&miss_packet, ifindex, args.repeat))
            .collect::<Result<_>>()?,
    );
    let table = maglev::size_for(args.backends, args.maglev_size);
    println!(
        "Maglev table: {table} entries per frontend of {} backends, at most {} ({} KiB of kernel memory per service)",
        args.backends,
        args.maglev_size,
        table.div_ceil(MAGLEV_CHUNK) * 4
    );
    println!(
        "calls per translated case: {}; miss: {} batches x {} repeats",
        args.calls, args.batches, args.repeat
    );
    let mut rows = vec![
        ("XDP_DROP baseline, repeat=1 calls", 0, drop_loop),
        ("XDP_DROP baseline, large repeat", 0, drop_repeat),
    ];
    let mut established = Vec::new();
    for &n in &args.services {
        let mut t = ProgTest::load(svclb_common::maps::CONNTRACK_MAX_ENTRIES)?;
        t.writer.set_maglev_size(args.maglev_size);
        t.set_snat(Some(NODE_V4), None, (1024, 65535))?;
        let started = Instant::now();
        for i in 0..n {
            t.apply(&format!("svc-{i}"), &[nodeport(i, args.backends)])?;
        }
        eprintln!(
            "{n} services applied in {:.1?}; Maglev tables: {:.1} MiB of kernel memory",
            started.elapsed(),
            memlock(&t, svclb_common::maps::MAGLEV)? as f64 / MIB
        );

        let miss: Vec<f64> = (0..args.batches)
            .map(|_| {
                let r = t.run_xdp_repeat(&miss_packet, Some(ifindex), args.repeat)?;
                expect(r.verdict, XDP_PASS, "miss")?;
                Ok(r.duration.as_nanos() as f64)
            })
            .collect::<Result<_>>()?;
        // One flow per call, spread over the services: its SYN, then the
        // segments of the established connection.
        let packets = |flags: u8| -> Vec<Vec<u8>> {
            (0..args.calls)
                .map(|c| {
                    Packet {
                        tcp_flags: flags,
                        ..inbound(client(c), frontend_addr(c % n))
                    }
                    .build()
                })
                .collect()
        };
        let (syns, flows) = (packets(TCP_SYN), packets(TCP_ACK));
        let per_call = |what: &str, packets: &[Vec<u8>]| -> Result<Stat> {
            let ns = packets
                .iter()
                .map(|p| {
                    let r = t.run_xdp(p, Some(ifindex))?;
                    expect(r.verdict, XDP_TX, what)?;
                    Ok(r.duration.as_nanos() as f64)
                })
                .collect::<Result<_>>()?;
            Ok(stat(ns))
        };
        let new = per_call("new flow", &syns)?;
        let est = per_call("established flow", &flows)?;
        // One flow's packets back to back: its entries stay in the cache,
        // as for a busy connection.
        let hot_ns = (0..args.calls)
            .map(|_| {
                let r = t.run_xdp(&flows[0], Some(ifindex))?;
                expect(r.verdict, XDP_TX, "established flow (hot)")?;
                Ok(r.duration.as_nanos() as f64)
            })
            .collect::<Result<_>>()?;
        let hot = stat(hot_ns);
        let steady = steady_state(&mut t, &flows[0], ifindex, args.batches)?;
        rows.push(("miss (large repeat)", n, stat(miss)));
        rows.push(("new flow (SNAT, remote backend)", n, new));
        rows.push(("established, each call another flow", n, est));
        rows.push(("established, one flow back to back", n, hot));
        rows.push(("established, steady state (repeat)", n, steady));
        established.push((n, steady));
    }

    println!();
    println!(
        "{:<36} {:>9} {:>12} {:>10} {:>10} {:>14}",
        "case", "services", "ns/packet", "p50 ns", "min ns", "x XDP_DROP"
    );
    for (case, n, s) in &rows {
        // Compare like with like: repeated runs with the repeated baseline.
        let base = if case.contains("repeat") {
            drop_repeat
        } else {
            drop_loop
        };
        let services = if *n == 0 { "-".into() } else { n.to_string() };
        println!(
            "{case:<36} {services:>9} {:>12.1} {:>10.1} {:>10.1} {:>14.2}",
            s.mean,
            s.p50,
            s.min,
            s.mean / base.mean
        );
    }
    println!();
    maglev_setup(args)?;
    sweeper_cost(args.sweep_entries)?;
    if let (Some((n1, first)), Some((nk, last))) = (established.first(), established.last()) {
        let ratio = last.mean / first.mean;
        println!(
            "established({nk})/established({n1}): {ratio:.2} (target <= 1.2: {})",
            met(ratio <= 1.2)
        );
        let worst = established.iter().map(|(_, s)| s.mean).fold(0.0, f64::max);
        println!(
            "established flow (steady state): at most {worst:.1} ns/packet (target <= 100: {}; {:.1} ns above the XDP_DROP baseline)",
            met(worst <= 100.0),
            worst - drop_repeat.mean
        );
    }
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

/// Maglev tables' kernel memory and the set-up time of
/// `args.maglev_services` NodePort services with `args.maglev_backends`
/// backends, fixed-size tables beside tables sized per frontend, and
/// kube-proxy's iptables-restore of the same services.
fn maglev_setup(args: &Args) -> Result<()> {
    let (n, b) = (args.maglev_services, args.maglev_backends);
    println!("Maglev at {n} NodePort services x {b} backends (set-up: every service written, as the agent's first sync):");
    for fixed in [true, false] {
        let mut t = ProgTest::load(svclb_common::maps::CONNTRACK_MAX_ENTRIES)?;
        t.writer.set_maglev_size(args.maglev_size);
        t.writer.set_maglev_fixed(fixed);
        let started = Instant::now();
        for i in 0..n {
            t.apply(&format!("svc-{i}"), &[nodeport(i, b)])?;
        }
        let took = started.elapsed();
        let mem = memlock(&t, svclb_common::maps::MAGLEV)? as f64 / MIB;
        let (what, size) = if fixed {
            ("every table at the largest size (before)", args.maglev_size)
        } else {
            (
                "tables sized per frontend",
                maglev::size_for(b, args.maglev_size),
            )
        };
        println!(
            "  {what:<42} {size:>6} entries: {mem:>7.1} MiB kernel memory (target <= 64: {}), set-up {:>6.2} s (target <= 2: {})",
            met(mem <= 64.0),
            took.as_secs_f64(),
            met(took.as_secs_f64() <= 2.0),
        );
    }
    if !args.iptables_restore.is_empty() {
        use svclb_tests::kubeproxy_iptables::{filler_services, ruleset};
        let text = ruleset(&filler_services(n, b), "198.18.0.0/16");
        let started = Instant::now();
        // In this thread's network namespace (the benchmark's own node).
        let mut child = std::process::Command::new(&args.iptables_restore)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", args.iptables_restore))?;
        use std::io::Write as _;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
        let status = child.wait()?;
        if !status.success() {
            bail!("{} failed: {status}", args.iptables_restore);
        }
        println!(
            "  kube-proxy-shaped {} of the same services: {:.2} s",
            args.iptables_restore,
            started.elapsed().as_secs_f64()
        );
    }
    println!();
    Ok(())
}

/// The kernel memory of the test's map `name`, as its fdinfo reports it.
fn memlock(t: &ProgTest, name: &str) -> Result<u64> {
    use std::os::fd::AsFd;
    let map = aya::maps::MapData::from_pin(t.bpffs().join(name))
        .with_context(|| format!("opening the pinned map {name}"))?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .context("memlock in the map's fdinfo")
}

/// The conntrack sweeper's CPU time (user and system, this thread) on
/// `entries` entries (`entries / 2` flows of remote backends): a sweep that
/// removes nothing (the cost every --ct-sweep-interval), then one that
/// removes every flow.
fn sweeper_cost(entries: usize) -> Result<()> {
    use svclb_common::{Flow, FlowKey, CT_SEEN, FLOW_INGRESS, PROTO_TCP};
    use svclb_userspace::dataplane::conntrack::{now_ticks, Timeouts};
    // Room to spare: an LRU map evicts before it is quite full.
    let mut t = ProgTest::load((entries + entries / 4) as u32)?;
    let now = now_ticks();
    let node = real_src(SocketAddr::new(NODE_V4.into(), 0));
    let started = Instant::now();
    for i in 0..entries / 2 {
        let client = client(i);
        // A SNAT port per flow: 50,000 per backend address.
        let backend = SocketAddr::new(
            Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 2, 1)) + (i / 50_000) as u32).into(),
            8080,
        );
        let port = 10_000 + (i % 50_000) as u16;
        let forward_key = FlowKey {
            src: real_src(client),
            dst: node,
            sport: client.port(),
            dport: 30080,
            proto: PROTO_TCP,
            _pad: 0,
            _pad2: 0,
        };
        let forward = Flow {
            src: node,
            dst: real_src(backend),
            sport: port,
            dport: backend.port(),
            backend_id: 1,
            direction: FLOW_INGRESS,
            state: CT_SEEN,
            last_seen: now,
            ..Default::default()
        };
        let reply_key = FlowKey {
            src: forward.dst,
            dst: node,
            sport: forward.dport,
            dport: port,
            ..forward_key
        };
        let reply = Flow {
            src: node,
            dst: forward_key.src,
            sport: 30080,
            dport: client.port(),
            backend_id: 0,
            ..forward
        };
        t.track(&reply_key, &reply)?;
        t.track(&forward_key, &forward)?;
    }
    let present = t.conntrack().len();
    eprintln!(
        "{present} conntrack entries written in {:.1?}",
        started.elapsed()
    );
    let mut sweeper = t.sweeper(&Timeouts::default())?;
    let cpu = |f: &mut dyn FnMut()
        -> Result<svclb_userspace::dataplane::conntrack::SweepReport>| {
        let before = thread_cpu();
        let r = f()?;
        Ok::<_, anyhow::Error>((thread_cpu() - before, r))
    };
    let (keep, r) = cpu(&mut || Ok(sweeper.sweep_at(now)?))?;
    let kept: u64 = r.flows_by_state.iter().sum();
    let day = Timeouts::default().to_ticks()[svclb_common::ct_state::TCP_ESTABLISHED];
    let (remove, r) = cpu(&mut || Ok(sweeper.sweep_at(now + day + 2)?))?;
    let removed: u64 = r.expired.iter().sum();
    let per_million = |d: std::time::Duration| d.as_secs_f64() * 1e3 * 1e6 / present as f64;
    println!(
        "conntrack sweeper: {present} entries, nothing expired ({kept} flows kept): {:.0} ms CPU ({:.0} ms per 1M entries); all {removed} flows expired: {:.0} ms CPU ({:.0} ms per 1M entries)",
        keep.as_secs_f64() * 1e3,
        per_million(keep),
        remove.as_secs_f64() * 1e3,
        per_million(remove),
    );
    Ok(())
}

/// CPU time (user and system) of the calling thread.
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

fn expect(verdict: u32, want: u32, what: &str) -> Result<()> {
    if verdict != want {
        bail!("{what}: verdict {verdict}, expected {want}");
    }
    Ok(())
}

/// The established path with the kernel's repeat loop, which runs each
/// repetition on the packet the previous one left. A translated packet
/// changes, so measure one whose translation is itself: a client-to-
/// backend packet with a conntrack entry that maps it to the same addresses
/// (made from `flow`'s real entry, same backend id). Each run then does
/// everything an established packet does (conntrack hit, backend check,
/// rewrite with checksums, FIB lookup, TTL and MACs, XDP_TX); only the TTL
/// drops, so at most 250 repetitions per call, from TTL 255.
fn steady_state(t: &mut ProgTest, flow: &[u8], ifindex: u32, batches: usize) -> Result<Stat> {
    const REPEAT: u32 = 250;
    let first = svclb_tests::prog_test::packet::summary(flow).context("flow packet")?;
    let (_, real) = t
        .conntrack()
        .into_iter()
        .find(|(k, f)| k.sport == first.src.port() && f.backend_id != 0)
        .context("the flow's conntrack entry")?;
    let client = first.src;
    let backend = SocketAddr::new(abi_ip(real.dst), real.dport);
    let mut packet = inbound(client, backend);
    packet.ttl = 255;
    packet.tcp_flags = TCP_ACK;
    let key = svclb_common::FlowKey {
        src: real_src(client),
        dst: real.dst,
        sport: client.port(),
        dport: real.dport,
        proto: svclb_common::PROTO_TCP,
        _pad: 0,
        _pad2: 0,
    };
    let identity = svclb_common::Flow {
        src: key.src,
        dst: key.dst,
        sport: key.sport,
        dport: key.dport,
        // An identity translation changes no checksum.
        csum_ip: 0,
        csum_l4: 0,
        // Looked up (and cached) by the first run.
        route: Default::default(),
        ..real
    };
    t.track(&key, &identity)?;
    let packet = packet.build();
    let ns = (0..batches)
        .map(|_| {
            let r = t.run_xdp_repeat(&packet, Some(ifindex), REPEAT)?;
            expect(r.verdict, XDP_TX, "established flow (steady state)")?;
            Ok(r.duration.as_nanos() as f64)
        })
        .collect::<Result<_>>()?;
    Ok(stat(ns))
}

fn real_src(a: SocketAddr) -> [u32; 4] {
    svclb_userspace::dataplane::abi::addr_to_abi(a.ip())
}

fn abi_ip(words: [u32; 4]) -> std::net::IpAddr {
    svclb_userspace::dataplane::abi::addr_from_abi(words)
}

/// Client `c`: distinct address and port per flow, from 198.18.128.0/17.
fn client(c: usize) -> SocketAddr {
    let ip = u32::from(Ipv4Addr::new(198, 18, 128, 1)) + (c / 50_000) as u32;
    SocketAddr::new(Ipv4Addr::from(ip).into(), 10_000 + (c % 50_000) as u16)
}

/// Service `i`'s node port.
fn frontend_addr(i: usize) -> SocketAddr {
    SocketAddr::new(NODE_V4.into(), 20_000 + i as u16)
}

fn inbound(src: SocketAddr, dst: SocketAddr) -> Packet {
    Packet {
        src_mac: ROUTER_MAC,
        dst_mac: EXT_MAC,
        payload: vec![0; 64],
        ..Packet::tcp(src, dst)
    }
}

/// Service `i`: a NodePort with `backends` remote pods (198.18.2.1.. on
/// the peer node; the port tells services apart).
fn nodeport(i: usize, backends: usize) -> Frontend {
    let at = frontend_addr(i);
    let mut b: Vec<Backend> = (0..backends)
        .map(|j| Backend {
            addr: Ipv4Addr::new(198, 18, 2, 1 + j as u8).into(),
            port: 10_000 + i as u16,
            terminating: false,
            local: false,
        })
        .collect();
    b.sort();
    Frontend {
        key: FrontendKey {
            addr: at.ip(),
            port: at.port(),
            protocol: Protocol::Tcp,
            scope: Scope::External,
        },
        kind: FrontendKind::NodePort,
        backends: b,
        when_empty: Default::default(),
        affinity_timeout: None,
        source_ranges: Vec::new(),
        draining: Vec::new(),
        port_name: String::new(),
    }
}

/// The baseline: `r0 = XDP_DROP; exit`, loaded with bpf(2) directly (not
/// part of svclb's object) and run through BPF_PROG_TEST_RUN like svclb_xdp.
struct DropProgram(OwnedFd);

/// union bpf_attr for BPF_PROG_LOAD, up to expected_attach_type.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// union bpf_attr for BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: `attr` is a valid, exclusively borrowed bpf_attr prefix of
    // the size passed; the kernel reads it and writes results into it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

impl DropProgram {
    fn load() -> Result<Self> {
        // BPF_MOV64_IMM(r0, XDP_DROP); BPF_EXIT.
        let insns: [u8; 16] = [
            0xb7,
            0,
            0,
            0,
            XDP_DROP as u8,
            0,
            0,
            0, //
            0x95,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        let license = c"GPL";
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..Default::default()
        };
        attr.prog_name[..9].copy_from_slice(b"xdp_drop\0");
        let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the XDP_DROP baseline")?;
        // SAFETY: a new file descriptor the kernel just returned to us.
        Ok(DropProgram(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Mean ns per run over `repeat` runs, as the kernel measured it.
    fn run(&self, packet: &[u8], ifindex: u32, repeat: u32) -> Result<f64> {
        let ctx: Vec<u8> = [0, packet.len() as u32, 0, ifindex, 0, 0]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        let mut out = vec![0u8; packet.len() + 256];
        let mut attr = TestRunAttr {
            prog_fd: self.0.as_raw_fd() as u32,
            data_size_in: packet.len() as u32,
            data_size_out: out.len() as u32,
            data_in: packet.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr).context("BPF_PROG_TEST_RUN of the baseline")?;
        expect(attr.retval, XDP_DROP, "baseline")?;
        Ok(f64::from(attr.duration))
    }
}
