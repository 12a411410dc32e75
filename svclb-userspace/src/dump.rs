//! `svclb maps dump`: what the kernel is doing, read from the pinned maps.
//! Works while an agent runs and after it has stopped.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::Serialize;
use svclb_common::{
    maps, Backend, ServiceKey, ServiceValue, BACKEND_TERMINATING, SVC_FLAG_AFFINITY,
    SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXTERNAL_IP, SVC_FLAG_LOAD_BALANCER,
    SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
};

use crate::cli::Output;
use crate::dataplane::abi::{addr_from_abi, frontend_key};
use crate::dataplane::{entries, map_path};
use crate::model::{FrontendKey, Scope};

#[derive(Debug, Serialize)]
pub struct Dump {
    pub frontends: Vec<FrontendDump>,
    /// The external path's conntrack map, when the agent used --devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackDump>,
}

#[derive(Debug, Serialize)]
pub struct ConntrackDump {
    pub entries: usize,
    pub capacity: usize,
    pub flows_created: u64,
    pub evictions: u64,
}

#[derive(Debug, Serialize)]
pub struct FrontendDump {
    pub address: String,
    pub port: u16,
    pub protocol: String,
    /// "socket" (connections from this node) or "external" (XDP).
    pub scope: &'static str,
    pub rev_nat_id: u32,
    pub flags: Vec<&'static str>,
    /// ClientIP session affinity timeout in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity_timeout: Option<u32>,
    pub backends: Vec<BackendDump>,
}

#[derive(Debug, Serialize)]
pub struct BackendDump {
    pub id: u32,
    pub address: String,
    pub port: u16,
    /// "active", "terminating", or "missing" (a slot naming no backend: a bug).
    pub state: &'static str,
    /// On this node (external traffic reaches it without SNAT).
    pub local: bool,
}

fn open<K: aya::Pod, V: aya::Pod>(
    bpffs: &Path,
    name: &'static str,
) -> anyhow::Result<BpfHashMap<MapData, K, V>> {
    let path = map_path(bpffs, name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is an agent using {}?)",
            path.display(),
            bpffs.display()
        )
    })?;
    BpfHashMap::try_from(Map::HashMap(data))
        .with_context(|| format!("{} is not the map svclb expects", path.display()))
}

pub fn read(bpffs: &Path) -> anyhow::Result<Dump> {
    let services = entries(
        &open::<ServiceKey, ServiceValue>(bpffs, maps::SERVICES)?,
        maps::SERVICES,
    )?;
    let backends: HashMap<u32, Backend> = entries(
        &open::<u32, Backend>(bpffs, maps::BACKENDS)?,
        maps::BACKENDS,
    )?
    .into_iter()
    .collect();
    let mut records: BTreeMap<FrontendKey, ServiceValue> = BTreeMap::new();
    let mut slots: HashMap<(FrontendKey, u16), u32> = HashMap::new();
    for (key, value) in services {
        let Some(fk) = frontend_key(&key) else {
            continue;
        };
        if key.slot == 0 {
            records.insert(fk, value);
        } else {
            slots.insert((fk, key.slot), value.backend_id);
        }
    }
    let frontends: Vec<FrontendDump> = records
        .into_iter()
        .map(|(fk, record)| FrontendDump {
            address: fk.addr.to_string(),
            port: fk.port,
            protocol: fk.protocol.to_string(),
            scope: match fk.scope {
                Scope::Socket => "socket",
                Scope::External => "external",
            },
            rev_nat_id: record.rev_nat_id,
            flags: flag_names(record.flags),
            affinity_timeout: (record.flags & SVC_FLAG_AFFINITY != 0)
                .then_some(record.affinity_timeout),
            backends: (1..=record.count)
                .map(|slot| {
                    let id = slots.get(&(fk, slot)).copied().unwrap_or(0);
                    match backends.get(&id) {
                        Some(b) => BackendDump {
                            id,
                            address: addr_from_abi(b.addr).to_string(),
                            port: b.port,
                            state: if b.state == BACKEND_TERMINATING {
                                "terminating"
                            } else {
                                "active"
                            },
                            local: b.local != 0,
                        },
                        None => BackendDump {
                            id,
                            address: String::new(),
                            port: 0,
                            state: "missing",
                            local: false,
                        },
                    }
                })
                .collect(),
        })
        .collect();
    // Only agents with --devices use the conntrack map.
    let conntrack = frontends_have_external(&frontends)
        .then(|| crate::dataplane::read_external_stats(bpffs).ok())
        .flatten()
        .map(|x| ConntrackDump {
            entries: x.conntrack_entries,
            capacity: x.conntrack_capacity,
            flows_created: x.counter(svclb_common::stats::CT_CREATED),
            evictions: x.conntrack_evictions(),
        });
    Ok(Dump {
        frontends,
        conntrack,
    })
}

fn frontends_have_external(frontends: &[FrontendDump]) -> bool {
    frontends.iter().any(|f| f.scope == "external")
}

fn flag_names(flags: u16) -> Vec<&'static str> {
    [
        (SVC_FLAG_CLUSTER_IP, "ClusterIP"),
        (SVC_FLAG_NODE_PORT, "NodePort"),
        (SVC_FLAG_EXTERNAL_IP, "ExternalIP"),
        (SVC_FLAG_LOAD_BALANCER, "LoadBalancer"),
        (SVC_FLAG_DROP_EMPTY, "DropEmpty"),
        (SVC_FLAG_AFFINITY, "Affinity"),
        (SVC_FLAG_SOURCE_RANGES, "SourceRanges"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

pub fn run(bpffs: &Path, output: Output) -> anyhow::Result<()> {
    let dump = read(bpffs)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&dump)?),
        Output::Table => print!("{}", table(&dump)),
    }
    Ok(())
}

fn table(dump: &Dump) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:<22} {:<8} BACKENDS",
        "FRONTEND", "FLAGS", "REV-NAT"
    );
    for f in &dump.frontends {
        let mut frontend = if f.address.contains(':') {
            format!("[{}]:{}/{}", f.address, f.port, f.protocol)
        } else {
            format!("{}:{}/{}", f.address, f.port, f.protocol)
        };
        if f.scope == "external" {
            frontend.push_str(" ext");
        }
        let backends: Vec<String> = f
            .backends
            .iter()
            .map(|b| {
                let addr = if b.address.contains(':') {
                    format!("[{}]:{}", b.address, b.port)
                } else {
                    format!("{}:{}", b.address, b.port)
                };
                let local = if f.scope == "external" && b.local {
                    ", local"
                } else {
                    ""
                };
                format!("{addr} ({}{local}, id {})", b.state, b.id)
            })
            .collect();
        let first = if backends.is_empty() && f.flags.contains(&"DropEmpty") {
            "(none here: connections dropped)".to_string()
        } else if backends.is_empty() {
            "(none: connections refused)".to_string()
        } else {
            backends[0].clone()
        };
        let _ = writeln!(
            out,
            "{:<40} {:<22} {:<8} {}",
            frontend,
            f.flags.join(","),
            f.rev_nat_id,
            first
        );
        for b in backends.iter().skip(1) {
            let _ = writeln!(out, "{:<40} {:<22} {:<8} {}", "", "", "", b);
        }
    }
    if let Some(ct) = &dump.conntrack {
        let _ = writeln!(
            out,
            "conntrack: {} of {} entries, {} flows created, {} entries evicted",
            ct.entries, ct.capacity, ct.flows_created, ct.evictions
        );
    }
    out
}
