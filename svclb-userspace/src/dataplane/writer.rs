//! The map writer: diffs desired frontends against what the maps hold and
//! writes only the difference, in an order that keeps readers consistent.
//!
//! Readers (the socket and XDP programs) read a frontend's slot 0 (backend
//! count, Maglev table), then one slot in 1..=count or one Maglev entry,
//! then that backend; with session affinity they may instead take a
//! remembered backend that the affinity-match map still lists for the
//! frontend. So for every reader:
//! - every slot within the count it read must exist,
//! - every Maglev chunk of the table it read must exist, and
//! - every backend a slot or Maglev entry names must exist.
//!
//! `apply` therefore writes an update of one service in this order (each
//! step is a function of that name):
//! 1. `upsert_backends`: new backends and changed backend states;
//! 2. `write_slots`: changed backend slots 1..=new_count (a slot overwritten
//!    in place flips atomically from one valid backend id to another), then
//!    `add_affinity_members`, `write_maglev_table` (a changed table goes
//!    into the other of two generations) and `add_source_ranges`;
//! 3. `write_slot_zero`: the new count, flags and Maglev generation. From
//!    here the change is live: new readers use the new set;
//! 4. `remove_frontend`: slot 0 of frontends that are gone.
//!
//! Then `flush`, once per batch of updates, off the path that makes changes
//! visible:
//! 5. `barrier`: wait for an RCU grace period, so readers that read an old
//!    count or table are done;
//! 6. `Deferred::delete`: slots beyond the new counts, gone frontends' slots,
//!    rev-NAT and affinity-match entries, old Maglev generations; then
//!    `delete_orphan_backends`: backends no slot names any more.
//!
//! Map hash elements are allocated without preallocation, so a value that is
//! replaced while a reader copies it is freed only after a grace period too.
//! Source ranges are only looked up, never followed, so removed ones go
//! right after slot 0 (`delete_source_ranges`).
//!
//! Every map key and value is encoded in `abi.rs`.
//!
//! When a map operation fails (in `apply`, `flush` or `prune_unclaimed`),
//! the maps are still consistent for readers (every step above keeps them
//! so), but they may hold part of an update that the bookkeeping doesn't
//! describe. The writer then marks its bookkeeping stale and, before its
//! next operation, rebuilds it from the maps as `adopt` does, deleting what
//! the failed call left unreachable. So after a failure the bookkeeping
//! never drifts from the maps: capacity counts are what the maps hold,
//! nothing waiting for deletion is forgotten, and applying a service again
//! (with the same frontends or new ones) converges the maps to it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;

use svclb_common::{
    maps, AffinityMatchKey, Backend as AbiBackend, MaglevChunk, MaglevKey, RevNat, ServiceKey,
    ServiceValue, BACKEND_DRAINING, MAGLEV_CHUNK,
};

use super::abi::{
    backend_state, backend_to_abi, frontend_key, maglev_chunk_to_abi, rev_nat_to_abi,
    service_entry, service_key, slot_to_abi, BackendAddr, BackendRecord, FrontendRecord,
    MaglevTable, ServiceEntry, Settings,
};
use super::{maglev, DataplaneError};
use crate::model::{Backend, Cidr, Frontend, FrontendKey, Scope, ServiceId};

/// The source-ranges key is part of the `MapOps` interface.
pub use super::abi::SourceRange;

/// The map operations the writer needs, one per map and direction; the
/// kernel implementation is in `kernel.rs`, tests use an in-memory one that
/// checks reader consistency.
pub trait MapOps {
    fn put_service(&mut self, key: &ServiceKey, value: &ServiceValue)
        -> Result<(), DataplaneError>;
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError>;
    fn put_backend(&mut self, id: u32, backend: &AbiBackend) -> Result<(), DataplaneError>;
    fn del_backend(&mut self, id: u32) -> Result<(), DataplaneError>;
    fn put_rev_nat(&mut self, id: u32, rev_nat: &RevNat) -> Result<(), DataplaneError>;
    fn del_rev_nat(&mut self, id: u32) -> Result<(), DataplaneError>;
    fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError>;
    fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError>;
    fn put_maglev(&mut self, key: &MaglevKey, chunk: &MaglevChunk) -> Result<(), DataplaneError>;
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<(), DataplaneError>;
    fn put_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError>;
    fn del_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError>;
    /// Returns once no reader that started before the call is running.
    fn barrier(&mut self) -> Result<(), DataplaneError>;
    /// Everything in the maps, for adopting state after a restart.
    fn read_all(&self) -> Result<MapContents, DataplaneError>;
    /// One Maglev chunk's contents (for drift checks).
    fn read_maglev(&self, key: &MaglevKey) -> Result<Option<MaglevChunk>, DataplaneError>;
}

#[derive(Clone, Debug, Default)]
pub struct MapContents {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(u32, AbiBackend)>,
    pub rev_nat: Vec<(u32, RevNat)>,
    pub affinity_match: Vec<AffinityMatchKey>,
    pub maglev: Vec<MaglevKey>,
    pub source_ranges: Vec<SourceRange>,
}

#[derive(Clone, Debug)]
struct BackendEntry {
    addr: BackendAddr,
    state: u8,
    /// How many frontends name this backend (in slots or Maglev table).
    refs: u32,
    /// How many frontends keep it for their established flows only (see
    /// `Frontend::draining`), counting the writer itself for draining
    /// backends found at start-up and not claimed yet.
    drains: u32,
}

impl BackendEntry {
    fn unused(&self) -> bool {
        self.refs == 0 && self.drains == 0
    }
}

#[derive(Clone, Debug)]
struct AppliedFrontend {
    /// None: found in the maps at start-up and not claimed by a service yet.
    owner: Option<ServiceId>,
    rev_nat_id: u32,
    settings: Settings,
    /// Backend ids of slots 1..=len.
    slots: Vec<u32>,
    /// External frontends with backends.
    table: Option<MaglevTable>,
    /// The slots the table was built from (empty without a table). They
    /// differ from `slots` after an update failed between its slot writes
    /// and slot 0: the old table is still live and names the old backends.
    table_slots: Vec<u32>,
    source_ranges: BTreeSet<Cidr>,
    /// Backends kept for established flows only (no slot names them).
    draining: Vec<u32>,
}

impl AppliedFrontend {
    /// A frontend found at start-up; its slots are filled in as found.
    fn adopted(record: &FrontendRecord) -> Self {
        AppliedFrontend {
            owner: None,
            rev_nat_id: record.rev_nat_id,
            settings: record.settings,
            slots: vec![0; usize::from(record.count)],
            table: record.table,
            table_slots: Vec::new(),
            source_ranges: BTreeSet::new(),
            draining: Vec::new(),
        }
    }

    /// The backends this frontend's slots and Maglev table name.
    fn named(&self) -> BTreeSet<u32> {
        self.slots
            .iter()
            .chain(&self.table_slots)
            .copied()
            .collect()
    }

