//! `cargo xtask demo`: svclb on a simulated one-node cluster, narrated for a
//! cluster operator. It starts the agent on the example manifests in
//! deploy/examples, sends traffic to the web Service's ClusterIP from a
//! client pod, shows the BPF maps, scales the Service up and down by
//! rewriting its EndpointSlices, and shows that a Service without endpoints
//! refuses connections. Then a second node and an external client join:
//! NodePort and LoadBalancer traffic from outside goes through XDP, with
//! both external traffic policies.
//!
//! Everything happens in network namespaces and a cgroup that the harness
//! creates and removes again. Exits non-zero when anything is off (a backend
//! never reached, a wrong port, a change that does not apply), so the demo
//! doubles as a smoke test.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use svclb_tests::manifests::to_yaml;
use svclb_tests::{
    agent, by_error, by_server, cmd, poll_until, Cluster, Connect, Node, Pod, ProbeResult, Proto,
};

// The demo's manifests are the example files, compiled in so the binary
// runs from anywhere; `check_example` fails if they and the pods disagree.
const WEB_YAML: &str = include_str!("../../../deploy/examples/web.yaml");
const API_YAML: &str = include_str!("../../../deploy/examples/api.yaml");
const SHOP_YAML: &str = include_str!("../../../deploy/examples/shop.yaml");
const SHOP_NODE_PORT: u16 = 30080;
const SHOP_LB: &str = "198.19.5.5";

// What deploy/examples says (checked against the files at start).
const WEB4: &str = "198.19.0.10";
const WEB6: &str = "fd00:5::10";
const API4: &str = "198.19.0.11";
const HTTP_PORT: u16 = 80;
const HTTP_TARGET: u16 = 8080;
const ECHO_PORT: u16 = 7;
const ECHO_TARGET: u16 = 7007;
const NAMESPACE: &str = "demo";

/// How long a manifest change may take to reach the maps before the demo
/// calls it a failure (the agent's goal is well under a second).
const APPLY_DEADLINE: Duration = Duration::from_secs(5);
const BAR_WIDTH: f64 = 40.0;

