//! Drift: every difference between what the maps hold and what the agent's
//! last sync wanted them to hold, in terms a person can read (frontends and
//! backends by address, not map ids).
//!
//! The agent compares once per sync period and repairs what differs
//! (`SyncLoop`); `svclb verify` compares the pinned maps with the desired
//! state the agent serves on its metrics address.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use svclb_common::{maps, MaglevChunk, MaglevKey, MAGLEV_CHUNK};

use super::abi::{
    maglev_chunk_to_abi, rev_nat_to_abi, service_entry, BackendAddr, BackendRecord, FrontendRecord,
    ServiceEntry, Settings,
};
use super::maglev;
use super::writer::{MapContents, MapOps};
use super::DataplaneError;
use crate::model::{Backend, Cidr, Frontend, FrontendKey, Scope, ServiceId};

/// One frontend as the maps must hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WantedFrontend {
    pub service: ServiceId,
    pub key: FrontendKey,
    /// Slot 0's flag bits and affinity timeout (`abi::Settings`).
    pub flags: u16,
    pub affinity_timeout: u32,
    /// In slot order.
    pub backends: Vec<Backend>,
    pub source_ranges: Vec<Cidr>,
    /// Backends kept for established flows only: an entry must exist (no
    /// slot names it).
    #[serde(default)]
    pub draining: Vec<Backend>,
}

impl WantedFrontend {
    pub fn of(service: &ServiceId, f: &Frontend) -> Self {
        let settings = Settings::of(f);
        WantedFrontend {
            service: service.clone(),
            key: f.key,
            flags: settings.flags,
            affinity_timeout: settings.affinity_timeout,
            backends: f.backends.clone(),
            source_ranges: f.source_ranges.clone(),
            draining: f.draining.clone(),
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            flags: self.flags,
            affinity_timeout: self.affinity_timeout,
        }
    }

    /// External frontends with backends have a Maglev table.
    fn has_table(&self) -> bool {
        self.key.scope == Scope::External && !self.backends.is_empty()
    }
}

/// The frontends each service's last apply wanted, as the agent publishes
/// it for `svclb verify`.
pub type Wanted = BTreeMap<ServiceId, Arc<Vec<Frontend>>>;

/// Every wanted frontend, sorted by key.
pub fn wanted_frontends(wanted: &Wanted) -> Vec<WantedFrontend> {
    let mut out: Vec<WantedFrontend> = wanted
        .iter()
        .flat_map(|(id, fs)| fs.iter().map(move |f| WantedFrontend::of(id, f)))
        .collect();
    out.sort_by_key(|f| f.key);
    out
}

/// The last desired state, shared between the sync loop (which sets it
/// after each pass) and the HTTP server (which serves it).
#[derive(Default)]
pub struct Published(RwLock<Arc<Wanted>>);

impl Published {
    pub fn set(&self, wanted: Arc<Wanted>) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = wanted;
    }

    /// `{"frontends": [WantedFrontend, ...]}`.
    pub fn json(&self) -> String {
        let wanted = self.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        let state = DesiredState {
            frontends: wanted_frontends(&wanted),
        };
        serde_json::to_string(&state).expect("plain data serializes")
    }
}

/// What /debug/svclb/desired answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct DesiredState {
    pub frontends: Vec<WantedFrontend>,
}

/// Everything the writer's maps hold, Maglev chunk contents included.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub contents: MapContents,
    pub maglev: BTreeMap<MaglevKey, MaglevChunk>,
}

impl Observed {
    /// Read the maps (one syscall per entry: seconds at 100,000s of entries).
    pub fn read(maps: &impl MapOps) -> Result<Self, DataplaneError> {
        let contents = maps.read_all()?;
        let mut maglev = BTreeMap::new();
        for k in &contents.maglev {
            // Chunks deleted since the listing are not there.
            if let Some(chunk) = maps.read_maglev(k)? {
                maglev.insert(*k, chunk);
            }
        }
        Ok(Observed { contents, maglev })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Wanted, not in the map.
    Missing,
    /// In the map, not wanted (or reachable by no reader).
    Extra,
    /// In the map with another value.
    Wrong,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Missing => "missing",
            Kind::Extra => "extra",
            Kind::Wrong => "wrong",
        })
    }
}