    /// What slot 0 holds.
    fn record(&self) -> FrontendRecord {
        FrontendRecord {
            count: self.slots.len() as u16,
            rev_nat_id: self.rev_nat_id,
            settings: self.settings,
            table: self.table,
        }
    }

    /// The affinity-match entries this frontend needs.
    fn members(&self) -> BTreeSet<AffinityMatchKey> {
        if !self.settings.members() {
            return BTreeSet::new();
        }
        let draining = match self.settings.draining_members() {
            true => &self.draining[..],
            false => &[],
        };
        self.slots
            .iter()
            .chain(draining)
            .map(|&backend_id| AffinityMatchKey {
                rev_nat_id: self.rev_nat_id,
                backend_id,
            })
            .collect()
    }
}

/// What one `apply` changed, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub writes: usize,
    pub deletes: usize,
}

pub struct Writer<M: MapOps> {
    maps: M,
    frontends: BTreeMap<FrontendKey, AppliedFrontend>,
    /// The frontends each service owns (an index of `frontends`).
    by_owner: HashMap<ServiceId, BTreeSet<FrontendKey>>,
    backends: HashMap<u32, BackendEntry>,
    by_addr: HashMap<BackendAddr, u32>,
    /// Entries in use in the services and backends maps, to refuse an update
    /// that would not fit before writing any of it.
    service_entries: usize,
    next_backend_id: u32,
    next_rev_nat_id: u32,
    capacity: Capacity,
    /// Maglev chunks in use.
    maglev_chunks: usize,
    /// The largest Maglev table (a prime; see `maglev::size_for`).
    maglev_size: u32,
    /// Every table gets `maglev_size` entries (see `set_maglev_fixed`).
    maglev_fixed: bool,
    /// Deletions waiting for the next `flush` (after a barrier).
    pending: Deferred,
    /// Set when a map operation failed: the bookkeeping is rebuilt from the
    /// maps, with what they can't tell, before the next operation.
    stale: Option<Known>,
    /// Draining backends found at start-up that no service has claimed
    /// (each holds one of its `drains`): kept until `prune_unclaimed`, so
    /// a restart moves no established flow.
    unclaimed_draining: BTreeSet<u32>,
}

/// What the maps can't tell about frontends, carried over a rebuild.
#[derive(Clone, Debug, Default)]
struct Known {
    owners: HashMap<FrontendKey, ServiceId>,
    /// Live Maglev tables: rev-NAT id, table, the slots it was built from.
    tables: HashMap<FrontendKey, (u32, MaglevTable, Vec<u32>)>,
    /// Frontends whose Maglev table's contents were found wrong (reading the
    /// maps back only sees a table's keys): dropped and written again.
    distrusted: BTreeSet<FrontendKey>,
    /// Each frontend's draining backends (no map entry names them).
    draining: HashMap<FrontendKey, Vec<u32>>,
    /// Which draining backends in the maps nobody claimed yet. None at
    /// start-up: every one (nobody has claimed anything).
    unclaimed_draining: Option<BTreeSet<u32>>,
}

#[derive(Clone, Copy, Debug)]
pub struct Capacity {
    pub services: usize,
    pub backends: usize,
    pub maglev_chunks: usize,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            services: maps::SERVICES_MAX_ENTRIES as usize,
            backends: maps::BACKENDS_MAX_ENTRIES as usize,
            maglev_chunks: maps::MAGLEV_MAX_ENTRIES as usize,
        }
    }
}

/// Work collected while applying, done after the barrier (step 6).
#[derive(Default)]
struct Deferred {
    service_keys: Vec<ServiceKey>,
    rev_nat_ids: Vec<u32>,
    /// With the frontend they belonged to, to tell whether they are live
    /// again by the time of the flush.
    affinity_match: Vec<(FrontendKey, AffinityMatchKey)>,
    /// Backend ids whose slot references went away.
    released: Vec<u32>,
    /// Replaced or removed Maglev tables, with their frontend.
    tables: Vec<(FrontendKey, u32, MaglevTable)>,
}

impl Deferred {
    fn is_empty(&self) -> bool {
        self.service_keys.is_empty()
            && self.rev_nat_ids.is_empty()
            && self.affinity_match.is_empty()
            && self.tables.is_empty()
    }

    /// Forget entries that became live again since they were deferred (a
    /// frontend that grew back, a table generation in use again).
    fn retain_stale(&mut self, frontends: &BTreeMap<FrontendKey, AppliedFrontend>) {
        self.service_keys.retain(|k| {
            let fk = frontend_key(k).expect("the writer only defers keys it wrote");
            frontends
                .get(&fk)
                .is_none_or(|f| k.slot as usize > f.slots.len())
        });
        self.affinity_match.retain(|(fk, k)| {
            !frontends.get(fk).is_some_and(|f| {
                f.rev_nat_id == k.rev_nat_id
                    && f.settings.members()
                    && f.slots.contains(&k.backend_id)
            })
        });
        self.affinity_match.sort_unstable();
        self.affinity_match.dedup();
        // A table may flip generations several times between flushes.
        self.tables.sort_unstable();
        self.tables.dedup();
        self.tables.retain(|(fk, rev_nat_id, t)| {
            !frontends
                .get(fk)
                .is_some_and(|f| f.rev_nat_id == *rev_nat_id && f.table == Some(*t))
        });
        self.service_keys
            .sort_unstable_by_key(|k| (k.addr, k.port, k.proto, k.scope, k.slot));
        self.service_keys.dedup();
    }

    /// Step 6 apart from backends; returns the number of deletes.
    fn delete(&self, maps: &mut impl MapOps) -> Result<usize, DataplaneError> {
        for key in &self.service_keys {
            maps.del_service(key)?;
        }
        for id in &self.rev_nat_ids {
            maps.del_rev_nat(*id)?;
        }
        for (_, key) in &self.affinity_match {
            maps.del_affinity_match(key)?;
        }
        let mut chunks = 0;
        for (_, rev_nat_id, t) in &self.tables {
            for key in t.keys(*rev_nat_id) {
                maps.del_maglev(&key)?;
                chunks += 1;
            }
        }
        Ok(self.service_keys.len() + self.rev_nat_ids.len() + self.affinity_match.len() + chunks)
    }
}

/// Entries found at start-up that no reader can reach, deleted after a
/// barrier.
#[derive(Default)]
struct Unreachable {
    service_keys: Vec<ServiceKey>,
    rev_nat_ids: Vec<u32>,
    maglev: Vec<MaglevKey>,
    source_ranges: Vec<SourceRange>,
    affinity_match: Vec<AffinityMatchKey>,
    backends: Vec<u32>,
}

