//! NodePort from outside the cluster, end to end: an external client sends
//! requests to node n1's ext0 address; the node forwards them to backend
//! pods on the same node. Cases, one line each:
//! - direct: to a pod IP, routed through the node, no translation (baseline);
//! - iptables: kube-proxy's nat table ([`svclb_tests::kubeproxy_iptables`])
//!   with 1 and with N services, loaded with iptables-restore in the node
//!   netns; only one service gets traffic, placed last (the worst case);
//! - svclb: the agent with `--devices ext0` and the same services as
//!   manifests (skipped while the agent has no --devices).
//!
//! TCP: a new connection per request (each one walks the nat rules); UDP:
//! one socket, request/reply (after the first packet only conntrack).
//! Prints rates and ratios; exits non-zero only when something broke.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use serde::Deserialize;
use serde_json::json;
use svclb_tests::cmd::{self, Placement};
use svclb_tests::kubeproxy_iptables::{filler_services, ruleset, NodePortService, ServicePort};
use svclb_tests::{
    netns, Cluster, Connect, EndpointSpec, ExternalClient, Node, PortSpec, Proto, ServiceSpec,
    SliceSpec, EXT_IF,
};

const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;
const CLUSTER_CIDR: &str = "198.18.1.0/24";

#[derive(Parser)]
#[command(about = "NodePort from an external client: direct vs iptables vs svclb XDP")]
struct Args {
    /// Seconds per case and protocol in each round.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Rounds per case (the median is reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Service counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,10000")]
    services: Vec<usize>,
    /// Endpoints per service (the measured service gets this many backend pods).
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    /// The iptables-restore to load rules with (iptables-nft-restore or
    /// iptables-legacy-restore).
    #[arg(long, default_value = "iptables-restore")]
    iptables_restore: String,
}

#[derive(Debug, Deserialize)]
struct RateRun {
    results: Vec<Rate>,
}

#[derive(Debug, Deserialize)]
struct Rate {
    ops: u64,
    errors: u64,
    ops_per_sec: f64,
    first_error: Option<String>,
}

/// A case's rates (requests/s) and ratios to the interleaved baseline.
struct Measured {
    tcp: f64,
    tcp_ratio: f64,
    udp: f64,
    udp_ratio: f64,
}

struct Bench {
    cluster: Cluster,
    node: Node,
    client: ExternalClient,
    backends: Vec<Ipv4Addr>,
    args: Args,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench xdp-e2e FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

impl Bench {
    /// Median requests/s over the rounds for (TCP, UDP) to `target`.
    /// Requests/s to `target` and its ratio to `direct`, TCP then UDP:
    /// the probe takes the two targets in turn within each run, so both
    /// see the same machine load; medians over the rounds.
    fn measure(&self, direct: SocketAddr, target: SocketAddr) -> Result<Measured> {
        let mut rates = [Vec::new(), Vec::new()];
        let mut ratios = [Vec::new(), Vec::new()];
        for _ in 0..self.args.rounds {
            for (i, proto) in [Proto::Tcp, Proto::Udp].into_iter().enumerate() {
                let args = [
                    "rate".to_string(),
                    "--proto".into(),
                    proto.probe().into(),
                    "--target".into(),
                    direct.to_string(),
                    "--target".into(),
                    target.to_string(),
                    "--duration-ms".into(),
                    ((self.args.seconds * 2000.0).round() as u64).to_string(),
                ];
                let mut lines: Vec<RateRun> = self.client.run_client_as(&args)?;
                let run = lines.pop().context("rate printed nothing")?;
                ensure!(
                    run.results.len() == 2,
                    "rate: {} results",
                    run.results.len()
                );
                for r in &run.results {
                    ensure!(
                        r.ops > 0 && r.errors * 100 <= r.ops,
                        "{proto}: {} ok, {} errors (first: {:?})",
                        r.ops,
                        r.errors,
                        r.first_error
                    );
                }
                rates[i].push(run.results[1].ops_per_sec);
                ratios[i].push(run.results[1].ops_per_sec / run.results[0].ops_per_sec);
            }
        }
        Ok(Measured {
            tcp: median(&mut rates[0]),
            tcp_ratio: median(&mut ratios[0]),
            udp: median(&mut rates[1]),
            udp_ratio: median(&mut ratios[1]),
        })
    }