/// One difference between the maps and the desired state.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Difference {
    /// The BPF map (svclb_common::maps name).
    pub map: &'static str,
    pub kind: Kind,
    /// The frontend it concerns, if any.
    pub frontend: Option<FrontendKey>,
    /// That frontend's Service, when the agent wants the frontend.
    pub service: Option<ServiceId>,
    /// What exactly: the entry and the values.
    pub detail: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.map)?;
        if let Some(k) = &self.frontend {
            write!(f, " {k}")?;
        }
        if let Some(s) = &self.service {
            write!(f, " (service {s})")?;
        }
        write!(f, ": {}", self.detail)
    }
}

impl Difference {
    /// Differences that the writer cannot see by reading the maps back
    /// (it adopts what it finds): it must rewrite this frontend's table.
    pub fn distrusts_table(&self) -> Option<FrontendKey> {
        (self.map == maps::MAGLEV && self.kind == Kind::Wrong)
            .then_some(self.frontend)
            .flatten()
    }
}

/// The maps decoded.
struct Decoded<'a> {
    records: BTreeMap<FrontendKey, FrontendRecord>,
    slots: BTreeMap<(FrontendKey, u16), u32>,
    backends: HashMap<u32, BackendRecord>,
    /// What the backends are, for draining backends (named by no slot).
    backend_ids: HashMap<BackendAddr, u32>,
    rev_nat: HashMap<u32, &'a svclb_common::RevNat>,
    /// The affinity-match entries, as a set once (not per frontend: UDP
    /// socket frontends make them 100,000s).
    members: BTreeSet<&'a svclb_common::AffinityMatchKey>,
}

/// Every difference between `observed` and `wanted` (sorted by key), plus
/// entries no reader can reach.
pub fn differences(wanted: &[WantedFrontend], observed: &Observed) -> Vec<Difference> {
    let mut out = Vec::new();
    let decoded = decode(observed, &mut out);
    let by_key: BTreeMap<FrontendKey, &WantedFrontend> =
        wanted.iter().map(|w| (w.key, w)).collect();
    let mut diff = |map, kind, frontend: Option<FrontendKey>, detail: String| {
        let service = frontend
            .and_then(|k| by_key.get(&k))
            .map(|w| w.service.clone());
        out.push(Difference {
            map,
            kind,
            frontend,
            service,
            detail,
        });
    };
    for (key, w) in &by_key {
        match decoded.records.get(key) {
            None => diff(
                maps::SERVICES,
                Kind::Missing,
                Some(*key),
                "no slot 0".into(),
            ),
            Some(record) => compare_frontend(w, record, &decoded, observed, &mut diff),
        }
    }
    for (key, record) in &decoded.records {
        if !by_key.contains_key(key) {
            let detail = format!(
                "slot 0 with {} backends, rev-NAT {}",
                record.count, record.rev_nat_id
            );
            diff(maps::SERVICES, Kind::Extra, Some(*key), detail);
        }
    }
    let draining: BTreeSet<BackendAddr> = wanted
        .iter()
        .flat_map(|w| w.draining.iter().map(|b| wanted_addr(w, b)))
        .collect();
    unreachable_entries(&decoded, observed, &draining, &mut diff);
    out.sort();
    out
}

