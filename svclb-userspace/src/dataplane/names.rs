//! Which Service each frontend belongs to, for operators: a pinned hash map
//! from a frontend's rev-NAT id to its Service's `namespace/name` and port
//! name. No program reads it; the agent writes it with each frontend and
//! removes it with the frontend, and `svclb maps dump` and `svclb conntrack
//! list` read it, while the agent runs or not.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use aya::maps::{HashMap as BpfHashMap, Map, MapData};

use super::abi::{service_entry, ServiceEntry};
use super::drift::{Difference, Kind, Observed, WantedFrontend};
use super::{map_path, DataplaneError};
use crate::model::{Frontend, FrontendKey, ServiceId};

/// The pin's name (svclb's maps' prefix, so cleanup finds it).
pub const FRONTEND_NAMES: &str = "SVCLB_FRONTEND_NAMES";
/// One entry per frontend, as the rev-NAT map.
pub const MAX_ENTRIES: u32 = svclb_common::maps::REV_NAT_MAX_ENTRIES;

/// `namespace/name` (each at most 63 bytes in Kubernetes) NUL-padded, then
/// the port name (at most 15) NUL-padded.
const SERVICE_LEN: usize = 128;
const PORT_LEN: usize = 32;
pub type NameValue = [u8; SERVICE_LEN + PORT_LEN];

const BPF_F_NO_PREALLOC: u32 = 1;

/// The entry for a frontend of `service` on port `port_name`; longer names
/// than Kubernetes allows are cut.
pub fn encode(service: &ServiceId, port_name: &str) -> NameValue {
    let mut v = [0u8; SERVICE_LEN + PORT_LEN];
    let service = service.to_string();
    let s = &service.as_bytes()[..service.len().min(SERVICE_LEN)];
    v[..s.len()].copy_from_slice(s);
    let p = &port_name.as_bytes()[..port_name.len().min(PORT_LEN)];
    v[SERVICE_LEN..SERVICE_LEN + p.len()].copy_from_slice(p);
    v
}

/// A frontend's Service as named in the map.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FrontendName {
    /// namespace/name
    pub service: String,
    /// "" when the port is unnamed.
    pub port_name: String,
}

pub fn decode(v: &NameValue) -> FrontendName {
    let text = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    FrontendName {
        service: text(&v[..SERVICE_LEN]),
        port_name: text(&v[SERVICE_LEN..]),
    }
}

type NamesMap = BpfHashMap<MapData, u32, NameValue>;

fn open(bpffs: &Path) -> Result<NamesMap, aya::maps::MapError> {
    let data = MapData::from_pin(map_path(bpffs, FRONTEND_NAMES))?;
    BpfHashMap::try_from(Map::HashMap(data))
}

/// Create and pin the map unless a usable one is pinned (an earlier agent's).
pub fn ensure_pinned(bpffs: &Path) -> Result<(), DataplaneError> {
    use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_HASH;
    use aya_obj::maps::{bpf_map_def, LegacyMap, PinningType};
    let path = map_path(bpffs, FRONTEND_NAMES);
    let value_size = size_of::<NameValue>() as u32;
    if let Ok(info) = MapData::from_pin(&path).and_then(|m| m.info()) {
        if info.key_size() == 4
            && info.value_size() == value_size
            && info.max_entries() == MAX_ENTRIES
        {
            return Ok(());
        }
        tracing::warn!(map = FRONTEND_NAMES, "recreating a map of another layout");
        let _ = std::fs::remove_file(&path);
    }
    let def = aya_obj::Map::Legacy(LegacyMap {
        def: bpf_map_def {
            map_type: BPF_MAP_TYPE_HASH as u32,
            key_size: 4,
            value_size,
            max_entries: MAX_ENTRIES,
            map_flags: BPF_F_NO_PREALLOC,
            id: 0,
            pinning: PinningType::ByName,
        },
        inner_def: None,
        section_index: 0,
        section_kind: aya_obj::EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    });
    let map = MapData::create(def, FRONTEND_NAMES, None)
        .map_err(|e| DataplaneError::Load(format!("creating {FRONTEND_NAMES}: {e}")))?;
    map.pin(&path).map_err(|e| DataplaneError::Bpffs {
        path: path.clone(),
        reason: format!("pin {FRONTEND_NAMES}: {e}"),
    })
}