    /// The measured service plus `count - 1` fillers before it.
    fn services(&self, count: usize) -> Vec<NodePortService> {
        let mut v = filler_services(count - 1, self.args.endpoints);
        v.push(NodePortService {
            namespace: "default".into(),
            name: "bench".into(),
            cluster_ip: Ipv4Addr::new(198, 19, 255, 1),
            ports: [Proto::Tcp, Proto::Udp]
                .into_iter()
                .map(|proto| ServicePort {
                    name: proto.probe().into(),
                    proto,
                    port: 80,
                    node_port: NODE_PORT,
                    target_port: TARGET_PORT,
                })
                .collect(),
            endpoints: self.backends.clone(),
        });
        v
    }

    /// A tool run in the node netns with `input` on stdin.
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
        cmd::wait_output(&c, child, std::time::Duration::from_secs(600))?;
        Ok(())
    }

    /// The NodePort reaches a backend, and (as kube-proxy masquerades
    /// external NodePort traffic) the backend sees `source`, if given.
    fn check_nodeport(&self, source: Option<IpAddr>) -> Result<()> {
        let target = self.node.ext_ipv4();
        for proto in [Proto::Tcp, Proto::Udp] {
            let r = self
                .client
                .connect(&Connect::new(proto, target, NODE_PORT))?;
            ensure!(r.len() == 1 && r[0].ok, "{proto} NodePort: {r:?}");
            if let Some(want) = source {
                let seen: SocketAddr = r[0].client.as_deref().unwrap_or("").parse()?;
                ensure!(
                    seen.ip() == want,
                    "{proto} NodePort: backend saw {seen}, not {want}"
                );
            }
        }
        Ok(())
    }
}

fn run(args: Args) -> Result<()> {
    ensure!(args.seconds > 0.0 && args.rounds > 0 && args.endpoints > 0);
    ensure!(
        args.services.iter().all(|&n| (1..=10_001).contains(&n)),
        "--services: 1..=10001"
    );
    let cluster = Cluster::new("bench-xdp-e2e")?;
    let node = cluster.add_node("n1")?;
    node.attach_external()?;
    let mut backends = Vec::new();
    for j in 0..args.endpoints {
        let pod = node.add_pod(&format!("b{j}"))?;
        pod.spawn_server(&format!("b{j}"), &[TARGET_PORT])?;
        backends.push(pod.ipv4());
    }
    let client = cluster.add_external_client("client")?;
    client.route_via("198.18.1.0/24", &node)?;
    // Many short connections: reuse TIME_WAIT ports, as busy clients do.
    netns::sysctls(
        client.netns_name(),
        &[
            ("net.ipv4.tcp_tw_reuse", "1"),
            ("net.ipv4.ip_local_port_range", "1024 65535"),
        ],
    )?;
    let bench = Bench {
        cluster,
        node,
        client,
        backends,
        args,
    };
    let direct = SocketAddr::new(bench.backends[0].into(), TARGET_PORT);
    let nodeport = SocketAddr::new(bench.node.ext_ipv4().into(), NODE_PORT);

    println!(
        "NodePort from an external client (netns {}):",
        bench.client.netns_name()
    );
    println!(
        "  client {} -> node n1 {EXT_IF} {} -> {} backend pods on n1 (svclb-probe serve)",
        bench.client.ipv4(),
        bench.node.ext_ipv4(),
        bench.args.endpoints
    );
    println!("  TCP: new connection per request; UDP: one socket, request/reply.");
    println!(
        "  {} rounds x {} s per case and protocol, median; rates in requests/s.",
        bench.args.rounds, bench.args.seconds
    );
    println!(
        "  iptables: {} (`iptables --version`: {})",
        bench.args.iptables_restore,
        cmd::run(Command::new("iptables").arg("--version"))
            .unwrap_or_default()
            .trim()
    );
    println!();
    println!(
        "  {:<34}{:>12}{:>8}{:>12}{:>8}",
        "case", "TCP", "ratio", "UDP", "ratio"
    );
    bench.measure_warm(direct)?;
    let line = |name: &str, m: &Measured| {
        println!(
            "  {name:<34}{:>12.0}{:>8.3}{:>12.0}{:>8.3}",
            m.tcp, m.tcp_ratio, m.udp, m.udp_ratio
        )
    };
    // The baseline against itself: how much two interleaved targets differ
    // by chance.
    line(
        "direct to pod IP (vs itself)",
        &bench.measure(direct, direct)?,
    );

    for &n in &bench.args.services {
        let services = bench.services(n);
        let text = ruleset(&services, CLUSTER_CIDR);
        let t = std::time::Instant::now();
        bench.in_node(&bench.args.iptables_restore, &[], &text)?;
        let load = t.elapsed();
        // Masqueraded: the backend sees the node's bridge address.
        bench.check_nodeport(Some(bench.node.bridge_ipv4().into()))?;
        let r = bench.measure(direct, nodeport)?;
        line(&format!("iptables, {n} services"), &r);
        println!(
            "  {:<34}(ruleset: {} lines, loaded in {:.1} s)",
            "",
            text.lines().count(),
            load.as_secs_f64()
        );
    }
    // Empty nat table again for the svclb cases.
    bench.in_node(&bench.args.iptables_restore, &[], "*nat\nCOMMIT\n")?;

    for &n in &bench.args.services {
        match svclb_case(&bench, n, direct) {
            Ok(Some(r)) => line(&format!("svclb XDP, {n} services"), &r),
            Ok(None) => {
                println!("  svclb XDP: skipped, the agent does not support --devices yet");
                break;
            }
            Err(e) => return Err(e.context(format!("svclb, {n} services"))),
        }
    }
    // Drift check: the baseline again.
    Ok(())
}

