//! Health check node ports end to end: a LoadBalancer Service with
//! externalTrafficPolicy Local gets an HTTP server on its
//! healthCheckNodePort, answering as kube-proxy's would, from the real agent
//! in a simulated node. A pod on the node plays the cloud load balancer and
//! probes the node's address directly (the port is no Service frontend, so
//! nothing translates it).
//!
//! One simulated node n1; an endpoint "on n2" is remote as far as svclb is
//! concerned.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use svclb_tests::{
    poll_until, Cluster, EndpointSpec, HttpResult, Node, Pod, PortSpec, ServiceSpec, SliceSpec,
};

const SVC: &str = "198.19.0.30";
const HC_PORT: u16 = 32100;
const DEADLINE: Duration = Duration::from_secs(2);

struct Env {
    cluster: Cluster,
    node: Node,
    client: Pod,
    backend: Pod,
}

impl Env {
    fn new(label: &str) -> Result<Env> {
        let cluster = Cluster::new(label)?;
        let node = cluster.add_node("n1")?;
        let client = node.add_pod("lb")?;
        // Only its address is used: health checks count endpoints, they do
        // not connect to them.
        let backend = node.add_pod("b1")?;
        Ok(Env {
            cluster,
            node,
            client,
            backend,
        })
    }

    fn service(&self, external_traffic_policy: &str) -> Result<ServiceSpec> {
        let svc = ServiceSpec::new(
            "web",
            &[SVC.parse()?],
            vec![PortSpec::tcp("http", 80).target(8080)],
        )
        .load_balancer(external_traffic_policy, Some(HC_PORT));
        self.cluster.manifests().write_service(&svc)?;
        Ok(svc)
    }

    /// The slice of "web": the backend pod on `node` in `endpoint`'s state.
    fn slice(&self, node: &str, endpoint: fn(IpAddr) -> EndpointSpec) -> Result<()> {
        let ep = EndpointSpec {
            node_name: Some(node.to_string()),
            ..endpoint(self.backend.ipv4().into())
        };
        let slice = SliceSpec::new("web-1", "web", vec![PortSpec::tcp("http", 8080)], vec![ep]);
        self.cluster.manifests().write_slice(&slice)?;
        Ok(())
    }

    fn get(&self) -> Result<HttpResult> {
        let args = [
            "http-get".to_string(),
            "--addr".into(),
            self.node.bridge_ipv4().to_string(),
            "--port".into(),
            HC_PORT.to_string(),
            "--path".into(),
            "/healthz".into(),
            "--timeout-ms".into(),
            "500".into(),
        ];
        let mut lines = self
            .client
            .run_client_as::<HttpResult, _>(&self.node, &args)?;
        match lines.pop() {
            Some(r) if lines.is_empty() => Ok(r),
            _ => bail!("expected one line from http-get, got {lines:?}"),
        }
    }

    /// Poll until a response satisfies `done` (the agent applies changes
    /// asynchronously); fail with the last response and the agent's log.
    fn converge(&self, what: &str, done: impl Fn(&HttpResult) -> bool) -> Result<HttpResult> {
        let mut last = HttpResult::default();
        let seen = poll_until(DEADLINE, || {
            last = self.get()?;
            Ok(done(&last).then_some(()))
        })?;
        if seen.is_none() {
            let log = self.node.agent().map(|a| a.log()).unwrap_or_default();
            bail!("{what}: last response {last:?}\n{log}");
        }
        Ok(last)
    }
}

/// kube-proxy's body for default/web.
fn body(local_endpoints: usize) -> String {
    format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": \"default\",\n\t\t\"name\": \"web\"\n\t}},\n\t\"localEndpoints\": {local_endpoints},\n\t\"serviceProxyHealthy\": true\n}}"
    )
}

fn answered(r: &HttpResult, status: u16, local_endpoints: usize) -> bool {
    r.ok && r.status == Some(status) && r.body.as_deref() == Some(body(local_endpoints).as_str())
}

/// No listener: the kernel refuses (svclb is not involved, so this is
/// ECONNREFUSED on every kernel).
fn refused(r: &HttpResult) -> bool {
    !r.ok && r.error.as_deref() == Some("ECONNREFUSED")
}

#[test]
fn health_check_port_reports_local_ready_endpoints() -> Result<()> {
    let env = Env::new("hc")?;
    let svc = env.service("Local")?;
    env.slice("n1", EndpointSpec::ready)?;
    let _agent = env.node.start_agent(env.cluster.manifests().dir())?;

    let r = env.converge("a local ready endpoint", |r| answered(r, 200, 1))?;
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(r.headers["x-content-type-options"], "nosniff");
    assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "1");

    // Terminating (still serving): the node must stop getting new traffic.
    env.slice("n1", EndpointSpec::terminating)?;
    let r = env.converge("only a terminating endpoint", |r| answered(r, 503, 0))?;
    assert_eq!(r.headers["x-load-balancing-endpoint-weight"], "0");

    env.slice("n2", EndpointSpec::ready)?;
    env.converge("endpoints only on another node", |r| answered(r, 503, 0))?;

    env.slice("n1", EndpointSpec::ready)?;
    env.converge("local endpoint again", |r| answered(r, 200, 1))?;

    // externalTrafficPolicy Cluster: every node serves, no health check.
    env.service("Cluster")?;
    env.converge("externalTrafficPolicy Cluster", refused)?;

    env.service("Local")?;
    env.converge("Local again", |r| answered(r, 200, 1))?;

    env.cluster.manifests().remove(&svc.file_name())?;
    env.converge("service deleted", refused)?;
    Ok(())
}
