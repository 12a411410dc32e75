//! `cargo xtask bench sock [--seconds N] [--rounds R] [--services 1,1000,10000]`:
//! a ClusterIP through svclb's socket hooks beside the same ClusterIP
//! through kube-proxy-shaped iptables and nftables rulesets, and direct to
//! the pod, in one run. Short TCP connections (connect, one request/reply,
//! close) and UDP request/replies (one unconnected socket, sendto +
//! recvfrom).
//!
//! Three nodes (network namespaces), each with a bridge that its pods sit
//! on, br_netfilter's `bridge-nf-call-iptables` on (as a bridge CNI needs
//! for kube-proxy), a client pod and two backend pods (`svclb-probe serve`,
//! TCP on one epoll loop):
//! - `svclb`: the agent, its programs on this node's cgroup only;
//! - `iptables`: kube-proxy's nat table ([`svclb_tests::kubeproxy_iptables`]:
//!   KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-* DNAT, PREROUTING and OUTPUT),
//!   loaded with iptables-restore; no agent;
//! - `nftables`: kube-proxy's nftables mode's table
//!   ([`svclb_tests::kubeproxy_nft`]: a service verdict map); no agent.
//!
//! Each node has the same N services (N - 1 fillers whose endpoints are
//! never contacted, plus the measured one, placed in the middle of the
//! iptables rules: kube-proxy writes them in map order, so a service is
//! half-way down KUBE-SERVICES on average).
//!
//! Each client process alternates direct and ClusterIP request by request
//! (`svclb-probe rate`), so load from elsewhere on the machine hits both
//! alike; the nodes take turns in a rotating order each round. Ratios are
//! the medians of the per-round ratios.
//!
//! Prints rates and ratios and whether the targets are met: timings
//! are no pass/fail material. Exits non-zero only when something broke (a
//! mode without successful requests, or with more than 1% errors).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde::Deserialize;
use svclb_tests::cmd::{self, Placement};
use svclb_tests::kubeproxy_iptables::{self, filler_services, NodePortService, ServicePort};
use svclb_tests::{
    kubeproxy_nft, netns, Cluster, Connect, EndpointSpec, Node, Pod, PortSpec, Proto, Server,
    ServiceSpec, SliceSpec,
};

const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);
const SERVICE_PORT: u16 = 80;
/// The iptables ruleset is NodePort-shaped; the measured service's node
/// port (fillers take 20000..30000).
const NODE_PORT: u16 = 30_080;
const TARGET_PORT: u16 = 8080;
/// A server in the svclb node's client pod, for the loopback ceiling.
const LOOPBACK_PORT: u16 = 9090;
/// Backend pods of the measured service on each node: two, so its
/// KUBE-SVC chain picks one with `statistic random` as with any
/// replicated service.
const BACKENDS: usize = 2;
/// kube-proxy's --cluster-cidr: every pod of every node.
const CLUSTER_CIDR: &str = "198.18.0.0/16";
const DIRECT_TARGET: f64 = 0.98;
const IPTABLES_TARGET: f64 = 2.5;
const IPTABLES_TARGET_AT: usize = 10_000;

#[derive(Parser)]
#[command(about = "ClusterIP: svclb vs kube-proxy-shaped iptables and nftables vs direct")]
struct Args {
    /// Seconds per protocol and mode in each round (a client run takes
    /// twice this: direct and ClusterIP interleaved).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Rounds per service count; each one measures every node, both
    /// protocols, both modes.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Service counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000")]
    services: Vec<usize>,
    /// Endpoints of each filler service.
    #[arg(long, default_value_t = 2)]
    filler_endpoints: usize,
    /// The iptables-restore to load rules with (iptables-nft-restore or
    /// iptables-legacy-restore).
    #[arg(long, default_value = "iptables-restore")]
    iptables_restore: String,
}

/// The JSON line of `svclb-probe rate`.
#[derive(Debug, Deserialize)]
struct RateRun {
    results: Vec<Rate>,
}

/// One target's share of a rate run.
#[derive(Debug, Deserialize)]
struct Rate {
    target: String,
    ops: u64,
    errors: u64,
    /// Time spent in this target's requests.
    seconds: f64,
    ops_per_sec: f64,
    first_error: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Peer {
    Svclb,
    Iptables,
    Nftables,
}

const PEERS: [Peer; 3] = [Peer::Svclb, Peer::Iptables, Peer::Nftables];
const PROTOS: [Proto; 2] = [Proto::Tcp, Proto::Udp];

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Svclb => "svclb",
            Peer::Iptables => "iptables",
            Peer::Nftables => "nftables",
        }
    }
}

