//! A simulated cluster made of network namespaces: one netns + bridge +
//! cgroup + bpffs pin dir per node, one netns + veth per pod. Everything it
//! creates carries a per-cluster prefix and is removed on drop (also when
//! the test panics); leftovers of dead runs are swept on first use.
//!
//! Addresses (never routed outside the namespaces):
//! - node N (1-based): bridge br0 with 198.18.N.1/24 and fd00:0:0:N::1/64;
//! - pod k (0-based) on node N: 198.18.N.(k+2)/24, fd00:0:0:N::(k+2)/64;
//! - services: pick from 198.19.0.0/16 and fd00:5::/112. svclb translates
//!   at connect()/sendmsg() before routing; pods have "unreachable" routes
//!   for these ranges so untranslated attempts fail at once, locally.
//!
//! The external network ("fabric", created on first use): one netns with a
//! bridge that nodes join with [`Node::attach_external`] and that
//! [`ExternalClient`]s (outside the cluster) sit on:
//! - node N: veth `ext0` with 198.18.0.N/24 and fd00:20::N/64, and routes
//!   to the pod subnets of every other attached node via that node's ext0
//!   address, so pods on different nodes reach each other by pod IP;
//! - external client k (0-based): 198.18.0.(200+k)/24, fd00:20::(200+k)/64
//!   (the number 200+k, so fd00:20::c8 for k = 0), with no routes beyond
//!   the fabric subnet until the test adds some ([`ExternalClient::route_via`]).
//!
//! Tx checksum offload is off on every veth end of an attached node and of
//! the fabric (see [`netns::set_tx_checksum`]).

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;

use crate::agent::{self, Agent, AgentConfig, AgentRuntime, AgentSource};
use crate::cmd::{self, Placement, Proc};
use crate::manifests::Manifests;
use crate::probe::{self, Connect, Hold, HoldSummary, ProbeResult};
use crate::{cgroup, mounts, netns, podman};

/// Every name this harness creates starts with this, then the owner's pid
/// in base 36, then '-'. Kept short: names are also used for interfaces.
const PREFIX: &str = "svt";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// The node's interface on the external network.
pub const EXT_IF: &str = "ext0";
/// The external network's subnets.
pub const EXT_CIDR4: &str = "198.18.0.0/24";
pub const EXT_CIDR6: &str = "fd00:20::/64";
/// The first external client's host number (198.18.0.200).
const CLIENT_HOST_BASE: u8 = 200;

/// Where tests put service addresses.
pub const SERVICE_CIDR4: &str = "198.19.0.0/16";
pub const SERVICE_CIDR6: &str = "fd00:5::/112";

/// For every node and pod netns:
/// - DAD off, so IPv6 addresses are usable at once;
/// - no ICMP rate limits, so every untranslated connect to an (unrouted)
///   service address fails at once with ENETUNREACH from the node, and every
///   UDP datagram to a closed port gets its port-unreachable. With the
///   defaults, bursts of attempts turn into one-second timeouts.
const COMMON_SYSCTLS: &[(&str, &str)] = &[
    ("net.ipv6.conf.all.accept_dad", "0"),
    ("net.ipv6.conf.default.accept_dad", "0"),
    ("net.ipv4.icmp_ratemask", "0"),
    ("net.ipv6.icmp.ratelimit", "0"),
    ("net.ipv4.icmp_msgs_per_sec", "1000000"),
    ("net.ipv4.icmp_msgs_burst", "1000000"),
];

/// One simulated cluster. Dropping it tears everything down.
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

struct ClusterInner {
    prefix: String,
    cgroup_root: PathBuf,
    bpffs: PathBuf,
    tmp: PathBuf,
    manifests: Manifests,
    /// How its nodes' agents are started.
    runtime: AgentRuntime,
    state: Mutex<State>,
    /// Held for a whole attach so that route setup sees a consistent set
    /// of attached nodes.
    fabric: Mutex<Fabric>,
}

/// The external network: created on first use.
#[derive(Default)]
struct Fabric {
    created: bool,
    /// Attached nodes.
    nodes: Vec<Node>,
    clients: Vec<ExternalClient>,
}

#[derive(Default)]
struct State {
    nodes: Vec<Node>,
    /// Long-running processes (servers, agents, background clients).
    procs: Vec<Arc<Proc>>,
    cleaned: bool,
}

impl ClusterInner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fabric(&self) -> std::sync::MutexGuard<'_, Fabric> {
        self.fabric.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Underscores never occur in node or pod names, so these cannot
    /// collide with `{prefix}-{node}[-{pod}]`.
    fn fabric_netns(&self) -> String {
        format!("{}_fabric", self.prefix)
    }

    /// Create the fabric netns and bridge unless done already.
    fn ensure_fabric(&self, fabric: &mut Fabric) -> Result<()> {
        if fabric.created {
            return Ok(());
        }
        if self.state().cleaned {
            bail!("cluster {} is already cleaned up", self.prefix);
        }
        let ns = self.fabric_netns();
        // Marked before creation so a half-built fabric is cleaned up too.
        fabric.created = true;
        netns::create(&ns)?;
        netns::sysctls(&ns, COMMON_SYSCTLS)?;
        cmd::ip_batch(
            &ns,
            &[
                "link set lo up".into(),
                // Fixed MAC for the same reason as the nodes' bridges.
                "link add br0 address 02:00:00:00:fe:01 type bridge".into(),
                "link set br0 up".into(),
            ],
        )
    }

    fn register(&self, p: Arc<Proc>) -> Result<()> {
        let mut st = self.state();
        if st.cleaned {
            p.kill();
            bail!("cluster {} is already cleaned up", self.prefix);
        }
        st.procs.push(p);
        Ok(())
    }
}

