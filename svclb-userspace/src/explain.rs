//! `svclb explain`: what happens to one connection on this node, and why,
//! read from the pinned maps (works with the agent down): the frontend it
//! matches and its Service, the backend set and what a new connection gets,
//! session affinity, source ranges; for external traffic the Maglev pick
//! and, by default, the live XDP program run on a synthetic packet
//! (`explain/dry_run.rs`) without touching any state real traffic sees.
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::Serialize;
use svclb_common::{
    flow_hash, maps, Affinity, AffinityKey, AffinityMatchKey, Flow, FlowKey, FlowKey4, MaglevChunk,
    MaglevKey, ServiceKey, ServiceValue, SourceRangeKey, MAGLEV_CHUNK, SVC_FLAG_AFFINITY,
    SVC_FLAG_DROP_EMPTY, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
};

use crate::cli::{AddrPort, Output};
use crate::dataplane::abi::{
    addr_from_abi, addr_to_abi, proto_to_abi, service_key, FrontendRecord, SourceRange,
};
use crate::dataplane::map_path;
use crate::dump::{BackendDump, FrontendDump};
use crate::model::{FrontendKey, Protocol, Scope};

pub mod dry_run;

/// What to explain: a connection from `from` to `to`.
#[derive(Clone, Debug)]
pub struct Request {
    pub from: AddrPort,
    pub to: SocketAddr,
    pub protocol: Protocol,
    /// Arriving from outside the node (XDP) instead of made on it.
    pub external: bool,
    /// The device the packet arrives on (external; for the XDP run's route
    /// lookup). None: ingress ifindex 0.
    pub device: Option<String>,
    /// Skip running the XDP program (external): computed answers only.
    pub no_run: bool,
    /// The client's network namespace (a file such as /proc/PID/ns/net):
    /// the socket hooks' affinity is kept per namespace cookie.
    pub client_netns: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub protocol: String,
    /// "socket" (a connection made on this node: the cgroup hooks) or
    /// "external" (a packet arriving at --devices: XDP).
    pub scope: &'static str,
    /// What happens: "translated", "refused", "dropped", "not a service".
    pub verdict: &'static str,
    /// Why, in one sentence.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frontend: Option<FrontendDump>,
    /// ClusterIP, NodePort, ExternalIP or LoadBalancer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// With no backend: whether the frontend drops (a Local traffic policy
    /// with endpoints elsewhere only) or refuses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when_empty: Option<&'static str>,
    /// The backends a new connection may get, with their probability.
    pub new_connection: Vec<Choice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<AffinityState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_ranges: Option<SourceRangeVerdict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maglev: Option<MaglevPick>,
    /// A live conntrack entry for this exact tuple: its packets follow it,
    /// not the Maglev table (external, with a client port).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracked: Option<Tracked>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xdp_run: Option<dry_run::XdpRun>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub backend: BackendDump,
    pub probability: f64,
}

#[derive(Debug, Serialize)]
pub struct AffinityState {
    pub timeout_seconds: u32,
    /// The cookie of --client-netns, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_netns_cookie: Option<u64>,
    /// This client's remembered backend, in effect: its next connection
    /// goes there (socket scope, with --client-netns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_backend: Option<BackendDump>,
    /// Socket scope: the clients the programs remember, by network
    /// namespace cookie (the socket hooks' notion of a client).
    pub remembered: Vec<AffinityEntry>,
}

#[derive(Debug, Serialize)]
pub struct AffinityEntry {
    pub client_netns_cookie: u64,
    pub backend_id: u32,
    pub idle_seconds: u64,
    /// Within the timeout and the backend still a member: the client's next
    /// connection goes there.
    pub in_effect: bool,
}

#[derive(Debug, Serialize)]
pub struct SourceRangeVerdict {
    pub allowed: bool,
    pub ranges: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct MaglevPick {
    pub table_size: u32,
    pub generation: u16,
    /// flow_hash(client address, client port (0 with affinity), protocol).
    pub hash: u32,
    pub index: u32,
    pub backend_id: u32,
}

#[derive(Debug, Serialize)]
pub struct Tracked {
    pub backend_id: u32,
    /// The packet's addresses after translation.
    pub translated_to: String,
    pub translated_from: String,
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &'static str,
    lru: bool,
) -> anyhow::Result<BpfHashMap<MapData, K, V>> {
    let path = map_path(bpffs, name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is an agent using {}?)",
            path.display(),
            bpffs.display()
        )
    })?;
    let map = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    BpfHashMap::try_from(map)
        .with_context(|| format!("{} is not the map svclb expects", path.display()))
}

