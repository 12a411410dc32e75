//! `cargo xtask soak [--short]`: svclb under churn, crashes and map faults.
//!
//! One simulated node with its agent in manifests mode (`svclb run
//! --manifests DIR`, injecting map-operation faults at a low rate), a few
//! backend pods that really serve, and many ClusterIP services on them:
//! - "churning" services get their EndpointSlices rewritten at a steady
//!   rate: endpoints added, removed, flipped between ready, terminating and
//!   not ready;
//! - "stable" services keep their ready backends; only their non-ready
//!   endpoints churn (the agent re-applies them, the maps must not move);
//! - a client pod connects continuously to the stable services (connect, one
//!   request/reply, close) and counts what fails;
//! - the agent is killed with SIGKILL at random moments and restarted with
//!   the same flags; after each restart (and at the end) the churn pauses,
//!   the agent settles and `svclb verify` compares its desired state with
//!   the maps.
//!
//! Prints agent RSS, retries, churn and connections over time, and ends
//! with exactly `soak: <N> connections, <F> failed, <D> verify differences`;
//! exits non-zero when F > 0, D > 0, or a verify could not run.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Deserialize;
use svclb_tests::cmd::{self, Placement};
use svclb_tests::{
    netns, Agent, Cluster, EndpointSpec, Node, Pod, PortSpec, ServiceSpec, SliceSpec,
};

#[derive(Parser, Clone)]
#[command(
    about = "svclb soak: churn, agent crashes and map faults while a client connects",
    args_override_self = true
)]
struct Args {
    /// ClusterIP services; every other one is stable, the rest churn.
    #[arg(long, default_value_t = 1000)]
    services: usize,
    /// Length of the run after set-up.
    #[arg(long, default_value_t = 600)]
    duration_secs: u64,
    /// SIGKILLs of the agent, at random moments.
    #[arg(long, default_value_t = 20)]
    kills: usize,
    /// EndpointSlice rewrites per second.
    #[arg(long, default_value_t = 50)]
    changes_per_sec: u32,
    /// The agent's --inject-map-faults.
    #[arg(long, default_value_t = 0.005)]
    fault_rate: f64,
    /// New client connections per second (to the stable services in turn).
    #[arg(long, default_value_t = 200)]
    connections_per_sec: u32,
    /// Backend pods (each serves ports 8080 and 8081; services share them).
    #[arg(long, default_value_t = 8)]
    backends: usize,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 10)]
    report_secs: u64,
    /// Random seed (default: from the clock; printed either way).
    #[arg(long)]
    seed: Option<u64>,
}

/// The agent's --metrics-bind-address default, inside the node's netns;
/// also where `svclb verify` asks for the desired state by default.
const METRICS_ADDR: &str = "127.0.0.1:10249";
/// Client connections per probe run; each run adds to the totals.
const CLIENT_CHUNK: Duration = Duration::from_secs(5);
/// After pausing the churn: how long the agent may take to reach the maps.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);
const TARGET_PORTS: [u16; 2] = [8080, 8081];

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cond {
    Ready,
    /// Serving but terminating (the fallback when nothing is ready).
    Terminating,
    NotReady,
}

/// One service and the endpoints its slice lists now.
struct Svc {
    name: String,
    cluster_ip: Ipv4Addr,
    target_port: u16,
    stable: bool,
    /// Stable services: their ready backends (pod indices), never changed.
    fixed_ready: Vec<usize>,
    /// Endpoints that churn: all of a churning service's, and the non-ready
    /// ones of a stable service.
    churned: Vec<(usize, Cond)>,
}