fn base36(mut n: u64) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(digits[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// The pid encoded in a harness-made name, if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, _) = rest.split_once('-')?;
    u32::from_str_radix(pid, 36).ok()
}

fn owner_is_dead(name: &str) -> bool {
    match owner_pid(name) {
        Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
        None => false,
    }
}

fn tmp_base() -> PathBuf {
    std::env::temp_dir().join("svclb-tests")
}

/// Remove what runs of dead processes left behind (killed test binaries
/// never run their destructors). Names of live owners are never touched.
pub fn sweep_leftovers() -> Result<()> {
    let mut errors = Vec::new();
    for name in netns::list().into_iter().filter(|n| owner_is_dead(n)) {
        if let Err(e) = netns::delete(&name) {
            errors.push(e);
        }
    }
    let dirs = |root: &Path| -> Vec<PathBuf> {
        fs::read_dir(root)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_str().is_some_and(owner_is_dead))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    for p in dirs(&mounts::ensure_bpffs()?) {
        if let Err(e) = fs::remove_dir_all(&p) {
            if p.exists() {
                errors.push(anyhow!("removing {}: {e}", p.display()));
            }
        }
    }
    for p in dirs(&mounts::cgroup2_root()?) {
        if let Err(e) = cgroup::remove(&p) {
            errors.push(e);
        }
    }
    for p in dirs(&tmp_base()) {
        let _ = fs::remove_dir_all(&p);
    }
    // Agents' containers outlive a killed test (conmon keeps them).
    if podman::available() {
        for name in podman::containers()
            .into_iter()
            .filter(|n| owner_is_dead(n))
        {
            podman::remove(&name);
        }
    }
    match errors.into_iter().next() {
        Some(e) => Err(e.context("sweeping leftovers of earlier runs")),
        None => Ok(()),
    }
}

impl Cluster {
    /// `label` only names the temp dir (logs), to find a test's files.
    /// Agents run as [`AgentRuntime::from_env`] says (the host by default).
    pub fn new(label: &str) -> Result<Cluster> {
        Cluster::with_runtime(label, AgentRuntime::from_env())
    }

    /// [`Cluster::new`] with the agents started by `runtime`.
    pub fn with_runtime(label: &str, runtime: AgentRuntime) -> Result<Cluster> {
        static SWEEP: Once = Once::new();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the svclb test harness needs root (netns, cgroups, bpffs)");
        }
        SWEEP.call_once(|| {
            if let Err(e) = sweep_leftovers() {
                eprintln!("svclb-tests: {e:#}");
            }
        });
        let prefix = format!(
            "{PREFIX}{}-{}",
            base36(std::process::id().into()),
            base36(COUNTER.fetch_add(1, Ordering::Relaxed).into())
        );
        let label: String = label
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let tmp = tmp_base().join(format!("{prefix}-{label}"));
        fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let manifests = Manifests::create(&tmp)?;
        Ok(Cluster {
            inner: Arc::new(ClusterInner {
                prefix,
                cgroup_root: mounts::cgroup2_root()?,
                bpffs: mounts::ensure_bpffs()?,
                tmp,
                manifests,
                runtime,
                state: Mutex::new(State::default()),
                fabric: Mutex::new(Fabric::default()),
            }),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// How its agents are started.
    pub fn runtime(&self) -> &AgentRuntime {
        &self.inner.runtime
    }

    /// Scratch dir for logs (kept when a test panics, swept next run).
    pub fn tmp_dir(&self) -> &Path {
        &self.inner.tmp
    }

    /// The cluster's manifests directory (shared by all nodes' agents).
    pub fn manifests(&self) -> &Manifests {
        &self.inner.manifests
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.inner.state().nodes.clone()
    }

    /// Names of everything this cluster created that should be gone after
    /// cleanup: netns names, cgroup dirs and pin dirs.
    pub fn owned_paths(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for n in self.nodes() {
            out.push(netns::path(&n.inner.netns));
            out.push(n.inner.cgroup.clone());
            out.push(n.inner.pin_dir.clone());
            for p in n.pods() {
                out.push(netns::path(&p.inner.netns));
            }
        }
        let fabric = self.inner.fabric();
        if fabric.created {
            out.push(netns::path(&self.inner.fabric_netns()));
        }
        for c in &fabric.clients {
            out.push(netns::path(&c.inner.netns));
        }
        out
    }

    /// The fabric's netns (it exists once a node is attached or an
    /// external client added); its veths are `nN` (node N) and `cK`
    /// (external client K), all on bridge br0.
    pub fn fabric_netns_name(&self) -> String {
        self.inner.fabric_netns()
    }

    /// A host outside the cluster on the external network (creates the
    /// fabric on first use). It has no routes beyond the fabric subnet:
    /// add them with [`ExternalClient::route_via`].
    pub fn add_external_client(&self, name: &str) -> Result<ExternalClient> {
        check_name(name)?;
        let mut fabric = self.inner.fabric();
        self.inner.ensure_fabric(&mut fabric)?;
        if fabric.clients.iter().any(|c| c.name() == name) {
            bail!("external client {name} exists");
        }
        let k = fabric.clients.len();
        let Some(host) = u8::try_from(k)
            .ok()
            .and_then(|k| k.checked_add(CLIENT_HOST_BASE))
            .filter(|h| *h < 255)
        else {
            bail!("too many external clients");
        };
        let client = ExternalClient {
            inner: Arc::new(ExternalInner {
                cluster: self.inner.clone(),
                name: name.to_string(),
                netns: format!("{}_ext-{name}", self.inner.prefix),
                ipv4: ext_ipv4(host),
                ipv6: ext_ipv6(host),
            }),
        };
        // Registered before creation so a half-built client is cleaned up too.
        fabric.clients.push(client.clone());
        let ns = &client.inner.netns;
        netns::create(ns)?;
        netns::sysctls(ns, COMMON_SYSCTLS)?;

        let fab = self.inner.fabric_netns();
        let peer = format!("c{k}");
        cmd::ip_batch(
            &fab,
            &[
                format!("link add {peer} type veth peer name eth0 netns {ns}"),
                format!("link set {peer} master br0 up"),
            ],
        )?;
        cmd::ip_batch(
            ns,
            &[
                "link set lo up".into(),
                format!("addr add {}/24 dev eth0", client.inner.ipv4),
                format!("addr add {}/64 dev eth0 nodad", client.inner.ipv6),
                "link set eth0 up".into(),
            ],
        )?;
        netns::set_tx_checksum(&fab, &peer, false)?;
        netns::set_tx_checksum(ns, "eth0", false)?;
        wait_link_ready(&fab, &peer)?;
        wait_link_ready(ns, "eth0")?;
        Ok(client)
    }

    /// The external clients made so far.
    pub fn external_clients(&self) -> Vec<ExternalClient> {
        self.inner.fabric().clients.clone()
    }

    pub fn add_node(&self, name: &str) -> Result<Node> {
        check_name(name)?;
        let index = {
            let st = self.inner.state();
            if st.cleaned {
                bail!("cluster {} is already cleaned up", self.inner.prefix);
            }
            if st.nodes.iter().any(|n| n.name() == name) {
                bail!("node {name} exists");
            }
            st.nodes.len() + 1
        };
        if index > 250 {
            bail!("too many nodes");
        }
        let full = format!("{}-{name}", self.inner.prefix);
        let node = Node {
            inner: Arc::new(NodeInner {
                cluster: self.inner.clone(),
                name: name.to_string(),
                index: index as u8,
                netns: full.clone(),
                cgroup: self.inner.cgroup_root.join(&full),
                pin_dir: self.inner.bpffs.join(&full),
                pods: Mutex::new(Vec::new()),
                external: AtomicBool::new(false),
                agent: Mutex::new(None),
                agent_runs: AtomicU32::new(0),
            }),
        };
        // Registered before creation so a half-built node is cleaned up too.
        self.inner.state().nodes.push(node.clone());
        node.setup()?;
        Ok(node)
    }

    /// Tear everything down: processes, namespaces, pin dirs, cgroups, and
    /// the temp dir (unless panicking). Idempotent; Drop calls it.
    pub fn cleanup(&self) -> Result<()> {
        let (nodes, procs) = {
            let mut st = self.inner.state();
            if st.cleaned {
                return Ok(());
            }
            st.cleaned = true;
            (st.nodes.clone(), std::mem::take(&mut st.procs))
        };
        let (fabric, clients) = {
            let f = self.inner.fabric();
            (f.created, f.clients.clone())
        };
        for p in &procs {
            p.kill();
        }
        let mut errors: Vec<anyhow::Error> = Vec::new();
        for node in &nodes {
            // Pins first: unlinking a pinned cgroup link detaches it.
            if node.inner.pin_dir.exists() {
                if let Err(e) = fs::remove_dir_all(&node.inner.pin_dir) {
                    errors.push(anyhow!("removing {}: {e}", node.inner.pin_dir.display()));
                }
            }
            for pod in node.pods() {
                errors.extend(netns::delete(&pod.inner.netns).err());
            }
            errors.extend(netns::delete(&node.inner.netns).err());
            errors.extend(cgroup::remove(&node.inner.cgroup).err());
        }
        for c in &clients {
            errors.extend(netns::delete(&c.inner.netns).err());
        }
        if fabric {
            errors.extend(netns::delete(&self.inner.fabric_netns()).err());
        }
        if thread::panicking() {
            eprintln!("svclb-tests: logs kept in {}", self.inner.tmp.display());
        } else {
            let _ = fs::remove_dir_all(&self.inner.tmp);
        }
        if errors.is_empty() {
            return Ok(());
        }
        let msg: Vec<String> = errors.iter().map(|e| format!("{e:#}")).collect();
        bail!(
            "cleanup of {} failed:\n{}",
            self.inner.prefix,
            msg.join("\n")
        )
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.cleanup() {
            eprintln!("svclb-tests: {e:#}");
        }
    }
}

/// Wait until `dev` in netns `ns` is up and has its real qdisc. Until the
/// kernel's link watcher gets to a new veth (it runs at most once a second
/// for non-urgent events, and a bridge in the netns makes them), the device
/// keeps the "noop" qdisc that drops everything: the first packets of a
/// test would vanish and cost it a 1 s retransmit.
fn wait_link_ready(ns: &str, dev: &str) -> Result<()> {
    let ready = crate::poll_until(Duration::from_secs(5), || {
        let out = cmd::ip(Some(ns), &["link", "show", dev])?;
        Ok((out.contains("state UP") && !out.contains("qdisc noop")).then_some(()))
    })?;
    match ready {
        Some(_) => Ok(()),
        None => bail!("{dev} in {ns} not ready after 5 s"),
    }
}

/// Routes (ip batch lines) to `node`'s pod subnets via its ext0 addresses.
fn pod_subnet_routes(node: &Node) -> [String; 2] {
    let n = node.index();
    [
        format!("route add 198.18.{n}.0/24 via {}", node.ext_ipv4()),
        format!("route add fd00:0:0:{n:x}::/64 via {}", node.ext_ipv6()),
    ]
}

/// Node and pod names become parts of netns/cgroup/file names.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok {
        bail!("bad name {name:?}: use 1-20 of [a-z0-9-]");
    }
    Ok(())
}

/// A simulated node. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    cluster: Arc<ClusterInner>,
    name: String,
    index: u8,
    netns: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    pods: Mutex<Vec<Pod>>,
    /// On the fabric ([`Node::attach_external`]).
    external: AtomicBool,
    agent: Mutex<Option<Agent>>,
    agent_runs: AtomicU32,
}