pub fn explain(bpffs: &Path, req: &Request) -> anyhow::Result<Explanation> {
    let scope = if req.external {
        Scope::External
    } else {
        Scope::Socket
    };
    let fk = FrontendKey {
        addr: req.to.ip(),
        port: req.to.port(),
        protocol: req.protocol,
        scope,
    };
    let mut e = Explanation {
        from: match req.from.port {
            Some(p) => SocketAddr::new(req.from.addr, p).to_string(),
            None => req.from.addr.to_string(),
        },
        to: req.to.to_string(),
        protocol: req.protocol.to_string(),
        scope: scope_name(scope),
        verdict: "not a service",
        reason: String::new(),
        frontend: None,
        kind: None,
        when_empty: None,
        new_connection: Vec::new(),
        affinity: None,
        source_ranges: None,
        maglev: None,
        tracked: None,
        xdp_run: None,
        notes: Vec::new(),
    };
    let services = open_hash::<ServiceKey, ServiceValue>(bpffs, maps::SERVICES, false)?;
    let Ok(slot0) = services.get(&service_key(&fk, 0), 0) else {
        e.reason = format!(
            "no {} frontend {} {}: the {} leaves it alone",
            scope_name(scope),
            req.to,
            req.protocol,
            if req.external {
                "XDP program"
            } else {
                "socket hook"
            }
        );
        if req.external {
            run_xdp(bpffs, req, &mut e);
        }
        return Ok(e);
    };
    let record = FrontendRecord::from_abi(&slot0);
    let frontend = crate::dump::read(bpffs)?
        .frontends
        .into_iter()
        .find(|f| {
            f.scope == scope_name(scope)
                && f.port == fk.port
                && f.protocol == fk.protocol.to_string()
                && f.address.parse::<IpAddr>().is_ok_and(|a| a == fk.addr)
        })
        .context("the frontend went away while reading the maps")?;
    let flags = slot0.flags;
    e.kind = record
        .settings
        .flag_names()
        .into_iter()
        .find(|n| ["ClusterIP", "NodePort", "ExternalIP", "LoadBalancer"].contains(n));
    e.when_empty = Some(if flags & SVC_FLAG_DROP_EMPTY != 0 {
        "drop"
    } else {
        "refuse"
    });
    let name = frontend
        .service
        .clone()
        .unwrap_or_else(|| "(unnamed)".into());
    if req.external {
        external(bpffs, req, &slot0, &frontend, &mut e)?;
    } else {
        socket(bpffs, req, &slot0, &frontend, &name, &mut e)?;
    }
    e.frontend = Some(frontend);
    if req.external {
        run_xdp(bpffs, req, &mut e);
    }
    Ok(e)
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Socket => "socket",
        Scope::External => "external",
    }
}

/// The connect/sendmsg hooks: a uniformly random slot, unless affinity
/// (or a UDP socket's flow) remembers a backend.
fn socket(
    bpffs: &Path,
    req: &Request,
    slot0: &ServiceValue,
    f: &FrontendDump,
    name: &str,
    e: &mut Explanation,
) -> anyhow::Result<()> {
    if slot0.count == 0 {
        empty_verdict(slot0, name, e);
        return Ok(());
    }
    e.verdict = "translated";
    e.new_connection = slot_shares(&f.backends);
    e.reason = format!(
        "{name}: a new connection goes to one of {} backend slots, uniformly at random",
        slot0.count
    );
    if slot0.flags & SVC_FLAG_AFFINITY != 0 {
        let remembered = affinity_entries(bpffs, slot0)?;
        let cookie = match &req.client_netns {
            Some(path) => Some(netns_cookie(path)?),
            None => None,
        };
        let client_backend = cookie
            .and_then(|c| {
                remembered
                    .iter()
                    .find(|r| r.client_netns_cookie == c && r.in_effect)
            })
            .and_then(|r| f.backends.iter().find(|b| b.id == r.backend_id))
            .map(clone_backend);
        if let Some(b) = &client_backend {
            e.reason = format!(
                "{name}: session affinity: this client's next connection goes to {}:{} \
                 (remembered, within {} s of idle time)",
                b.address, b.port, slot0.affinity_timeout
            );
            e.new_connection = vec![Choice {
                backend: clone_backend(b),
                probability: 1.0,
            }];
        }
        e.affinity = Some(AffinityState {
            timeout_seconds: slot0.affinity_timeout,
            client_netns_cookie: cookie,
            client_backend,
            remembered,
        });
        e.notes.push(format!(
            "session affinity: a client is a network namespace (by its cookie), which the \
             address {} does not name (--client-netns does); a client the programs remember \
             (listed) keeps its backend for {} s of idle time, any other gets a random one",
            req.from.addr, slot0.affinity_timeout
        ));
    }
    if req.protocol == Protocol::Udp {
        e.notes.push(
            "unconnected UDP: a socket that sent to this frontend within the UDP timeout keeps \
             its backend while it is a member (per socket, not per address)"
                .into(),
        );
    }
    Ok(())
}

