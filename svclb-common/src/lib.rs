//! The ABI shared by the svclb eBPF programs and the userspace agent: map
//! names and sizes, key/value layouts and flag bits. Nothing else lives here.
//!
//! Every struct is `#[repr(C)]` with explicit padding so that both sides agree
//! byte for byte and keys hash identically (no uninitialised padding).
//!
//! Addresses are `[u32; 4]` holding the 16 bytes of an IPv6 address in network
//! order, exactly as `bpf_sock_addr.user_ip6` does; IPv4 addresses are stored
//! IPv4-mapped (`::ffff:a.b.c.d`), so one map serves both families and a
//! dual-stack socket connecting to a mapped address finds IPv4 services.
//! Ports are stored in host byte order.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map names, as declared in svclb-ebpf and pinned under the agent's bpffs dir.
pub mod maps {
    /// [`crate::ServiceKey`] -> [`crate::ServiceValue`]: frontends and their backend slots.
    pub const SERVICES: &str = "SVCLB_SERVICES";
    /// backend id (u32) -> [`crate::Backend`].
    pub const BACKENDS: &str = "SVCLB_BACKENDS";
    /// rev-NAT id (u32) -> [`crate::RevNat`]: the frontend a translated flow belongs to.
    pub const REV_NAT: &str = "SVCLB_REV_NAT";
    /// [`crate::SockRevNatKey`] -> [`crate::SockRevNat`] (LRU): per-socket reverse
    /// translation for recvmsg and getpeername.
    pub const SOCK_REV_NAT: &str = "SVCLB_SOCK_RNAT";
    /// [`crate::AffinityKey`] -> [`crate::Affinity`] (LRU): the backend a
    /// client (network namespace) was last sent to, per frontend.
    pub const AFFINITY: &str = "SVCLB_AFFINITY";
    /// [`crate::AffinityMatchKey`] -> u8: the backends of each affinity
    /// frontend, so a remembered backend that left the service is not reused.
    pub const AFFINITY_MATCH: &str = "SVCLB_AFF_MATCH";

    pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
    pub const BACKENDS_MAX_ENTRIES: u32 = 131_072;
    pub const REV_NAT_MAX_ENTRIES: u32 = 65_536;
    pub const SOCK_REV_NAT_MAX_ENTRIES: u32 = 262_144;
    pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;
    pub const AFFINITY_MATCH_MAX_ENTRIES: u32 = 131_072;
    /// `BPF_F_NO_PREALLOC`: the writer relies on freed elements being
    /// RCU-deferred, so a reader holding a value never sees it reused.
    pub const NO_PREALLOC: u32 = 1;
}

/// Names of the global (read-only data) settings the loader fills in.
pub mod globals {
    /// u8: 1 when the kernel has `bpf_set_retval` for cgroup programs (5.18+),
    /// so a refused connect returns ECONNREFUSED instead of EPERM.
    pub const HAS_SET_RETVAL: &str = "SVCLB_HAS_SET_RETVAL";
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Which traffic a frontend serves. Only in-cluster socket traffic so far.
pub const SCOPE_SOCKET: u8 = 0;

/// Most backends one frontend may have (slots 1..=count).
pub const MAX_BACKENDS_PER_FRONTEND: u16 = 4096;

/// Backend id 0 is never allocated, so a zeroed value can't name a backend.
pub const BACKEND_ID_NONE: u32 = 0;

/// `Backend::state` values.
pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;

/// `ServiceValue::flags` bits (slot 0 only). One of the first four says
/// what kind of address the frontend is.
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_FLAG_NODE_PORT: u16 = 1 << 1;
pub const SVC_FLAG_EXTERNAL_IP: u16 = 1 << 2;
pub const SVC_FLAG_LOAD_BALANCER: u16 = 1 << 3;
/// With no backends, drop (a Local traffic policy without local endpoints)
/// instead of refusing (a service without endpoints).
pub const SVC_FLAG_DROP_EMPTY: u16 = 1 << 4;
/// ClientIP session affinity; `ServiceValue::affinity_timeout` is set.
pub const SVC_FLAG_AFFINITY: u16 = 1 << 5;

/// Key of the services map. Slot 0 holds the frontend record; slots
/// 1..=count hold the backend ids the frontend load-balances over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub slot: u16,
    pub _pad: u16,
}

/// Value of the services map. In slot 0: `count`, `rev_nat_id`, `flags`,
/// `affinity_timeout`; in slots 1..: `backend_id`. One type keeps every map
/// value the same size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u16,
    pub rev_nat_id: u32,
    /// Seconds (with `SVC_FLAG_AFFINITY`).
    pub affinity_timeout: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RevNat {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A connected or sending socket (by cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// The frontend address the socket's application believes it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockRevNat {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
}

/// A client of an affinity frontend. At the socket hooks the client is
/// the network namespace (a pod), by its cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub client: u64,
    pub rev_nat_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Affinity {
    /// bpf_ktime_get_ns() of the last connection.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct AffinityMatchKey {
    pub rev_nat_id: u32,
    pub backend_id: u32,
}

/// The IPv4-mapped form of an IPv4 address given as the network-order u32
/// that `bpf_sock_addr.user_ip4` holds.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be]
}

/// Whether an address is IPv4-mapped; its IPv4 address is then `addr[3]`.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C), padding-free (explicit pad fields) and
    // valid for any bit pattern (they are bytemuck::Pod).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNat {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::Affinity {}
    unsafe impl aya::Pod for super::AffinityMatchKey {}
}