/// 198.18.0.HOST: a node's (HOST = its index) or external client's address.
fn ext_ipv4(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, host)
}

/// fd00:20::HOST (the number HOST, so fd00:20::a for node 10).
fn ext_ipv6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, host.into())
}

impl Node {
    fn setup(&self) -> Result<()> {
        let i = &self.inner;
        let n = i.index;
        netns::create(&i.netns)?;
        // Forwarding on so the node routes like a real one.
        let mut settings = vec![
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ];
        settings.extend(COMMON_SYSCTLS);
        netns::sysctls(&i.netns, &settings)?;
        // A fixed bridge MAC: otherwise it follows the lowest port MAC and
        // changes as pods come and go, staling the pods' neighbour entries.
        cmd::ip_batch(
            &i.netns,
            &[
                "link set lo up".into(),
                format!("link add br0 address 02:00:00:00:{n:02x}:01 type bridge"),
                format!("addr add {} dev br0", self.cidr4(1)),
                format!("addr add {} dev br0 nodad", self.cidr6(1)),
                "link set br0 up".into(),
            ],
        )?;
        cgroup::create(&i.cgroup)?;
        fs::create_dir(&i.pin_dir).with_context(|| format!("creating {}", i.pin_dir.display()))?;
        Ok(())
    }

    fn cidr4(&self, host: u8) -> String {
        format!("198.18.{}.{host}/24", self.inner.index)
    }

