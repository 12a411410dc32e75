//! `svclb explain` against the netns cluster: two nodes with XDP on ext0
//! (backend b1 on n1, b2 on n2), an external client and a client pod on
//! n1. What explain predicts must be what real traffic does: the backend a
//! UDP flow from a given client port reaches, the backend set a pod's
//! connections spread over, affinity, refusal, drops; and explaining an
//! external flow (which runs the live XDP program) records no conntrack
//! entry.

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use svclb_tests::agent::svclb_bin;
use svclb_tests::cmd::{self, Placement};
use svclb_tests::manifests::to_yaml;
use svclb_tests::{
    by_server, kernel_at_least, poll_until, Cluster, Connect, EndpointSpec, ExternalClient, Node,
    Pod, PortSpec, ProbeResult, Proto, ServiceSpec, SliceSpec, EXT_IF,
};

const CLUSTER_IP: &str = "198.19.0.70";
const LB_IP: &str = "198.19.5.70";
const NODE_PORT: u16 = 30170;
const DEADLINE: Duration = Duration::from_secs(5);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

struct Env {
    cluster: Cluster,
    nodes: Vec<Node>,
    backends: Vec<Pod>,
    client: ExternalClient,
    pod: Pod,
}

fn setup(label: &str) -> Result<Option<Env>> {
    if !kernel_at_least(5, 10) {
        eprintln!("skipped: svclb needs Linux 5.10+");
        return Ok(None);
    }
    let cluster = Cluster::new(label)?;
    let mut nodes = Vec::new();
    let mut backends = Vec::new();
    for n in 1..=2 {
        let node = cluster.add_node(&format!("n{n}"))?;
        node.attach_external()?;
        let pod = node.add_pod(&format!("b{n}"))?;
        pod.spawn_server(&format!("b{n}"), &[8080])?;
        node.write_node_object(&[])?;
        nodes.push(node);
        backends.push(pod);
    }
    let client = cluster.add_external_client("x1")?;
    let pod = nodes[0].add_pod("c1")?;
    Ok(Some(Env {
        cluster,
        nodes,
        backends,
        client,
        pod,
    }))
}

