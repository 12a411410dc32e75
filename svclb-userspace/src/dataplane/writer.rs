//! The map writer: diffs desired frontends against what the maps hold and
//! writes only the difference, in an order that keeps readers consistent.
//!
//! Readers (the socket programs) read a frontend's slot 0 (backend count),
//! then one slot in 1..=count, then that slot's backend; with session
//! affinity they may instead take a remembered backend that the
//! affinity-match map still lists for the frontend. So for every reader:
//! - every slot within the count it read must exist, and
//! - every backend a slot names must exist.
//!
//! An update of one service therefore goes:
//! 1. upsert new backends (and changed backend states);
//! 2. write changed backend slots 1..=new_count (a slot overwritten in place
//!    flips atomically from one valid backend id to another) and add
//!    affinity-match entries for new members;
//! 3. write slot 0 with the new count: from here new readers use the new set;
//! 4. delete slot 0 of frontends that are gone;
//! 5. wait for an RCU grace period: readers that read an old count are done;
//! 6. delete slots beyond the new counts, gone frontends' slots, rev-NAT and
//!    affinity-match entries, and backends no slot names any more.
//!
//! Map hash elements are allocated without preallocation, so a value that is
//! replaced while a reader copies it is freed only after a grace period too.
//!
//! External frontends (XDP) also have a Maglev table over their backends and
//! may have source ranges. Both are written before slot 0: a changed table
//! goes into the other of two generations and slot 0 switches to it, so
//! readers see the whole old or the whole new table; the old generation is
//! deleted after the barrier, like stale slots. Source ranges are only
//! looked up, never followed, so removed ones go right after slot 0.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use svclb_common::{
    maps, AffinityMatchKey, Backend as AbiBackend, MaglevChunk, MaglevKey, RevNat, ServiceKey,
    ServiceValue, SourceRangeKey, BACKEND_ACTIVE, BACKEND_TERMINATING, MAGLEV_CHUNK,
    SVC_FLAG_AFFINITY, SVC_FLAG_CLUSTER_IP, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
};

use super::abi::{
    addr_from_abi, addr_to_abi, frontend_key, proto_from_abi, proto_to_abi, service_key,
};
use super::{maglev, DataplaneError};
use crate::model::{
    Cidr, Frontend, FrontendKey, FrontendKind, Protocol, Scope, ServiceId, WhenEmpty,
};

/// The map operations the writer needs; the kernel implementation is in
/// `kernel.rs`, tests use an in-memory one that checks reader consistency.
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

/// A source-ranges trie key: prefix length (of rev-NAT id + address) and data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub prefix_len: u32,
    pub rev_nat_id: u32,
    pub addr: [u32; 4],
}

impl SourceRange {
    fn of(rev_nat_id: u32, c: &Cidr) -> Self {
        let bits = match c.addr {
            IpAddr::V4(_) => 96 + u32::from(c.prefix),
            IpAddr::V6(_) => u32::from(c.prefix),
        };
        SourceRange {
            prefix_len: 32 + bits,
            rev_nat_id,
            addr: addr_to_abi(c.addr),
        }
    }

    fn cidr(&self) -> Cidr {
        let addr = addr_from_abi(self.addr);
        let bits = self.prefix_len.saturating_sub(32);
        let prefix = match addr {
            IpAddr::V4(_) => bits.saturating_sub(96),
            IpAddr::V6(_) => bits,
        };
        Cidr {
            addr,
            prefix: prefix as u8,
        }
    }

    pub fn abi(&self) -> SourceRangeKey {
        SourceRangeKey {
            rev_nat_id_be: self.rev_nat_id.to_be(),
            addr: self.addr,
        }
    }

    pub fn from_abi(prefix_len: u32, key: &SourceRangeKey) -> Self {
        SourceRange {
            prefix_len,
            rev_nat_id: u32::from_be(key.rev_nat_id_be),
            addr: key.addr,
        }
    }
}