impl Svc {
    fn slice(&self, pods: &[Pod]) -> SliceSpec {
        let ep = |k: usize, c: Cond| {
            let addr = IpAddr::V4(pods[k].ipv4());
            match c {
                Cond::Ready => EndpointSpec::ready(addr),
                Cond::Terminating => EndpointSpec::terminating(addr),
                Cond::NotReady => EndpointSpec::not_ready(addr),
            }
        };
        let endpoints = (self.fixed_ready.iter().map(|&k| ep(k, Cond::Ready)))
            .chain(self.churned.iter().map(|&(k, c)| ep(k, c)))
            .collect();
        SliceSpec::new(
            &format!("{}-1", self.name),
            &self.name,
            vec![PortSpec::tcp("http", self.target_port)],
            endpoints,
        )
    }

    /// Add, remove or flip one endpoint (a stable service's never to ready).
    fn mutate(&mut self, rng: &mut Rng, backends: usize) {
        let conds: &[Cond] = if self.stable {
            &[Cond::Terminating, Cond::NotReady]
        } else {
            &[Cond::Ready, Cond::Terminating, Cond::NotReady]
        };
        let free: Vec<usize> = (0..backends)
            .filter(|k| !self.fixed_ready.contains(k) && !self.churned.iter().any(|(c, _)| c == k))
            .collect();
        let pick = |rng: &mut Rng| conds[rng.below(conds.len())];
        match rng.below(3) {
            0 if !free.is_empty() => {
                let c = pick(rng);
                self.churned.push((free[rng.below(free.len())], c));
            }
            1 if !self.churned.is_empty() => {
                let i = rng.below(self.churned.len());
                self.churned.remove(i);
            }
            _ if !self.churned.is_empty() => {
                let i = rng.below(self.churned.len());
                let old = self.churned[i].1;
                let others: Vec<Cond> = conds.iter().copied().filter(|c| *c != old).collect();
                self.churned[i].1 = others[rng.below(others.len())];
            }
            _ => {
                let c = pick(rng);
                self.churned.push((free[rng.below(free.len())], c));
            }
        }
    }
}

/// The EndpointSlice rewriter. Holding its lock pauses the churn.
struct Churn {
    services: Vec<Svc>,
    pods: Vec<Pod>,
    rng: Rng,
    changes: u64,
}

impl Churn {
    fn change(&mut self, cluster: &Cluster) -> Result<()> {
        // A fifth of the changes touch the stable services' non-ready endpoints.
        let stable = self.rng.unit() < 0.2;
        let candidates: Vec<usize> = (0..self.services.len())
            .filter(|&i| self.services[i].stable == stable)
            .collect();
        let i = candidates[self.rng.below(candidates.len())];
        let backends = self.pods.len();
        let svc = &mut self.services[i];
        svc.mutate(&mut self.rng, backends);
        cluster.manifests().write_slice(&svc.slice(&self.pods))?;
        self.changes += 1;
        Ok(())
    }
}

/// What the client counted so far.
#[derive(Default)]
struct Conns {
    attempted: u64,
    failed: u64,
    /// First error per target that failed.
    errors: BTreeMap<String, String>,
    client_errors: u64,
}

/// Things the reporter and the main thread share.
struct Shared {
    stop: AtomicBool,
    conns: Mutex<Conns>,
    /// The running agent (pid, run number).
    agent: Mutex<Option<(u32, usize)>>,
    /// Last svclb_sync_errors_total (summed over reasons) seen per run.
    sync_errors: Mutex<BTreeMap<usize, f64>>,
    /// (seconds since start, run, RSS KiB).
    rss: Mutex<Vec<(f64, usize, u64)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn run(args: Args) -> Result<bool> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    let mut rng = Rng(seed);
    println!(
        "soak: {} services ({} stable), {} backends, {} s, {} changes/s, {} agent kills, map fault rate {}, {} connections/s, seed {seed}",
        args.services,
        args.services.div_ceil(2),
        args.backends,
        args.duration_secs,
        args.changes_per_sec,
        args.kills,
        args.fault_rate,
        args.connections_per_sec
    );
    if args.services < 2 || args.backends < 3 {
        bail!("need at least 2 services and 3 backends");
    }
    let cluster = Cluster::new("soak")?;
    let node = cluster.add_node("n1")?;
    let mut pods = Vec::new();
    for k in 0..args.backends {
        let pod = node.add_pod(&format!("b{k}"))?;
        pod.spawn_server(&format!("b{k}"), &TARGET_PORTS)?;
        pods.push(pod);
    }
    let client = node.add_pod("client")?;