/// Every entry of the pinned map, by rev-NAT id (empty when there is no
/// such map: an agent of an older version).
pub fn read(bpffs: &Path) -> HashMap<u32, FrontendName> {
    let Ok(map) = open(bpffs) else {
        return HashMap::new();
    };
    map.iter()
        .filter_map(Result::ok)
        .map(|(id, v)| (id, decode(&v)))
        .collect()
}

/// For `svclb verify`: wanted frontends in the maps whose name is missing
/// or names another Service, and names of rev-NAT ids no frontend has.
/// (The frontends themselves are `drift::differences`' business.)
pub fn differences(
    wanted: &[WantedFrontend],
    observed: &Observed,
    names: &HashMap<u32, FrontendName>,
) -> Vec<Difference> {
    let rev_nat: BTreeMap<FrontendKey, u32> = (observed.contents.services.iter())
        .filter_map(|(k, v)| match service_entry(k, v) {
            Some(ServiceEntry::Frontend(fk, r)) => Some((fk, r.rev_nat_id)),
            _ => None,
        })
        .collect();
    let difference = |kind, w: Option<&WantedFrontend>, detail| Difference {
        map: FRONTEND_NAMES,
        kind,
        frontend: w.map(|w| w.key),
        service: w.map(|w| w.service.clone()),
        detail,
    };
    let mut out = Vec::new();
    for w in wanted {
        let Some(id) = rev_nat.get(&w.key) else {
            continue;
        };
        let want = w.service.to_string();
        match names.get(id) {
            None => out.push(difference(Kind::Missing, Some(w), format!("rev-NAT {id}"))),
            Some(n) if n.service != want => out.push(difference(
                Kind::Wrong,
                Some(w),
                format!("rev-NAT {id} names {}, want {want}", n.service),
            )),
            Some(_) => {}
        }
    }
    let live: BTreeSet<u32> = rev_nat.values().copied().collect();
    for (id, n) in names.iter().filter(|(id, _)| !live.contains(id)) {
        out.push(difference(
            Kind::Extra,
            None,
            format!("rev-NAT {id} ({}), of no frontend", n.service),
        ));
    }
    out.sort();
    out
}

/// The agent's side: keeps the map equal to the frontends in the maps.
/// The names only inform operators, so a failed write is logged, not
/// retried by the sync loop; the next apply of the service writes it.
pub struct Names {
    map: Option<NamesMap>,
    /// What the map holds.
    written: HashMap<u32, NameValue>,
}

impl Names {
    /// The pinned map (see [`ensure_pinned`]) and what it holds.
    pub fn open(bpffs: &Path) -> Self {
        match open(bpffs) {
            Ok(map) => {
                let written = map.iter().filter_map(Result::ok).collect();
                Names {
                    map: Some(map),
                    written,
                }
            }
            Err(e) => {
                tracing::warn!(map = FRONTEND_NAMES, error = %e, "frontend names unavailable");
                Names {
                    map: None,
                    written: HashMap::new(),
                }
            }
        }
    }

    /// After `service` was applied: `before` and `after` are its frontends
    /// in the maps (with their rev-NAT ids) before and after; `frontends`
    /// what it wanted (their port names).
    pub fn update(
        &mut self,
        service: &ServiceId,
        before: &[(FrontendKey, u32)],
        after: &[(FrontendKey, u32)],
        frontends: &[Frontend],
    ) {
        let live: BTreeSet<u32> = after.iter().map(|(_, id)| *id).collect();
        for (_, id) in before.iter().filter(|(_, id)| !live.contains(id)) {
            self.remove(*id);
        }
        for (key, id) in after {
            let port = frontends
                .iter()
                .find(|f| f.key == *key)
                .map_or("", |f| f.port_name.as_str());
            let value = encode(service, port);
            if self.written.get(id) == Some(&value) {
                continue;
            }
            let Some(map) = &mut self.map else { return };
            match map.insert(id, value, 0) {
                Ok(()) => {
                    self.written.insert(*id, value);
                }
                Err(e) => {
                    tracing::warn!(map = FRONTEND_NAMES, service = %service, error = %e, "writing a frontend's name")
                }
            }
        }
    }

