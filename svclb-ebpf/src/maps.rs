//! The maps, pinned by name under the agent's bpffs directory so that they
//! outlive the agent process. Names and layouts come from svclb-common.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
    Global,
};
use svclb_common::{
    maps::*, Affinity, AffinityKey, AffinityMatchKey, Backend, RevNat, ServiceKey, ServiceValue,
    SockRevNat, SockRevNatKey,
};

#[map(name = "SVCLB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(SERVICES_MAX_ENTRIES, NO_PREALLOC);

#[map(name = "SVCLB_BACKENDS")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(BACKENDS_MAX_ENTRIES, NO_PREALLOC);

#[map(name = "SVCLB_REV_NAT")]
pub static REV_NAT: HashMap<u32, RevNat> = HashMap::pinned(REV_NAT_MAX_ENTRIES, NO_PREALLOC);

#[map(name = "SVCLB_SOCK_RNAT")]
pub static SOCK_REV_NAT: LruHashMap<SockRevNatKey, SockRevNat> =
    LruHashMap::pinned(SOCK_REV_NAT_MAX_ENTRIES, 0);

#[map(name = "SVCLB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::pinned(AFFINITY_MAX_ENTRIES, 0);

#[map(name = "SVCLB_AFF_MATCH")]
pub static AFFINITY_MATCH: HashMap<AffinityMatchKey, u8> =
    HashMap::pinned(AFFINITY_MATCH_MAX_ENTRIES, NO_PREALLOC);

/// Set by the loader (svclb_common::globals::HAS_SET_RETVAL).
#[unsafe(no_mangle)]
pub static SVCLB_HAS_SET_RETVAL: Global<u8> = Global::new(0);
