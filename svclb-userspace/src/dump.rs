//! `svclb maps dump`: what the kernel is doing, read from the pinned maps.
//! Works while an agent runs and after it has stopped.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use serde::Serialize;
use svclb_common::{maps, Backend, ServiceKey, ServiceValue, UdpFlow, UdpFlowKey};

use crate::cli::{FrontendFilter, Output};
use crate::dataplane::abi::{service_entry, BackendRecord, FrontendRecord, ServiceEntry};
use crate::dataplane::{entries, map_path};
use crate::model::{FrontendKey, Scope};

#[derive(Debug, Serialize)]
pub struct Dump {
    pub frontends: Vec<FrontendDump>,
    /// Backends no frontend's slots name, kept while established external
    /// flows may still use them (terminating endpoints that still serve).
    pub draining: Vec<BackendDump>,
    /// The external path's conntrack map, when the agent used --devices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<ConntrackDump>,
    /// Unconnected UDP flows the socket programs remember (none when the
    /// map is missing: an agent of an older version).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_flows: Option<UdpFlowsDump>,
}

#[derive(Debug, Serialize)]
pub struct UdpFlowsDump {
    /// Entries, expired ones included: the programs check their age when
    /// they use them, and the LRU map reuses the oldest when full.
    pub entries: usize,
    pub capacity: u32,
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
    /// The Service (namespace/name) and its port's name, as the agent
    /// recorded them (None: written by an agent that did not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
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
    /// "active", "terminating", "draining" (established flows only), or
    /// "missing" (a slot naming no backend: a bug).
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
    let backends: HashMap<u32, BackendRecord> = entries(
        &open::<u32, Backend>(bpffs, maps::BACKENDS)?,
        maps::BACKENDS,
    )?
    .iter()
    .map(|(id, b)| (*id, BackendRecord::from_abi(b)))
    .collect();
    let mut records: BTreeMap<FrontendKey, FrontendRecord> = BTreeMap::new();
    let mut slots: HashMap<(FrontendKey, u16), u32> = HashMap::new();
    for (key, value) in &services {
        match service_entry(key, value) {
            Some(ServiceEntry::Frontend(fk, record)) => {
                records.insert(fk, record);
            }
            Some(ServiceEntry::Slot(fk, slot, backend_id)) => {
                slots.insert((fk, slot), backend_id);
            }
            None => {}
        }
    }
    let names = crate::dataplane::names::read(bpffs);
    let frontends: Vec<FrontendDump> = records
        .iter()
        .map(|(fk, record)| {
            let backends = (1..=record.count).map(|slot| {
                let id = slots.get(&(*fk, slot)).copied().unwrap_or(0);
                backend_dump(id, backends.get(&id))
            });
            let mut f = frontend_dump(fk, record, backends.collect());
            if let Some(n) = names.get(&record.rev_nat_id) {
                f.service = Some(n.service.clone());
                f.port_name = Some(n.port_name.clone());
            }
            f
        })
        .collect();
    let named: std::collections::HashSet<u32> = slots.values().copied().collect();
    let mut draining: Vec<BackendDump> = backends
        .iter()
        .filter(|(id, b)| !named.contains(id) && b.state == svclb_common::BACKEND_DRAINING)
        .map(|(id, b)| backend_dump(*id, Some(b)))
        .collect();
    draining.sort_by_key(|b| b.id);
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
        draining,
        conntrack,
        udp_flows: udp_flows(bpffs),
    })
}

fn udp_flows(bpffs: &Path) -> Option<UdpFlowsDump> {
    let data = MapData::from_pin(map_path(bpffs, maps::UDP_FLOWS)).ok()?;
    let map: BpfHashMap<MapData, UdpFlowKey, UdpFlow> =
        BpfHashMap::try_from(Map::LruHashMap(data)).ok()?;
    Some(UdpFlowsDump {
        entries: map.keys().filter(Result::is_ok).count(),
        capacity: maps::UDP_FLOWS_MAX_ENTRIES,
    })
}

fn frontend_dump(
    fk: &FrontendKey,
    record: &FrontendRecord,
    backends: Vec<BackendDump>,
) -> FrontendDump {
    let settings = &record.settings;
    FrontendDump {
        address: fk.addr.to_string(),
        port: fk.port,
        protocol: fk.protocol.to_string(),
        scope: match fk.scope {
            Scope::Socket => "socket",
            Scope::External => "external",
        },
        rev_nat_id: record.rev_nat_id,
        service: None,
        port_name: None,
        flags: settings.flag_names(),
        affinity_timeout: settings.affinity().then_some(settings.affinity_timeout),
        backends,
    }
}

