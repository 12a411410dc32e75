//! The operator's commands on the real kernel: `svclb maps dump` names each
//! frontend's Service (also with the agent killed) and filters by Service,
//! frontend and scope; `svclb conntrack list` shows an external flow;
//! `svclb status` reports the kernel features, devices and last sync, and
//! says when the agent is unreachable. One node with XDP on its external
//! device, an external client.

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde_json::{json, Value};
use svclb_tests::agent::svclb_bin;
use svclb_tests::cmd::{self, Placement};
use svclb_tests::{
    kernel_at_least, poll_until, Cluster, Connect, EndpointSpec, ExternalClient, Node, Pod,
    PortSpec, ServiceSpec, SliceSpec, EXT_IF,
};
use svclb_userspace::dataplane::names::{NameValue, FRONTEND_NAMES};

const WEB_IP: &str = "198.19.0.50";
const DB_IP: &str = "198.19.0.51";
const NODE_PORT: u16 = 30095;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address literal")
}

struct Env {
    cluster: Cluster,
    node: Node,
    _backend: Pod,
    client: ExternalClient,
}

/// "web" (NodePort, port "http") and "db" (ClusterIP, port "sql"), one
/// backend each on the node; the agent runs with XDP on ext0.
fn setup(label: &str) -> Result<Option<Env>> {
    if !kernel_at_least(5, 10) {
        eprintln!("skipped: svclb needs Linux 5.10+");
        return Ok(None);
    }
    let cluster = Cluster::new(label)?;
    let node = cluster.add_node("n1")?;
    node.attach_external()?;
    node.write_node_object(&[])?;
    let backend = node.add_pod("b1")?;
    backend.spawn_server("b1", &[8080])?;
    let client = cluster.add_external_client("x1")?;
    let manifests = cluster.manifests();
    let web = ServiceSpec::new("web", &[ip(WEB_IP)], Vec::new())
        .with_spec("type", json!("NodePort"))
        .with_spec(
            "ports",
            json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": NODE_PORT}]),
        );
    manifests.write_service(&web)?;
    let db = ServiceSpec::new(
        "db",
        &[ip(DB_IP)],
        vec![PortSpec::tcp("sql", 5432).target(8080)],
    );
    manifests.write_service(&db)?;
    for (svc, port) in [("web", "http"), ("db", "sql")] {
        let slice = SliceSpec::new(
            &format!("{svc}-1"),
            svc,
            vec![PortSpec::tcp(port, 8080)],
            // On this node: external traffic reaches it without SNAT.
            vec![EndpointSpec {
                node_name: Some(node.name().to_string()),
                ..EndpointSpec::ready(backend.ipv4().into())
            }],
        );
        manifests.write_slice(&slice)?;
    }
    // A short sync period: the periodic check comes soon.
    node.start_agent_with(manifests.dir(), &[EXT_IF], &["--sync-period", "2s"])?;
    Ok(Some(Env {
        cluster,
        node,
        _backend: backend,
        client,
    }))
}

/// `svclb ARGS --bpffs <pin dir>` in the node's netns (where the agent's
/// metrics address is); its standard output.
fn svclb(node: &Node, args: &[&str]) -> Result<String> {
    match svclb_exit(node, args)? {
        (0, out) => Ok(out),
        (code, out) => bail!("svclb {args:?} exited with {code}: {out}"),
    }
}