    fn cidr6(&self, host: u8) -> String {
        format!("fd00:0:0:{:x}::{host:x}/64", self.inner.index)
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// 1-based; the third octet of the node's subnet.
    pub fn index(&self) -> u8 {
        self.inner.index
    }

    pub fn netns_name(&self) -> &str {
        &self.inner.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.inner.netns)
    }

    /// The node's cgroup v2 directory (svclb attaches its programs here).
    pub fn cgroup(&self) -> &Path {
        &self.inner.cgroup
    }

    /// The agent's bpffs pin dir.
    pub fn pin_dir(&self) -> &Path {
        &self.inner.pin_dir
    }

    pub fn bridge_ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.inner.index, 1)
    }

    pub fn bridge_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0, 0, self.inner.index.into(), 0, 0, 0, 1)
    }

    /// The address of [`EXT_IF`] (198.18.0.N), once attached.
    pub fn ext_ipv4(&self) -> Ipv4Addr {
        ext_ipv4(self.inner.index)
    }

    /// The address of [`EXT_IF`] (fd00:20::N), once attached.
    pub fn ext_ipv6(&self) -> Ipv6Addr {
        ext_ipv6(self.inner.index)
    }

    /// The ext0 address of the same family as `like`.
    pub fn ext_ip_like(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => self.ext_ipv4().into(),
            IpAddr::V6(_) => self.ext_ipv6().into(),
        }
    }

    pub fn is_external(&self) -> bool {
        self.inner.external.load(Ordering::Relaxed)
    }

    /// The node's InternalIPs: its ext0 addresses when attached, else its
    /// bridge addresses.
    pub fn internal_ips(&self) -> [IpAddr; 2] {
        if self.is_external() {
            [self.ext_ipv4().into(), self.ext_ipv6().into()]
        } else {
            [self.bridge_ipv4().into(), self.bridge_ipv6().into()]
        }
    }

    /// This node's Node object: its name, `labels`, and
    /// [`Node::internal_ips`] as InternalIP addresses.
    pub fn node_object(&self, labels: &[(&str, &str)]) -> serde_json::Value {
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        let addresses: Vec<serde_json::Value> = self
            .internal_ips()
            .iter()
            .map(|ip| serde_json::json!({"type": "InternalIP", "address": ip.to_string()}))
            .collect();
        serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.name(), "labels": labels},
            "status": {"addresses": addresses},
        })
    }

    /// Write [`Node::node_object`] into the cluster's manifests dir as
    /// `node-NAME.yaml` (replacing an earlier one); returns the file name.
    pub fn write_node_object(&self, labels: &[(&str, &str)]) -> Result<String> {
        let file = format!("node-{}.yaml", self.name());
        let yaml = crate::manifests::to_yaml(&self.node_object(labels));
        self.inner.cluster.manifests.write(&file, &yaml)?;
        Ok(file)
    }

    /// Put the node on the external network: veth [`EXT_IF`] into the
    /// fabric with [`Node::ext_ipv4`] and [`Node::ext_ipv6`], routes
    /// between this node's and every other attached node's pod subnets,
    /// and tx checksum offload off on its veths (also pods added later).
    pub fn attach_external(&self) -> Result<()> {
        let i = &self.inner;
        let mut fabric = i.cluster.fabric();
        i.cluster.ensure_fabric(&mut fabric)?;
        if self.is_external() {
            bail!("node {} is already attached", i.name);
        }
        let fab = i.cluster.fabric_netns();
        let peer = format!("n{}", i.index);
        i.external.store(true, Ordering::Relaxed);
        fabric.nodes.push(self.clone());
        let mut lines = vec![
            format!("link add {EXT_IF} type veth peer name {peer} netns {fab}"),
            format!("addr add {}/24 dev {EXT_IF}", self.ext_ipv4()),
            format!("addr add {}/64 dev {EXT_IF} nodad", self.ext_ipv6()),
            format!("link set {EXT_IF} up"),
        ];
        let others: Vec<&Node> = fabric.nodes.iter().filter(|n| n.name() != i.name).collect();
        for other in &others {
            lines.extend(pod_subnet_routes(other));
        }
        cmd::ip_batch(&i.netns, &lines)?;

        cmd::ip_batch(&fab, &[format!("link set {peer} master br0 up")])?;
        for other in &others {
            cmd::ip_batch(&other.inner.netns, &pod_subnet_routes(self))?;
        }
        netns::set_tx_checksum(&fab, &peer, false)?;
        netns::set_tx_checksum(&i.netns, EXT_IF, false)?;
        for (k, pod) in self.pods().iter().enumerate() {
            self.pod_tx_checksum_off(k, pod)?;
        }
        wait_link_ready(&fab, &peer)?;
        wait_link_ready(&i.netns, EXT_IF)
    }

    /// Both ends of pod k's veth.
    fn pod_tx_checksum_off(&self, k: usize, pod: &Pod) -> Result<()> {
        netns::set_tx_checksum(&self.inner.netns, &format!("vp{k}"), false)?;
        netns::set_tx_checksum(&pod.inner.netns, "eth0", false)
    }

    /// `svclb-probe serve` in the node's own netns (a host-network
    /// backend, or something for external clients to reach); not in the
    /// node's cgroup. See [`Pod::spawn_server`].
    pub fn spawn_server(&self, name: &str, ports: &[u16]) -> Result<Server> {
        let place = Placement {
            netns: Some(&self.netns_path()),
            cgroup: None,
        };
        spawn_server(&self.inner.cluster, &place, &self.inner.name, name, ports)
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.inner
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Run `ip -n <node netns> ARGS`.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        cmd::ip(Some(&self.inner.netns), args)
    }

    pub fn add_pod(&self, name: &str) -> Result<Pod> {
        check_name(name)?;
        let i = &self.inner;
        let (k, pod) = {
            let mut pods = i.pods.lock().unwrap_or_else(|e| e.into_inner());
            if pods.iter().any(|p| p.name() == name) {
                bail!("pod {name} exists on node {}", i.name);
            }
            let k = pods.len();
            if k > 250 {
                bail!("too many pods on node {}", i.name);
            }
            let host = (k + 2) as u8;
            let pod = Pod {
                inner: Arc::new(PodInner {
                    cluster: i.cluster.clone(),
                    name: name.to_string(),
                    node: i.name.clone(),
                    netns: format!("{}-{name}", i.netns),
                    ipv4: Ipv4Addr::new(198, 18, i.index, host),
                    ipv6: Ipv6Addr::new(0xfd00, 0, 0, i.index.into(), 0, 0, 0, host.into()),
                }),
            };
            // Registered before creation so a half-built pod is cleaned up too.
            pods.push(pod.clone());
            (k, pod)
        };
        let p = &pod.inner;
        netns::create(&p.netns)?;
        netns::sysctls(&p.netns, COMMON_SYSCTLS)?;
        // Create the pair inside the node netns with the peer directly in
        // the pod netns: no interface ever appears in the root namespace.
        let host_if = format!("vp{k}");
        cmd::ip_batch(
            &i.netns,
            &[
                format!(
                    "link add {host_if} type veth peer name eth0 netns {}",
                    p.netns
                ),
                format!("link set {host_if} master br0 up"),
            ],
        )?;
        cmd::ip_batch(
            &p.netns,
            &[
                "link set lo up".into(),
                format!("addr add {}/24 dev eth0", p.ipv4),
                format!("addr add {}/64 dev eth0 nodad", p.ipv6),
                "link set eth0 up".into(),
                format!("route add 0.0.0.0/0 via {}", self.bridge_ipv4()),
                format!("route add ::/0 via {}", self.bridge_ipv6()),
                // Connects to a service address that svclb did not translate
                // fail at once and locally (the socket hooks run before
                // routing, so translated ones never see these routes).
                // Routed to the node instead, they would race its ICMP
                // error against the connect and often end in a timeout.
                format!("route add unreachable {SERVICE_CIDR4}"),
                format!("route add unreachable {SERVICE_CIDR6}"),
            ],
        )?;
        if self.is_external() {
            self.pod_tx_checksum_off(k, &pod)?;
        }
        Ok(pod)
    }

    /// Start this node's agent on `manifests_dir` and wait for its initial
    /// sync. Replaces the remembered agent (the old one is not stopped).
    pub fn start_agent(&self, manifests_dir: &Path) -> Result<Agent> {
        self.start_agent_with_devices(manifests_dir, &[])
    }

    /// [`Node::start_agent`] with `--devices` (comma-joined) when `devices`
    /// is not empty, e.g. `&[EXT_IF]`: the external interfaces the agent
    /// attaches its XDP and tc programs to.
    pub fn start_agent_with_devices(
        &self,
        manifests_dir: &Path,
        devices: &[&str],
    ) -> Result<Agent> {
        self.start_agent_with(manifests_dir, devices, &[])
    }

    /// [`Node::start_agent_with_devices`] with more `svclb run` flags.
    pub fn start_agent_with(
        &self,
        manifests_dir: &Path,
        devices: &[&str],
        extra_args: &[&str],
    ) -> Result<Agent> {
        let source = AgentSource::Manifests(manifests_dir.to_path_buf());
        self.start_agent_from(source, devices, extra_args)
    }

    /// Start this node's agent on `source` with `--devices` (none: no
    /// flag) and more flags, and wait for its initial sync. Replaces the
    /// remembered agent (the old one is not stopped).
    pub fn start_agent_from(
        &self,
        source: AgentSource,
        devices: &[&str],
        extra_args: &[&str],
    ) -> Result<Agent> {
        let i = &self.inner;
        let run = i.agent_runs.fetch_add(1, Ordering::Relaxed);
        let agent = Agent::start(&AgentConfig {
            node_name: &i.name,
            netns: &netns::path(&i.netns),
            cgroup: &i.cgroup,
            bpffs: &i.pin_dir,
            source,
            devices: devices.iter().map(|d| d.to_string()).collect(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            log: i.cluster.tmp.join(format!("agent-{}-{run}.log", i.name)),
            runtime: &i.cluster.runtime,
            instance: &format!("{}-a{run}", i.netns),
        })?;
        i.cluster.register(agent.proc())?;
        *i.agent.lock().unwrap_or_else(|e| e.into_inner()) = Some(agent.clone());
        Ok(agent)
    }

    /// The agent last started on this node.
    pub fn agent(&self) -> Option<Agent> {
        self.inner
            .agent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stop the current agent (SIGTERM) and start a new one on the same
    /// source, devices and flags.
    pub fn restart_agent(&self) -> Result<Agent> {
        let old = self
            .agent()
            .ok_or_else(|| anyhow!("node {} has no agent to restart", self.name()))?;
        old.stop()?;
        self.start_agent_like(&old)
    }

    /// Start an agent with the same source, devices and flags as
    /// `old` (which must have stopped, e.g. killed).
    pub fn start_agent_like(&self, old: &Agent) -> Result<Agent> {
        let devices: Vec<&str> = old.devices().iter().map(String::as_str).collect();
        let args: Vec<&str> = old.extra_args().iter().map(String::as_str).collect();
        self.start_agent_from(old.source().clone(), &devices, &args)
    }

    /// `svclb-probe connect` from the node itself (its netns, in its
    /// cgroup): what a host-network process sees.
    pub fn connect(&self, c: &Connect) -> Result<Vec<ProbeResult>> {
        let ns = self.netns_path();
        let place = Placement {
            netns: Some(&ns),
            cgroup: Some(self.cgroup()),
        };
        run_probe(&place, &c.args(), connect_timeout(c))
    }

    /// `svclb maps dump --bpffs <pin dir> --output json`.
    pub fn dump_json(&self) -> Result<serde_json::Value> {
        agent::dump_json(&self.inner.pin_dir)
    }
}

/// A simulated pod. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Pod {
    inner: Arc<PodInner>,
}