impl Bench {
    fn measure_warm(&self, target: SocketAddr) -> Result<()> {
        let r = self
            .client
            .connect(&Connect::tcp(target.ip(), target.port()))?;
        ensure!(r.len() == 1 && r[0].ok, "direct to {target}: {r:?}");
        Ok(())
    }
}

/// Write `services` as manifests, start the agent with --devices ext0 and
/// measure; None when the agent rejects --devices.
fn svclb_case(bench: &Bench, n: usize, direct: SocketAddr) -> Result<Option<Measured>> {
    if let Some(agent) = bench.node.agent() {
        agent.stop()?;
    }
    let m = bench.cluster.manifests();
    bench.node.write_node_object(&[])?;
    for svc in bench.services(n) {
        let ports: Vec<_> = svc
            .ports
            .iter()
            .map(|p| {
                json!({"name": p.name, "port": p.port, "targetPort": p.target_port,
                       "nodePort": p.node_port, "protocol": p.proto.k8s()})
            })
            .collect();
        let mut spec = ServiceSpec::new(&svc.name, &[svc.cluster_ip.into()], vec![]);
        spec.extra_spec = Some(json!({"type": "NodePort", "ports": ports}));
        m.write_service(&spec)?;
        let slice_ports = svc
            .ports
            .iter()
            .map(|p| PortSpec::new(&p.name, p.target_port, p.proto))
            .collect();
        let endpoints = svc
            .endpoints
            .iter()
            // On this node: DNAT only, replies through tc egress (a
            // "remote" backend behind the same node would get SNAT replies
            // that never pass XDP).
            .map(|e| EndpointSpec {
                node_name: Some(bench.node.name().to_string()),
                ..EndpointSpec::ready((*e).into())
            })
            .collect();
        m.write_slice(&SliceSpec::new(
            &format!("{}-1", svc.name),
            &svc.name,
            slice_ports,
            endpoints,
        ))?;
    }
    match bench.node.start_agent_with_devices(m.dir(), &[EXT_IF]) {
        Ok(_) => {}
        Err(e) if format!("{e:#}").contains("--devices") => return Ok(None),
        Err(e) => bail!(e),
    }
    bench.check_nodeport(None)?;
    let nodeport = SocketAddr::new(bench.node.ext_ipv4().into(), NODE_PORT);
    bench.measure(direct, nodeport).map(Some)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