/// One node with its client and backend pods.
struct Site {
    peer: Peer,
    node: Node,
    client: Pod,
    /// The measured service's endpoints; direct requests go to the first.
    backends: Vec<Pod>,
    servers: Vec<Server>,
}

impl Site {
    fn new(cluster: &Cluster, peer: Peer) -> Result<Site> {
        let node = cluster.add_node(peer.name().get(..3).expect("short name"))?;
        // A bridge CNI's node: bridged pod traffic goes through iptables
        // (what makes a DNATed reply between pods of one bridge find its
        // conntrack entry).
        netns::sysctls(
            node.netns_name(),
            &[
                ("net.bridge.bridge-nf-call-iptables", "1"),
                ("net.bridge.bridge-nf-call-ip6tables", "1"),
            ],
        )?;
        let client = node.add_pod("client")?;
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for k in 0..BACKENDS {
            let pod = node.add_pod(&format!("backend{k}"))?;
            servers.push(pod.spawn_server("backend", &[TARGET_PORT])?);
            backends.push(pod);
        }
        // Tens of thousands of short connections to one address:port would
        // run out of source ports while they sit in TIME_WAIT: let connect
        // reuse them, as busy clients do. 32,768 ports per target (one can
        // be reused a second later) also bound the conntrack entries the
        // peer nodes keep (a few tens of thousands each).
        netns::sysctls(
            client.netns_name(),
            &[
                ("net.ipv4.tcp_tw_reuse", "1"),
                ("net.ipv4.ip_local_port_range", "32768 65535"),
            ],
        )?;
        if peer != Peer::Svclb {
            // The harness makes service addresses unreachable in pods (an
            // untranslated connect fails at once); netfilter translates on
            // the node, so these pods route them there.
            client.ip(&["route", "del", "unreachable", svclb_tests::SERVICE_CIDR4])?;
        }
        Ok(Site {
            peer,
            node,
            client,
            backends,
            servers,
        })
    }

    fn direct(&self) -> SocketAddr {
        SocketAddr::new(self.backends[0].ipv4().into(), TARGET_PORT)
    }

    fn backend_ips(&self) -> Vec<Ipv4Addr> {
        self.backends.iter().map(Pod::ipv4).collect()
    }

    /// One `svclb-probe rate` run of `seconds` in the client pod (and its
    /// node's cgroup) alternating between `targets` request by request.
    fn rate(&self, proto: Proto, targets: &[SocketAddr], seconds: f64) -> Result<Vec<Rate>> {
        let mut args = vec!["rate".to_string(), "--proto".into(), proto.probe().into()];
        for t in targets {
            args.extend(["--target".into(), t.to_string()]);
        }
        let ms = (seconds * 1000.0).round() as u64;
        args.extend(["--duration-ms".into(), ms.to_string()]);
        let lines: Vec<RateRun> = self.client.run_client_as(&self.node, &args)?;
        let [run] = <[RateRun; 1]>::try_from(lines)
            .map_err(|l| anyhow::anyhow!("rate printed {} lines", l.len()))?;
        ensure!(run.results.len() == targets.len());
        for r in &run.results {
            ensure!(
                r.ops > 0 && r.errors * 100 <= r.ops,
                "{} {proto} to {}: {} ok, {} errors (first: {:?})",
                self.peer.name(),
                r.target,
                r.ops,
                r.errors,
                r.first_error
            );
        }
        Ok(run.results)
    }

    /// (direct, ClusterIP) requests/s over `seconds` each. Direct requests
    /// take the backends in turn, as the ClusterIP's do at random: with
    /// one backend only, its address:port would run short of free source
    /// ports (TIME_WAIT) sooner than the ClusterIP's and slow its connect()s.
    fn measure(&self, proto: Proto, seconds: f64, direct_first: bool) -> Result<(f64, f64)> {
        let cip = SocketAddr::new(SERVICE_IP.into(), SERVICE_PORT);
        let mut targets = Vec::new();
        for b in &self.backends {
            let d = SocketAddr::new(b.ipv4().into(), TARGET_PORT);
            targets.extend(if direct_first { [d, cip] } else { [cip, d] });
        }
        let results = self.rate(proto, &targets, 2.0 * seconds)?;
        let rate = |direct: bool| {
            let (ops, secs) = results
                .iter()
                .zip(&targets)
                .filter(|(_, t)| (**t != cip) == direct)
                .fold((0, 0.0), |(o, s), (r, _)| (o + r.ops, s + r.seconds));
            ops as f64 / secs
        };
        Ok((rate(true), rate(false)))
    }