    /// Read the map again, so that entries changed behind the agent's back
    /// are rewritten by their services' next applies.
    pub fn reload(&mut self) {
        if let Some(map) = &self.map {
            self.written = map.iter().filter_map(Result::ok).collect();
        }
    }

    /// Remove the names of rev-NAT ids not in `live` (frontends removed
    /// without an apply of their service: pruned, or dropped by a rebuild).
    pub fn retain(&mut self, live: &BTreeSet<u32>) {
        let gone: Vec<u32> = (self.written.keys())
            .filter(|id| !live.contains(id))
            .copied()
            .collect();
        for id in gone {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: u32) {
        let Some(map) = &mut self.map else { return };
        match map.remove(&id) {
            Ok(()) => {
                self.written.remove(&id);
            }
            Err(aya::maps::MapError::KeyNotFound) => {
                self.written.remove(&id);
            }
            Err(e) => {
                tracing::warn!(map = FRONTEND_NAMES, error = %e, "removing a frontend's name")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_missing_wrong_and_extra_entries() {
        use crate::dataplane::abi::{service_key, FrontendRecord, Settings};
        use crate::model::{Protocol, Scope};
        let key = |port| FrontendKey {
            addr: "198.19.0.50".parse().unwrap(),
            port,
            protocol: Protocol::Tcp,
            scope: Scope::Socket,
        };
        let record = |rev_nat_id| FrontendRecord {
            count: 0,
            rev_nat_id,
            settings: Settings {
                flags: 0,
                affinity_timeout: 0,
            },
            table: None,
        };
        let mut observed = Observed::default();
        for (port, id) in [(80, 1), (81, 2), (82, 3)] {
            let entry = (service_key(&key(port), 0), record(id).to_abi());
            observed.contents.services.push(entry);
        }
        let web = ServiceId {
            namespace: "default".into(),
            name: "web".into(),
        };
        let wanted: Vec<WantedFrontend> = [80, 81, 82, 83]
            .into_iter()
            .map(|port| WantedFrontend {
                service: web.clone(),
                key: key(port),
                flags: 0,
                affinity_timeout: 0,
                backends: Vec::new(),
                source_ranges: Vec::new(),
                draining: Vec::new(),
            })
            .collect();
        let name = |service: &str| FrontendName {
            service: service.into(),
            port_name: "http".into(),
        };
        // 80 right, 81 unnamed, 82 another Service's, 83 not in the maps
        // (drift's to report), 9 of no frontend.
        let names = [
            (1, name("default/web")),
            (3, name("default/db")),
            (9, name("x/y")),
        ]
        .into_iter()
        .collect();
        let found: Vec<(Kind, Option<u16>)> = differences(&wanted, &observed, &names)
            .iter()
            .map(|d| (d.kind, d.frontend.map(|k| k.port)))
            .collect();
        assert_eq!(
            found,
            [
                (Kind::Missing, Some(81)),
                (Kind::Extra, None),
                (Kind::Wrong, Some(82)),
            ]
        );
    }

    #[test]
    fn names_round_trip_and_longest_fit() {
        let id = |ns: &str, name: &str| ServiceId {
            namespace: ns.into(),
            name: name.into(),
        };
        let v = encode(&id("default", "web"), "http");
        assert_eq!(
            decode(&v),
            FrontendName {
                service: "default/web".into(),
                port_name: "http".into()
            }
        );
        assert_eq!(decode(&encode(&id("a", "b"), "")).port_name, "");
        // Kubernetes' longest: 63-byte namespace and name, 15-byte port name.
        let (ns, name, port) = ("n".repeat(63), "s".repeat(63), "p".repeat(15));
        let d = decode(&encode(&id(&ns, &name), &port));
        assert_eq!(d.service, format!("{ns}/{name}"));
        assert_eq!(d.port_name, port);
    }
}