/// The Maglev table an external frontend's slot 0 points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Table {
    generation: u16,
    size: u32,
}

impl Table {
    fn chunks(&self) -> u16 {
        self.size.div_ceil(MAGLEV_CHUNK) as u16
    }

    fn keys(&self, rev_nat_id: u32) -> impl Iterator<Item = MaglevKey> + '_ {
        (0..self.chunks()).map(move |chunk| MaglevKey {
            rev_nat_id,
            generation: self.generation,
            chunk,
        })
    }
}

/// A backend as the maps know it: address, port, protocol and whether it
/// is on this node. Locality is part of the identity, so services whose
/// slices disagree about an endpoint's node can't flip each other's.
type BackendAddr = (IpAddr, u16, Protocol, bool);

#[derive(Clone, Debug)]
struct BackendEntry {
    addr: BackendAddr,
    state: u8,
    /// How many slots name this backend.
    refs: u32,
}

/// Slot 0's content apart from the count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Record {
    flags: u16,
    affinity_timeout: u32,
}

impl Record {
    fn of(f: &Frontend) -> Self {
        let kind = match f.kind {
            FrontendKind::ClusterIp => SVC_FLAG_CLUSTER_IP,
            FrontendKind::NodePort => SVC_FLAG_NODE_PORT,
            FrontendKind::ExternalIp => SVC_FLAG_EXTERNAL_IP,
            FrontendKind::LoadBalancer => SVC_FLAG_LOAD_BALANCER,
        };
        let drop = match f.when_empty {
            WhenEmpty::Drop => SVC_FLAG_DROP_EMPTY,
            WhenEmpty::Refuse => 0,
        };
        let affinity = if f.affinity_timeout.is_some() {
            SVC_FLAG_AFFINITY
        } else {
            0
        };
        let ranges = if f.source_ranges.is_empty() {
            0
        } else {
            SVC_FLAG_SOURCE_RANGES
        };
        Record {
            flags: kind | drop | affinity | ranges,
            affinity_timeout: f.affinity_timeout.unwrap_or(0),
        }
    }

    fn affinity(&self) -> bool {
        self.flags & SVC_FLAG_AFFINITY != 0
    }
}

#[derive(Clone, Debug)]
struct AppliedFrontend {
    /// None: found in the maps at start-up and not claimed by a service yet.
    owner: Option<ServiceId>,
    rev_nat_id: u32,
    record: Record,
    /// Backend ids of slots 1..=len.
    slots: Vec<u32>,
    /// External frontends with backends.
    table: Option<Table>,
    source_ranges: BTreeSet<Cidr>,
}