    /// The ClusterIP must really reach the backend, or we would time nothing.
    fn check(&self) -> Result<()> {
        for proto in PROTOS {
            let r = self.client.connect(
                &self.node,
                &Connect::new(proto, IpAddr::from(SERVICE_IP), SERVICE_PORT),
            )?;
            ensure!(
                r.len() == 1 && r[0].ok && r[0].server.as_deref() == Some("backend"),
                "{}: {proto} to the ClusterIP does not reach the backend: {r:?}",
                self.peer.name()
            );
        }
        Ok(())
    }

    /// `program args` in the node netns with `input` on stdin.
    fn in_node(&self, program: &str, args: &[&str], input: &str) -> Result<()> {
        use std::io::Write;
        let mut c = Command::new(program);
        c.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd::spawn_placed(
            &mut c,
            &Placement {
                netns: Some(&self.node.netns_path()),
                cgroup: None,
            },
        )?;
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())?;
        cmd::wait_output(&c, child, Duration::from_secs(600))?;
        Ok(())
    }
}

/// `count - 1` fillers with the measured service (TCP and UDP port 80 to
/// `backends`) in the middle.
fn services(
    count: usize,
    filler_endpoints: usize,
    backends: Vec<Ipv4Addr>,
) -> Vec<NodePortService> {
    let mut v = filler_services(count - 1, filler_endpoints);
    let bench = NodePortService {
        namespace: "default".into(),
        name: "bench".into(),
        cluster_ip: SERVICE_IP,
        ports: PROTOS
            .into_iter()
            .map(|proto| ServicePort {
                name: proto.probe().into(),
                proto,
                port: SERVICE_PORT,
                node_port: NODE_PORT,
                target_port: TARGET_PORT,
            })
            .collect(),
        endpoints: backends,
    };
    v.insert(v.len() / 2, bench);
    v
}

/// Service and EndpointSlice manifests for `services` (ClusterIP).
fn write_manifests(cluster: &Cluster, services: &[NodePortService]) -> Result<()> {
    let m = cluster.manifests();
    for svc in services {
        let ports = svc
            .ports
            .iter()
            .map(|p| PortSpec::new(&p.name, p.port, p.proto).target(p.target_port))
            .collect();
        m.write_service(&ServiceSpec::new(
            &svc.name,
            &[svc.cluster_ip.into()],
            ports,
        ))?;
        let slice_ports = svc
            .ports
            .iter()
            .map(|p| PortSpec::new(&p.name, p.target_port, p.proto))
            .collect();
        let endpoints = svc
            .endpoints
            .iter()
            .map(|e| EndpointSpec::ready((*e).into()))
            .collect();
        m.write_slice(&SliceSpec::new(
            &format!("{}-1", svc.name),
            &svc.name,
            slice_ports,
            endpoints,
        ))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench sock FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// user + system CPU seconds of a process.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the ")" that ends the command name: state is field 3,
    // utime and stime fields 14 and 15.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// CPU seconds of this process's reaped children (the probe clients).
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// How close the direct baseline gets to what this machine can do: the
/// same client against a server on loopback in its own pod (no veth, no
/// bridge), and where the CPU goes during a direct run.
fn ceiling(site: &Site, args: &Args) -> Result<()> {
    site.client.spawn_server("loopback", &[LOOPBACK_PORT])?;
    let lo = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), LOOPBACK_PORT);
    println!("Ceiling of the direct baseline (svclb node, before the agent starts):");
    for proto in PROTOS {
        let r = site.rate(proto, &[site.direct(), lo], 2.0 * args.seconds)?;
        println!(
            "  {proto}: direct {:.0}/s, loopback in the client pod {:.0}/s: direct/loopback = {:.3}",
            r[0].ops_per_sec,
            r[1].ops_per_sec,
            r[0].ops_per_sec / r[1].ops_per_sec
        );
        // Direct only, the backends in turn (one address:port alone runs
        // short of free source ports): where the CPU goes.
        let servers_cpu =
            || -> Result<f64> { site.servers.iter().map(|s| cpu_seconds(s.pid())).sum() };
        let (server0, client0, t0) = (servers_cpu()?, children_cpu_seconds(), Instant::now());
        let direct: Vec<SocketAddr> = site
            .backends
            .iter()
            .map(|b| SocketAddr::new(b.ipv4().into(), TARGET_PORT))
            .collect();
        let r = site.rate(proto, &direct, args.seconds)?;
        let wall = t0.elapsed().as_secs_f64();
        let server = servers_cpu()? - server0;
        let client = children_cpu_seconds() - client0;
        let (ops, secs) = r
            .iter()
            .fold((0, 0.0), |(o, s), r| (o + r.ops, s + r.seconds));
        println!(
            "  {proto}: direct alone {:.0}/s; CPU over the run's {wall:.1} s: client process {:.0}%, \
             server processes {:.0}% (of one core; 2 cores here)",
            ops as f64 / secs,
            100.0 * client / wall,
            100.0 * server / wall
        );
    }
    println!(
        "  One client does one request at a time, so a rate is 1 / (one request's round trip):"
    );
    println!(
        "  the client's syscalls, two wake-ups per round trip, and the kernel's TCP/UDP path."
    );
    println!();
    Ok(())
}