struct PodInner {
    cluster: Arc<ClusterInner>,
    name: String,
    node: String,
    netns: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn node_name(&self) -> &str {
        &self.inner.node
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.inner.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.inner.ipv6
    }

    /// The pod's address of the same family as `like`.
    pub fn ip_like(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => self.inner.ipv4.into(),
            IpAddr::V6(_) => self.inner.ipv6.into(),
        }
    }

    pub fn netns_name(&self) -> &str {
        &self.inner.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.inner.netns)
    }

    /// Run `ip -n <pod netns> ARGS`.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        cmd::ip(Some(&self.inner.netns), args)
    }

    fn client_place<'a>(netns: &'a Path, node: &'a Node) -> Placement<'a> {
        Placement {
            netns: Some(netns),
            cgroup: Some(node.cgroup()),
        }
    }

    /// `svclb-probe serve --name NAME --port P...` in this pod (netns only);
    /// returns once all ports listen. Lives until stopped or cluster cleanup.
    pub fn spawn_server(&self, name: &str, ports: &[u16]) -> Result<Server> {
        let place = Placement {
            netns: Some(&self.netns_path()),
            cgroup: None,
        };
        spawn_server(&self.inner.cluster, &place, &self.inner.name, name, ports)
    }

    /// Run the probe with `args` in this pod's netns and in `node`'s cgroup
    /// (so the node's svclb programs apply) and parse each output line.
    pub fn run_client_as<T: DeserializeOwned, S: AsRef<OsStr>>(
        &self,
        node: &Node,
        args: &[S],
    ) -> Result<Vec<T>> {
        let ns = self.netns_path();
        run_probe(&Self::client_place(&ns, node), args, CLIENT_TIMEOUT)
    }

    /// [`Pod::run_client_as`] for `connect`.
    pub fn run_client<S: AsRef<OsStr>>(&self, node: &Node, args: &[S]) -> Result<Vec<ProbeResult>> {
        self.run_client_as(node, args)
    }

    /// `svclb-probe connect` from this pod in `node`'s cgroup.
    pub fn connect(&self, node: &Node, c: &Connect) -> Result<Vec<ProbeResult>> {
        let ns = self.netns_path();
        run_probe(
            &Self::client_place(&ns, node),
            &c.args(),
            connect_timeout(c),
        )
    }

    /// Start the probe with `args` in the background (same placement as
    /// [`Pod::run_client`]); stdin is a pipe that [`Client::finish`] closes.
    pub fn spawn_client<S: AsRef<OsStr>>(&self, node: &Node, args: &[S]) -> Result<Client> {
        let ns = self.netns_path();
        spawn_probe(&self.inner.cluster, &Self::client_place(&ns, node), args)
    }

    /// `svclb-probe hold ...` in the background.
    pub fn spawn_hold(&self, node: &Node, h: &Hold) -> Result<Client> {
        self.spawn_client(node, &h.args())
    }
}