impl AppliedFrontend {
    /// The affinity-match entries this frontend needs.
    fn members(&self) -> BTreeSet<AffinityMatchKey> {
        if !self.record.affinity() {
            return BTreeSet::new();
        }
        self.slots
            .iter()
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
    /// Entries of new Maglev tables (a prime).
    maglev_size: u32,
    /// Deletions waiting for the next `flush` (after a barrier).
    pending: Deferred,
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

/// Work collected while applying, done after the barrier.
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
    tables: Vec<(FrontendKey, u32, Table)>,
}

impl Deferred {
    fn is_empty(&self) -> bool {
        self.service_keys.is_empty()
            && self.rev_nat_ids.is_empty()
            && self.affinity_match.is_empty()
            && self.tables.is_empty()
    }
}

impl<M: MapOps> Writer<M> {
    /// Adopt whatever the maps already hold (left by an earlier agent), so a
    /// restart rewrites nothing that is still right. Entries no reader can
    /// reach (slots beyond a count, unreferenced backends) are removed, and
    /// frontends the earlier agent left half-written are dropped for the
    /// resync to write again.
    pub fn adopt(maps: M, capacity: Capacity) -> Result<Self, DataplaneError> {
        let contents = maps.read_all()?;
        let mut w = Writer {
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
            maglev_size: super::maglev::DEFAULT_TABLE_SIZE,
            pending: Deferred::default(),
        };
        let mut slots: HashMap<(FrontendKey, u16), u32> = HashMap::new();
        let mut garbage = Deferred::default();
        for (key, value) in &contents.services {
            match frontend_key(key) {
                Some(fk) if key.slot == 0 => {
                    let applied = AppliedFrontend {
                        owner: None,
                        rev_nat_id: value.rev_nat_id,
                        record: Record {
                            flags: value.flags,
                            affinity_timeout: value.affinity_timeout,
                        },
                        slots: vec![0; value.count as usize],
                        table: (value.maglev_size > 0).then_some(Table {
                            generation: value.maglev_generation,
                            size: value.maglev_size,
                        }),
                        source_ranges: BTreeSet::new(),
                    };
                    w.frontends.insert(fk, applied);
                    w.next_rev_nat_id = w.next_rev_nat_id.max(value.rev_nat_id + 1);
                }
                Some(fk) => {
                    slots.insert((fk, key.slot), value.backend_id);
                }
                None => garbage.service_keys.push(*key),
            }
        }
        for ((fk, slot), id) in slots {
            match w.frontends.get_mut(&fk) {
                Some(f) if (slot as usize) <= f.slots.len() => f.slots[slot as usize - 1] = id,
                _ => garbage.service_keys.push(service_key(&fk, slot)),
            }
        }
        let mut by_id: HashMap<u32, (BackendAddr, u8)> = HashMap::new();
        for (id, b) in &contents.backends {
            w.next_backend_id = w.next_backend_id.max(id + 1);
            match proto_from_abi(b.proto) {
                Some(p) => {
                    let addr = (addr_from_abi(b.addr), b.port, p, b.local != 0);
                    by_id.insert(*id, (addr, b.state));
                }
                None => w.maps.del_backend(*id)?,
            }
        }
        let chunks: BTreeSet<MaglevKey> = contents.maglev.iter().copied().collect();
        let broken: Vec<FrontendKey> = w
            .frontends
            .iter()
            .filter(|(_, f)| {
                f.slots.iter().any(|id| !by_id.contains_key(id))
                    || f.table
                        .is_some_and(|t| t.keys(f.rev_nat_id).any(|k| !chunks.contains(&k)))
            })
            .map(|(k, _)| *k)
            .collect();
        for fk in broken {
            let f = w.frontends.remove(&fk).expect("listed above");
            w.maps.del_service(&service_key(&fk, 0))?;
            garbage
                .service_keys
                .extend((1..=f.slots.len() as u16).map(|s| service_key(&fk, s)));
        }
        let mut members = BTreeSet::new();
        let mut live_chunks = BTreeSet::new();
        for f in w.frontends.values() {
            w.service_entries += 1 + f.slots.len();
            members.extend(f.members());
            if let Some(t) = f.table {
                live_chunks.extend(t.keys(f.rev_nat_id));
            }
            for id in &f.slots {
                let (addr, state) = by_id[id];
                w.by_addr.insert(addr, *id);
                w.backends
                    .entry(*id)
                    .or_insert(BackendEntry {
                        addr,
                        state,
                        refs: 0,
                    })
                    .refs += 1;
            }
        }
        w.maglev_chunks = live_chunks.len();
        let stale_chunks: Vec<MaglevKey> = chunks.difference(&live_chunks).copied().collect();
        let by_rev_nat: HashMap<u32, FrontendKey> = w
            .frontends
            .iter()
            .map(|(k, f)| (f.rev_nat_id, *k))
            .collect();
        let mut stale_ranges = Vec::new();
        for r in &contents.source_ranges {
            match by_rev_nat.get(&r.rev_nat_id) {
                Some(fk) => {
                    let f = w.frontends.get_mut(fk).expect("indexed above");
                    f.source_ranges.insert(r.cidr());
                }
                None => stale_ranges.push(*r),
            }
        }
        let found: BTreeSet<AffinityMatchKey> = contents.affinity_match.iter().copied().collect();
        for key in members.difference(&found) {
            w.maps.put_affinity_match(key)?;
        }
        let stale_members: Vec<AffinityMatchKey> = found.difference(&members).copied().collect();
        let live_rev_nat: BTreeSet<u32> = w.frontends.values().map(|f| f.rev_nat_id).collect();
        garbage.rev_nat_ids.extend(
            contents
                .rev_nat
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| !live_rev_nat.contains(id)),
        );
        let orphans: Vec<u32> = by_id
            .keys()
            .copied()
            .filter(|id| !w.backends.contains_key(id))
            .collect();
        if !garbage.is_empty()
            || !orphans.is_empty()
            || !stale_members.is_empty()
            || !stale_chunks.is_empty()
            || !stale_ranges.is_empty()
        {
            w.maps.barrier()?;
        }
        w.delete(&garbage)?;
        for key in &stale_chunks {
            w.maps.del_maglev(key)?;
        }
        for key in &stale_ranges {
            w.maps.del_source_range(key)?;
        }
        for key in &stale_members {
            w.maps.del_affinity_match(key)?;
        }
        for id in orphans {
            w.maps.del_backend(id)?;
        }
        Ok(w)
    }

