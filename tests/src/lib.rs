//! The netns "cluster" harness shared by svclb's integration tests,
//! benchmarks and the demo.
//!
//! A [`Cluster`] holds nodes (netns + bridge + cgroup + bpffs pin dir) and
//! pods (netns + veth on the node's bridge). Servers run in pods; clients
//! run in a pod's netns *and* its node's cgroup, so the svclb programs the
//! node's [`Agent`] attached there translate their service connects.
//! Traffic never leaves the namespaces the harness creates.
//!
//! ```no_run
//! use svclb_tests::*;
//! # fn main() -> anyhow::Result<()> {
//! let cluster = Cluster::new("example")?;
//! let node = cluster.add_node("n1")?;
//! let (client, backend) = (node.add_pod("client")?, node.add_pod("web")?);
//! let _server = backend.spawn_server("web", &[8080])?;
//! let svc = ServiceSpec::new("web", &["198.19.0.10".parse()?], vec![PortSpec::tcp("http", 80).target(8080)]);
//! let slice = SliceSpec::new("web-1", "web", vec![PortSpec::tcp("http", 8080)],
//!     vec![EndpointSpec::ready(backend.ipv4().into())]);
//! cluster.manifests().write_service(&svc)?;
//! cluster.manifests().write_slice(&slice)?;
//! let _agent = node.start_agent(cluster.manifests().dir())?;
//! let results = client.connect(&node, &Connect::tcp(svc.cluster_ips[0], 80).count(10))?;
//! assert!(results.iter().all(|r| r.ok));
//! # Ok(()) }
//! ```

use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Result;

pub mod agent;
pub mod cgroup;
pub mod cluster;
pub mod cmd;
pub mod kubeproxy_iptables;
pub mod kubeproxy_nft;
pub mod manifests;
pub mod mock_api;
pub mod mounts;
pub mod netns;
pub mod podman;
pub mod probe;
pub mod prog_test;

pub use agent::{Agent, AgentRuntime, AgentSource};
pub use cluster::{
    Client, Cluster, ExternalClient, Node, Pod, Server, EXT_CIDR4, EXT_CIDR6, EXT_IF,
    SERVICE_CIDR4, SERVICE_CIDR6,
};
pub use manifests::{EndpointSpec, Manifests, PortSpec, Proto, ServiceSpec, SliceSpec};
pub use probe::{by_error, by_server, Connect, Hold, HoldSummary, HttpResult, ProbeResult};

/// Cargo target dirs to look for binaries in: $CARGO_TARGET_DIR, then the
/// workspace's own target/.
pub(crate) fn target_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        dirs.push(PathBuf::from(t));
    }
    dirs.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../target"
    )));
    dirs
}

/// Call `check` every ~10 ms until it returns `Some`; gives up once
/// `timeout` has passed without a check starting. Returns the value and when
/// the successful check started (so "within 1 s" means a check that began
/// within 1 s saw the change).
pub fn poll_until<T>(
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<Option<(T, Duration)>> {
    let start = Instant::now();
    loop {
        let began = start.elapsed();
        if began > timeout {
            return Ok(None);
        }
        if let Some(v) = check()? {
            return Ok(Some((v, began)));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let num = |p: Option<&str>| p.and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    (num(parts.next()), num(parts.next())) >= (major, minor)
}

/// The errno a connect to a frontend without endpoints fails with: svclb
/// sets ECONNREFUSED with bpf_set_retval, which cgroup programs have from
/// Linux 5.18; before that the kernel reports the documented EPERM.
pub fn refused_errno() -> &'static str {
    if kernel_at_least(5, 18) {
        "ECONNREFUSED"
    } else {
        "EPERM"
    }
}

/// The errno a connect that kube-proxy would drop (a Local traffic policy
/// without local endpoints) fails with; EPERM before Linux 5.18 likewise.
pub fn dropped_errno() -> &'static str {
    if kernel_at_least(5, 18) {
        "ETIMEDOUT"
    } else {
        "EPERM"
    }
}