/// A host outside the cluster, on the external network. Its probes run in
/// its netns only (no cgroup: svclb's socket programs never apply).
/// Cheap to clone (shared handle).
#[derive(Clone)]
pub struct ExternalClient {
    inner: Arc<ExternalInner>,
}

struct ExternalInner {
    cluster: Arc<ClusterInner>,
    name: String,
    netns: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

impl ExternalClient {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.inner.ipv4
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        self.inner.ipv6
    }

    /// The client's address of the same family as `like`.
    pub fn ip_like(&self, like: IpAddr) -> IpAddr {
        match like {
            IpAddr::V4(_) => self.inner.ipv4.into(),
            IpAddr::V6(_) => self.inner.ipv6.into(),
        }
    }

    pub fn netns_name(&self) -> &str {
        &self.inner.netns
    }

    pub fn netns_path(&self) -> PathBuf {
        netns::path(&self.inner.netns)
    }

    /// Run `ip -n <client netns> ARGS`.
    pub fn ip<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        cmd::ip(Some(&self.inner.netns), args)
    }

    /// Route `prefix` (an address or CIDR, either family) via `node`'s
    /// ext0 address, as a load balancer or router in front of the cluster
    /// would. Replaces an earlier route for the same prefix, so a test can
    /// move a VIP to another node.
    pub fn route_via(&self, prefix: &str, node: &Node) -> Result<()> {
        if !node.is_external() {
            bail!(
                "node {} is not attached to the external network",
                node.name()
            );
        }
        let via = if prefix.contains(':') {
            node.ext_ipv6().to_string()
        } else {
            node.ext_ipv4().to_string()
        };
        self.ip(&["route", "replace", prefix, "via", &via])?;
        Ok(())
    }

    /// Run the probe with `args` in this client's netns and parse each
    /// output line.
    pub fn run_client_as<T: DeserializeOwned, S: AsRef<OsStr>>(
        &self,
        args: &[S],
    ) -> Result<Vec<T>> {
        let ns = self.netns_path();
        run_probe(&netns_only(&ns), args, CLIENT_TIMEOUT)
    }

    /// [`ExternalClient::run_client_as`] for `connect`.
    pub fn run_client<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Vec<ProbeResult>> {
        self.run_client_as(args)
    }

    /// `svclb-probe connect` from this client.
    pub fn connect(&self, c: &Connect) -> Result<Vec<ProbeResult>> {
        let ns = self.netns_path();
        run_probe(&netns_only(&ns), &c.args(), connect_timeout(c))
    }

    /// Start the probe with `args` in the background; see [`Pod::spawn_client`].
    pub fn spawn_client<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Client> {
        let ns = self.netns_path();
        spawn_probe(&self.inner.cluster, &netns_only(&ns), args)
    }

    /// `svclb-probe hold ...` in the background.
    pub fn spawn_hold(&self, h: &Hold) -> Result<Client> {
        self.spawn_client(&h.args())
    }

    /// `svclb-probe serve` on this client (e.g. for pods to reach out to).
    pub fn spawn_server(&self, name: &str, ports: &[u16]) -> Result<Server> {
        let ns = self.netns_path();
        spawn_server(
            &self.inner.cluster,
            &netns_only(&ns),
            &self.inner.name,
            name,
            ports,
        )
    }
}