/// [`svclb`]'s exit code and standard output.
fn svclb_exit(node: &Node, args: &[&str]) -> Result<(i32, String)> {
    let mut c = Command::new(svclb_bin()?);
    c.args(args)
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
    // Shown with --nocapture (the README's examples come from here).
    eprintln!("$ svclb {}\n{text}", args.join(" "));
    let code = out.status.code().unwrap_or(-1);
    if code != 0 && code != 1 {
        bail!(
            "svclb {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((code, text))
}

fn json_of(node: &Node, args: &[&str]) -> Result<Value> {
    let mut args = args.to_vec();
    args.extend(["--output", "json"]);
    let out = svclb(node, &args)?;
    serde_json::from_str(&out).with_context(|| format!("parsing {out}"))
}

fn frontends(dump: &Value) -> Vec<Value> {
    dump["frontends"].as_array().cloned().unwrap_or_default()
}

/// The (service, port name, scope, port) of each frontend of a dump.
fn named(dump: &Value) -> Vec<(String, String, String, u64)> {
    frontends(dump)
        .iter()
        .map(|f| {
            (
                f["service"].as_str().unwrap_or("(none)").to_string(),
                f["port_name"].as_str().unwrap_or("(none)").to_string(),
                f["scope"].as_str().unwrap_or_default().to_string(),
                f["port"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn check_web_only(dump: &Value) {
    let rows = named(dump);
    assert!(!rows.is_empty(), "{dump:#}");
    for (service, port, _, _) in &rows {
        assert_eq!(
            (service.as_str(), port.as_str()),
            ("default/web", "http"),
            "{dump:#}"
        );
    }
    let scopes: Vec<&str> = rows.iter().map(|r| r.2.as_str()).collect();
    assert!(
        scopes.contains(&"socket") && scopes.contains(&"external"),
        "{dump:#}"
    );
}

#[test]
fn maps_dump_names_services_with_the_agent_down_too() -> Result<()> {
    let Some(env) = setup("cli-dump")? else {
        return Ok(());
    };
    let node = &env.node;
    let web = json_of(node, &["maps", "dump", "--service", "default/web"])?;
    check_web_only(&web);
    let all = json_of(node, &["maps", "dump"])?;
    assert!(
        named(&all)
            .iter()
            .any(|(s, p, _, port)| s == "default/db" && p == "sql" && *port == 5432),
        "{all:#}"
    );
    let table = svclb(node, &["maps", "dump"])?;
    assert!(
        table.contains("default/web:http") && table.contains("default/db:sql"),
        "{table}"
    );
    let table = svclb(node, &["maps", "dump", "--service", "default/db"])?;
    assert!(table.contains("default/db:sql"), "{table}");
    assert!(!table.contains("default/web"), "{table}");
    let external = json_of(node, &["maps", "dump", "--scope", "external"])?;
    let rows = named(&external);
    assert!(!rows.is_empty(), "{external:#}");
    assert!(
        rows.iter()
            .all(|r| r.2 == "external" && r.3 == u64::from(NODE_PORT)),
        "{external:#}"
    );
    let one = json_of(
        node,
        &["maps", "dump", "--frontend", &format!("{DB_IP}:5432")],
    )?;
    assert_eq!(frontends(&one).len(), 1, "{one:#}");
    assert_eq!(frontends(&one)[0]["address"], DB_IP, "{one:#}");

    // One name per frontend; a deleted Service's go with its frontends.
    let names = |node: &Node| -> Result<u64> {
        let status = json_of(node, &["status"])?;
        let maps = status["maps"].as_array().cloned().unwrap_or_default();
        let m = maps.iter().find(|m| m["name"] == "SVCLB_FRONTEND_NAMES");
        m.and_then(|m| m["entries"].as_u64())
            .context("SVCLB_FRONTEND_NAMES")
    };
    assert_eq!(names(node)?, frontends(&all).len() as u64, "{all:#}");
    let db = ServiceSpec::new("db", &[ip(DB_IP)], Vec::new());
    env.cluster.manifests().remove(&db.file_name())?;
    let gone = poll_until(Duration::from_secs(5), || {
        let dump = json_of(node, &["maps", "dump"])?;
        Ok((!named(&dump).iter().any(|r| r.0 == "default/db")).then_some(dump))
    })?;
    let (now, _) = gone.context("db's frontend stays in the maps")?;
    assert_eq!(names(node)?, frontends(&now).len() as u64, "{now:#}");

    // `svclb verify` checks the names too; a name removed behind the
    // agent's back is reported, and written again after the periodic check.
    svclb(node, &["verify"])?;
    let id = frontends(&now)[0]["rev_nat_id"]
        .as_u64()
        .context("rev_nat_id")? as u32;
    let pin = node.pin_dir().join(FRONTEND_NAMES);
    let mut map: BpfHashMap<MapData, u32, NameValue> =
        BpfHashMap::try_from(Map::HashMap(MapData::from_pin(&pin)?))?;
    map.remove(&id)?;
    let (code, report) = svclb_exit(node, &["verify"])?;
    // On a slow machine (a TCG guest) the agent's 2 s periodic check may
    // write the name again before verify reads the maps: then no difference
    // is right, and the name must be back.
    if code == 0 {
        assert!(
            map.get(&id, 0).is_ok(),
            "verify saw no difference, yet the name is gone: {report}"
        );
    } else {
        assert_eq!(code, 1, "{report}");
        assert!(
            report.contains(&format!("missing {FRONTEND_NAMES}")),
            "{report}"
        );
    }
    let repaired = poll_until(Duration::from_secs(10), || {
        Ok(map.get(&id, 0).is_ok().then_some(()))
    })?;
    assert!(
        repaired.is_some(),
        "the name of rev-NAT {id} is not written again"
    );
    svclb(node, &["verify"])?;

    // Killed (as a crash would): the names stay in the pinned map.
    node.agent().context("agent")?.kill();
    let web = json_of(node, &["maps", "dump", "--service", "default/web"])?;
    check_web_only(&web);
    Ok(())
}

#[test]
fn conntrack_list_and_status() -> Result<()> {
    let Some(env) = setup("cli-ct")? else {
        return Ok(());
    };
    let node = &env.node;
    let c = Connect::tcp(node.ext_ipv4(), NODE_PORT)
        .count(3)
        .timeout_ms(1000);
    let mut last = Vec::new();
    let reached = poll_until(Duration::from_secs(5), || {
        last = env.client.connect(&c)?;
        Ok((!last.is_empty() && last.iter().all(|r| r.ok)).then_some(()))
    })?;
    if reached.is_none() {
        bail!(
            "the NodePort never answered: {:?}; agent log:\n{}",
            svclb_tests::by_error(&last),
            node.agent().map(|a| a.log()).unwrap_or_default()
        );
    }
    let frontend = format!("{}:{NODE_PORT}", node.ext_ipv4());
    let flows = json_of(
        node,
        &[
            "conntrack",
            "list",
            "--frontend",
            &frontend,
            "--proto",
            "tcp",
        ],
    )?;
    let flows = flows.as_array().context("a list")?;
    assert!(!flows.is_empty(), "no flow listed");
    let client = env.client.ipv4().to_string();
    for f in flows {
        assert_eq!(f["frontend"], frontend, "{f:#}");
        assert_eq!(f["protocol"], "TCP", "{f:#}");
        assert!(
            f["client"]
                .as_str()
                .is_some_and(|c| c.starts_with(&format!("{client}:"))),
            "{f:#}"
        );
        assert_eq!(f["service"], "default/web:http", "{f:#}");
        assert!(
            f["backend"].as_str().is_some_and(|b| b.ends_with(":8080")),
            "{f:#}"
        );
    }
    // Filters that match nothing.
    let none = json_of(node, &["conntrack", "list", "--client", "198.18.255.1"])?;
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none:#}");
    let table = svclb(node, &["conntrack", "list", "--frontend", &frontend])?;
    assert!(table.contains("default/web:http"), "{table}");

    // The agent's view.
    let status = json_of(node, &["status"])?;
    let agent = &status["agent"];
    assert!(agent.is_object(), "{status:#}");
    assert!(
        status["features"]["kernel"]
            .as_str()
            .is_some_and(|k| !k.is_empty()),
        "{status:#}"
    );
    assert_eq!(status["features_from"], "agent", "{status:#}");
    assert_eq!(status["devices"][0]["device"], EXT_IF, "{status:#}");
    assert_eq!(agent["sync"]["last_result"], "ok", "{status:#}");
    assert!(
        agent["sync"]["last_success"].as_f64().is_some(),
        "{status:#}"
    );
    let maps = status["maps"].as_array().context("maps")?;
    let services = maps
        .iter()
        .find(|m| m["name"] == "SVCLB_SERVICES")
        .context("SVCLB_SERVICES")?;
    assert!(
        services["entries"].as_u64().is_some_and(|n| n > 0),
        "{status:#}"
    );
    assert!(
        maps.iter().any(|m| m["name"] == "SVCLB_FRONTEND_NAMES"),
        "{status:#}"
    );
    let table = svclb(node, &["status"])?;
    assert!(
        table.contains("last sync:") && table.contains(" ok"),
        "{table}"
    );

    // With the agent down: unreachable, features probed, devices from the pins.
    node.agent().context("agent")?.kill();
    let status = json_of(node, &["status"])?;
    assert!(status["agent"].is_null(), "{status:#}");
    assert_eq!(
        status["features_from"], "probed by this command",
        "{status:#}"
    );
    assert_eq!(status["devices"][0]["device"], EXT_IF, "{status:#}");
    let table = svclb(node, &["status"])?;
    assert!(table.contains("agent:     unreachable"), "{table}");
    assert!(
        table.contains("last sync: unknown (agent unreachable)"),
        "{table}"
    );
    Ok(())
}