impl Unreachable {
    fn is_empty(&self) -> bool {
        self.service_keys.is_empty()
            && self.rev_nat_ids.is_empty()
            && self.maglev.is_empty()
            && self.source_ranges.is_empty()
            && self.affinity_match.is_empty()
            && self.backends.is_empty()
    }

    /// Backends last: slots named them until just now.
    fn delete(&self, maps: &mut impl MapOps) -> Result<(), DataplaneError> {
        for key in &self.service_keys {
            maps.del_service(key)?;
        }
        for id in &self.rev_nat_ids {
            maps.del_rev_nat(*id)?;
        }
        for key in &self.maglev {
            maps.del_maglev(key)?;
        }
        for key in &self.source_ranges {
            maps.del_source_range(key)?;
        }
        for key in &self.affinity_match {
            maps.del_affinity_match(key)?;
        }
        for id in &self.backends {
            maps.del_backend(*id)?;
        }
        Ok(())
    }
}

/// A backend found at start-up: what it is and its state.
type FoundBackends = HashMap<u32, (BackendAddr, u8)>;

impl<M: MapOps> Writer<M> {
    fn new(maps: M, capacity: Capacity) -> Self {
        Writer {
            maps,
            frontends: BTreeMap::new(),
            by_owner: HashMap::new(),
            backends: HashMap::new(),
            by_addr: HashMap::new(),
            service_entries: 0,
            next_backend_id: 1,
            next_rev_nat_id: 1,
            capacity,
            maglev_chunks: 0,
            maglev_size: maglev::DEFAULT_TABLE_SIZE,
            maglev_fixed: false,
            pending: Deferred::default(),
            stale: None,
            unclaimed_draining: BTreeSet::new(),
        }
    }

    /// Adopt whatever the maps already hold (left by an earlier agent), so a
    /// restart rewrites nothing that is still right. Entries no reader can
    /// reach (slots beyond a count, unreferenced backends) are removed, and
    /// frontends the earlier agent left half-written are dropped for the
    /// resync to write again.
    pub fn adopt(maps: M, capacity: Capacity) -> Result<Self, DataplaneError> {
        let mut w = Writer::new(maps, capacity);
        w.load(&Known {
            unclaimed_draining: None,
            ..Known::default()
        })?;
        Ok(w)
    }