    /// Entries of the Maglev tables written from now on (a prime; see
    /// `maglev::validate_table_size`). Tables of another size are rewritten
    /// at their frontend's next update.
    pub fn set_maglev_size(&mut self, size: u32) {
        self.maglev_size = size;
    }

    /// Make the frontends owned by `owner` exactly `desired`. Frontends owned
    /// by another service are left alone (reported as a conflict).
    pub fn apply(
        &mut self,
        owner: &ServiceId,
        desired: &[Frontend],
    ) -> Result<ApplyStats, DataplaneError> {
        let mut stats = ApplyStats::default();
        let mut wanted: Vec<&Frontend> = Vec::new();
        let mut conflicts = Vec::new();
        for f in desired {
            match self.frontends.get(&f.key).and_then(|a| a.owner.as_ref()) {
                Some(other) if other != owner => conflicts.push((f.key, other.clone())),
                _ => wanted.push(f),
            }
        }
        let wanted_keys: BTreeSet<FrontendKey> = wanted.iter().map(|f| f.key).collect();
        let gone: Vec<FrontendKey> = self
            .by_owner
            .get(owner)
            .into_iter()
            .flatten()
            .filter(|k| !wanted_keys.contains(k))
            .copied()
            .collect();
        self.check_capacity(owner, &wanted)?;

        // 1. Backends.
        for f in &wanted {
            for b in &f.backends {
                let addr = (b.addr, b.port, f.key.protocol, b.local);
                let state = if b.terminating {
                    BACKEND_TERMINATING
                } else {
                    BACKEND_ACTIVE
                };
                let id = match self.by_addr.get(&addr) {
                    Some(id) if self.backends[id].state == state => continue,
                    Some(id) => *id,
                    None => {
                        let id = self.next_backend_id;
                        self.next_backend_id += 1;
                        id
                    }
                };
                self.maps.put_backend(id, &abi_backend(&addr, state))?;
                stats.writes += 1;
                self.by_addr.insert(addr, id);
                let refs = self.backends.get(&id).map_or(0, |e| e.refs);
                self.backends.insert(id, BackendEntry { addr, state, refs });
            }
        }

        // 2.-3. Slots and affinity members, then slot 0, per frontend.
        let mut deferred = std::mem::take(&mut self.pending);
        for f in &wanted {
            let old = self.frontends.get(&f.key).cloned();
            let rev_nat_id = match &old {
                Some(a) => a.rev_nat_id,
                None => {
                    let id = self.next_rev_nat_id;
                    self.next_rev_nat_id += 1;
                    let rn = RevNat {
                        addr: addr_to_abi(f.key.addr),
                        port: f.key.port,
                        _pad: [0; 6],
                    };
                    self.maps.put_rev_nat(id, &rn)?;
                    stats.writes += 1;
                    id
                }
            };
            let mut new = AppliedFrontend {
                owner: Some(owner.clone()),
                rev_nat_id,
                record: Record::of(f),
                slots: f
                    .backends
                    .iter()
                    .map(|b| self.by_addr[&(b.addr, b.port, f.key.protocol, b.local)])
                    .collect(),
                table: None,
                source_ranges: f.source_ranges.iter().copied().collect(),
            };
            let old_slots = old.as_ref().map_or(&[][..], |a| &a.slots[..]);
            for (i, id) in new.slots.iter().enumerate() {
                if old_slots.get(i) != Some(id) {
                    let value = ServiceValue {
                        backend_id: *id,
                        ..ServiceValue::default()
                    };
                    self.maps
                        .put_service(&service_key(&f.key, i as u16 + 1), &value)?;
                    stats.writes += 1;
                }
            }
            let old_members = old
                .as_ref()
                .map(AppliedFrontend::members)
                .unwrap_or_default();
            let new_members = new.members();
            for key in new_members.difference(&old_members) {
                self.maps.put_affinity_match(key)?;
                stats.writes += 1;
            }
            let old_table = old.as_ref().and_then(|a| a.table);
            new.table = self.write_table(f, &new, old_slots, old_table, &mut stats)?;
            if let Some(t) = old_table.filter(|t| new.table != Some(*t)) {
                deferred.tables.push((f.key, rev_nat_id, t));
            }
            self.maglev_chunks += new.table.map_or(0, |t| usize::from(t.chunks()));
            self.maglev_chunks -= old_table.map_or(0, |t| usize::from(t.chunks()));
            let old_ranges = old
                .as_ref()
                .map(|a| a.source_ranges.clone())
                .unwrap_or_default();
            for c in new.source_ranges.difference(&old_ranges) {
                self.maps
                    .put_source_range(&SourceRange::of(rev_nat_id, c))?;
                stats.writes += 1;
            }
            let unchanged = old.as_ref().is_some_and(|a| {
                a.slots.len() == new.slots.len() && a.record == new.record && a.table == new.table
            });
            if !unchanged {
                let value = ServiceValue {
                    count: new.slots.len() as u16,
                    flags: new.record.flags,
                    rev_nat_id,
                    affinity_timeout: new.record.affinity_timeout,
                    maglev_generation: new.table.map_or(0, |t| t.generation),
                    maglev_size: new.table.map_or(0, |t| t.size),
                    ..ServiceValue::default()
                };
                self.maps.put_service(&service_key(&f.key, 0), &value)?;
                stats.writes += 1;
            }
            // Source ranges are looked up, never followed: removed ones can
            // go at once (after slot 0, which may have dropped the flag).
            for c in old_ranges.difference(&new.source_ranges) {
                self.maps
                    .del_source_range(&SourceRange::of(rev_nat_id, c))?;
                stats.deletes += 1;
            }
            deferred
                .affinity_match
                .extend(old_members.difference(&new_members).map(|k| (f.key, *k)));
            deferred.service_keys.extend(
                (new.slots.len() + 1..=old_slots.len()).map(|s| service_key(&f.key, s as u16)),
            );
            for id in &new.slots {
                self.backend_refs(*id, 1);
            }
            for id in old_slots {
                self.backend_refs(*id, -1);
            }
            deferred.released.extend(old_slots.iter().copied());
            self.service_entries =
                self.service_entries + new.slots.len() + usize::from(old.is_none())
                    - old_slots.len();
            self.by_owner
                .entry(owner.clone())
                .or_default()
                .insert(f.key);
            self.frontends.insert(f.key, new);
        }

        // 4. Frontends that are gone stop being found.
        for key in gone {
            self.remove_frontend(key, &mut deferred)?;
            stats.deletes += 1;
        }

        // 5.-6. happen in `flush`, once per batch of updates.
        self.pending = deferred;
        if let Some((key, other)) = conflicts.first() {
            return Err(DataplaneError::Conflict {
                service: owner.clone(),
                frontend: *key,
                owner: other.clone(),
            });
        }
        Ok(stats)
    }

