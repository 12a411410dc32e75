//! `cargo xtask bench sock [--seconds N] [--rounds R]`: what the socket-level
//! translation costs. Short TCP connections (connect, one request/reply,
//! close) and UDP request/replies (one unconnected socket, sendto +
//! recvfrom), to a ClusterIP and directly to the backend pod's IP, in the
//! same run.
//!
//! Each round runs one client process per protocol that alternates between
//! the two targets request by request (`svclb-probe rate`), so load from
//! elsewhere on the machine (builds, VMs: this runs on small shared
//! machines) hits both modes alike; which mode goes first alternates by
//! round. The ratio is the median of the per-round ratios.
//!
//! Prints rates and ratios only: timings are no pass/fail material. Exits
//! non-zero only when something broke (a mode without successful requests,
//! or with more than 1% errors).

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use serde::Deserialize;
use svclb_tests::{
    netns, Cluster, Connect, EndpointSpec, Node, Pod, PortSpec, Proto, ServiceSpec, SliceSpec,
};

const SERVICE_IP: &str = "198.19.0.20";
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
const TARGET: f64 = 0.95;

#[derive(Parser)]
#[command(about = "ClusterIP vs direct: short TCP connections and UDP request/replies")]
struct Args {
    /// Seconds per protocol and mode in each round.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rounds; each one measures both protocols in both modes.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
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
    ops_per_sec: f64,
    first_error: Option<String>,
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

fn service_ip() -> IpAddr {
    SERVICE_IP.parse().expect("valid address literal")
}

struct Bench {
    node: Node,
    client: Pod,
    direct: SocketAddr,
    cluster_ip: SocketAddr,
}

impl Bench {
    /// One `svclb-probe rate` run in the client pod and the node's cgroup,
    /// alternating direct and ClusterIP requests (`direct_first` picks which
    /// goes first). Returns the (direct, ClusterIP) rates.
    fn measure(&self, proto: Proto, seconds: f64, direct_first: bool) -> Result<(Rate, Rate)> {
        let (first, second) = if direct_first {
            (self.direct, self.cluster_ip)
        } else {
            (self.cluster_ip, self.direct)
        };
        let args = [
            "rate".to_string(),
            "--proto".into(),
            proto.probe().into(),
            "--target".into(),
            first.to_string(),
            "--target".into(),
            second.to_string(),
            "--duration-ms".into(),
            // Both modes share the run's time.
            ((2.0 * seconds * 1000.0).round() as u64).to_string(),
        ];
        let lines: Vec<RateRun> = self.client.run_client_as(&self.node, &args)?;
        let [run] = <[RateRun; 1]>::try_from(lines)
            .map_err(|l| anyhow::anyhow!("rate printed {} lines", l.len()))?;
        for r in &run.results {
            ensure!(
                r.ops > 0 && r.errors * 100 <= r.ops,
                "{proto} to {}: {} ok, {} errors (first: {:?})",
                r.target,
                r.ops,
                r.errors,
                r.first_error
            );
        }
        let [a, b] = <[Rate; 2]>::try_from(run.results)
            .map_err(|r| anyhow::anyhow!("rate reported {} targets", r.len()))?;
        Ok(if direct_first { (a, b) } else { (b, a) })
    }
}

fn run(args: &Args) -> Result<()> {
    ensure!(
        args.seconds > 0.0 && args.rounds > 0,
        "--seconds and --rounds must be positive"
    );
    let cluster = Cluster::new("bench-sock")?;
    let node = cluster.add_node("n1")?;
    let client = node.add_pod("client")?;
    let backend = node.add_pod("backend")?;
    backend.spawn_server("backend", &[TARGET_PORT])?;
    // Tens of thousands of short connections to one backend address:port
    // would run out of source ports while they sit in TIME_WAIT (60 s).
    // Let connect reuse them, as busy clients do.
    netns::sysctls(
        client.netns_name(),
        &[
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.ipv4.ip_local_port_range", "1024 65535"),
        ],
    )?;
    let m = cluster.manifests();
    m.write_service(&ServiceSpec::new(
        "bench",
        &[service_ip()],
        vec![
            PortSpec::tcp("tcp", SERVICE_PORT).target(TARGET_PORT),
            PortSpec::udp("udp", SERVICE_PORT).target(TARGET_PORT),
        ],
    ))?;
    m.write_slice(&SliceSpec::new(
        "bench-1",
        "bench",
        vec![
            PortSpec::tcp("tcp", TARGET_PORT),
            PortSpec::udp("udp", TARGET_PORT),
        ],
        vec![EndpointSpec::ready(backend.ipv4().into())],
    ))?;
    node.start_agent(m.dir())?;
    let bench = Bench {
        node,
        client,
        direct: SocketAddr::new(backend.ipv4().into(), TARGET_PORT),
        cluster_ip: SocketAddr::new(service_ip(), SERVICE_PORT),
    };

    // The ClusterIP must really be translated, or we would time nothing.
    for proto in [Proto::Tcp, Proto::Udp] {
        let r = bench.client.connect(
            &bench.node,
            &Connect::new(proto, service_ip(), SERVICE_PORT),
        )?;
        ensure!(
            r.len() == 1 && r[0].ok && r[0].server.as_deref() == Some("backend"),
            "{proto} to the ClusterIP does not reach the backend: {r:?}"
        );
    }

    println!("svclb socket-level load balancing: ClusterIP vs direct to the pod");
    println!(
        "  client: one svclb-probe process in pod client ({}), in node n1's cgroup",
        bench.client.ipv4()
    );
    println!(
        "  server: svclb-probe in pod backend, {} (TCP: a thread per connection; UDP: one socket)",
        bench.direct
    );
    println!(
        "  ClusterIP: {} -> svclb rewrites connect()/sendmsg() to the same pod",
        bench.cluster_ip
    );
    println!("  TCP: a new connection per request (connect, request, reply, close)");
    println!("  UDP: one unconnected socket per mode, sendto + recvfrom per request");
    println!("  The client alternates direct and ClusterIP request by request, so other load");
    println!("  on the machine hits both alike; a mode's rate counts only its own requests' time.");
    println!("  Direct traffic runs in the same cgroup, so it also pays for svclb's hooks on");
    println!("  non-service addresses (a map lookup that misses): the ratio is the cost of the");
    println!("  translation itself, not of having svclb attached.");
    println!(
        "  {} rounds x {} s per protocol and mode; rates in requests/s.",
        args.rounds, args.seconds
    );

    // Warm-up (not counted): caches, neighbour entries, allocator.
    for proto in [Proto::Tcp, Proto::Udp] {
        bench.measure(proto, 0.2, true)?;
    }

    let protos = [Proto::Tcp, Proto::Udp];
    // rates[p]: (direct, ClusterIP) requests/s of each round.
    let mut rates: [Vec<(f64, f64)>; 2] = Default::default();
    let mut errors = 0u64;
    println!();
    println!(
        "  {:<7}{:>12}{:>14}{:>8}  {:>12}{:>14}{:>8}",
        "round", "TCP direct", "TCP ClusterIP", "ratio", "UDP direct", "UDP ClusterIP", "ratio"
    );
    for round in 1..=args.rounds {
        let mut line = format!("  {round:<7}");
        for (p, proto) in protos.iter().enumerate() {
            let (d, c) = bench
                .measure(*proto, args.seconds, round % 2 == 1)
                .with_context(|| format!("round {round}"))?;
            errors += d.errors + c.errors;
            let (d, c) = (d.ops_per_sec, c.ops_per_sec);
            rates[p].push((d, c));
            line += &format!("{d:>12.0}{c:>14.0}{:>8.3}  ", c / d);
        }
        println!("{}", line.trim_end());
    }
    let med = |p: usize, f: fn(&(f64, f64)) -> f64| median(rates[p].iter().map(f).collect());
    let mut line = format!("  {:<7}", "median");
    for p in 0..protos.len() {
        line += &format!(
            "{:>12.0}{:>14.0}{:>8.3}  ",
            med(p, |r| r.0),
            med(p, |r| r.1),
            med(p, |r| r.1 / r.0)
        );
    }
    println!("{}", line.trim_end());
    println!();
    for (p, proto) in protos.iter().enumerate() {
        // Within a round both modes saw the same conditions, so compare
        // within rounds, then take the median over rounds.
        let ratio = med(p, |r| r.1 / r.0);
        let extra_us = med(p, |r| 1e6 / r.1 - 1e6 / r.0);
        let verdict = if ratio >= TARGET { "meets" } else { "below" };
        println!(
            "  {proto}: ClusterIP/direct = {ratio:.3}  (target >= {TARGET}: {verdict});  ClusterIP costs {extra_us:+.2} us per request"
        );
    }
    println!("  (ratio and cost: medians over the rounds of each round's own comparison)");
    if errors > 0 {
        println!("  ({errors} failed requests in all, under 1% of each mode's requests)");
    }
    Ok(())
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