/// Per-round (direct, ClusterIP) rates of one node and protocol.
type Rounds = Vec<(f64, f64)>;

fn run(args: &Args) -> Result<()> {
    ensure!(
        args.seconds > 0.0 && args.rounds > 0 && args.filler_endpoints > 0,
        "--seconds, --rounds and --filler-endpoints must be positive"
    );
    ensure!(
        args.services.iter().all(|&n| (1..=10_001).contains(&n)),
        "--services: 1..=10001"
    );
    if !Path::new("/proc/sys/net/bridge").exists() {
        cmd::run(Command::new("modprobe").arg("br_netfilter")).context("modprobe br_netfilter")?;
    }
    let cluster = Cluster::new("bench-sock")?;
    let sites = PEERS
        .iter()
        .map(|&p| Site::new(&cluster, p))
        .collect::<Result<Vec<_>>>()?;

    println!("ClusterIP: svclb vs kube-proxy-shaped iptables and nftables vs direct to the pod");
    println!(
        "  three nodes, each: pods on bridge br0 (bridge-nf-call-iptables=1), one client pod,"
    );
    println!("  two backend pods (svclb-probe serve: TCP on one epoll loop, UDP one socket);");
    println!("  svclb: the agent, socket hooks on that node's cgroup; iptables: kube-proxy's nat");
    println!(
        "  table by {} ({}); nftables: kube-proxy's nftables table (`nft`); no agent on those two.",
        args.iptables_restore,
        cmd::run(Command::new("iptables").arg("--version"))
            .unwrap_or_default()
            .trim()
    );
    println!("  TCP: a new connection per request (connect, request, reply, close);");
    println!("  UDP: one unconnected socket per target, sendto + recvfrom per request.");
    println!("  Each client alternates direct and ClusterIP request by request; svclb's direct");
    println!("  requests also pay its hooks' misses (same cgroup), the peers' direct requests pay");
    println!("  conntrack (on once a nat rule exists), as on such nodes.");
    println!(
        "  {} rounds x {} s per node, protocol and mode; rates in requests/s, medians over rounds.",
        args.rounds, args.seconds
    );
    println!();

    ceiling(&sites[0], args)?;

    let mut summary = Vec::new();
    let mut written = 0usize;
    for &n in &args.services {
        // svclb: manifests, then a fresh agent's first sync. Files are
        // only ever added or rewritten, so the counts must grow.
        ensure!(n >= written, "--services must be in increasing order");
        write_manifests(
            &cluster,
            &services(n, args.filler_endpoints, sites[0].backend_ips()),
        )?;
        written = n;
        let sv = &sites[0];
        if let Some(agent) = sv.node.agent() {
            agent.stop()?;
        }
        let t = Instant::now();
        sv.node.start_agent(cluster.manifests().dir())?;
        let sync = t.elapsed();
        // The peers' backends have other addresses.
        let ipt = &sites[1];
        let ipt_text = kubeproxy_iptables::ruleset(
            &services(n, args.filler_endpoints, ipt.backend_ips()),
            CLUSTER_CIDR,
        );
        let t = Instant::now();
        ipt.in_node(&args.iptables_restore, &[], &ipt_text)?;
        let ipt_load = t.elapsed();
        let nft = &sites[2];
        let nft_text = format!(
            "flush ruleset\n{}",
            kubeproxy_nft::ruleset(
                &services(n, args.filler_endpoints, nft.backend_ips()),
                CLUSTER_CIDR
            )
        );
        let t = Instant::now();
        nft.in_node("nft", &["-f", "-"], &nft_text)?;
        let nft_load = t.elapsed();
        for s in &sites {
            s.check()?;
        }
        println!(
            "{n} services: svclb agent start to first sync {:.2} s; iptables-restore {} lines {:.2} s; nft -f {} lines {:.2} s",
            sync.as_secs_f64(),
            ipt_text.lines().count(),
            ipt_load.as_secs_f64(),
            nft_text.lines().count(),
            nft_load.as_secs_f64()
        );
        // Warm-up (not counted): caches, neighbour entries, allocator.
        for s in &sites {
            for proto in PROTOS {
                s.measure(proto, 0.1, true)?;
            }
        }
        // rates[peer][proto]
        let mut rates: Vec<Vec<Rounds>> = vec![vec![Vec::new(); 2]; 3];
        for round in 0..args.rounds as usize {
            for (p, proto) in PROTOS.iter().enumerate() {
                for k in 0..3 {
                    let i = (round + k) % 3;
                    let (d, c) = sites[i]
                        .measure(*proto, args.seconds, round % 2 == 0)
                        .with_context(|| format!("{n} services, round {}", round + 1))?;
                    rates[i][p].push((d, c));
                }
            }
        }
        summary.push(report(n, &rates));
        println!();
    }

    println!("Targets:");
    for s in &summary {
        for (p, proto) in PROTOS.iter().enumerate() {
            let r = s.svclb_direct[p];
            println!(
                "  {proto}, {} services: svclb/direct = {r:.3} (>= {DIRECT_TARGET}: {})",
                s.services,
                met(r >= DIRECT_TARGET)
            );
        }
    }
    for s in summary.iter().filter(|s| s.services == IPTABLES_TARGET_AT) {
        for (p, proto) in PROTOS.iter().enumerate() {
            let r = s.svclb_iptables[p];
            println!(
                "  {proto}, {} services: svclb/iptables = {r:.2} (>= {IPTABLES_TARGET}: {})",
                s.services,
                met(r >= IPTABLES_TARGET)
            );
        }
    }
    Ok(())
}

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "not met"
    }
}