fn netns_only(ns: &Path) -> Placement<'_> {
    Placement {
        netns: Some(ns),
        cgroup: None,
    }
}

/// Each connect attempt may wait for connect and for the reply.
fn connect_timeout(c: &Connect) -> Duration {
    Duration::from_millis(2 * c.timeout_ms * u64::from(c.count)) + Duration::from_secs(10)
}

fn probe_command<S: AsRef<OsStr>>(args: &[S]) -> Result<Command> {
    let mut c = Command::new(probe::probe_bin()?);
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(c)
}

/// `svclb-probe serve --name NAME --port P...` placed as given (`host`
/// names the pod, node or client in the log file name); returns once all
/// ports listen. Lives until stopped or cluster cleanup.
fn spawn_server(
    cluster: &ClusterInner,
    place: &Placement,
    host: &str,
    name: &str,
    ports: &[u16],
) -> Result<Server> {
    let mut args = vec!["serve".to_string(), "--name".into(), name.into()];
    for p in ports {
        args.extend(["--port".into(), p.to_string()]);
    }
    let mut c = probe_command(&args)?;
    let log_path = cluster.tmp.join(format!("server-{host}-{name}.log"));
    c.stdin(Stdio::null()).stderr(File::create(&log_path)?);
    let mut child = cmd::spawn_placed(&mut c, place)?;
    let stdout = child.stdout.take().expect("piped");
    let proc = Arc::new(Proc::new(format!("server {name}"), child));
    cluster.register(proc.clone())?;
    // The probe prints "listening" after binding every port.
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if line.trim() != "listening" {
        proc.kill();
        bail!(
            "server {name} on {host} did not start: {}",
            fs::read_to_string(&log_path).unwrap_or_default()
        );
    }
    Ok(Server {
        proc,
        name: name.to_string(),
        ports: ports.to_vec(),
    })
}