fn decode<'a>(observed: &'a Observed, out: &mut Vec<Difference>) -> Decoded<'a> {
    let mut d = Decoded {
        records: BTreeMap::new(),
        slots: BTreeMap::new(),
        backends: HashMap::new(),
        backend_ids: HashMap::new(),
        rev_nat: observed
            .contents
            .rev_nat
            .iter()
            .map(|(id, r)| (*id, r))
            .collect(),
        members: observed.contents.affinity_match.iter().collect(),
    };
    for (key, value) in &observed.contents.services {
        match service_entry(key, value) {
            Some(ServiceEntry::Frontend(fk, record)) => {
                d.records.insert(fk, record);
            }
            Some(ServiceEntry::Slot(fk, slot, id)) => {
                d.slots.insert((fk, slot), id);
            }
            None => out.push(Difference {
                map: maps::SERVICES,
                kind: Kind::Extra,
                frontend: None,
                service: None,
                detail: format!("undecodable key {key:?}"),
            }),
        }
    }
    for (id, b) in &observed.contents.backends {
        let record = BackendRecord::from_abi(b);
        if let Some(addr) = record.backend_addr() {
            d.backend_ids.insert(addr, *id);
        }
        d.backends.insert(*id, record);
    }
    d
}

type Report<'r> = dyn FnMut(&'static str, Kind, Option<FrontendKey>, String) + 'r;

/// One wanted frontend against its entries.
fn compare_frontend(
    w: &WantedFrontend,
    record: &FrontendRecord,
    d: &Decoded,
    observed: &Observed,
    diff: &mut Report,
) {
    let key = Some(w.key);
    if record.settings != w.settings() {
        let detail = format!(
            "flags {:?} affinity {}s, want {:?} affinity {}s",
            record.settings.flag_names(),
            record.settings.affinity_timeout,
            w.settings().flag_names(),
            w.affinity_timeout
        );
        diff(maps::SERVICES, Kind::Wrong, key, detail);
    }
    if usize::from(record.count) != w.backends.len() {
        let detail = format!("{} backends, want {}", record.count, w.backends.len());
        diff(maps::SERVICES, Kind::Wrong, key, detail);
    }
    // Slots, and the backends they name, in order.
    let mut ids = Vec::new();
    for (i, want) in w.backends.iter().enumerate() {
        let slot = i as u16 + 1;
        let Some(&id) = d.slots.get(&(w.key, slot)) else {
            diff(
                maps::SERVICES,
                Kind::Missing,
                key,
                format!("slot {slot} ({})", backend_text(want)),
            );
            continue;
        };
        ids.push(id);
        match d.backends.get(&id) {
            None => {
                let detail = format!("backend {id} (slot {slot}: {})", backend_text(want));
                diff(maps::BACKENDS, Kind::Missing, key, detail);
            }
            Some(b) if !backend_matches(b, w, want) => {
                let detail = format!(
                    "backend {id} (slot {slot}) is {}, want {}",
                    record_text(b),
                    backend_text(want)
                );
                diff(maps::BACKENDS, Kind::Wrong, key, detail);
            }
            Some(_) => {}
        }
    }
    match d.rev_nat.get(&record.rev_nat_id) {
        None => diff(
            maps::REV_NAT,
            Kind::Missing,
            key,
            format!("rev-NAT {}", record.rev_nat_id),
        ),
        Some(r) if **r != rev_nat_to_abi(&w.key) => diff(
            maps::REV_NAT,
            Kind::Wrong,
            key,
            format!("rev-NAT {} names another address", record.rev_nat_id),
        ),
        Some(_) => {}
    }
    let mut draining_ids = Vec::new();
    for want in &w.draining {
        match d.backend_ids.get(&wanted_addr(w, want)) {
            Some(id) => draining_ids.push(*id),
            None => {
                let detail = format!("draining backend {}", backend_text(want));
                diff(maps::BACKENDS, Kind::Missing, key, detail);
            }
        }
    }
    compare_table(w, record, &ids, observed, diff);
    compare_source_ranges(w, record, observed, diff);
    if record.settings.members() {
        let present = &d.members;
        let draining = match record.settings.draining_members() {
            true => &draining_ids[..],
            false => &[],
        };
        for id in ids.iter().chain(draining) {
            let k = svclb_common::AffinityMatchKey {
                rev_nat_id: record.rev_nat_id,
                backend_id: *id,
            };
            if !present.contains(&k) {
                diff(
                    maps::AFFINITY_MATCH,
                    Kind::Missing,
                    key,
                    format!("backend {id}"),
                );
            }
        }
    }
}