/// The medians a service count ends with, per protocol.
struct Summary {
    services: usize,
    svclb_direct: [f64; 2],
    svclb_iptables: [f64; 2],
}

/// Print one service count's table and ratio lines.
fn report(n: usize, rates: &[Vec<Rounds>]) -> Summary {
    let mut s = Summary {
        services: n,
        svclb_direct: [0.0; 2],
        svclb_iptables: [0.0; 2],
    };
    println!(
        "  {:<6}{:<10}{:>10}{:>11}{:>19}",
        "", "node", "direct", "ClusterIP", "ClusterIP/direct"
    );
    for (p, proto) in PROTOS.iter().enumerate() {
        for (i, peer) in PEERS.iter().enumerate() {
            let r = &rates[i][p];
            let ratios: Vec<f64> = r.iter().map(|(d, c)| c / d).collect();
            let ratio = median(ratios.clone());
            println!(
                "  {:<6}{:<10}{:>10.0}{:>11.0}{:>9.3} ({:.3}-{:.3})",
                proto.to_string(),
                peer.name(),
                median(r.iter().map(|x| x.0).collect()),
                median(r.iter().map(|x| x.1).collect()),
                ratio,
                min(&ratios),
                max(&ratios)
            );
            if *peer == Peer::Svclb {
                s.svclb_direct[p] = ratio;
            }
        }
    }
    println!("  (ClusterIP/direct: median over rounds, min-max in brackets)");
    for (p, proto) in PROTOS.iter().enumerate() {
        // Same round: the nodes ran back to back.
        let cross = |j: usize| {
            median(
                rates[0][p]
                    .iter()
                    .zip(&rates[j][p])
                    .map(|(a, b)| a.1 / b.1)
                    .collect(),
            )
        };
        let (ipt, nft) = (cross(1), cross(2));
        s.svclb_iptables[p] = ipt;
        println!("  {proto}, {n} services: svclb/iptables = {ipt:.2}, svclb/nftables = {nft:.2}");
    }
    s
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