impl Env {
    /// "web": LoadBalancer (NodePort 30170), TCP "http" and UDP "dns" on 80.
    fn service(&self, extra: Value) -> Result<()> {
        let mut svc = ServiceSpec::new("web", &[ip(CLUSTER_IP)], Vec::new());
        let mut spec = json!({
            "type": "LoadBalancer",
            "ports": [
                {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": NODE_PORT},
                {"name": "dns", "port": 80, "protocol": "UDP", "targetPort": 8080, "nodePort": NODE_PORT},
            ],
        });
        for (k, v) in extra.as_object().expect("object") {
            spec[k] = v.clone();
        }
        svc.extra_spec = Some(spec);
        let mut v = svc.to_json();
        v["status"] = json!({"loadBalancer": {"ingress": [{"ip": LB_IP}]}});
        self.cluster
            .manifests()
            .write(&svc.file_name(), &to_yaml(&v))
    }

    /// The backends (0-based) of "web", each on its node.
    fn slice(&self, backends: &[usize]) -> Result<()> {
        let eps = backends
            .iter()
            .map(|&i| EndpointSpec {
                node_name: Some(self.nodes[i].name().to_string()),
                ..EndpointSpec::ready(self.backends[i].ipv4().into())
            })
            .collect();
        let ports = vec![
            PortSpec::tcp("http", 8080),
            PortSpec::new("dns", 8080, Proto::Udp),
        ];
        let slice = SliceSpec::new("web-1", "web", ports, eps);
        self.cluster.manifests().write_slice(&slice).map(drop)
    }

    fn start_agents(&self) -> Result<()> {
        for node in &self.nodes {
            node.start_agent_with_devices(self.cluster.manifests().dir(), &[EXT_IF])?;
        }
        Ok(())
    }

    /// Backend name (b1, b2) of a backend address.
    fn name_of(&self, addr: &str) -> String {
        let i = self
            .backends
            .iter()
            .position(|b| format!("{}:8080", b.ipv4()) == addr);
        i.map_or(format!("unknown {addr}"), |i| format!("b{}", i + 1))
    }
}

/// `svclb explain ARGS --bpffs <pin dir> --output json` in the node's netns.
fn explain(node: &Node, args: &[&str]) -> Result<Value> {
    let mut c = Command::new(svclb_bin()?);
    c.arg("explain")
        .args(args)
        .arg("--bpffs")
        .arg(node.pin_dir())
        .args(["--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ns = node.netns_path();
    let place = Placement {
        netns: Some(&ns),
        cgroup: None,
    };
    let started = std::time::Instant::now();
    let out = cmd::spawn_placed(&mut c, &place)?.wait_with_output()?;
    let took = started.elapsed();
    let text = String::from_utf8(out.stdout)?;
    if !out.status.success() {
        bail!(
            "svclb explain {args:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_str(&text).with_context(|| format!("parsing {text}"))?;
    // Shown with --nocapture.
    eprintln!("$ svclb explain {} (took {took:?})\n{v:#}", args.join(" "));
    Ok(v)
}

/// The same as text (for the README's example).
fn explain_text(node: &Node, args: &[&str]) -> Result<String> {
    let mut c = Command::new(svclb_bin()?);
    c.arg("explain")
        .args(args)
        .arg("--bpffs")
        .arg(node.pin_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ns = node.netns_path();
    let place = Placement {
        netns: Some(&ns),
        cgroup: None,
    };
    let out = cmd::spawn_placed(&mut c, &place)?.wait_with_output()?;
    let text = String::from_utf8(out.stdout)?;
    eprintln!("$ svclb explain {}\n{text}", args.join(" "));
    Ok(text)
}

/// Poll explain until `done` holds; its last answer.
fn explain_until(node: &Node, args: &[&str], done: impl Fn(&Value) -> bool) -> Result<Value> {
    let mut last = Value::Null;
    let seen = poll_until(DEADLINE, || {
        last = explain(node, args)?;
        Ok(done(&last).then_some(()))
    })?;
    if seen.is_none() {
        bail!("explain {args:?} never got there: {last:#}");
    }
    Ok(last)
}

/// The XDP program's count of flows created (`svclb maps dump`).
fn flows_created(node: &Node) -> Result<u64> {
    let mut c = Command::new(svclb_bin()?);
    c.args(["maps", "dump", "--output", "json", "--bpffs"])
        .arg(node.pin_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let ns = node.netns_path();
    let place = Placement {
        netns: Some(&ns),
        cgroup: None,
    };
    let out = cmd::spawn_placed(&mut c, &place)?.wait_with_output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v["conntrack"]["flows_created"]
        .as_u64()
        .with_context(|| format!("no flows_created in {v:#}"))
}

/// The node's tracked external flows from `client` (ADDR:PORT).
fn tracked_flows(node: &Node, client: &str) -> Result<usize> {
    let mut c = Command::new(svclb_bin()?);
    c.args([
        "conntrack",
        "list",
        "--client",
        client,
        "--output",
        "json",
        "--bpffs",
    ])
    .arg(node.pin_dir())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let ns = node.netns_path();
    let place = Placement {
        netns: Some(&ns),
        cgroup: None,
    };
    let out = cmd::spawn_placed(&mut c, &place)?.wait_with_output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v.as_array().map(Vec::len).context("a list")
}

fn all_ok(r: &[ProbeResult]) -> bool {
    !r.is_empty() && r.iter().all(|r| r.ok)
}

/// The address of the backend explain's Maglev pick names.
fn maglev_backend(v: &Value) -> Option<String> {
    let id = v["maglev"]["backend_id"].as_u64()?;
    let b = v["frontend"]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["id"].as_u64() == Some(id))?;
    Some(format!("{}:{}", b["address"].as_str()?, b["port"]))
}

/// External, Cluster policy: for each of several client ports, explain's
/// Maglev pick is the backend a real UDP flow from that port reaches, the
/// XDP run rewrites the packet to that backend (SNAT for the remote one),
/// and explaining records no conntrack entry. Then source ranges, a Local
/// policy without local endpoints, and no endpoints at all.
#[test]
fn explain_external_matches_real_traffic() -> Result<()> {
    let Some(env) = setup("explext")? else {
        return Ok(());
    };
    env.service(json!({}))?;
    env.slice(&[0, 1])?;
    env.start_agents()?;
    let n1 = &env.nodes[0];
    let to_udp = format!("{}:{NODE_PORT}/UDP", n1.ext_ipv4());
    let client = env.client.ipv4().to_string();
    let ready = Connect::udp(n1.ext_ipv4(), NODE_PORT).count(10);
    let mut last = Vec::new();
    let up = poll_until(DEADLINE, || {
        last = env.client.connect(&ready)?;
        Ok(all_ok(&last).then_some(()))
    })?;
    if up.is_none() {
        bail!(
            "the NodePort never answered: {:?}",
            svclb_tests::by_error(&last)
        );
    }

    // Explaining a tuple nothing sent records nothing: the live program
    // ran on private conntrack maps.
    let from = format!("{client}:42000");
    let created = flows_created(n1)?;
    let v = explain(
        n1,
        &[
            "--from",
            &from,
            "--to",
            &to_udp,
            "--external",
            "--device",
            EXT_IF,
        ],
    )?;
    assert_eq!(v["verdict"], "translated", "{v:#}");
    assert_eq!(v["frontend"]["service"], "default/web", "{v:#}");
    assert!(v["xdp_run"]["rewritten"] == true, "{v:#}");
    assert_eq!(
        tracked_flows(n1, &from)?,
        0,
        "explain left a conntrack entry"
    );
    assert_eq!(flows_created(n1)?, created, "explain counted a flow");
    // A real flow from the same tuple is tracked (the check can fail).
    let real = env
        .client
        .connect(&Connect::udp(n1.ext_ipv4(), NODE_PORT).source_port(42000))?;
    assert!(all_ok(&real), "{real:?}");
    assert_eq!(tracked_flows(n1, &from)?, 1, "the real flow is tracked");
    explain_text(
        n1,
        &[
            "--from",
            &from,
            "--to",
            &to_udp,
            "--external",
            "--device",
            EXT_IF,
        ],
    )?;

    let mut reached = std::collections::BTreeSet::new();
    for port in 41000..41012u16 {
        let from = format!("{client}:{port}");
        let v = explain(
            n1,
            &[
                "--from",
                &from,
                "--to",
                &to_udp,
                "--external",
                "--device",
                EXT_IF,
            ],
        )?;
        let predicted = maglev_backend(&v).context("no Maglev pick")?;
        let run = &v["xdp_run"];
        assert_eq!(run["packet_out"]["dst"], predicted.as_str(), "{v:#}");
        let local = predicted == format!("{}:8080", env.backends[0].ipv4());
        if local {
            // DNAT only: the client's address kept, to the stack.
            assert_eq!(run["packet_out"]["src"], from.as_str(), "{v:#}");
            assert_eq!(run["verdict"], "XDP_PASS", "{v:#}");
        } else {
            if !reached.contains("b2") {
                // The README's example of a remote backend.
                let args = [
                    "--from",
                    &from,
                    "--to",
                    &to_udp,
                    "--external",
                    "--device",
                    EXT_IF,
                ];
                explain_text(n1, &args)?;
            }
            assert!(
                run["packet_out"]["src"]
                    .as_str()
                    .is_some_and(|s| s.starts_with(&format!("{}:", n1.ext_ipv4()))),
                "SNAT to the node's address: {v:#}"
            );
        }
        let real = env
            .client
            .connect(&Connect::udp(n1.ext_ipv4(), NODE_PORT).source_port(port))?;
        assert!(all_ok(&real), "{real:?}");
        let server = real[0].server.clone().unwrap_or_default();
        assert_eq!(
            server,
            env.name_of(&predicted),
            "client port {port}: explain predicted {predicted}"
        );
        reached.insert(server);
    }
    assert_eq!(reached.len(), 2, "the ports spread over both backends");

    // Source ranges on the load-balancer IP.
    env.service(json!({"loadBalancerSourceRanges": [format!("{client}/32")]}))?;
    let to_lb = format!("{LB_IP}:80/TCP");
    let denied = explain_until(
        n1,
        &["--from", "198.18.250.1:40000", "--to", &to_lb, "--external"],
        |v| v["source_ranges"].is_object(),
    )?;
    assert_eq!(denied["verdict"], "dropped", "{denied:#}");
    assert_eq!(denied["source_ranges"]["allowed"], false, "{denied:#}");
    assert_eq!(denied["xdp_run"]["verdict"], "XDP_DROP", "{denied:#}");
    let allowed = explain(
        n1,
        &[
            "--from",
            &format!("{client}:40000"),
            "--to",
            &to_lb,
            "--external",
        ],
    )?;
    assert_eq!(allowed["verdict"], "translated", "{allowed:#}");
    assert_eq!(allowed["source_ranges"]["allowed"], true, "{allowed:#}");
    assert_eq!(
        allowed["source_ranges"]["ranges"],
        json!([format!("{client}/32")]),
        "{allowed:#}"
    );

    // Local policy, the only endpoint on n2: n1 drops, n2 keeps it local.
    env.service(json!({"externalTrafficPolicy": "Local"}))?;
    env.slice(&[1])?;
    let to_tcp = format!("{}:{NODE_PORT}/TCP", n1.ext_ipv4());
    let args = ["--from", &from, "--to", &to_tcp, "--external"];
    let v = explain_until(n1, &args, |v| v["verdict"] == "dropped")?;
    assert_eq!(v["when_empty"], "drop", "{v:#}");
    assert_eq!(v["xdp_run"]["verdict"], "XDP_DROP", "{v:#}");
    let dropped = env
        .client
        .connect(&Connect::tcp(n1.ext_ipv4(), NODE_PORT).timeout_ms(500))?;
    assert!(!dropped[0].ok, "{dropped:?}");
    let n2 = &env.nodes[1];
    let to_n2 = format!("{}:{NODE_PORT}/TCP", n2.ext_ipv4());
    let v = explain_until(n2, &["--from", &from, "--to", &to_n2, "--external"], |v| {
        v["verdict"] == "translated"
    })?;
    let b2 = format!("{}:8080", env.backends[1].ipv4());
    assert_eq!(maglev_backend(&v).as_deref(), Some(b2.as_str()), "{v:#}");
    assert_eq!(v["frontend"]["backends"][0]["local"], true, "{v:#}");
    assert_eq!(v["xdp_run"]["packet_out"]["src"], from.as_str(), "{v:#}");

    // No endpoints: the node port is refused (XDP leaves it to the stack).
    env.service(json!({}))?;
    env.slice(&[])?;
    let v = explain_until(n1, &args, |v| v["verdict"] == "refused")?;
    assert_eq!(v["xdp_run"]["verdict"], "XDP_PASS", "{v:#}");
    assert_eq!(v["xdp_run"]["rewritten"], false, "{v:#}");
    let refused = env
        .client
        .connect(&Connect::tcp(n1.ext_ipv4(), NODE_PORT).timeout_ms(1000))?;
    assert_eq!(
        refused[0].error.as_deref(),
        Some("ECONNREFUSED"),
        "{refused:?}"
    );
    Ok(())
}

/// Socket scope: a ClusterIP's backend set and shares, what a pod's
/// connections reach, session affinity as the programs remember it, and
/// refusal without endpoints.
#[test]
fn explain_cluster_ip_matches_real_traffic() -> Result<()> {
    let Some(env) = setup("explsock")? else {
        return Ok(());
    };
    env.service(json!({}))?;
    env.slice(&[0, 1])?;
    env.start_agents()?;
    let n1 = &env.nodes[0];
    let from = env.pod.ipv4().to_string();
    let to = format!("{CLUSTER_IP}:80/TCP");
    let args = ["--from", from.as_str(), "--to", to.as_str()];
    let v = explain_until(n1, &args, |v| v["verdict"] == "translated")?;
    assert_eq!(v["scope"], "socket", "{v:#}");
    assert_eq!(v["kind"], "ClusterIP", "{v:#}");
    assert_eq!(v["frontend"]["port_name"], "http", "{v:#}");
    let choices = v["new_connection"].as_array().context("choices")?;
    let mut set: Vec<String> = choices
        .iter()
        .map(|c| {
            format!(
                "{}:{}",
                c["backend"]["address"].as_str().unwrap_or(""),
                c["backend"]["port"]
            )
        })
        .map(|a| env.name_of(&a))
        .collect();
    set.sort();
    assert_eq!(set, ["b1", "b2"], "{v:#}");
    for c in choices {
        assert_eq!(c["probability"], 0.5, "{v:#}");
        assert_eq!(c["backend"]["state"], "active", "{v:#}");
    }
    let real = env
        .pod
        .connect(n1, &Connect::tcp(ip(CLUSTER_IP), 80).count(20))?;
    assert!(all_ok(&real), "{real:?}");
    let servers: Vec<String> = by_server(&real).into_keys().collect();
    assert_eq!(servers, ["b1", "b2"], "connections spread over the set");
    explain_text(n1, &args)?;

    // Affinity: after the pod's connection, its netns is remembered with
    // the backend it reached.
    env.service(json!({"sessionAffinity": "ClientIP"}))?;
    explain_until(n1, &args, |v| v["affinity"].is_object())?;
    let real = env
        .pod
        .connect(n1, &Connect::tcp(ip(CLUSTER_IP), 80).count(5))?;
    assert!(all_ok(&real), "{real:?}");
    let servers: Vec<String> = by_server(&real).into_keys().collect();
    assert_eq!(servers.len(), 1, "affinity keeps one backend: {servers:?}");
    let netns = env.pod.netns_path();
    let netns = netns.to_str().context("netns path")?;
    let mut with_netns = args.to_vec();
    with_netns.extend(["--client-netns", netns]);
    let v = explain(n1, &with_netns)?;
    let predicted = v["affinity"]["client_backend"].clone();
    let addr = format!(
        "{}:{}",
        predicted["address"].as_str().unwrap_or(""),
        predicted["port"]
    );
    assert_eq!(env.name_of(&addr), servers[0], "{v:#}");
    assert_eq!(
        v["new_connection"].as_array().map(Vec::len),
        Some(1),
        "{v:#}"
    );
    explain_text(n1, &with_netns)?;
    let remembered = v["affinity"]["remembered"]
        .as_array()
        .context("remembered")?;
    let in_effect: Vec<&Value> = remembered
        .iter()
        .filter(|r| r["in_effect"] == true)
        .collect();
    assert_eq!(in_effect.len(), 1, "{v:#}");
    let id = in_effect[0]["backend_id"].as_u64();
    let b = v["frontend"]["backends"]
        .as_array()
        .and_then(|bs| bs.iter().find(|b| b["id"].as_u64() == id))
        .context("remembered backend in the set")?;
    let addr = format!("{}:{}", b["address"].as_str().unwrap_or(""), b["port"]);
    assert_eq!(env.name_of(&addr), servers[0], "{v:#}");
    explain_text(n1, &args)?;

    // No endpoints: refused, as a pod's connect is.
    env.service(json!({}))?;
    env.slice(&[])?;
    explain_until(n1, &args, |v| v["verdict"] == "refused")?;
    let refused = env
        .pod
        .connect(n1, &Connect::tcp(ip(CLUSTER_IP), 80).timeout_ms(1000))?;
    assert_eq!(
        refused[0].error.as_deref(),
        Some("ECONNREFUSED"),
        "{refused:?}"
    );
    // An address that is no frontend.
    let v = explain(n1, &["--from", &from, "--to", "198.19.0.99:80/TCP"])?;
    assert_eq!(v["verdict"], "not a service", "{v:#}");
    Ok(())
}