/// A frontend with no backend: refused or dropped (socket and external
/// agree, except that XDP lets an empty NodePort through to the stack).
fn empty_verdict(slot0: &ServiceValue, name: &str, e: &mut Explanation) {
    if slot0.flags & SVC_FLAG_DROP_EMPTY != 0 {
        e.verdict = "dropped";
        e.reason = format!(
            "{name} has no backend for this traffic (a Local traffic policy with endpoints on \
             other nodes only): dropped"
        );
    } else {
        e.verdict = "refused";
        e.reason =
            format!("{name} has no endpoints: refused (ECONNREFUSED, as kube-proxy's REJECT)");
    }
}

/// Each backend's share of the slots (a random slot picks it).
fn slot_shares(backends: &[BackendDump]) -> Vec<Choice> {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for b in backends {
        *counts.entry(b.id).or_default() += 1;
    }
    let total = backends.len().max(1) as f64;
    let mut seen = std::collections::HashSet::new();
    backends
        .iter()
        .filter(|b| seen.insert(b.id))
        .map(|b| Choice {
            backend: clone_backend(b),
            probability: counts[&b.id] as f64 / total,
        })
        .collect()
}

fn clone_backend(b: &BackendDump) -> BackendDump {
    BackendDump {
        id: b.id,
        address: b.address.clone(),
        port: b.port,
        state: b.state,
        local: b.local,
    }
}

fn affinity_entries(bpffs: &Path, slot0: &ServiceValue) -> anyhow::Result<Vec<AffinityEntry>> {
    let affinity = open_hash::<AffinityKey, Affinity>(bpffs, maps::AFFINITY, true)?;
    let members = open_hash::<AffinityMatchKey, u8>(bpffs, maps::AFFINITY_MATCH, false)?;
    let now = monotonic_ns();
    let timeout_ns = u64::from(slot0.affinity_timeout) * 1_000_000_000;
    let mut out: Vec<AffinityEntry> = affinity
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.rev_nat_id == slot0.rev_nat_id)
        .map(|(k, v)| {
            let idle = now.saturating_sub(v.last_used_ns);
            let member = members
                .get(
                    &AffinityMatchKey {
                        rev_nat_id: slot0.rev_nat_id,
                        backend_id: v.backend_id,
                    },
                    0,
                )
                .is_ok();
            AffinityEntry {
                client_netns_cookie: k.client,
                backend_id: v.backend_id,
                idle_seconds: idle / 1_000_000_000,
                in_effect: idle <= timeout_ns && member,
            }
        })
        .collect();
    out.sort_by_key(|a| a.client_netns_cookie);
    Ok(out)
}

