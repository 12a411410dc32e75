//! The map declarations, and nothing else. The maps are pinned by name under
//! the agent's bpffs directory so that they outlive the agent process;
//! names and layouts come from svclb-common.
use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    Global,
};
use svclb_common::{
    maps::*, stats, Affinity, AffinityKey, AffinityMatchKey, Backend, Flow, FlowKey, FlowKey4,
    MaglevChunk, MaglevKey, RevNat, ServiceKey, ServiceValue, SockRevNat, SockRevNatKey,
    SourceRangeKey, UdpFlow, UdpFlowKey, XdpConfig,
};

use crate::scratch::Scratch;

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

#[map(name = "SVCLB_UDP_FLOWS")]
pub static UDP_FLOWS: LruHashMap<UdpFlowKey, UdpFlow> =
    LruHashMap::pinned(UDP_FLOWS_MAX_ENTRIES, 0);

#[map(name = "SVCLB_MAGLEV")]
pub static MAGLEV: HashMap<MaglevKey, MaglevChunk> =
    HashMap::pinned(MAGLEV_MAX_ENTRIES, NO_PREALLOC);

#[map(name = "SVCLB_CT4")]
pub static CONNTRACK4: LruHashMap<FlowKey4, Flow> = LruHashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);

#[map(name = "SVCLB_CT6")]
pub static CONNTRACK6: LruHashMap<FlowKey, Flow> = LruHashMap::pinned(CONNTRACK_MAX_ENTRIES, 0);

#[map(name = "SVCLB_SRC_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::pinned(SOURCE_RANGES_MAX_ENTRIES, 0);

#[map(name = "SVCLB_XDP_CONFIG")]
pub static XDP_CONFIG: Array<XdpConfig> = Array::pinned(1, 0);

#[map(name = "SVCLB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);

#[map(name = "SVCLB_TX_DEVICES")]
pub static TX_DEVICES: DevMapHash = DevMapHash::pinned(TX_DEVICES_MAX_ENTRIES, 0);

#[map(name = "SVCLB_BACKENDS_EPOCH")]
pub static BACKENDS_EPOCH: Array<u32> = Array::pinned(1, 0);

/// Not pinned: per-packet working memory of the XDP program.
#[map(name = "SVCLB_SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// Set by the loader (svclb_common::globals::HAS_SET_RETVAL).
#[unsafe(no_mangle)]
pub static SVCLB_HAS_SET_RETVAL: Global<u8> = Global::new(0);

/// Set by the loader (svclb_common::globals::HOST_NETNS_COOKIE).
#[unsafe(no_mangle)]
pub static SVCLB_HOST_NETNS_COOKIE: Global<u64> = Global::new(0);

/// Set by the loader (svclb_common::globals::UDP_TIMEOUT_NS).
#[unsafe(no_mangle)]
pub static SVCLB_UDP_TIMEOUT_NS: Global<u64> = Global::new(30_000_000_000);

/// Set by the loader (svclb_common::globals::UDP_STREAM_TIMEOUT_NS).
#[unsafe(no_mangle)]
pub static SVCLB_UDP_STREAM_TIMEOUT_NS: Global<u64> = Global::new(120_000_000_000);