/// Run the probe to completion and parse each output line.
fn run_probe<T: DeserializeOwned, S: AsRef<OsStr>>(
    place: &Placement,
    args: &[S],
    timeout: Duration,
) -> Result<Vec<T>> {
    let mut c = probe_command(args)?;
    c.stdin(Stdio::null());
    let child = cmd::spawn_placed(&mut c, place)?;
    let out = cmd::wait_output(&c, child, timeout)?;
    parse_lines(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("output of `{}`", cmd::describe(&c)))
}

/// Start the probe in the background; stdin is a pipe that
/// [`Client::finish`] closes.
fn spawn_probe<S: AsRef<OsStr>>(
    cluster: &ClusterInner,
    place: &Placement,
    args: &[S],
) -> Result<Client> {
    let mut c = probe_command(args)?;
    c.stdin(Stdio::piped());
    let mut child = cmd::spawn_placed(&mut c, place)?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let desc = cmd::describe(&c);
    let proc = Arc::new(Proc::new(format!("client {desc}"), child));
    cluster.register(proc.clone())?;
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    // stdout line by line, so a test can look at it while the client runs.
    let seen = Arc::new(Mutex::new(String::new()));
    let lines = seen.clone();
    let stdout = thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut all = lines.lock().unwrap_or_else(|e| e.into_inner());
            all.push_str(&line);
            all.push('\n');
        }
        lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    });
    Ok(Client {
        proc,
        desc,
        stdout,
        seen,
        stderr: read(Box::new(stderr)),
    })
}

fn parse_lines<T: DeserializeOwned>(text: &str) -> Result<Vec<T>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad JSON line {l:?}")))
        .collect()
}

/// A probe server. Stays up until [`Server::stop`] or cluster cleanup.
pub struct Server {
    proc: Arc<Proc>,
    pub name: String,
    pub ports: Vec<u16>,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn stop(&self) {
        self.proc.kill();
    }
}

/// A background probe client.
pub struct Client {
    proc: Arc<Proc>,
    desc: String,
    stdout: thread::JoinHandle<String>,
    /// The whole lines it printed so far.
    seen: Arc<Mutex<String>>,
    stderr: thread::JoinHandle<String>,
}

impl Client {
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// The lines it printed so far, parsed.
    pub fn so_far<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        let text = self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        parse_lines(&text).with_context(|| format!("output of `{}`", self.desc))
    }

    /// Close its stdin (ends `hold --until-eof`), wait for it to exit and
    /// parse its output lines.
    pub fn finish<T: DeserializeOwned>(self) -> Result<Vec<T>> {
        self.proc.with_child(|c| drop(c.stdin.take()));
        let status = self.proc.wait_timeout(CLIENT_TIMEOUT);
        if status.is_none() {
            self.proc.kill();
        }
        let out = self.stdout.join().unwrap_or_default();
        let err = self.stderr.join().unwrap_or_default();
        match status {
            Some(s) if s.success() => {}
            Some(s) => bail!("`{}` failed ({s}): {err}", self.desc),
            None => bail!("`{}` did not finish; stderr: {err}", self.desc),
        }
        parse_lines(&out).with_context(|| format!("output of `{}`", self.desc))
    }

    /// [`Client::finish`] for `hold`: its single summary line.
    pub fn finish_hold(self) -> Result<HoldSummary> {
        let desc = self.desc.clone();
        let mut lines: Vec<HoldSummary> = self.finish()?;
        if lines.len() != 1 {
            bail!("`{desc}` printed {} summary lines", lines.len());
        }
        Ok(lines.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_roundtrip() {
        let name = format!("{PREFIX}{}-{}-n1", base36(4194304), base36(37));
        assert_eq!(owner_pid(&name), Some(4194304));
        assert_eq!(owner_pid("svtzz"), None);
        assert_eq!(owner_pid("other-1"), None);
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
    }
}
