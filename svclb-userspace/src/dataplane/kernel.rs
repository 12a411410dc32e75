//! `MapOps` on the real, pinned BPF maps.
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError};
use svclb_common::{
    AffinityMatchKey, Backend, MaglevChunk, MaglevKey, RevNat, ServiceKey, ServiceValue,
    SourceRangeKey,
};

use super::abi::SourceRange;
use super::barrier::RcuBarrier;
use super::writer::{MapContents, MapOps};
use super::DataplaneError;

pub struct KernelMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub rev_nat: HashMap<MapData, u32, RevNat>,
    pub affinity_match: HashMap<MapData, AffinityMatchKey, u8>,
    pub maglev: HashMap<MapData, MaglevKey, MaglevChunk>,
    pub source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    /// Bumped after every backend deletion (see
    /// `svclb_common::maps::BACKENDS_EPOCH`).
    backends_epoch: Array<MapData, u32>,
    /// A backend was deleted but bumping the epoch failed: retried before
    /// the next barrier or backend deletion, so the bump is never lost.
    epoch_behind: bool,
    /// None when opened only to read (`open_pinned`): creating it makes a
    /// map, which kernels before 5.11 charge to RLIMIT_MEMLOCK.
    barrier: Option<RcuBarrier>,
    /// `svclb run --inject-map-faults`: the share of writes and deletes
    /// that fail on purpose (0: none), for soak tests of the retry paths.
    fault_rate: f64,
    fault_draws: u64,
    fault_seed: RandomState,
}

/// The maps the writer owns, as taken from the loaded object.
pub struct WriterMaps {
    pub services: Map,
    pub backends: Map,
    pub rev_nat: Map,
    pub affinity_match: Map,
    pub maglev: Map,
    pub source_ranges: Map,
    pub backends_epoch: Map,
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, op, source }
}

impl KernelMaps {
    pub fn new(m: WriterMaps) -> Result<Self, DataplaneError> {
        let barrier = RcuBarrier::new().map_err(DataplaneError::Barrier)?;
        Self::with_barrier(m, Some(barrier))
    }

    fn with_barrier(m: WriterMaps, barrier: Option<RcuBarrier>) -> Result<Self, DataplaneError> {
        use svclb_common::maps::*;
        Ok(KernelMaps {
            services: HashMap::try_from(m.services).map_err(map_err(SERVICES, "open"))?,
            backends: HashMap::try_from(m.backends).map_err(map_err(BACKENDS, "open"))?,
            rev_nat: HashMap::try_from(m.rev_nat).map_err(map_err(REV_NAT, "open"))?,
            affinity_match: HashMap::try_from(m.affinity_match)
                .map_err(map_err(AFFINITY_MATCH, "open"))?,
            maglev: HashMap::try_from(m.maglev).map_err(map_err(MAGLEV, "open"))?,
            source_ranges: LpmTrie::try_from(m.source_ranges)
                .map_err(map_err(SOURCE_RANGES, "open"))?,
            backends_epoch: Array::try_from(m.backends_epoch)
                .map_err(map_err(BACKENDS_EPOCH, "open"))?,
            epoch_behind: false,
            barrier,
            fault_rate: 0.0,
            fault_draws: 0,
            fault_seed: RandomState::new(),
        })
    }

    /// Make each later write or delete fail with probability `rate`.
    pub fn inject_faults(&mut self, rate: f64) {
        self.fault_rate = rate;
    }