    /// Rebuild the bookkeeping from the maps (see `adopt`), with `known`
    /// filling in what the maps can't tell.
    fn load(&mut self, known: &Known) -> Result<(), DataplaneError> {
        let contents = self.maps.read_all()?;
        self.frontends.clear();
        self.by_owner.clear();
        self.backends.clear();
        self.by_addr.clear();
        self.service_entries = 0;
        self.maglev_chunks = 0;
        self.unclaimed_draining.clear();
        // Whatever waited for a flush is found again as unreachable.
        self.pending = Deferred::default();
        let mut unreachable = Unreachable::default();
        self.adopt_frontends(&contents.services, known, &mut unreachable);
        let found = self.read_backends(&contents.backends)?;
        let chunks: BTreeSet<MaglevKey> = contents.maglev.iter().copied().collect();
        let present: HashSet<ServiceKey> = contents.services.iter().map(|(k, _)| *k).collect();
        self.drop_half_written(&found, &chunks, &present, known, &mut unreachable)?;
        self.count_backend_refs(&found);
        self.adopt_draining(&found, known, &contents.affinity_match);
        unreachable.maglev = self.adopt_maglev_tables(&chunks);
        unreachable.source_ranges = self.adopt_source_ranges(&contents.source_ranges);
        unreachable.affinity_match = self.repair_affinity_members(&contents.affinity_match)?;
        self.repair_rev_nat(&contents.rev_nat)?;
        let live_rev_nat: BTreeSet<u32> = self.frontends.values().map(|f| f.rev_nat_id).collect();
        unreachable.rev_nat_ids.extend(
            contents
                .rev_nat
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| !live_rev_nat.contains(id)),
        );
        unreachable.backends = found
            .keys()
            .copied()
            .filter(|id| !self.backends.contains_key(id))
            .collect();
        if !unreachable.is_empty() {
            self.maps.barrier()?;
        }
        unreachable.delete(&mut self.maps)
    }

    /// Before the next operation after a failed one: rebuild the bookkeeping
    /// from the maps. Kept stale (and retried next time) if that fails too.
    fn resync(&mut self) -> Result<(), DataplaneError> {
        let Some(known) = self.stale.take() else {
            return Ok(());
        };
        if let Err(e) = self.load(&known) {
            self.stale = Some(known);
            return Err(e);
        }
        tracing::info!("map writer state rebuilt from the maps after a failed map operation");
        Ok(())
    }

    /// A map operation failed: remember what the maps can't tell (owners,
    /// including the frontends `claim` was writing, and the slots of live
    /// Maglev tables) for `resync`.
    fn lost_sync(&mut self, claim: Option<(&ServiceId, &[&Frontend])>) {
        let mut known = Known {
            unclaimed_draining: Some(self.unclaimed_draining.clone()),
            ..Known::default()
        };
        for (key, f) in &self.frontends {
            if !f.draining.is_empty() {
                known.draining.insert(*key, f.draining.clone());
            }
            if let Some(owner) = &f.owner {
                known.owners.insert(*key, owner.clone());
            }
            if let Some(t) = f.table {
                known
                    .tables
                    .insert(*key, (f.rev_nat_id, t, f.table_slots.clone()));
            }
        }
        if let Some((owner, wanted)) = claim {
            for f in wanted {
                known.owners.insert(f.key, owner.clone());
            }
        }
        self.stale = Some(known);
    }

    /// Frontends from their slot 0 and slots; keys svclb can't have written
    /// and slots beyond their frontend's count are unreachable.
    fn adopt_frontends(
        &mut self,
        services: &[(ServiceKey, ServiceValue)],
        known: &Known,
        unreachable: &mut Unreachable,
    ) {
        let mut slots: HashMap<(FrontendKey, u16), u32> = HashMap::new();
        for (key, value) in services {
            match service_entry(key, value) {
                Some(ServiceEntry::Frontend(fk, record)) => {
                    self.frontends.insert(fk, AppliedFrontend::adopted(&record));
                    self.next_rev_nat_id = self.next_rev_nat_id.max(record.rev_nat_id + 1);
                }
                Some(ServiceEntry::Slot(fk, slot, backend_id)) => {
                    slots.insert((fk, slot), backend_id);
                }
                None => unreachable.service_keys.push(*key),
            }
        }
        for ((fk, slot), id) in slots {
            match self.frontends.get_mut(&fk) {
                Some(f) if (slot as usize) <= f.slots.len() => f.slots[slot as usize - 1] = id,
                _ => unreachable.service_keys.push(service_key(&fk, slot)),
            }
        }
        for (fk, f) in &mut self.frontends {
            // A table found at start-up is taken to be built from the
            // slots; a known one may be older (see `table_slots`).
            f.table_slots = match known.tables.get(fk) {
                Some((rev_nat_id, t, slots))
                    if (*rev_nat_id, Some(*t)) == (f.rev_nat_id, f.table) =>
                {
                    slots.clone()
                }
                _ if f.table.is_some() => f.slots.clone(),
                _ => Vec::new(),
            };
            f.owner = known.owners.get(fk).cloned();
            if let Some(owner) = &f.owner {
                self.by_owner.entry(owner.clone()).or_default().insert(*fk);
            }
        }
    }

    /// The backends in the map; those svclb can't have written are deleted
    /// now (no slot svclb wrote names them).
    fn read_backends(
        &mut self,
        backends: &[(u32, AbiBackend)],
    ) -> Result<FoundBackends, DataplaneError> {
        let mut found = HashMap::new();
        for (id, b) in backends {
            self.next_backend_id = self.next_backend_id.max(id + 1);
            let record = BackendRecord::from_abi(b);
            match record.backend_addr() {
                Some(addr) => {
                    found.insert(*id, (addr, record.state));
                }
                None => self.maps.del_backend(*id)?,
            }
        }
        Ok(found)
    }

    /// Drop frontends with a missing slot, a slot naming a missing backend,
    /// a missing Maglev chunk or a distrusted table (whose entries may name
    /// any backend): slot 0 goes now, so no new reader follows them; their
    /// slots in `present` go after the barrier. The next apply writes them
    /// again.
    fn drop_half_written(
        &mut self,
        found: &FoundBackends,
        chunks: &BTreeSet<MaglevKey>,
        present: &HashSet<ServiceKey>,
        known: &Known,
        unreachable: &mut Unreachable,
    ) -> Result<(), DataplaneError> {
        let broken: Vec<FrontendKey> = self
            .frontends
            .iter()
            .filter(|(k, f)| {
                known.distrusted.contains(k)
                    || f.named().iter().any(|id| !found.contains_key(id))
                    || f.table
                        .is_some_and(|t| t.keys(f.rev_nat_id).any(|k| !chunks.contains(&k)))
            })
            .map(|(k, _)| *k)
            .collect();
        for fk in broken {
            let f = self.frontends.remove(&fk).expect("listed above");
            self.maps.del_service(&service_key(&fk, 0))?;
            unreachable.service_keys.extend(
                (1..=f.slots.len() as u16)
                    .map(|s| service_key(&fk, s))
                    .filter(|k| present.contains(k)),
            );
        }
        Ok(())
    }

    /// Entries in use and the backends the adopted frontends name.
    fn count_backend_refs(&mut self, found: &FoundBackends) {
        for f in self.frontends.values() {
            self.service_entries += 1 + f.slots.len();
            for id in &f.named() {
                let (addr, state) = found[id];
                self.by_addr.insert(addr, *id);
                self.backends
                    .entry(*id)
                    .or_insert(BackendEntry {
                        addr,
                        state,
                        refs: 0,
                        drains: 0,
                    })
                    .refs += 1;
            }
        }
    }

    /// Backends no slot names that established flows may still use: the
    /// frontends' draining backends the bookkeeping knew (after a failed
    /// operation), and draining ones nobody claimed yet (all of them at
    /// start-up). The others are unreachable.
    fn adopt_draining(
        &mut self,
        found: &FoundBackends,
        known: &Known,
        members: &[AffinityMatchKey],
    ) {
        let keep = |w: &mut Self, id: u32| -> bool {
            let Some(&(addr, state)) = found.get(&id) else {
                return false;
            };
            if w.by_addr.get(&addr).is_some_and(|other| *other != id) {
                return false; // A duplicate: slots name the other one.
            }
            w.by_addr.insert(addr, id);
            w.backends
                .entry(id)
                .or_insert(BackendEntry {
                    addr,
                    state,
                    refs: 0,
                    drains: 0,
                })
                .drains += 1;
            true
        };
        // A frontend whose members include its draining backends says in the
        // maps which those are: a member no slot names.
        let mut drained_members: HashMap<u32, Vec<u32>> = HashMap::new();
        for k in members {
            if found
                .get(&k.backend_id)
                .is_some_and(|(_, state)| *state == BACKEND_DRAINING)
            {
                drained_members
                    .entry(k.rev_nat_id)
                    .or_default()
                    .push(k.backend_id);
            }
        }
        let keys: Vec<FrontendKey> = self.frontends.keys().copied().collect();
        for fk in keys {
            let f = &self.frontends[&fk];
            let from_maps = (f.settings.draining_members())
                .then(|| drained_members.remove(&f.rev_nat_id))
                .flatten();
            let ids = match known.draining.get(&fk) {
                Some(ids) => ids.clone(),
                None => from_maps.unwrap_or_default(),
            };
            let kept = ids.into_iter().filter(|id| keep(self, *id)).collect();
            self.frontends.get_mut(&fk).expect("listed above").draining = kept;
        }
        // Those of frontends dropped as half-written are kept like
        // unclaimed ones: the frontend's next apply takes them back.
        let orphaned: BTreeSet<u32> = known
            .draining
            .iter()
            .filter(|(fk, _)| !self.frontends.contains_key(fk))
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        let mut unclaimed: Vec<u32> = found
            .iter()
            .filter(|(id, (_, state))| {
                orphaned.contains(id)
                    || *state == BACKEND_DRAINING
                        && known
                            .unclaimed_draining
                            .as_ref()
                            .is_none_or(|u| u.contains(id))
            })
            .map(|(id, _)| *id)
            .collect();
        unclaimed.sort_unstable();
        for id in unclaimed {
            if keep(self, id) {
                self.unclaimed_draining.insert(id);
            }
        }
        // A failed operation may have kept the flush from marking them.
        for (id, e) in &self.backends {
            if e.refs == 0 && e.state != BACKEND_DRAINING {
                self.pending.released.push(*id);
            }
        }
    }

    /// Count the chunks of the adopted frontends' tables; returns the others.
    fn adopt_maglev_tables(&mut self, chunks: &BTreeSet<MaglevKey>) -> Vec<MaglevKey> {
        let live: BTreeSet<MaglevKey> = self
            .frontends
            .values()
            .filter_map(|f| f.table.map(|t| t.keys(f.rev_nat_id)))
            .flatten()
            .collect();
        self.maglev_chunks = live.len();
        chunks.difference(&live).copied().collect()
    }

    /// Give the adopted frontends their source ranges; returns those of no
    /// frontend.
    fn adopt_source_ranges(&mut self, ranges: &[SourceRange]) -> Vec<SourceRange> {
        let by_rev_nat: HashMap<u32, FrontendKey> = self
            .frontends
            .iter()
            .map(|(k, f)| (f.rev_nat_id, *k))
            .collect();
        let mut stale = Vec::new();
        for r in ranges {
            match by_rev_nat.get(&r.rev_nat_id) {
                Some(fk) => {
                    let f = self.frontends.get_mut(fk).expect("indexed above");
                    f.source_ranges.insert(r.cidr());
                }
                None => stale.push(*r),
            }
        }
        stale
    }

    /// Write the affinity-match entries the adopted frontends miss; returns
    /// those no frontend needs.
    fn repair_affinity_members(
        &mut self,
        found: &[AffinityMatchKey],
    ) -> Result<Vec<AffinityMatchKey>, DataplaneError> {
        let members: BTreeSet<AffinityMatchKey> = self
            .frontends
            .values()
            .flat_map(AppliedFrontend::members)
            .collect();
        let found: BTreeSet<AffinityMatchKey> = found.iter().copied().collect();
        for key in members.difference(&found) {
            self.maps.put_affinity_match(key)?;
        }
        Ok(found.difference(&members).copied().collect())
    }

    /// Write the rev-NAT entries of adopted frontends that are missing or
    /// name another address (replies would carry a wrong source).
    fn repair_rev_nat(&mut self, found: &[(u32, RevNat)]) -> Result<(), DataplaneError> {
        let found: HashMap<u32, RevNat> = found.iter().copied().collect();
        for (fk, f) in &self.frontends {
            let want = rev_nat_to_abi(fk);
            if found.get(&f.rev_nat_id) != Some(&want) {
                self.maps.put_rev_nat(f.rev_nat_id, &want)?;
            }
        }
        Ok(())
    }

    /// The maps were found to differ from what the bookkeeping says (changed
    /// behind the writer's back): rebuild the bookkeeping from them before
    /// the next operation, dropping the frontends of `tables` (their Maglev
    /// tables' contents are wrong). Applying every service then repairs the
    /// maps, and `prune_unclaimed` removes frontends nobody owns.
    pub fn distrust(&mut self, tables: &[FrontendKey]) {
        if self.stale.is_none() {
            self.lost_sync(None);
        }
        let known = self.stale.as_mut().expect("set above");
        for key in tables {
            known.tables.remove(key);
            known.distrusted.insert(*key);
        }
    }

    /// The largest Maglev table written from now on (a prime; see
    /// `maglev::validate_table_size`); each frontend's table is sized from
    /// its backend count up to it (`maglev::size_for`). Tables of another
    /// size are rewritten at their frontend's next update.
    pub fn set_maglev_size(&mut self, size: u32) {
        self.maglev_size = size;
    }

    /// Give every table the largest size whatever its backend count, as
    /// svclb did before tables were sized per frontend: for benchmarks
    /// that compare the two.
    pub fn set_maglev_fixed(&mut self, fixed: bool) {
        self.maglev_fixed = fixed;
    }

    /// The entries of a table over `backends` backends.
    fn maglev_size_for(&self, backends: usize) -> u32 {
        if self.maglev_fixed {
            return self.maglev_size;
        }
        maglev::size_for(backends, self.maglev_size)
    }

    /// Make the frontends owned by `owner` exactly `desired`. Frontends owned
    /// by another service are left alone (reported as a conflict).
    ///
    /// If a map operation fails, readers still find every slot and backend
    /// they follow, and the next call first rebuilds the bookkeeping from the
    /// maps (see the module comment): calling `apply` again converges.
    pub fn apply(
        &mut self,
        owner: &ServiceId,
        desired: &[Frontend],
    ) -> Result<ApplyStats, DataplaneError> {
        self.resync()?;
        let (wanted, conflicts) = self.claim(owner, desired);
        let gone = self.gone_frontends(owner, &wanted);
        self.check_capacity(owner, &wanted)?;
        let mut deferred = std::mem::take(&mut self.pending);
        let written = self.write_update(owner, &wanted, gone, &mut deferred);
        self.pending = deferred;
        let stats = match written {
            Ok(stats) => stats,
            Err(e) => {
                self.lost_sync(Some((owner, &wanted)));
                return Err(e);
            }
        };
        if let Some((key, other)) = conflicts.first() {
            return Err(DataplaneError::Conflict {
                service: owner.clone(),
                frontend: *key,
                owner: other.clone(),
            });
        }
        Ok(stats)
    }

    /// Steps 1-4 for one service; 5 and 6 happen in `flush`, once per batch
    /// of updates.
    fn write_update(
        &mut self,
        owner: &ServiceId,
        wanted: &[&Frontend],
        gone: Vec<FrontendKey>,
        deferred: &mut Deferred,
    ) -> Result<ApplyStats, DataplaneError> {
        let mut stats = ApplyStats::default();
        // 1.
        stats.writes += self.upsert_backends(wanted)?;
        // 2.-3., per frontend.
        for f in wanted {
            self.update_frontend(owner, f, deferred, &mut stats)?;
        }
        // 4.
        for key in gone {
            self.remove_frontend(key, deferred)?;
            stats.deletes += 1;
        }
        Ok(stats)
    }

    /// The frontends of `desired` that `owner` may write, and the keys of
    /// those another service owns (with that owner).
    fn claim<'a>(
        &self,
        owner: &ServiceId,
        desired: &'a [Frontend],
    ) -> (Vec<&'a Frontend>, Vec<(FrontendKey, ServiceId)>) {
        let mut wanted = Vec::new();
        let mut conflicts = Vec::new();
        for f in desired {
            match self.frontends.get(&f.key).and_then(|a| a.owner.as_ref()) {
                Some(other) if other != owner => conflicts.push((f.key, other.clone())),
                _ => wanted.push(f),
            }
        }
        (wanted, conflicts)
    }

    /// The frontends `owner` has that it no longer wants.
    fn gone_frontends(&self, owner: &ServiceId, wanted: &[&Frontend]) -> Vec<FrontendKey> {
        let wanted_keys: BTreeSet<FrontendKey> = wanted.iter().map(|f| f.key).collect();
        self.by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .filter(|k| !wanted_keys.contains(k))
            .copied()
            .collect()
    }

    /// Step 1: write new backends and changed backend states; returns the
    /// number of writes. Draining backends come after the others: a backend
    /// some slot names shows that slot's state, and an existing one keeps
    /// its entry (and id, which established flows hold).
    fn upsert_backends(&mut self, wanted: &[&Frontend]) -> Result<usize, DataplaneError> {
        let mut writes = 0;
        for f in wanted {
            for b in &f.backends {
                let addr = backend_addr(f, b);
                let state = backend_state(b.terminating);
                let id = match self.by_addr.get(&addr) {
                    Some(id) if self.backends[id].state == state => continue,
                    Some(id) => *id,
                    None => self.new_backend_id(),
                };
                writes += self.put_backend(id, addr, state)?;
            }
        }
        for f in wanted {
            for b in &f.draining {
                let addr = backend_addr(f, b);
                if !self.by_addr.contains_key(&addr) {
                    let id = self.new_backend_id();
                    writes += self.put_backend(id, addr, BACKEND_DRAINING)?;
                }
            }
        }
        Ok(writes)
    }

    fn new_backend_id(&mut self) -> u32 {
        let id = self.next_backend_id;
        self.next_backend_id += 1;
        id
    }

    /// Write a backend entry and its bookkeeping (references unchanged);
    /// returns the number of writes.
    fn put_backend(
        &mut self,
        id: u32,
        addr: BackendAddr,
        state: u8,
    ) -> Result<usize, DataplaneError> {
        self.maps.put_backend(id, &backend_to_abi(&addr, state))?;
        self.by_addr.insert(addr, id);
        let (refs, drains) = self
            .backends
            .get(&id)
            .map_or((0, 0), |e| (e.refs, e.drains));
        self.backends.insert(
            id,
            BackendEntry {
                addr,
                state,
                refs,
                drains,
            },
        );
        Ok(1)
    }

    /// Steps 2 and 3 for one frontend: everything slot 0 will point at, then
    /// slot 0; what the old slot 0 pointed at and the new one doesn't is
    /// deferred to the flush.
    fn update_frontend(
        &mut self,
        owner: &ServiceId,
        f: &Frontend,
        deferred: &mut Deferred,
        stats: &mut ApplyStats,
    ) -> Result<(), DataplaneError> {
        let old = self.frontends.get(&f.key).cloned();
        let rev_nat_id = match &old {
            Some(a) => a.rev_nat_id,
            None => {
                let id = self.add_rev_nat(&f.key)?;
                stats.writes += 1;
                id
            }
        };
        let mut new = self.desired_frontend(owner, f, rev_nat_id);
        // What the old slot 0 points at.
        let old_slots = old.as_ref().map_or(&[][..], |a| &a.slots[..]);
        let old_table_slots = old.as_ref().map_or(&[][..], |a| &a.table_slots[..]);
        let old_members = old
            .as_ref()
            .map(AppliedFrontend::members)
            .unwrap_or_default();
        let old_table = old.as_ref().and_then(|a| a.table);
        let old_ranges = old
            .as_ref()
            .map(|a| a.source_ranges.clone())
            .unwrap_or_default();
        let new_members = new.members();

        // 2.
        stats.writes += self.write_slots(&f.key, old_slots, &new.slots)?;
        stats.writes += self.add_affinity_members(&old_members, &new_members)?;
        new.table = self.maglev_table_for(f, old_table_slots, &new.slots, old_table);
        if let Some(t) = new.table.filter(|t| old_table != Some(*t)) {
            stats.writes += self.write_maglev_table(f, rev_nat_id, t, &new.slots)?;
        }
        if new.table.is_some() {
            new.table_slots = new.slots.clone();
        }
        self.retire_maglev_table(f.key, rev_nat_id, old_table, new.table, deferred);
        stats.writes += self.add_source_ranges(rev_nat_id, &old_ranges, &new.source_ranges)?;

        // 3.
        if old.as_ref().is_none_or(|a| a.record() != new.record()) {
            self.write_slot_zero(&f.key, &new.record())?;
            stats.writes += 1;
        }
        stats.deletes += self.delete_source_ranges(rev_nat_id, &old_ranges, &new.source_ranges)?;

        deferred
            .affinity_match
            .extend(old_members.difference(&new_members).map(|k| (f.key, *k)));
        deferred
            .service_keys
            .extend((new.slots.len() + 1..=old_slots.len()).map(|s| service_key(&f.key, s as u16)));
        self.record_applied(owner, f.key, old.as_ref(), new, deferred);
        Ok(())
    }

    /// The frontend as `f` wants it, before its Maglev table is known; its
    /// backends are in the maps (step 1).
    fn desired_frontend(
        &self,
        owner: &ServiceId,
        f: &Frontend,
        rev_nat_id: u32,
    ) -> AppliedFrontend {
        AppliedFrontend {
            owner: Some(owner.clone()),
            rev_nat_id,
            settings: Settings::of(f),
            slots: f
                .backends
                .iter()
                .map(|b| self.by_addr[&backend_addr(f, b)])
                .collect(),
            table: None,
            table_slots: Vec::new(),
            source_ranges: f.source_ranges.iter().copied().collect(),
            draining: f
                .draining
                .iter()
                .map(|b| self.by_addr[&backend_addr(f, b)])
                .collect(),
        }
    }

    /// A new frontend's rev-NAT entry; returns its id.
    fn add_rev_nat(&mut self, key: &FrontendKey) -> Result<u32, DataplaneError> {
        let id = self.next_rev_nat_id;
        self.next_rev_nat_id += 1;
        self.maps.put_rev_nat(id, &rev_nat_to_abi(key))?;
        Ok(id)
    }

    /// Step 2: the slots that changed; returns the number of writes.
    fn write_slots(
        &mut self,
        key: &FrontendKey,
        old: &[u32],
        new: &[u32],
    ) -> Result<usize, DataplaneError> {
        let mut writes = 0;
        for (i, id) in new.iter().enumerate() {
            if old.get(i) != Some(id) {
                self.maps
                    .put_service(&service_key(key, i as u16 + 1), &slot_to_abi(*id))?;
                writes += 1;
            }
        }
        Ok(writes)
    }

    /// Step 2: affinity-match entries for new members; returns the number of
    /// writes.
    fn add_affinity_members(
        &mut self,
        old: &BTreeSet<AffinityMatchKey>,
        new: &BTreeSet<AffinityMatchKey>,
    ) -> Result<usize, DataplaneError> {
        let mut writes = 0;
        for key in new.difference(old) {
            self.maps.put_affinity_match(key)?;
            writes += 1;
        }
        Ok(writes)
    }

    /// The Maglev table an external frontend needs: the old one while the
    /// backends it was built from and the table size stay the same, else a
    /// new one in the other generation.
    fn maglev_table_for(
        &self,
        f: &Frontend,
        old_table_slots: &[u32],
        new_slots: &[u32],
        old: Option<MaglevTable>,
    ) -> Option<MaglevTable> {
        if f.key.scope != Scope::External || new_slots.is_empty() {
            return None;
        }
        let size = self.maglev_size_for(new_slots.len());
        if let Some(t) = old.filter(|t| t.size == size && old_table_slots == new_slots) {
            return Some(t);
        }
        Some(MaglevTable {
            generation: old.map_or(0, |t| t.generation ^ 1),
            size,
        })
    }

    /// Step 2: a new Maglev table over `slots`; returns the number of writes.
    fn write_maglev_table(
        &mut self,
        f: &Frontend,
        rev_nat_id: u32,
        table: MaglevTable,
        slots: &[u32],
    ) -> Result<usize, DataplaneError> {
        // Names: address and port, so every node builds the same table.
        let names: Vec<Vec<u8>> = f.backends.iter().map(maglev_name).collect();
        let entries = maglev::table(&names, table.size);
        let mut writes = 0;
        for (key, part) in table
            .keys(rev_nat_id)
            .zip(entries.chunks(MAGLEV_CHUNK as usize))
        {
            self.maps
                .put_maglev(&key, &maglev_chunk_to_abi(part, slots))?;
            writes += 1;
        }
        Ok(writes)
    }

    /// Count the new table's chunks instead of the old one's, which is
    /// deleted after the barrier.
    fn retire_maglev_table(
        &mut self,
        key: FrontendKey,
        rev_nat_id: u32,
        old: Option<MaglevTable>,
        new: Option<MaglevTable>,
        deferred: &mut Deferred,
    ) {
        if let Some(t) = old.filter(|t| new != Some(*t)) {
            deferred.tables.push((key, rev_nat_id, t));
        }
        self.maglev_chunks += new.map_or(0, |t| usize::from(t.chunks()));
        self.maglev_chunks -= old.map_or(0, |t| usize::from(t.chunks()));
    }

    /// Step 2: new source ranges; returns the number of writes.
    fn add_source_ranges(
        &mut self,
        rev_nat_id: u32,
        old: &BTreeSet<Cidr>,
        new: &BTreeSet<Cidr>,
    ) -> Result<usize, DataplaneError> {
        let mut writes = 0;
        for c in new.difference(old) {
            self.maps
                .put_source_range(&SourceRange::of(rev_nat_id, c))?;
            writes += 1;
        }
        Ok(writes)
    }

    /// Step 3: from here new readers use the new slots and table.
    fn write_slot_zero(
        &mut self,
        key: &FrontendKey,
        record: &FrontendRecord,
    ) -> Result<(), DataplaneError> {
        self.maps
            .put_service(&service_key(key, 0), &record.to_abi())
    }

    /// After step 3: source ranges are looked up, never followed, so removed
    /// ones can go at once (after slot 0, which may have dropped the flag).
    /// Returns the number of deletes.
    fn delete_source_ranges(
        &mut self,
        rev_nat_id: u32,
        old: &BTreeSet<Cidr>,
        new: &BTreeSet<Cidr>,
    ) -> Result<usize, DataplaneError> {
        let mut deletes = 0;
        for c in old.difference(new) {
            self.maps
                .del_source_range(&SourceRange::of(rev_nat_id, c))?;
            deletes += 1;
        }
        Ok(deletes)
    }

    /// Bookkeeping once a frontend's update is written: backend references,
    /// entries in use, ownership.
    fn record_applied(
        &mut self,
        owner: &ServiceId,
        key: FrontendKey,
        old: Option<&AppliedFrontend>,
        new: AppliedFrontend,
        deferred: &mut Deferred,
    ) {
        for id in new.named() {
            self.backend_refs(id, 1);
        }
        for id in &new.draining {
            self.backend_drains(*id, 1);
        }
        let old_named = old.map(AppliedFrontend::named).unwrap_or_default();
        for id in &old_named {
            self.backend_refs(*id, -1);
        }
        deferred.released.extend(old_named);
        let old_draining = old.map_or(&[][..], |a| &a.draining[..]);
        for id in old_draining {
            self.backend_drains(*id, -1);
        }
        deferred.released.extend(old_draining);
        let old_entries = old.map_or(0, |a| 1 + a.slots.len());
        self.service_entries = self.service_entries + 1 + new.slots.len() - old_entries;
        self.by_owner.entry(owner.clone()).or_default().insert(key);
        self.frontends.insert(key, new);
    }

    /// Remove every frontend nobody claimed since start-up (services deleted
    /// while no agent ran). Call once all sources have synced.
    pub fn prune_unclaimed(&mut self) -> Result<ApplyStats, DataplaneError> {
        self.resync()?;
        let pruned = self.remove_unclaimed();
        if pruned.is_err() {
            self.lost_sync(None);
        }
        pruned
    }

    fn remove_unclaimed(&mut self) -> Result<ApplyStats, DataplaneError> {
        let unclaimed: Vec<FrontendKey> = self
            .frontends
            .iter()
            .filter(|(_, a)| a.owner.is_none())
            .map(|(k, _)| *k)
            .collect();
        let mut stats = ApplyStats::default();
        let mut deferred = std::mem::take(&mut self.pending);
        let removed = unclaimed
            .into_iter()
            .try_for_each(|key| self.remove_frontend(key, &mut deferred));
        // Draining backends found at start-up: kept from here only if a
        // frontend keeps them.
        for id in std::mem::take(&mut self.unclaimed_draining) {
            self.backend_drains(id, -1);
            deferred.released.push(id);
        }
        self.pending = deferred;
        removed?;
        stats.deletes += self.flush_pending()?;
        Ok(stats)
    }

    /// Entries in use: (services map, backends map). Rebuilt from the maps
    /// by the next operation after a failed one.
    pub fn usage(&self) -> (usize, usize) {
        (self.service_entries, self.backends.len())
    }

    /// The addresses of the backends on other nodes (reached through SNAT
    /// from the external path), sorted.
    pub fn remote_backend_addrs(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .by_addr
            .keys()
            .filter(|(_, _, _, local)| !local)
            .map(|(addr, ..)| *addr)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The service whose frontend `key` is in the maps.
    pub fn owner(&self, key: &FrontendKey) -> Option<&ServiceId> {
        self.frontends.get(key).and_then(|f| f.owner.as_ref())
    }

    /// The frontends `owner` has in the maps, with their rev-NAT ids.
    pub fn owned(&self, owner: &ServiceId) -> Vec<(FrontendKey, u32)> {
        (self.by_owner.get(owner).into_iter().flatten())
            .filter_map(|k| self.frontends.get(k).map(|f| (*k, f.rev_nat_id)))
            .collect()
    }

    /// The rev-NAT ids of every frontend in the maps.
    pub fn rev_nat_ids(&self) -> BTreeSet<u32> {
        self.frontends.values().map(|f| f.rev_nat_id).collect()
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// For settings of the maps themselves (fault injection); writing
    /// entries through it would bypass the bookkeeping.
    pub fn maps_mut(&mut self) -> &mut M {
        &mut self.maps
    }

    /// Step 4: delete slot 0 now (new readers stop finding the frontend) and
    /// its source ranges; the rest goes after the barrier.
    fn remove_frontend(
        &mut self,
        key: FrontendKey,
        deferred: &mut Deferred,
    ) -> Result<(), DataplaneError> {
        // Bookkeeping only once slot 0 is gone, so that the owner is still
        // known if the delete fails.
        self.maps.del_service(&service_key(&key, 0))?;
        let a = self
            .frontends
            .remove(&key)
            .expect("callers list existing frontends");
        deferred
            .service_keys
            .extend((1..=a.slots.len()).map(|s| service_key(&key, s as u16)));
        deferred.rev_nat_ids.push(a.rev_nat_id);
        deferred
            .affinity_match
            .extend(a.members().into_iter().map(|k| (key, k)));
        if let Some(t) = a.table {
            deferred.tables.push((key, a.rev_nat_id, t));
            self.maglev_chunks -= usize::from(t.chunks());
        }
        for c in &a.source_ranges {
            self.maps
                .del_source_range(&SourceRange::of(a.rev_nat_id, c))?;
        }
        if let Some(owner) = &a.owner {
            self.disown(owner, &key);
        }
        let named = a.named();
        for id in &named {
            self.backend_refs(*id, -1);
        }
        deferred.released.extend(named);
        for id in &a.draining {
            self.backend_drains(*id, -1);
        }
        deferred.released.extend(&a.draining);
        self.service_entries -= 1 + a.slots.len();
        Ok(())
    }

    fn disown(&mut self, owner: &ServiceId, key: &FrontendKey) {
        if let Some(owned) = self.by_owner.get_mut(owner) {
            owned.remove(key);
            if owned.is_empty() {
                self.by_owner.remove(owner);
            }
        }
    }

    fn backend_refs(&mut self, id: u32, delta: i32) {
        if let Some(e) = self.backends.get_mut(&id) {
            e.refs = e.refs.saturating_add_signed(delta);
        }
    }

    fn backend_drains(&mut self, id: u32, delta: i32) {
        if let Some(e) = self.backends.get_mut(&id) {
            e.drains = e.drains.saturating_add_signed(delta);
        }
    }

    /// Steps 5 and 6: wait for readers, then delete what they might still
    /// have been using. Call after a batch of `apply`s (one grace period per
    /// batch, off the path that makes changes visible). Entries that became
    /// live again since (a frontend that grew back, a backend re-added) stay.
    pub fn flush(&mut self) -> Result<usize, DataplaneError> {
        self.resync()?;
        let flushed = self.flush_pending();
        if flushed.is_err() {
            self.lost_sync(None);
        }
        flushed
    }

    fn flush_pending(&mut self) -> Result<usize, DataplaneError> {
        let mut d = std::mem::take(&mut self.pending);
        d.retain_stale(&self.frontends);
        let orphans = self.orphan_backends(&d.released);
        self.mark_draining(&d.released)?;
        if d.is_empty() && orphans.is_empty() {
            return Ok(0);
        }
        // 5.
        self.maps.barrier()?;
        // 6.
        let deletes = d.delete(&mut self.maps)?;
        Ok(deletes + self.delete_orphan_backends(orphans)?)
    }

    /// Released backends no frontend names or keeps any more, sorted.
    fn orphan_backends(&self, released: &[u32]) -> Vec<u32> {
        let mut orphans: Vec<u32> = released
            .iter()
            .copied()
            .filter(|id| self.backends.get(id).is_some_and(BackendEntry::unused))
            .collect();
        orphans.sort_unstable();
        orphans.dedup();
        orphans
    }

    /// Released backends that only draining frontends keep get the
    /// draining state (for `svclb maps dump`, and so that a restarted agent
    /// keeps them).
    fn mark_draining(&mut self, released: &[u32]) -> Result<(), DataplaneError> {
        let mut marked: Vec<(u32, BackendAddr)> = released
            .iter()
            .filter_map(|id| {
                let e = self.backends.get(id)?;
                (e.refs == 0 && e.drains > 0 && e.state != BACKEND_DRAINING)
                    .then_some((*id, e.addr))
            })
            .collect();
        marked.sort_unstable();
        marked.dedup();
        for (id, addr) in marked {
            self.put_backend(id, addr, BACKEND_DRAINING)?;
        }
        Ok(())
    }

    /// Step 6, last: backends; returns the number of deletes.
    fn delete_orphan_backends(&mut self, orphans: Vec<u32>) -> Result<usize, DataplaneError> {
        let mut deletes = 0;
        for id in orphans {
            let e = self.backends.remove(&id).expect("listed as orphans");
            self.by_addr.remove(&e.addr);
            self.maps.del_backend(id)?;
            deletes += 1;
        }
        Ok(deletes)
    }

    /// Refuse, before writing anything, an update the maps can't hold, so a
    /// full map never leaves a service half-written. Stale entries are
    /// deleted only after the new ones are written, so the peak is what is in
    /// use now plus every entry the update adds.
    fn check_capacity(
        &self,
        owner: &ServiceId,
        wanted: &[&Frontend],
    ) -> Result<(), DataplaneError> {
        let added: usize = wanted
            .iter()
            .map(|f| match self.frontends.get(&f.key) {
                Some(a) => f.backends.len().saturating_sub(a.slots.len()),
                None => 1 + f.backends.len(),
            })
            .sum();
        // Entries waiting for `flush` still take room.
        let services = self.service_entries + self.pending.service_keys.len() + added;
        let new_backends: BTreeSet<BackendAddr> = wanted
            .iter()
            .flat_map(|f| {
                f.backends
                    .iter()
                    .chain(&f.draining)
                    .map(|b| backend_addr(f, b))
            })
            .filter(|a| !self.by_addr.contains_key(a))
            .collect();
        let backends = self.backends.len() + new_backends.len();
        let chunks = self.maglev_chunks_needed(wanted);
        if services > self.capacity.services
            || backends > self.capacity.backends
            || chunks > self.capacity.maglev_chunks
        {
            return Err(DataplaneError::Full {
                service: owner.clone(),
                services_needed: services,
                services_capacity: self.capacity.services,
                backends_needed: backends,
                backends_capacity: self.capacity.backends,
                maglev_needed: chunks,
                maglev_capacity: self.capacity.maglev_chunks,
            });
        }
        Ok(())
    }

    /// Maglev chunks in use at the peak of an update of `wanted`.
    fn maglev_chunks_needed(&self, wanted: &[&Frontend]) -> usize {
        // Every external frontend may get a new table while the old one waits.
        let new_tables: usize = wanted
            .iter()
            .filter(|f| f.key.scope == Scope::External && !f.backends.is_empty())
            .map(|f| {
                self.maglev_size_for(f.backends.len())
                    .div_ceil(MAGLEV_CHUNK) as usize
            })
            .sum();
        let waiting: usize = self
            .pending
            .tables
            .iter()
            .map(|(_, _, t)| usize::from(t.chunks()))
            .sum();
        self.maglev_chunks + waiting + new_tables
    }
}

/// Backends are shared by address, port, protocol and locality.
fn backend_addr(f: &Frontend, b: &Backend) -> BackendAddr {
    (b.addr, b.port, f.key.protocol, b.local)
}

/// A backend's name in the Maglev hash: its address (IPv4 mapped) and port.
pub(super) fn maglev_name(b: &Backend) -> Vec<u8> {
    let mut name = match b.addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    name.extend_from_slice(&b.port.to_be_bytes());
    name
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