    let services: Vec<Svc> = (0..args.services)
        .map(|i| {
            let stable = i % 2 == 0;
            let j = i / 2;
            let fixed_ready = if stable {
                (0..1 + j % 3).map(|n| (j + n) % args.backends).collect()
            } else {
                Vec::new()
            };
            let churned = if stable {
                Vec::new()
            } else {
                vec![((j + 1) % args.backends, Cond::Ready)]
            };
            Svc {
                name: format!("s{i}"),
                cluster_ip: Ipv4Addr::new(198, 19, (i / 250) as u8, (i % 250 + 1) as u8),
                target_port: TARGET_PORTS[j % 2],
                stable,
                fixed_ready,
                churned,
            }
        })
        .collect();
    for svc in &services {
        let spec = ServiceSpec::new(
            &svc.name,
            &[IpAddr::V4(svc.cluster_ip)],
            vec![PortSpec::tcp("http", 80).target(svc.target_port)],
        );
        cluster.manifests().write_service(&spec)?;
        cluster.manifests().write_slice(&svc.slice(&pods))?;
    }
    let targets: Vec<String> = (services.iter().filter(|s| s.stable))
        .map(|s| SocketAddr::from((s.cluster_ip, 80)).to_string())
        .collect();

    let fault_rate = args.fault_rate.to_string();
    let agent_args = ["--inject-map-faults", fault_rate.as_str()];
    let t0 = Instant::now();
    let mut agent = node.start_agent_with(cluster.manifests().dir(), &[], &agent_args)?;
    println!(
        "soak: set up; first agent synced after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mut agents = vec![agent.clone()];
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        conns: Mutex::default(),
        agent: Mutex::new(Some((agent.pid(), 0))),
        sync_errors: Mutex::default(),
        rss: Mutex::default(),
    });
    let churn = Arc::new(Mutex::new(Churn {
        services,
        pods,
        rng: Rng(rng.next() | 1),
        changes: 0,
    }));

    let start = Instant::now();
    let mut kill_at: Vec<Duration> = (0..args.kills)
        .map(|_| Duration::from_secs_f64(args.duration_secs as f64 * (0.05 + 0.9 * rng.unit())))
        .collect();
    kill_at.sort();

    let outcome = thread::scope(|scope| -> Result<(Vec<Option<usize>>, Option<usize>)> {
        let churner = scope.spawn(|| churn_loop(&cluster, &churn, &shared, args.changes_per_sec));
        let connector = scope
            .spawn(|| client_loop(&client, &node, &targets, &shared, args.connections_per_sec));
        let reporter = scope.spawn(|| report_loop(&node, &churn, &shared, start, args.report_secs));
        let verified = (|| {
            let mut after_restart = Vec::new();
            for (run, at) in kill_at.iter().enumerate() {
                thread::sleep(at.saturating_sub(start.elapsed()));
                scrape_errors(&node, &shared, run);
                agent.kill();
                *lock(&shared.agent) = None;
                let killed = start.elapsed();
                agent = node.start_agent_like(&agent)?;
                agents.push(agent.clone());
                *lock(&shared.agent) = Some((agent.pid(), run + 1));
                println!(
                    "soak: [{:>6.1} s] kill {}/{} (SIGKILL); restarted agent synced after {:.1} s",
                    killed.as_secs_f64(),
                    run + 1,
                    args.kills,
                    (start.elapsed() - killed).as_secs_f64()
                );
                let _paused = lock(&churn);
                after_restart.push(settle_and_verify(&node, run + 1, start));
            }
            thread::sleep(Duration::from_secs(args.duration_secs).saturating_sub(start.elapsed()));
            // The end: the churn stops for good; the client goes on until
            // the final verify is done.
            let _paused = lock(&churn);
            let last = settle_and_verify(&node, args.kills, start);
            scrape_errors(&node, &shared, args.kills);
            anyhow::Ok((after_restart, last))
        })();
        shared.stop.store(true, Ordering::Relaxed);
        for t in [churner, connector, reporter] {
            t.join()
                .map_err(|_| anyhow::anyhow!("a soak thread panicked"))??;
        }
        verified
    });
    let (after_restart, last) = outcome?;
    agent.stop().ok();

    summarize(&shared, &churn, &agents, &after_restart, last, start)
}