    /// Remove every frontend nobody claimed since start-up (services deleted
    /// while no agent ran). Call once all sources have synced.
    pub fn prune_unclaimed(&mut self) -> Result<ApplyStats, DataplaneError> {
        let unclaimed: Vec<FrontendKey> = self
            .frontends
            .iter()
            .filter(|(_, a)| a.owner.is_none())
            .map(|(k, _)| *k)
            .collect();
        let mut stats = ApplyStats::default();
        let mut deferred = std::mem::take(&mut self.pending);
        for key in unclaimed {
            self.remove_frontend(key, &mut deferred)?;
            stats.deletes += 1;
        }
        self.pending = deferred;
        stats.deletes += self.flush()?;
        Ok(stats)
    }

    /// Entries in use: (services map, backends map).
    pub fn usage(&self) -> (usize, usize) {
        (self.service_entries, self.backends.len())
    }

    pub fn maps(&self) -> &M {
        &self.maps
    }

    /// Delete slot 0 now (new readers stop finding the frontend); the rest
    /// goes after the barrier.
    fn remove_frontend(
        &mut self,
        key: FrontendKey,
        deferred: &mut Deferred,
    ) -> Result<(), DataplaneError> {
        let a = self
            .frontends
            .remove(&key)
            .expect("callers list existing frontends");
        self.maps.del_service(&service_key(&key, 0))?;
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
        if let Some(owned) = a.owner.as_ref().and_then(|o| self.by_owner.get_mut(o)) {
            owned.remove(&key);
            if owned.is_empty() {
                self.by_owner
                    .remove(a.owner.as_ref().expect("just matched"));
            }
        }
        for id in &a.slots {
            self.backend_refs(*id, -1);
        }
        deferred.released.extend(a.slots.iter().copied());
        self.service_entries -= 1 + a.slots.len();
        Ok(())
    }