/// The Maglev table slot 0 names must be the one every node computes from
/// the backends (by address and port) in slot order.
fn compare_table(
    w: &WantedFrontend,
    record: &FrontendRecord,
    slot_ids: &[u32],
    observed: &Observed,
    diff: &mut Report,
) {
    let key = Some(w.key);
    let table = match (w.has_table(), record.table) {
        (false, None) => return,
        (false, Some(_)) => {
            diff(
                maps::SERVICES,
                Kind::Wrong,
                key,
                "has a Maglev table, want none".into(),
            );
            return;
        }
        (true, None) => {
            diff(maps::MAGLEV, Kind::Missing, key, "no Maglev table".into());
            return;
        }
        (true, Some(t)) => t,
    };
    if maglev::validate_table_size(table.size).is_err() {
        diff(
            maps::SERVICES,
            Kind::Wrong,
            key,
            format!("Maglev size {} is not a valid table size", table.size),
        );
        return;
    }
    if slot_ids.len() != w.backends.len() {
        return; // Reported as a missing slot already.
    }
    let names: Vec<Vec<u8>> = w.backends.iter().map(maglev_name).collect();
    let entries = maglev::table(&names, table.size);
    for (k, part) in table
        .keys(record.rev_nat_id)
        .zip(entries.chunks(MAGLEV_CHUNK as usize))
    {
        match observed.maglev.get(&k) {
            None => diff(
                maps::MAGLEV,
                Kind::Missing,
                key,
                format!("chunk {} of generation {}", k.chunk, k.generation),
            ),
            Some(chunk) if *chunk != maglev_chunk_to_abi(part, slot_ids) => diff(
                maps::MAGLEV,
                Kind::Wrong,
                key,
                format!("chunk {} of generation {}", k.chunk, k.generation),
            ),
            Some(_) => {}
        }
    }
}

fn compare_source_ranges(
    w: &WantedFrontend,
    record: &FrontendRecord,
    observed: &Observed,
    diff: &mut Report,
) {
    let have: BTreeSet<Cidr> = observed
        .contents
        .source_ranges
        .iter()
        .filter(|r| r.rev_nat_id == record.rev_nat_id)
        .map(|r| r.cidr())
        .collect();
    let want: BTreeSet<Cidr> = w.source_ranges.iter().copied().collect();
    for c in want.difference(&have) {
        diff(
            maps::SOURCE_RANGES,
            Kind::Missing,
            Some(w.key),
            c.to_string(),
        );
    }
    for c in have.difference(&want) {
        diff(maps::SOURCE_RANGES, Kind::Extra, Some(w.key), c.to_string());
    }
}