    /// An injected failure of `op` on `map`, drawn with the fault rate.
    fn injected_fault(
        &mut self,
        map: &'static str,
        op: &'static str,
    ) -> Result<(), DataplaneError> {
        if self.fault_rate <= 0.0 {
            return Ok(());
        }
        self.fault_draws += 1;
        let bits = self.fault_seed.hash_one(self.fault_draws);
        let unit = (bits >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        if unit >= self.fault_rate {
            return Ok(());
        }
        let fault = std::io::Error::other("injected fault");
        Err(map_err(map, op)(MapError::IoError(fault)))
    }
}

impl KernelMaps {
    fn bump_backends_epoch(&mut self) -> Result<(), DataplaneError> {
        use svclb_common::maps::BACKENDS_EPOCH;
        let epoch = self
            .backends_epoch
            .get(&0, 0)
            .map_err(map_err(BACKENDS_EPOCH, "lookup"))?;
        self.backends_epoch
            .set(0, epoch.wrapping_add(1), 0)
            .map_err(map_err(BACKENDS_EPOCH, "update"))?;
        self.epoch_behind = false;
        Ok(())
    }
}

/// Collect a map's entries; entries deleted while iterating are skipped.
pub fn entries<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, DataplaneError> {
    let mut out = Vec::new();
    for item in map.iter() {
        match item {
            Ok(kv) => out.push(kv),
            Err(MapError::KeyNotFound) => continue,
            Err(e) => return Err(map_err(name, "read")(e)),
        }
    }
    Ok(out)
}

impl MapOps for KernelMaps {
    fn put_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::SERVICES, "update")?;
        self.services
            .insert(key, value, 0)
            .map_err(map_err(svclb_common::maps::SERVICES, "update"))
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::SERVICES, "delete")?;
        self.services
            .remove(key)
            .map_err(map_err(svclb_common::maps::SERVICES, "delete"))
    }
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::BACKENDS, "update")?;
        self.backends
            .insert(id, backend, 0)
            .map_err(map_err(svclb_common::maps::BACKENDS, "update"))
    }
    /// Established external flows skip the check that their backend still
    /// exists until the epoch moves: bump it once the backend is gone.
    fn del_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        use svclb_common::maps::BACKENDS;
        self.injected_fault(BACKENDS, "delete")?;
        self.backends
            .remove(&id)
            .map_err(map_err(BACKENDS, "delete"))?;
        self.epoch_behind = true;
        self.bump_backends_epoch()
    }
    fn put_rev_nat(&mut self, id: u32, rev_nat: &RevNat) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::REV_NAT, "update")?;
        self.rev_nat
            .insert(id, rev_nat, 0)
            .map_err(map_err(svclb_common::maps::REV_NAT, "update"))
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::REV_NAT, "delete")?;
        self.rev_nat
            .remove(&id)
            .map_err(map_err(svclb_common::maps::REV_NAT, "delete"))
    }
    fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::AFFINITY_MATCH, "update")?;
        self.affinity_match
            .insert(key, 1, 0)
            .map_err(map_err(svclb_common::maps::AFFINITY_MATCH, "update"))
    }
    fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::AFFINITY_MATCH, "delete")?;
        self.affinity_match
            .remove(key)
            .map_err(map_err(svclb_common::maps::AFFINITY_MATCH, "delete"))
    }
    fn put_maglev(&mut self, key: &MaglevKey, chunk: &MaglevChunk) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::MAGLEV, "update")?;
        self.maglev
            .insert(key, chunk, 0)
            .map_err(map_err(svclb_common::maps::MAGLEV, "update"))
    }
    fn del_maglev(&mut self, key: &MaglevKey) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::MAGLEV, "delete")?;
        self.maglev
            .remove(key)
            .map_err(map_err(svclb_common::maps::MAGLEV, "delete"))
    }
    fn put_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::SOURCE_RANGES, "update")?;
        self.source_ranges
            .insert(&LpmKey::new(key.prefix_len, key.abi()), 1, 0)
            .map_err(map_err(svclb_common::maps::SOURCE_RANGES, "update"))
    }
    fn del_source_range(&mut self, key: &SourceRange) -> Result<(), DataplaneError> {
        self.injected_fault(svclb_common::maps::SOURCE_RANGES, "delete")?;
        self.source_ranges
            .remove(&LpmKey::new(key.prefix_len, key.abi()))
            .map_err(map_err(svclb_common::maps::SOURCE_RANGES, "delete"))
    }
    fn barrier(&mut self) -> Result<(), DataplaneError> {
        if self.epoch_behind {
            self.bump_backends_epoch()?;
        }
        let Some(barrier) = &self.barrier else {
            return Err(DataplaneError::Barrier(std::io::Error::other(
                "maps opened read-only",
            )));
        };
        barrier.wait().map_err(DataplaneError::Barrier)
    }
    fn read_all(&self) -> Result<MapContents, DataplaneError> {
        use svclb_common::maps::*;
        Ok(MapContents {
            services: entries(&self.services, SERVICES)?,
            backends: entries(&self.backends, BACKENDS)?,
            rev_nat: entries(&self.rev_nat, REV_NAT)?,
            affinity_match: entries(&self.affinity_match, AFFINITY_MATCH)?
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
            maglev: self
                .maglev
                .keys()
                .filter_map(|k| match k {
                    Err(MapError::KeyNotFound) => None,
                    other => Some(other),
                })
                .collect::<Result<_, _>>()
                .map_err(map_err(MAGLEV, "read"))?,
            source_ranges: self
                .source_ranges
                .keys()
                .filter_map(|k| match k {
                    Err(MapError::KeyNotFound) => None,
                    other => Some(other),
                })
                .map(|k| k.map(|k| SourceRange::from_abi(k.prefix_len(), &k.data())))
                .collect::<Result<_, _>>()
                .map_err(map_err(SOURCE_RANGES, "read"))?,
        })
    }
    fn read_maglev(&self, key: &MaglevKey) -> Result<Option<MaglevChunk>, DataplaneError> {
        match self.maglev.get(key, 0) {
            Ok(chunk) => Ok(Some(chunk)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(svclb_common::maps::MAGLEV, "read")(e)),
        }
    }
}

/// The writer's maps as another process pinned them in `bpffs`, to read
/// (for `svclb verify`; no programs are loaded, no barrier is made).
pub fn open_pinned(bpffs: &std::path::Path) -> Result<KernelMaps, DataplaneError> {
    use svclb_common::maps::*;
    let open = |name: &'static str| {
        MapData::from_pin(super::map_path(bpffs, name)).map_err(map_err(name, "open"))
    };
    KernelMaps::with_barrier(
        WriterMaps {
            services: Map::HashMap(open(SERVICES)?),
            backends: Map::HashMap(open(BACKENDS)?),
            rev_nat: Map::HashMap(open(REV_NAT)?),
            affinity_match: Map::HashMap(open(AFFINITY_MATCH)?),
            maglev: Map::HashMap(open(MAGLEV)?),
            source_ranges: Map::LpmTrie(open(SOURCE_RANGES)?),
            backends_epoch: Map::Array(open(BACKENDS_EPOCH)?),
        },
        None,
    )
}
