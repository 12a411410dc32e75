//! `MapOps` on the real, pinned BPF maps.
use aya::maps::{HashMap, Map, MapData, MapError};
use svclb_common::{AffinityMatchKey, Backend, RevNat, ServiceKey, ServiceValue};

use super::barrier::RcuBarrier;
use super::writer::{MapContents, MapOps};
use super::DataplaneError;

pub struct KernelMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub rev_nat: HashMap<MapData, u32, RevNat>,
    pub affinity_match: HashMap<MapData, AffinityMatchKey, u8>,
    barrier: RcuBarrier,
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, op, source }
}

impl KernelMaps {
    pub fn new(
        services: Map,
        backends: Map,
        rev_nat: Map,
        affinity_match: Map,
    ) -> Result<Self, DataplaneError> {
        use svclb_common::maps::*;
        Ok(KernelMaps {
            services: HashMap::try_from(services).map_err(map_err(SERVICES, "open"))?,
            backends: HashMap::try_from(backends).map_err(map_err(BACKENDS, "open"))?,
            rev_nat: HashMap::try_from(rev_nat).map_err(map_err(REV_NAT, "open"))?,
            affinity_match: HashMap::try_from(affinity_match)
                .map_err(map_err(AFFINITY_MATCH, "open"))?,
            barrier: RcuBarrier::new().map_err(DataplaneError::Barrier)?,
        })
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
        self.services
            .insert(key, value, 0)
            .map_err(map_err(svclb_common::maps::SERVICES, "update"))
    }
    fn del_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.services
            .remove(key)
            .map_err(map_err(svclb_common::maps::SERVICES, "delete"))
    }
    fn put_backend(&mut self, id: u32, backend: &Backend) -> Result<(), DataplaneError> {
        self.backends
            .insert(id, backend, 0)
            .map_err(map_err(svclb_common::maps::BACKENDS, "update"))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.backends
            .remove(&id)
            .map_err(map_err(svclb_common::maps::BACKENDS, "delete"))
    }
    fn put_rev_nat(&mut self, id: u32, rev_nat: &RevNat) -> Result<(), DataplaneError> {
        self.rev_nat
            .insert(id, rev_nat, 0)
            .map_err(map_err(svclb_common::maps::REV_NAT, "update"))
    }
    fn del_rev_nat(&mut self, id: u32) -> Result<(), DataplaneError> {
        self.rev_nat
            .remove(&id)
            .map_err(map_err(svclb_common::maps::REV_NAT, "delete"))
    }
    fn put_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        self.affinity_match
            .insert(key, 1, 0)
            .map_err(map_err(svclb_common::maps::AFFINITY_MATCH, "update"))
    }
    fn del_affinity_match(&mut self, key: &AffinityMatchKey) -> Result<(), DataplaneError> {
        self.affinity_match
            .remove(key)
            .map_err(map_err(svclb_common::maps::AFFINITY_MATCH, "delete"))
    }
    fn barrier(&mut self) -> Result<(), DataplaneError> {
        self.barrier.wait().map_err(DataplaneError::Barrier)
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
        })
    }
}