/// Entries no frontend's slot 0 leads to: slots past a count, backends no
/// slot or table names and no frontend keeps draining, rev-NAT entries,
/// Maglev chunks, source ranges and affinity members of no frontend.
fn unreachable_entries(
    d: &Decoded,
    observed: &Observed,
    draining: &BTreeSet<BackendAddr>,
    diff: &mut Report,
) {
    let mut named = BTreeSet::new();
    let mut live_chunks = BTreeSet::new();
    let mut members = BTreeSet::new();
    // Frontends whose members include their draining backends; which
    // frontend drains which backend is not in the maps, so any draining
    // backend counts as a member of these.
    let mut draining_members = BTreeSet::new();
    for (fk, r) in &d.records {
        if r.settings.draining_members() {
            draining_members.insert(r.rev_nat_id);
        }
        for slot in 1..=r.count {
            if let Some(id) = d.slots.get(&(*fk, slot)) {
                named.insert(*id);
                if r.settings.members() {
                    members.insert((r.rev_nat_id, *id));
                }
            }
        }
        if let Some(t) = r.table {
            for k in t.keys(r.rev_nat_id) {
                if let Some(chunk) = observed.maglev.get(&k) {
                    named.extend(chunk.backend_ids.iter().copied().filter(|id| *id != 0));
                }
                live_chunks.insert(k);
            }
        }
    }
    for ((fk, slot), id) in &d.slots {
        if d.records.get(fk).is_none_or(|r| *slot > r.count) {
            diff(
                maps::SERVICES,
                Kind::Extra,
                Some(*fk),
                format!("slot {slot} (backend {id}) past the count"),
            );
        }
    }
    for (id, b) in &d.backends {
        let kept = b.backend_addr().is_some_and(|a| draining.contains(&a));
        if !named.contains(id) && !kept {
            diff(
                maps::BACKENDS,
                Kind::Extra,
                None,
                format!("backend {id} ({})", record_text(b)),
            );
        }
    }
    let rev_nat_ids: BTreeSet<u32> = d.records.values().map(|r| r.rev_nat_id).collect();
    for id in d.rev_nat.keys() {
        if !rev_nat_ids.contains(id) {
            diff(maps::REV_NAT, Kind::Extra, None, format!("rev-NAT {id}"));
        }
    }
    for k in observed.maglev.keys() {
        if !live_chunks.contains(k) {
            let detail = format!(
                "chunk {} of generation {} of rev-NAT {}",
                k.chunk, k.generation, k.rev_nat_id
            );
            diff(maps::MAGLEV, Kind::Extra, None, detail);
        }
    }
    for r in &observed.contents.source_ranges {
        if !rev_nat_ids.contains(&r.rev_nat_id) {
            diff(
                maps::SOURCE_RANGES,
                Kind::Extra,
                None,
                format!("{} of rev-NAT {}", r.cidr(), r.rev_nat_id),
            );
        }
    }
    let draining_ids: BTreeSet<u32> = (d.backends.iter())
        .filter(|(_, b)| b.backend_addr().is_some_and(|a| draining.contains(&a)))
        .map(|(id, _)| *id)
        .collect();
    for k in &observed.contents.affinity_match {
        let kept = draining_members.contains(&k.rev_nat_id) && draining_ids.contains(&k.backend_id);
        if !members.contains(&(k.rev_nat_id, k.backend_id)) && !kept {
            let detail = format!("rev-NAT {} backend {}", k.rev_nat_id, k.backend_id);
            diff(maps::AFFINITY_MATCH, Kind::Extra, None, detail);
        }
    }
}

/// A backend entry is right when it names the wanted address, port,
/// protocol and locality. Its ready/terminating state is not compared: the
/// entry is shared by every frontend naming that backend, services' slices
/// may disagree about the state for a while, and no program reads it (it
/// is for `svclb maps dump`).
fn backend_matches(b: &BackendRecord, w: &WantedFrontend, want: &Backend) -> bool {
    (b.addr, b.port, b.protocol, b.local)
        == (want.addr, want.port, Some(w.key.protocol), want.local)
}

/// A wanted backend as the maps identify it.
fn wanted_addr(w: &WantedFrontend, b: &Backend) -> BackendAddr {
    (b.addr, b.port, w.key.protocol, b.local)
}

fn backend_text(b: &Backend) -> String {
    let state = if b.terminating {
        "terminating"
    } else {
        "active"
    };
    let local = if b.local { ", local" } else { "" };
    format!("{} ({state}{local})", socket_text(b.addr, b.port))
}

fn record_text(b: &BackendRecord) -> String {
    let state = b.state_name();
    let local = if b.local { ", local" } else { "" };
    let proto = b.protocol.map_or("?".to_string(), |p| p.to_string());
    format!("{}/{proto} ({state}{local})", socket_text(b.addr, b.port))
}

fn socket_text(addr: std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

/// A backend's name in the Maglev hash (as the writer computes it).
fn maglev_name(b: &Backend) -> Vec<u8> {
    super::writer::maglev_name(b)
}