    fn backend_refs(&mut self, id: u32, delta: i32) {
        if let Some(e) = self.backends.get_mut(&id) {
            e.refs = e.refs.saturating_add_signed(delta);
        }
    }

    /// Steps 5 and 6: wait for readers, then delete what they might still
    /// have been using. Call after a batch of `apply`s (one grace period per
    /// batch, off the path that makes changes visible). Entries that became
    /// live again since (a frontend that grew back, a backend re-added) stay.
    pub fn flush(&mut self) -> Result<usize, DataplaneError> {
        let mut d = std::mem::take(&mut self.pending);
        d.service_keys.retain(|k| {
            let fk = frontend_key(k).expect("the writer only defers keys it wrote");
            self.frontends
                .get(&fk)
                .is_none_or(|f| k.slot as usize > f.slots.len())
        });
        d.affinity_match.retain(|(fk, k)| {
            !self.frontends.get(fk).is_some_and(|f| {
                f.rev_nat_id == k.rev_nat_id
                    && f.record.affinity()
                    && f.slots.contains(&k.backend_id)
            })
        });
        d.affinity_match.sort_unstable();
        d.affinity_match.dedup();
        // A table may flip generations several times between flushes.
        d.tables.sort_unstable();
        d.tables.dedup();
        d.tables.retain(|(fk, rev_nat_id, t)| {
            !self
                .frontends
                .get(fk)
                .is_some_and(|f| f.rev_nat_id == *rev_nat_id && f.table == Some(*t))
        });

        d.service_keys
            .sort_unstable_by_key(|k| (k.addr, k.port, k.proto, k.scope, k.slot));
        d.service_keys.dedup();
        let mut orphans: Vec<u32> = d
            .released
            .iter()
            .copied()
            .filter(|id| self.backends.get(id).is_some_and(|e| e.refs == 0))
            .collect();
        orphans.sort_unstable();
        orphans.dedup();
        if d.is_empty() && orphans.is_empty() {
            return Ok(0);
        }
        self.maps.barrier()?;
        let mut deletes = self.delete(&d)?;
        for id in orphans {
            let e = self.backends.remove(&id).expect("listed above");
            self.by_addr.remove(&e.addr);
            self.maps.del_backend(id)?;
            deletes += 1;
        }
        Ok(deletes)
    }