/// The backend a slot names; None: the slot names no backend (a bug).
fn backend_dump(id: u32, backend: Option<&BackendRecord>) -> BackendDump {
    match backend {
        Some(b) => BackendDump {
            id,
            address: b.addr.to_string(),
            port: b.port,
            state: b.state_name(),
            local: b.local,
        },
        None => BackendDump {
            id,
            address: String::new(),
            port: 0,
            state: "missing",
            local: false,
        },
    }
}

fn frontends_have_external(frontends: &[FrontendDump]) -> bool {
    frontends.iter().any(|f| f.scope == "external")
}

impl FrontendDump {
    /// Whether `filter` selects this frontend.
    pub fn matches(&self, filter: &FrontendFilter) -> bool {
        let service = filter
            .service
            .as_ref()
            .is_none_or(|s| self.service.as_deref() == Some(s.to_string().as_str()));
        let frontend = filter.frontend.is_none_or(|at| {
            self.address
                .parse()
                .is_ok_and(|addr: std::net::IpAddr| at.matches((addr, self.port).into()))
        });
        let scope = filter.scope.is_none_or(|s| s.name() == self.scope);
        service && frontend && scope
    }

    /// namespace/name:port-name, "" when unknown.
    fn service_cell(&self) -> String {
        match (&self.service, self.port_name.as_deref()) {
            (Some(s), Some("") | None) => s.clone(),
            (Some(s), Some(p)) => format!("{s}:{p}"),
            (None, _) => String::new(),
        }
    }
}

/// Keep the frontends `filter` selects; with any filter, the node-wide
/// parts (draining backends, conntrack, UDP flows) are left out.
pub fn filter(mut dump: Dump, filter: &FrontendFilter) -> Dump {
    let any = filter.service.is_some() || filter.frontend.is_some() || filter.scope.is_some();
    if any {
        dump.frontends.retain(|f| f.matches(filter));
        dump.draining.clear();
        dump.conntrack = None;
        dump.udp_flows = None;
    }
    dump
}

pub fn run(bpffs: &Path, frontend_filter: &FrontendFilter, output: Output) -> anyhow::Result<()> {
    let dump = filter(read(bpffs)?, frontend_filter);
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
        "{:<40} {:<32} {:<22} {:<8} BACKENDS",
        "FRONTEND", "SERVICE", "FLAGS", "REV-NAT"
    );
    for f in &dump.frontends {
        let backends: Vec<String> = f.backends.iter().map(|b| backend_cell(f, b)).collect();
        let first = if backends.is_empty() && f.flags.contains(&"DropEmpty") {
            "(none here: connections dropped)".to_string()
        } else if backends.is_empty() {
            "(none: connections refused)".to_string()
        } else {
            backends[0].clone()
        };
        let _ = writeln!(
            out,
            "{:<40} {:<32} {:<22} {:<8} {}",
            frontend_cell(f),
            f.service_cell(),
            f.flags.join(","),
            f.rev_nat_id,
            first
        );
        for b in backends.iter().skip(1) {
            let _ = writeln!(out, "{:<40} {:<32} {:<22} {:<8} {}", "", "", "", "", b);
        }
    }
    if !dump.draining.is_empty() {
        let draining: Vec<String> = dump.draining.iter().map(draining_cell).collect();
        let _ = writeln!(
            out,
            "draining (established external flows only): {}",
            draining.join(", ")
        );
    }
    if let Some(ct) = &dump.conntrack {
        let _ = writeln!(
            out,
            "conntrack: {} of {} entries, {} flows created, {} entries evicted",
            ct.entries, ct.capacity, ct.flows_created, ct.evictions
        );
    }
    if let Some(u) = &dump.udp_flows {
        let _ = writeln!(
            out,
            "udp flows: {} of {} entries (expired ones included)",
            u.entries, u.capacity
        );
    }
    out
}