fn main() -> ExitCode {
    let started = Instant::now();
    let cluster = match Cluster::new("demo") {
        Ok(c) => c,
        Err(e) => {
            eprintln!("demo: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let result = run(&cluster);
    if let Err(e) = &result {
        eprintln!("\ndemo FAILED: {e:#}");
        // The agent log lives in the cluster's temp dir, which cleanup
        // removes: show its end now.
        if let Some(agent) = cluster.nodes().first().and_then(Node::agent) {
            let log = agent.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("--- agent log (last 30 lines) ---");
            for l in &lines[lines.len().saturating_sub(30)..] {
                eprintln!("{l}");
            }
        }
    }
    section("10. Clean up");
    let cleaned = cluster.cleanup().and_then(|()| {
        let left: Vec<_> = cluster
            .owned_paths()
            .into_iter()
            .filter(|p| p.exists())
            .collect();
        ensure!(left.is_empty(), "left behind: {left:?}");
        Ok(())
    });
    if let Err(e) = cleaned {
        eprintln!("demo: cleanup: {e:#}");
        return ExitCode::FAILURE;
    }
    say("Stopped the agent and the servers; removed the namespaces, the node's cgroup");
    say("(which detaches the programs) and the pinned maps. Nothing is left behind.");
    if result.is_err() {
        return ExitCode::FAILURE;
    }
    println!(
        "\nDemo finished in {:.1} s.",
        started.elapsed().as_secs_f64()
    );
    ExitCode::SUCCESS
}

fn run(cluster: &Cluster) -> Result<()> {
    println!("svclb demo: Kubernetes Services without kube-proxy");
    say("svclb attaches eBPF programs to a node's cgroup. When a pod connects to a");
    say("Service's ClusterIP, the program rewrites the destination to one backend pod,");
    say("once per connection (no per-packet NAT, no conntrack). The backend sets live in");
    say("BPF maps that the `svclb` agent keeps in sync with Services and EndpointSlices.");

    section("1. A simulated cluster");
    say("One node and four pods, each a network namespace (a fifth pod comes later).");
    say("Clients run in the node's cgroup, where the agent attaches svclb's programs.");
    let node = cluster.add_node("n1")?;
    let mut web = Vec::new();
    for i in 1..=3 {
        web.push(web_pod(&node, i)?);
    }
    let client = node.add_pod("client")?;
    println!();
    println!("    node n1    cgroup {}", node.cgroup().display());
    for p in web.iter().chain([&client]) {
        let role = if p.name() == "client" {
            "sends the traffic"
        } else {
            "server on 8080/tcp and 7007/udp"
        };
        println!(
            "    pod {:<7}{:<13}{:<16}{role}",
            p.name(),
            p.ipv4(),
            p.ipv6()
        );
    }

    section("2. The manifests: deploy/examples/web.yaml and api.yaml");
    let web_docs = parse_docs(WEB_YAML).context("deploy/examples/web.yaml")?;
    check_example(&web_docs, &web)?;
    parse_docs(API_YAML).context("deploy/examples/api.yaml")?;
    let manifests = cluster.manifests();
    manifests.write("web.yaml", WEB_YAML)?;
    manifests.write("api.yaml", API_YAML)?;
    say(&format!(
        "Service {NAMESPACE}/web   ClusterIPs {WEB4} and {WEB6}; {HTTP_PORT}/TCP -> targetPort http (8080),"
    ));
    say(&format!(
        "                   {ECHO_PORT}/UDP -> {ECHO_TARGET}; EndpointSlices web-v4 and web-v6 list web-1..3."
    ));
    say(&format!(
        "Service {NAMESPACE}/api   ClusterIP {API4}; its EndpointSlice lists no endpoints."
    ));

    section("3. Start the agent");
    println!(
        "    $ svclb run --manifests {} --node-name n1 \\\n        --cgroup {} --bpffs {}",
        manifests.dir().display(),
        node.cgroup().display(),
        node.pin_dir().display()
    );
    let t = Instant::now();
    node.start_agent(manifests.dir())?;
    say(&format!(
        "Programs attached and maps written in {} ms (the agent logged its initial sync).",
        t.elapsed().as_millis()
    ));

    section("4. Traffic from pod client to the web Service");
    say("Every attempt uses a new socket, so every one is a new load-balancing decision.");
    let endpoints: Vec<&str> = web.iter().map(Pod::name).collect();
    for (proto, addr, port, target, count) in [
        (Proto::Tcp, WEB4, HTTP_PORT, HTTP_TARGET, 300),
        (Proto::Udp, WEB4, ECHO_PORT, ECHO_TARGET, 150),
        (Proto::Tcp, WEB6, HTTP_PORT, HTTP_TARGET, 150),
    ] {
        let frontend = SocketAddr::new(ip(addr), port);
        let r = client.connect(
            &node,
            &Connect::new(proto, frontend.ip(), port).count(count),
        )?;
        print_spread(proto, frontend, &r, &web, &endpoints);
        check_spread(&client, proto, frontend, &r, &endpoints, target)?;
    }
    say("The client never sees a backend address: getpeername() and the source of UDP");
    say("replies show the ClusterIP (checked on every attempt above). The servers saw the");
    say("client's own pod address: no SNAT.");

    section("5. What the kernel holds: svclb maps dump");
    say("One frontend per ClusterIP, port and protocol; each lists its backends.");
    show_dump(&node)?;

    section("6. Scale up: a fourth pod becomes ready");
    web.push(web_pod(&node, 4)?);
    let names: Vec<&str> = web.iter().map(Pod::name).collect();
    scale(cluster, &node, &web_docs, &web, &names)?;
    let r = tcp_burst(&client, &node)?;
    print_spread(Proto::Tcp, tcp_frontend(), &r, &web, &names);
    check_spread(&client, Proto::Tcp, tcp_frontend(), &r, &names, HTTP_TARGET)?;
    show_dump(&node)?;

    section("7. Scale down: web-2 leaves the Service");
    say("web-2 keeps running, but it is no longer an endpoint, so new connections skip it.");
    let names: Vec<&str> = names.into_iter().filter(|n| *n != "web-2").collect();
    let remaining: Vec<Pod> = web
        .iter()
        .filter(|p| names.contains(&p.name()))
        .cloned()
        .collect();
    scale(cluster, &node, &web_docs, &remaining, &names)?;
    let r = tcp_burst(&client, &node)?;
    print_spread(Proto::Tcp, tcp_frontend(), &r, &web, &names);
    check_spread(&client, Proto::Tcp, tcp_frontend(), &r, &names, HTTP_TARGET)?;
    show_dump(&node)?;

    section("8. A Service without endpoints");
    let api = SocketAddr::new(ip(API4), HTTP_PORT);
    let t = Instant::now();
    let r = client.connect(&node, &Connect::tcp(api.ip(), api.port()).count(10))?;
    let took = t.elapsed();
    let errors = by_error(&r);
    println!(
        "\n    10 TCP connects to {api} (Service {NAMESPACE}/api): {errors:?}, all within {} ms",
        took.as_millis().max(1)
    );
    ensure!(
        errors.get("ECONNREFUSED") == Some(&10),
        "connects to {api} should all be refused, got {errors:?}"
    );
    say("Refused at once with ECONNREFUSED (the time includes starting the client), as");
    say("kube-proxy's REJECT rule does: clients fail fast instead of waiting for a timeout.");

    external(cluster, &node, &web[0])
}

/// Section 9: a second node, an external client, deploy/examples/shop.yaml.
fn external(cluster: &Cluster, n1: &Node, web1: &Pod) -> Result<()> {
    section("9. Traffic from outside the cluster (XDP)");
    say("Node n2 joins with pod shop-n2; both nodes get an external interface (ext0)");
    say("on a shared network, where an external client x1 lives. The agents now run with");
    say("--devices ext0: XDP there serves node ports and load-balancer IPs.");
    let n2 = cluster.add_node("n2")?;
    let shop = n2.add_pod("shop-n2")?;
    shop.spawn_server("shop-n2", &[HTTP_TARGET])?;
    for n in [n1, &n2] {
        n.attach_external()?;
        n.write_node_object(&[])?;
    }
    let x1 = cluster.add_external_client("x1")?;
    x1.route_via(&format!("{SHOP_LB}/32"), n1)?;
    let docs = parse_docs(SHOP_YAML).context("deploy/examples/shop.yaml")?;
    ensure!(
        docs[1].to_string().contains(&web1.ipv4().to_string())
            && docs[1].to_string().contains(&shop.ipv4().to_string()),
        "deploy/examples/shop.yaml lists other pod addresses than the demo's"
    );
    cluster.manifests().write("shop.yaml", SHOP_YAML)?;
    println!();
    for n in [n1, &n2] {
        println!("    node {}    ext0 {}", n.name(), n.ext_ipv4());
    }
    println!("    client x1  {}  (routes {SHOP_LB} to n1)", x1.ipv4());
    println!(
        "
    $ svclb run --manifests {} --node-name n1 ... --devices ext0   (restarted)",
        cluster.manifests().dir().display()
    );
    n1.agent().context("n1's agent")?.stop()?;
    n1.start_agent_with_devices(cluster.manifests().dir(), &["ext0"])?;
    n2.start_agent_with_devices(cluster.manifests().dir(), &["ext0"])?;

    let n1_port = SocketAddr::new(IpAddr::V4(n1.ext_ipv4()), SHOP_NODE_PORT);
    let lb = SocketAddr::new(ip(SHOP_LB), HTTP_PORT);
    say("");
    say("externalTrafficPolicy Cluster: n1 balances over both backends (Maglev). web-1 is");
    say("local and sees the client's address; shop-n2 is on n2 and sees an address of n1");
    say("(SNAT: the source of n1's routes toward its remote backends, as MASQUERADE would).");
    for target in [n1_port, lb] {
        let r = converge_external(&x1, target, |r| by_server(r).len() == 2)?;
        print_external(target, &r);
        let seen = seen_clients(&r);
        // n1 reaches its remote backends over ext0 (shop-n2) and its bridge
        // (the earlier sections' backends of other nodes): the SNAT source
        // is the route source most of them share, one of n1's addresses.
        let n1_addrs = [n1.ext_ipv4().to_string(), n1.bridge_ipv4().to_string()];
        let snat_ok = seen
            .get("shop-n2")
            .is_some_and(|s| s.len() == 1 && s.iter().all(|a| n1_addrs.contains(a)));
        ensure!(
            seen.get("web-1") == Some(&BTreeSet::from([x1.ipv4().to_string()])) && snat_ok,
            "{target}: unexpected client addresses {seen:?}"
        );
    }
    show_dump(n1)?;

    say("");
    say("externalTrafficPolicy Local: each node only uses its own backend, which sees the");
    say("client's address; a node without a local endpoint would drop.");
    let local = SHOP_YAML.replace(
        "externalTrafficPolicy: Cluster",
        "externalTrafficPolicy: Local",
    );
    cluster.manifests().write("shop.yaml", &local)?;
    let n2_port = SocketAddr::new(IpAddr::V4(n2.ext_ipv4()), SHOP_NODE_PORT);
    for (target, only) in [(n1_port, "web-1"), (n2_port, "shop-n2")] {
        let r = converge_external(&x1, target, |r| {
            by_server(r).keys().map(String::as_str).eq([only])
        })?;
        print_external(target, &r);
        let seen = seen_clients(&r);
        ensure!(
            seen.get(only) == Some(&BTreeSet::from([x1.ipv4().to_string()])),
            "{target}: {only} saw {seen:?}"
        );
    }
    Ok(())
}

/// 40 TCP connections from the external client, repeated until `done`
/// (the agents apply changes asynchronously) and all answered.
fn converge_external(
    x1: &svclb_tests::ExternalClient,
    target: SocketAddr,
    done: impl Fn(&[ProbeResult]) -> bool,
) -> Result<Vec<ProbeResult>> {
    let mut last = Vec::new();
    let ok = poll_until(APPLY_DEADLINE, || {
        last = x1.connect(&Connect::tcp(target.ip(), target.port()).count(40))?;
        Ok((by_error(&last).is_empty() && done(&last)).then_some(()))
    })?;
    ensure!(
        ok.is_some(),
        "{target}: answered by {:?}, errors {:?}",
        by_server(&last),
        by_error(&last)
    );
    Ok(last)
}

/// Backend -> the client addresses it saw.
fn seen_clients(results: &[ProbeResult]) -> std::collections::BTreeMap<String, BTreeSet<String>> {
    let mut m: std::collections::BTreeMap<String, BTreeSet<String>> = Default::default();
    for r in results {
        let seen = r
            .client
            .as_deref()
            .and_then(|c| c.parse::<SocketAddr>().ok())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        m.entry(r.server.clone().unwrap_or_default())
            .or_default()
            .insert(seen);
    }
    m
}

fn print_external(target: SocketAddr, results: &[ProbeResult]) {
    println!(
        "
    TCP from x1 to {target}: {} new connections",
        results.len()
    );
    let counts = by_server(results);
    for (name, seen) in seen_clients(results) {
        let n = counts.get(&name).copied().unwrap_or(0);
        let seen: Vec<String> = seen.into_iter().collect();
        println!(
            "      {name:<8} {n:>3}  saw the client as {}",
            seen.join(", ")
        );
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("valid address literal")
}

fn tcp_frontend() -> SocketAddr {
    SocketAddr::new(ip(WEB4), HTTP_PORT)
}

fn tcp_burst(client: &Pod, node: &Node) -> Result<Vec<ProbeResult>> {
    client.connect(node, &Connect::tcp(ip(WEB4), HTTP_PORT).count(300))
}

/// Pod web-<i> with its probe server (named like the pod) on both ports.
fn web_pod(node: &Node, i: usize) -> Result<Pod> {
    let name = format!("web-{i}");
    let pod = node.add_pod(&name)?;
    pod.spawn_server(&name, &[HTTP_TARGET, ECHO_TARGET])?;
    Ok(pod)
}

fn section(title: &str) {
    println!(
        "\n== {title} {}",
        "=".repeat(72usize.saturating_sub(title.len()))
    );
}

/// An explanatory line.
fn say(text: &str) {
    println!("  {text}");
}

fn parse_docs(yaml: &str) -> Result<Vec<Value>> {
    serde_saphyr::from_multiple(yaml).context("invalid YAML")
}

/// The example's EndpointSlices with their endpoints replaced by `pods`
/// (all ready), in each slice's address family.
fn with_endpoints(docs: &[Value], pods: &[Pod]) -> Vec<Value> {
    let mut docs = docs.to_vec();
    for d in docs.iter_mut().filter(|d| d["kind"] == "EndpointSlice") {
        let v6 = d["addressType"] == "IPv6";
        let endpoints: Vec<Value> = pods
            .iter()
            .map(|p| {
                let addr: IpAddr = if v6 { p.ipv6().into() } else { p.ipv4().into() };
                json!({
                    "addresses": [addr.to_string()],
                    "conditions": { "ready": true },
                    "targetRef": { "kind": "Pod", "namespace": NAMESPACE, "name": p.name() },
                })
            })
            .collect();
        d["endpoints"] = endpoints.into();
    }
    docs
}

/// The example file must describe the pods the harness created (their
/// addresses are fixed by creation order) and the addresses used here.
fn check_example(docs: &[Value], pods: &[Pod]) -> Result<()> {
    let want = with_endpoints(docs, pods);
    if docs != want.as_slice() {
        bail!(
            "deploy/examples/web.yaml does not list the demo's pods; its EndpointSlices should read:\n{}",
            want.iter().map(to_yaml).collect::<Vec<_>>().join("---\n")
        );
    }
    let svc = docs
        .iter()
        .find(|d| d["kind"] == "Service")
        .context("web.yaml has no Service")?;
    ensure!(
        svc["spec"]["clusterIPs"] == json!([WEB4, WEB6]),
        "web.yaml: clusterIPs should be [{WEB4}, {WEB6}]"
    );
    ensure!(
        svc["spec"]["ports"][0]["port"] == HTTP_PORT
            && svc["spec"]["ports"][1]["port"] == ECHO_PORT,
        "web.yaml: ports should be {HTTP_PORT}/TCP and {ECHO_PORT}/UDP"
    );
    Ok(())
}

/// Rewrite the web EndpointSlices to list `pods`, then wait until every web
/// frontend in the maps has exactly their addresses.
fn scale(
    cluster: &Cluster,
    node: &Node,
    docs: &[Value],
    pods: &[Pod],
    names: &[&str],
) -> Result<()> {
    let yaml: Vec<String> = with_endpoints(docs, pods).iter().map(to_yaml).collect();
    cluster.manifests().write("web.yaml", &yaml.join("---\n"))?;
    say(&format!(
        "Rewrote EndpointSlices {NAMESPACE}/web-v4 and web-v6: endpoints {}.",
        names.join(", ")
    ));
    let applied = poll_until(APPLY_DEADLINE, || {
        Ok(web_backends_are(&node.dump_json()?, pods).then_some(()))
    })?;
    match applied {
        Some(((), t)) => {
            say(&format!(
                "The agent rewrote the maps within {} ms of the file change.",
                t.as_millis().max(1)
            ));
            Ok(())
        }
        None => bail!("the maps did not follow the EndpointSlice change within {APPLY_DEADLINE:?}"),
    }
}

/// Whether every frontend of the web Service has exactly `pods` (in its
/// family) as backends, and all four frontends exist.
fn web_backends_are(dump: &Value, pods: &[Pod]) -> bool {
    let parse = |v: &Value| v.as_str()?.parse::<IpAddr>().ok().map(|a| a.to_canonical());
    let web: Vec<&Value> = dump["frontends"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter(|f| parse(&f["address"]).is_some_and(|a| a == ip(WEB4) || a == ip(WEB6)))
                .collect()
        })
        .unwrap_or_default();
    web.len() == 4
        && web.iter().all(|f| {
            let Some(family) = parse(&f["address"]) else {
                return false;
            };
            let want: BTreeSet<IpAddr> = pods.iter().map(|p| p.ip_like(family)).collect();
            let have: BTreeSet<IpAddr> = f["backends"]
                .as_array()
                .map(|bs| bs.iter().filter_map(|b| parse(&b["address"])).collect())
                .unwrap_or_default();
            have == want
        })
}

fn show_dump(node: &Node) -> Result<()> {
    let mut c = Command::new(agent::svclb_bin()?);
    c.args(["maps", "dump", "--bpffs"])
        .arg(node.pin_dir())
        .args(["--output", "table"]);
    let out = cmd::run(&mut c)?;
    println!(
        "\n    $ svclb maps dump --bpffs {}",
        node.pin_dir().display()
    );
    for line in out.lines() {
        println!("    {line}");
    }
    Ok(())
}

/// One line per web pod: how many attempts it answered, as a bar.
fn print_spread(
    proto: Proto,
    frontend: SocketAddr,
    results: &[ProbeResult],
    pods: &[Pod],
    endpoints: &[&str],
) {
    let counts = by_server(results);
    let ok: usize = counts.values().sum();
    println!(
        "\n    {proto} to {frontend}: {} {}, {ok} answered",
        results.len(),
        if proto == Proto::Tcp {
            "new connections"
        } else {
            "requests, each from a new socket"
        }
    );
    for p in pods {
        let n = counts.get(p.name()).copied().unwrap_or(0);
        let share = n as f64 / results.len().max(1) as f64;
        let bar = "#".repeat((share * BAR_WIDTH).round() as usize);
        let note = if endpoints.contains(&p.name()) {
            ""
        } else {
            "  (not an endpoint)"
        };
        println!(
            "      {:<6} {:<16} {n:>4}  {:>5.1}%  {bar}{note}",
            p.name(),
            p.ip_like(frontend.ip()).to_string(),
            share * 100.0
        );
    }
}

/// Every attempt answered, only by `endpoints`, each with at least a third
/// of an even share (a miss is then far beyond chance), on `target_port`;
/// the client saw the frontend as its peer and the server saw the client.
fn check_spread(
    client: &Pod,
    proto: Proto,
    frontend: SocketAddr,
    results: &[ProbeResult],
    endpoints: &[&str],
    target_port: u16,
) -> Result<()> {
    let what = format!("{proto} to {frontend}");
    let errors = by_error(results);
    ensure!(errors.is_empty(), "{what}: failed attempts {errors:?}");
    let counts = by_server(results);
    if let Some(stray) = counts.keys().find(|n| !endpoints.contains(&n.as_str())) {
        bail!("{what}: {stray} answered but is not an endpoint ({counts:?})");
    }
    let min = results.len() / (3 * endpoints.len());
    for name in endpoints {
        let n = counts.get(*name).copied().unwrap_or(0);
        ensure!(
            n >= min,
            "{what}: {name} answered {n} of {}, expected at least {min}",
            results.len()
        );
    }
    let client_ip = client.ip_like(frontend.ip());
    let frontend = frontend.to_string();
    for r in results {
        let seen = r
            .client
            .as_deref()
            .and_then(|c| c.parse::<SocketAddr>().ok());
        ensure!(
            seen.map(|a| a.ip()) == Some(client_ip),
            "{what}: the server saw the client as {:?}, not {client_ip}",
            r.client
        );
        ensure!(
            r.server_port == Some(target_port),
            "{what}: answered on port {:?}, not the target port {target_port}",
            r.server_port
        );
        ensure!(
            r.peer.as_deref() == Some(frontend.as_str()),
            "{what}: the client saw peer {:?}, not the ClusterIP",
            r.peer
        );
    }
    Ok(())
}