    fn delete(&mut self, d: &Deferred) -> Result<usize, DataplaneError> {
        for key in &d.service_keys {
            self.maps.del_service(key)?;
        }
        for id in &d.rev_nat_ids {
            self.maps.del_rev_nat(*id)?;
        }
        for (_, key) in &d.affinity_match {
            self.maps.del_affinity_match(key)?;
        }
        let mut chunks = 0;
        for (_, rev_nat_id, t) in &d.tables {
            for key in t.keys(*rev_nat_id) {
                self.maps.del_maglev(&key)?;
                chunks += 1;
            }
        }
        Ok(d.service_keys.len() + d.rev_nat_ids.len() + d.affinity_match.len() + chunks)
    }

    /// The Maglev table an external frontend needs: the old one while its
    /// backends and the table size stay the same, else a new one written
    /// into the other generation.
    fn write_table(
        &mut self,
        f: &Frontend,
        new: &AppliedFrontend,
        old_slots: &[u32],
        old: Option<Table>,
        stats: &mut ApplyStats,
    ) -> Result<Option<Table>, DataplaneError> {
        if f.key.scope != Scope::External || new.slots.is_empty() {
            return Ok(None);
        }
        if let Some(t) = old.filter(|t| t.size == self.maglev_size && old_slots == new.slots) {
            return Ok(Some(t));
        }
        let table = Table {
            generation: old.map_or(0, |t| t.generation ^ 1),
            size: self.maglev_size,
        };
        // Names: address and port, so every node builds the same table.
        let names: Vec<Vec<u8>> = f
            .backends
            .iter()
            .map(|b| {
                let mut name = match b.addr {
                    IpAddr::V4(a) => a.to_ipv6_mapped().octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                name.extend_from_slice(&b.port.to_be_bytes());
                name
            })
            .collect();
        let entries = maglev::table(&names, table.size);
        for (key, part) in table
            .keys(new.rev_nat_id)
            .zip(entries.chunks(MAGLEV_CHUNK as usize))
        {
            let mut chunk = MaglevChunk {
                backend_ids: [0; MAGLEV_CHUNK as usize],
            };
            for (slot, &index) in chunk.backend_ids.iter_mut().zip(part) {
                *slot = new.slots[usize::from(index)];
            }
            self.maps.put_maglev(&key, &chunk)?;
            stats.writes += 1;
        }
        Ok(Some(table))
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
                    .map(|b| (b.addr, b.port, f.key.protocol, b.local))
            })
            .filter(|a| !self.by_addr.contains_key(a))
            .collect();
        let backends = self.backends.len() + new_backends.len();
        // Every external frontend may get a new table while the old one waits.
        let per_table = self.maglev_size.div_ceil(MAGLEV_CHUNK) as usize;
        let tables = wanted
            .iter()
            .filter(|f| f.key.scope == Scope::External && !f.backends.is_empty())
            .count();
        let chunks = self.maglev_chunks
            + self
                .pending
                .tables
                .iter()
                .map(|(_, _, t)| usize::from(t.chunks()))
                .sum::<usize>()
            + tables * per_table;
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
}

fn abi_backend(addr: &BackendAddr, state: u8) -> AbiBackend {
    AbiBackend {
        addr: addr_to_abi(addr.0),
        port: addr.1,
        proto: proto_to_abi(addr.2),
        state,
        local: u8::from(addr.3),
        _pad: 0,
        _pad2: 0,
    }
}

#[cfg(test)]
#[path = "writer_tests.rs"]
mod tests;