fn frontend_cell(f: &FrontendDump) -> String {
    let mut frontend = if f.address.contains(':') {
        format!("[{}]:{}/{}", f.address, f.port, f.protocol)
    } else {
        format!("{}:{}/{}", f.address, f.port, f.protocol)
    };
    if f.scope == "external" {
        frontend.push_str(" ext");
    }
    frontend
}

fn draining_cell(b: &BackendDump) -> String {
    let local = if b.local { ", local" } else { "" };
    let addr = std::net::SocketAddr::new(b.address.parse().unwrap_or([0; 4].into()), b.port);
    format!("{addr} (id {}{local})", b.id)
}

fn backend_cell(f: &FrontendDump, b: &BackendDump) -> String {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{AddrPort, ScopeFilter};
    use crate::model::ServiceId;

    fn frontend(addr: &str, port: u16, scope: &'static str, service: Option<&str>) -> FrontendDump {
        FrontendDump {
            address: addr.into(),
            port,
            protocol: "TCP".into(),
            scope,
            rev_nat_id: 7,
            service: service.map(String::from),
            port_name: service.map(|_| "http".into()),
            flags: vec!["ClusterIP"],
            affinity_timeout: None,
            backends: vec![BackendDump {
                id: 3,
                address: "198.18.1.5".into(),
                port: 8080,
                state: "active",
                local: false,
            }],
        }
    }

    fn dump() -> Dump {
        Dump {
            frontends: vec![
                frontend("198.18.0.10", 80, "socket", Some("default/web")),
                frontend("198.18.0.10", 443, "socket", Some("default/web")),
                frontend("198.18.0.20", 30080, "external", Some("default/web")),
                frontend("198.18.0.11", 53, "socket", Some("kube-system/dns")),
                frontend("fd00::11", 53, "socket", None),
            ],
            draining: Vec::new(),
            conntrack: Some(ConntrackDump {
                entries: 2,
                capacity: 10,
                flows_created: 1,
                evictions: 0,
            }),
            udp_flows: None,
        }
    }

    fn shown(f: &FrontendFilter) -> Vec<(String, u16)> {
        filter(dump(), f)
            .frontends
            .iter()
            .map(|f| (f.address.clone(), f.port))
            .collect()
    }

    #[test]
    fn filters_select_frontends() {
        let web = ServiceId {
            namespace: "default".into(),
            name: "web".into(),
        };
        let by_service = FrontendFilter {
            service: Some(web.clone()),
            ..Default::default()
        };
        assert_eq!(shown(&by_service).len(), 3);
        let external_web = FrontendFilter {
            scope: Some(ScopeFilter::External),
            ..by_service.clone()
        };
        assert_eq!(shown(&external_web), [("198.18.0.20".into(), 30080)]);
        let addr = |a: &str, port| FrontendFilter {
            frontend: Some(AddrPort {
                addr: a.parse().unwrap(),
                port,
            }),
            ..Default::default()
        };
        assert_eq!(shown(&addr("198.18.0.10", None)).len(), 2);
        assert_eq!(
            shown(&addr("198.18.0.10", Some(443))),
            [("198.18.0.10".into(), 443)]
        );
        assert_eq!(shown(&addr("fd00::11", Some(53))).len(), 1);
        assert!(shown(&addr("198.18.0.99", None)).is_empty());
        // No filter: everything, with the node-wide summaries.
        let all = filter(dump(), &FrontendFilter::default());
        assert_eq!(all.frontends.len(), 5);
        assert!(all.conntrack.is_some());
        assert!(filter(dump(), &by_service).conntrack.is_none());
    }

    #[test]
    fn table_names_the_service_and_port() {
        let text = table(&dump());
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("SERVICE"), "{text}");
        assert!(lines[1].starts_with("198.18.0.10:80/TCP"), "{text}");
        assert!(lines[1].contains("default/web:http"), "{text}");
        assert!(lines[4].contains("kube-system/dns:http"), "{text}");
        // A frontend without a recorded name shows an empty cell.
        assert!(lines[5].starts_with("[fd00::11]:53/TCP"), "{text}");
        assert!(
            !lines[5].contains("web") && !lines[5].contains("dns"),
            "{text}"
        );
        let json = serde_json::to_value(dump()).unwrap();
        assert_eq!(json["frontends"][0]["service"], "default/web");
        assert_eq!(json["frontends"][0]["port_name"], "http");
        assert!(json["frontends"][4].get("service").is_none());
    }
}