/// Rewrite one EndpointSlice every 1/rate s until stopped; a paused churn
/// (its lock held) does not catch up afterwards.
fn churn_loop(
    cluster: &Cluster,
    churn: &Mutex<Churn>,
    shared: &Shared,
    per_sec: u32,
) -> Result<()> {
    let interval = Duration::from_secs_f64(1.0 / f64::from(per_sec.max(1)));
    let mut next = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        thread::sleep(next.saturating_duration_since(Instant::now()));
        if per_sec > 0 {
            lock(churn).change(cluster)?;
        }
        next = (next + interval).max(Instant::now());
    }
    Ok(())
}

/// One `rate` line of svclb-probe (only what the soak counts).
#[derive(Deserialize)]
struct RateOut {
    results: Vec<RateResult>,
}

#[derive(Deserialize)]
struct RateResult {
    target: String,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Connect to the stable services in turn, chunk after chunk, until stopped.
fn client_loop(
    client: &Pod,
    node: &Node,
    targets: &[String],
    shared: &Shared,
    per_sec: u32,
) -> Result<()> {
    let mut probe_args: Vec<String> = vec![
        "rate".into(),
        "--duration-ms".into(),
        CLIENT_CHUNK.as_millis().to_string(),
        "--per-sec".into(),
        per_sec.to_string(),
        "--timeout-ms".into(),
        "2000".into(),
    ];
    for t in targets {
        probe_args.extend(["--target".into(), t.clone()]);
    }
    while !shared.stop.load(Ordering::Relaxed) {
        match client.run_client_as::<RateOut, _>(node, &probe_args) {
            Ok(out) => {
                let mut c = lock(&shared.conns);
                for r in out.iter().flat_map(|o| &o.results) {
                    c.attempted += r.ops + r.errors;
                    c.failed += r.errors;
                    if let Some(e) = &r.first_error {
                        c.errors
                            .entry(r.target.clone())
                            .or_insert_with(|| e.clone());
                    }
                }
            }
            // The probe itself failing is not a failed connection, but it
            // must not pass unnoticed.
            Err(e) => {
                eprintln!("soak: client run failed: {e:#}");
                lock(&shared.conns).client_errors += 1;
            }
        }
    }
    Ok(())
}

/// Every `every` seconds: agent RSS, retries and errors, churn and connections.
fn report_loop(
    node: &Node,
    churn: &Mutex<Churn>,
    shared: &Shared,
    start: Instant,
    every: u64,
) -> Result<()> {
    let mut next = start;
    while !shared.stop.load(Ordering::Relaxed) {
        next += Duration::from_secs(every.max(1));
        while Instant::now() < next {
            if shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(100));
        }
        let Some((pid, run)) = *lock(&shared.agent) else {
            continue;
        };
        let t = start.elapsed().as_secs_f64();
        let rss = rss_kib(pid);
        if let Some(kib) = rss {
            lock(&shared.rss).push((t, run, kib));
        }
        let metrics = scrape(node).ok();
        let pending = metrics.as_ref().and_then(|m| m.retries_pending);
        if let Some(m) = &metrics {
            lock(&shared.sync_errors).insert(run, m.sync_errors);
        }
        // try_lock: a paused churn (verify running) must not stall the
        // report; a change in progress holds the lock only briefly.
        let changes = (0..20).find_map(|_| match churn.try_lock() {
            Ok(c) => Some(c.changes.to_string()),
            Err(_) => {
                thread::sleep(Duration::from_millis(5));
                None
            }
        });
        let (attempted, failed) = {
            let c = lock(&shared.conns);
            (c.attempted, c.failed)
        };
        println!(
            "soak: [{t:>6.1} s] run {run}: agent RSS {}, retries pending {}, sync errors this run {}, slice changes {}, connections {attempted} ({failed} failed)",
            rss.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            pending.map_or("?".into(), |p| p.to_string()),
            metrics.map_or("?".into(), |m| m.sync_errors.to_string()),
            changes.unwrap_or_else(|| "(paused)".into()),
        );
    }
    Ok(())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// What the soak reads from the agent's /metrics.
struct Scraped {
    retries_pending: Option<u64>,
    /// svclb_sync_errors_total summed over reasons.
    sync_errors: f64,
}

fn scrape(node: &Node) -> Result<Scraped> {
    let text = netns::in_netns(node.netns_name(), || http_get(METRICS_ADDR, "/metrics"))?;
    let mut s = Scraped {
        retries_pending: None,
        sync_errors: 0.0,
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if name == "svclb_sync_retries_pending" {
            s.retries_pending = Some(value as u64);
        } else if name.starts_with("svclb_sync_errors_total{") {
            s.sync_errors += value;
        }
    }
    Ok(s)
}

/// Remember the current run's error count before the agent goes away.
fn scrape_errors(node: &Node, shared: &Shared, run: usize) {
    if let Ok(m) = scrape(node) {
        lock(&shared.sync_errors).insert(run, m.sync_errors);
    }
}

/// A plain HTTP/1.1 GET (Connection: close); the body on 200.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse()?, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP header end")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// With the churn paused: wait until the agent has seen the last change
/// and retried what failed, then `svclb verify`. Returns its number of
/// differences, None if it could not run.
fn settle_and_verify(node: &Node, run: usize, start: Instant) -> Option<usize> {
    // The manifests source polls every 200 ms.
    thread::sleep(Duration::from_secs(1));
    let settled = Instant::now();
    let mut zero_in_a_row = 0;
    while zero_in_a_row < 2 && settled.elapsed() < SETTLE_TIMEOUT {
        match scrape(node).map(|m| m.retries_pending) {
            Ok(Some(0)) => zero_in_a_row += 1,
            _ => zero_in_a_row = 0,
        }
        thread::sleep(Duration::from_millis(500));
    }
    let settle = settled.elapsed().as_secs_f64() + 1.0;
    let t = start.elapsed().as_secs_f64();
    match verify(node) {
        Ok(differences) => {
            println!(
                "soak: [{t:>6.1} s] run {run}: settled in {settle:.1} s, svclb verify: {} differences",
                differences.len()
            );
            let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
            for d in &differences {
                let field = |k: &str| d[k].as_str().unwrap_or("?").to_string();
                *by_kind
                    .entry(format!("{} {}", field("map"), field("kind")))
                    .or_default() += 1;
            }
            if !by_kind.is_empty() {
                println!("soak:     by map and kind: {by_kind:?}");
            }
            for d in differences.iter().take(3) {
                println!("soak:     {d}");
            }
            Some(differences.len())
        }
        Err(e) => {
            println!("soak: [{t:>6.1} s] run {run}: svclb verify could not run: {e:#}");
            None
        }
    }
}

#[derive(Deserialize)]
struct VerifyOut {
    differences: Vec<serde_json::Value>,
}

/// `svclb verify --bpffs PIN --output json` in the node's netns, where the
/// agent serves its desired state on the default --agent address. Exit
/// status 0: no differences, 1: differences, 2: error.
fn verify(node: &Node) -> Result<Vec<serde_json::Value>> {
    let mut c = Command::new(svclb_tests::agent::svclb_bin()?);
    c.args(["verify", "--bpffs"])
        .arg(node.pin_dir())
        .args(["--output", "json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let netns = node.netns_path();
    let child = cmd::spawn_placed(
        &mut c,
        &Placement {
            netns: Some(&netns),
            cgroup: None,
        },
    )?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    match out.status.code() {
        Some(0 | 1) => {
            let v: VerifyOut = serde_json::from_str(&stdout)
                .with_context(|| format!("parsing `{}` output: {stdout}", cmd::describe(&c)))?;
            Ok(v.differences)
        }
        _ => bail!(
            "`{}` failed ({}): {}",
            cmd::describe(&c),
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or_default()
        ),
    }
}

/// Agent log lines that report an injected fault (each one failed a
/// service's apply or a stale-entry flush, to be retried).
fn injected_faults(agents: &[Agent]) -> usize {
    agents
        .iter()
        .map(|a| {
            a.log()
                .lines()
                .filter(|l| l.contains("injected fault"))
                .count()
        })
        .sum()
}

fn summarize(
    shared: &Shared,
    churn: &Mutex<Churn>,
    agents: &[Agent],
    after_restart: &[Option<usize>],
    last: Option<usize>,
    start: Instant,
) -> Result<bool> {
    let conns = lock(&shared.conns);
    let rss = lock(&shared.rss);
    let sync_errors: f64 = lock(&shared.sync_errors).values().sum();
    let changes = lock(churn).changes;
    println!(
        "soak: {:.0} s, {changes} slice changes, {} agent runs",
        start.elapsed().as_secs_f64(),
        agents.len()
    );
    let mib = |k: u64| k as f64 / 1024.0;
    if let (Some(min), Some(max)) = (rss.iter().map(|r| r.2).min(), rss.iter().map(|r| r.2).max()) {
        // Flat means: the longest run ends where it began (after its sync).
        let mut by_run: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for &(_, run, kib) in rss.iter() {
            by_run.entry(run).or_default().push(kib);
        }
        let (run, longest) = by_run
            .iter()
            .max_by_key(|(_, v)| v.len())
            .expect("samples exist");
        println!(
            "soak: agent RSS over {} samples: min {:.1} MiB, max {:.1} MiB; longest run ({run}, {} samples): first {:.1} MiB, last {:.1} MiB",
            rss.len(),
            mib(min),
            mib(max),
            longest.len(),
            mib(longest[0]),
            mib(*longest.last().expect("non-empty"))
        );
    }
    println!(
        "soak: retries: {sync_errors} sync errors (svclb_sync_errors_total over all runs), {} injected faults in the agent logs",
        injected_faults(agents)
    );
    let shown: Vec<String> = after_restart
        .iter()
        .map(|d| d.map_or("error".into(), |d| d.to_string()))
        .collect();
    println!(
        "soak: verify differences after each restart: [{}]; at the end: {}",
        shown.join(", "),
        last.map_or("error".into(), |d| d.to_string())
    );
    for (target, e) in conns.errors.iter().take(20) {
        println!("soak: failed connections to {target}, first: {e}");
    }
    let unverified = after_restart
        .iter()
        .chain([&last])
        .filter(|d| d.is_none())
        .count();
    if unverified > 0 {
        println!("soak: {unverified} verify runs could not run");
    }
    if conns.client_errors > 0 {
        println!("soak: {} client runs failed", conns.client_errors);
    }
    let differences: usize = after_restart.iter().chain([&last]).flatten().sum();
    println!(
        "soak: {} connections, {} failed, {differences} verify differences",
        conns.attempted, conns.failed
    );
    Ok(conns.failed == 0
        && differences == 0
        && unverified == 0
        && conns.client_errors == 0
        && conns.attempted > 0)
}