/// The cookie of the network namespace at `path`, asked from a thread that
/// enters it (setns affects only the calling thread).
fn netns_cookie(path: &Path) -> anyhow::Result<u64> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let cookie = std::thread::spawn(move || -> std::io::Result<u64> {
        // SAFETY: setns on a descriptor we own; only this thread moves.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        crate::dataplane::loader::own_netns_cookie()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the netns thread panicked"))?;
    cookie.with_context(|| format!("the network namespace cookie of {}", path.display()))
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The XDP program's new-flow decision (`svclb-ebpf/src/external.rs`
/// `new_flow`), computed from the maps in the same order.
fn external(
    bpffs: &Path,
    req: &Request,
    slot0: &ServiceValue,
    f: &FrontendDump,
    e: &mut Explanation,
) -> anyhow::Result<()> {
    let name = f.service.clone().unwrap_or_else(|| "(unnamed)".into());
    let src = addr_to_abi(req.from.addr);
    if slot0.flags & SVC_FLAG_SOURCE_RANGES != 0 {
        let verdict = source_ranges(bpffs, slot0.rev_nat_id, src)?;
        let allowed = verdict.allowed;
        e.source_ranges = Some(verdict);
        if !allowed {
            e.verdict = "dropped";
            e.reason = format!(
                "{name}: {} is outside the loadBalancerSourceRanges: dropped",
                req.from.addr
            );
            return Ok(());
        }
    }
    if slot0.count == 0 || slot0.maglev_size == 0 {
        empty_verdict(slot0, &name, e);
        if slot0.flags & SVC_FLAG_DROP_EMPTY == 0 && slot0.flags & SVC_FLAG_NODE_PORT != 0 {
            e.reason.push_str(
                " (XDP passes it to the stack: nothing listens on the node port, so the \
                 stack answers with a reset or port unreachable)",
            );
        } else if slot0.flags & SVC_FLAG_DROP_EMPTY == 0 {
            e.verdict = "dropped";
            e.reason = format!(
                "{name} has no endpoints: dropped (the address is not the node's, the stack \
                 would route it)"
            );
        }
        return Ok(());
    }
    let table = maglev_table(bpffs, slot0)?;
    e.new_connection = table_shares(&table, &f.backends);
    let affinity = slot0.flags & SVC_FLAG_AFFINITY != 0;
    let sport = if affinity { Some(0) } else { req.from.port };
    e.verdict = "translated";
    match sport {
        Some(sport) => {
            let hash = flow_hash(&src, sport, proto_to_abi(req.protocol));
            let index = hash % slot0.maglev_size;
            let backend_id = table.get(index as usize).copied().unwrap_or(0);
            e.maglev = Some(MaglevPick {
                table_size: slot0.maglev_size,
                generation: slot0.maglev_generation,
                hash,
                index,
                backend_id,
            });
            let backend = f.backends.iter().find(|b| b.id == backend_id);
            e.reason = match backend {
                Some(b) => format!(
                    "{name}: a new flow hashes to Maglev entry {index} of {}: backend {} ({})",
                    slot0.maglev_size,
                    SocketAddr::new(b.address.parse().unwrap_or(req.from.addr), b.port),
                    if b.local {
                        "on this node: DNAT only, the client's address kept"
                    } else {
                        "on another node: SNAT to this node's address and a port of --snat-ports"
                    }
                ),
                None => format!("{name}: Maglev entry {index} names no backend: dropped"),
            };
            if backend.is_none() {
                e.verdict = "dropped";
            }
        }
        None => {
            e.reason = format!(
                "{name}: the backend depends on the client port (Maglev over address, port and \
                 protocol); give --from ADDR:PORT for one flow's backend"
            );
        }
    }
    if affinity {
        e.affinity = Some(AffinityState {
            timeout_seconds: slot0.affinity_timeout,
            client_netns_cookie: None,
            client_backend: None,
            remembered: Vec::new(),
        });
        e.notes.push(
            "session affinity (external): the Maglev hash uses the client address only, so this \
             client gets the same backend on every node while the backend set is stable"
                .into(),
        );
    }
    if let Some(sport) = req.from.port {
        e.tracked = tracked(bpffs, req, sport)?;
        if let Some(t) = &e.tracked {
            let differs = e
                .maglev
                .as_ref()
                .is_some_and(|m| m.backend_id != t.backend_id);
            e.notes.push(format!(
                "a conntrack entry exists for this tuple: its packets go to {} (backend {}){}",
                t.translated_to,
                t.backend_id,
                if differs {
                    ", not to the Maglev pick, until the flow expires or a SYN on a draining \
                     backend starts over"
                } else {
                    ""
                }
            ));
        }
    }
    Ok(())
}

fn source_ranges(
    bpffs: &Path,
    rev_nat_id: u32,
    src: [u32; 4],
) -> anyhow::Result<SourceRangeVerdict> {
    let path = map_path(bpffs, maps::SOURCE_RANGES);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let trie: LpmTrie<MapData, SourceRangeKey, u8> = LpmTrie::try_from(Map::LpmTrie(data))?;
    let key = SourceRangeKey {
        rev_nat_id_be: rev_nat_id.to_be(),
        addr: src,
    };
    let allowed = trie.get(&LpmKey::new(32 + 128, key), 0).is_ok();
    let mut ranges: Vec<String> = trie
        .keys()
        .filter_map(Result::ok)
        .map(|k| SourceRange::from_abi(k.prefix_len(), &k.data()))
        .filter(|r| r.rev_nat_id == rev_nat_id)
        .map(|r| r.cidr().to_string())
        .collect();
    ranges.sort();
    Ok(SourceRangeVerdict { allowed, ranges })
}

/// The frontend's current Maglev table (backend ids), as XDP reads it.
fn maglev_table(bpffs: &Path, slot0: &ServiceValue) -> anyhow::Result<Vec<u32>> {
    let chunks = open_hash::<MaglevKey, MaglevChunk>(bpffs, maps::MAGLEV, false)?;
    let size = slot0.maglev_size as usize;
    let mut table = Vec::with_capacity(size);
    for chunk in 0..slot0.maglev_size.div_ceil(MAGLEV_CHUNK) {
        let key = MaglevKey {
            rev_nat_id: slot0.rev_nat_id,
            generation: slot0.maglev_generation,
            chunk: chunk as u16,
        };
        let ids = chunks
            .get(&key, 0)
            .map(|c| c.backend_ids)
            .unwrap_or([0; MAGLEV_CHUNK as usize]);
        table.extend_from_slice(&ids);
    }
    table.truncate(size);
    Ok(table)
}

/// Each backend's share of the Maglev table: the probability that a new
/// flow from a random client port lands on it.
fn table_shares(table: &[u32], backends: &[BackendDump]) -> Vec<Choice> {
    let mut counts: HashMap<u32, usize> = HashMap::new();
    for id in table {
        *counts.entry(*id).or_default() += 1;
    }
    let total = table.len().max(1) as f64;
    let mut seen = std::collections::HashSet::new();
    backends
        .iter()
        .filter(|b| seen.insert(b.id))
        .map(|b| Choice {
            backend: clone_backend(b),
            probability: counts.get(&b.id).copied().unwrap_or(0) as f64 / total,
        })
        .collect()
}

/// The live conntrack entry of the client -> frontend tuple, read only.
fn tracked(bpffs: &Path, req: &Request, sport: u16) -> anyhow::Result<Option<Tracked>> {
    let key = FlowKey {
        src: addr_to_abi(req.from.addr),
        dst: addr_to_abi(req.to.ip()),
        sport,
        dport: req.to.port(),
        proto: proto_to_abi(req.protocol),
        _pad: 0,
        _pad2: 0,
    };
    let flow: Option<Flow> = if req.from.addr.is_ipv4() {
        open_hash::<FlowKey4, Flow>(bpffs, maps::CONNTRACK4, true)?
            .get(&FlowKey4::from_mapped(&key), 0)
            .ok()
    } else {
        open_hash::<FlowKey, Flow>(bpffs, maps::CONNTRACK6, true)?
            .get(&key, 0)
            .ok()
    };
    Ok(flow
        .filter(|f| f.direction == svclb_common::FLOW_INGRESS && f.backend_id != 0)
        .map(|f| Tracked {
            backend_id: f.backend_id,
            translated_from: SocketAddr::new(addr_from_abi(f.src), f.sport).to_string(),
            translated_to: SocketAddr::new(addr_from_abi(f.dst), f.dport).to_string(),
        }))
}

fn run_xdp(bpffs: &Path, req: &Request, e: &mut Explanation) {
    if req.no_run {
        e.notes
            .push("--no-run: the XDP program was not run; the answers above are computed".into());
        return;
    }
    match dry_run::run(bpffs, req) {
        Ok(run) => {
            if let Some(w) = run.disagrees(e.verdict) {
                e.notes.push(w);
            }
            e.xdp_run = Some(run);
        }
        Err(err) => e.notes.push(format!(
            "the XDP program could not be run ({err:#}); the answers above are computed from the \
             maps"
        )),
    }
}

pub fn run(bpffs: &Path, req: &Request, output: Output) -> anyhow::Result<()> {
    let e = explain(bpffs, req)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
        Output::Table => print!("{}", text(&e)),
    }
    Ok(())
}

pub fn text(e: &Explanation) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} -> {} {} ({} scope)",
        e.from, e.to, e.protocol, e.scope
    );
    let _ = writeln!(out, "verdict:   {}", e.verdict);
    let _ = writeln!(out, "why:       {}", e.reason);
    if let Some(f) = &e.frontend {
        let service = match (&f.service, f.port_name.as_deref()) {
            (Some(s), Some("") | None) => s.clone(),
            (Some(s), Some(p)) => format!("{s}:{p}"),
            (None, _) => "(not recorded)".into(),
        };
        let _ = writeln!(out, "service:   {service}");
        let _ = writeln!(
            out,
            "frontend:  {} rev-NAT {} flags {}",
            e.kind.unwrap_or("?"),
            f.rev_nat_id,
            f.flags.join(",")
        );
        if let Some(w) = e.when_empty {
            let _ = writeln!(out, "if empty:  {w}");
        }
        let _ = writeln!(out, "backends:  {}", f.backends.len());
        for b in &f.backends {
            let share = e
                .new_connection
                .iter()
                .find(|c| c.backend.id == b.id)
                .map_or(0.0, |c| c.probability);
            let _ = writeln!(
                out,
                "  {:<28} id {:<6} {:<12}{:<7} new connections: {:.1}%",
                SocketAddr::new(b.address.parse().unwrap_or([0; 4].into()), b.port).to_string(),
                b.id,
                b.state,
                if b.local { "local" } else { "" },
                share * 100.0
            );
        }
    }
    if let Some(s) = &e.source_ranges {
        let _ = writeln!(
            out,
            "source ranges: {} -> {}",
            s.ranges.join(", "),
            if s.allowed { "allowed" } else { "denied" }
        );
    }
    if let Some(m) = &e.maglev {
        let _ = writeln!(
            out,
            "maglev:    hash {:#010x} -> entry {} of {} (generation {}) -> backend id {}",
            m.hash, m.index, m.table_size, m.generation, m.backend_id
        );
    }
    if let Some(a) = &e.affinity {
        let _ = writeln!(
            out,
            "affinity:  ClientIP, {} s; {} client(s) remembered",
            a.timeout_seconds,
            a.remembered.len()
        );
        if let Some(c) = a.client_netns_cookie {
            let at = match &a.client_backend {
                Some(b) => format!("remembered: {}:{}", b.address, b.port),
                None => "nothing in effect: a new connection picks at random".into(),
            };
            let _ = writeln!(out, "  this client: netns cookie {c}, {at}");
        }
        for r in &a.remembered {
            let _ = writeln!(
                out,
                "  netns cookie {:<12} -> backend id {:<6} idle {} s{}",
                r.client_netns_cookie,
                r.backend_id,
                r.idle_seconds,
                if r.in_effect { "" } else { " (expired)" }
            );
        }
    }
    if let Some(t) = &e.tracked {
        let _ = writeln!(
            out,
            "tracked:   {} -> {} (backend id {})",
            t.translated_from, t.translated_to, t.backend_id
        );
    }
    if let Some(r) = &e.xdp_run {
        out.push_str(&r.text());
    }
    for n in &e.notes {
        let _ = writeln!(out, "note: {n}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(id: u32, last: u8) -> BackendDump {
        BackendDump {
            id,
            address: format!("198.18.1.{last}"),
            port: 8080,
            state: "active",
            local: false,
        }
    }

    #[test]
    fn shares_are_slots_and_table_entries() {
        let set = [backend(1, 1), backend(2, 2), backend(3, 3)];
        let slots = slot_shares(&set);
        assert_eq!(slots.len(), 3);
        assert!(slots
            .iter()
            .all(|c| (c.probability - 1.0 / 3.0).abs() < 1e-9));
        // A table that names backend 2 three times as often as 1, never 3.
        let table = [1, 2, 2, 2, 1, 2, 2, 2];
        let shares: Vec<(u32, f64)> = table_shares(&table, &set)
            .iter()
            .map(|c| (c.backend.id, c.probability))
            .collect();
        assert_eq!(shares, [(1, 0.25), (2, 0.75), (3, 0.0)]);
    }

    #[test]
    fn a_run_that_contradicts_the_computed_verdict_is_reported() {
        let headers = |dst: &str| dry_run::Headers {
            eth_dst: String::new(),
            eth_src: String::new(),
            src: "198.18.0.200:40000".into(),
            dst: dst.into(),
        };
        let run = |verdict, out: &str| dry_run::XdpRun {
            verdict,
            device: None,
            packet_in: headers("198.18.0.1:30080"),
            rewritten: out != "198.18.0.1:30080",
            packet_out: headers(out),
        };
        assert!(run("XDP_TX", "198.18.2.2:8080")
            .disagrees("translated")
            .is_none());
        assert!(run("XDP_DROP", "198.18.0.1:30080")
            .disagrees("dropped")
            .is_none());
        assert!(run("XDP_PASS", "198.18.0.1:30080")
            .disagrees("refused")
            .is_none());
        assert!(run("XDP_PASS", "198.18.0.1:30080")
            .disagrees("translated")
            .is_some());
        assert!(run("XDP_PASS", "198.18.1.2:8080")
            .disagrees("dropped")
            .is_some());
    }
}
