//! Audited access to the socket-address context and map values. This is the
//! only module with `unsafe`; everything else works on copies.
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_jiffies64,
        bpf_ktime_get_ns, bpf_set_retval,
    },
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
    EbpfContext,
};
use core::ptr::NonNull;

use svclb_common::{Flow, FlowKey, FlowKey4, Route};

use crate::maps::{CONNTRACK4, CONNTRACK6};

/// A socket address as the hooks see it: IPv4 addresses IPv4-mapped, port in
/// host byte order.
#[derive(Clone, Copy)]
pub struct SockAddr {
    pub addr: [u32; 4],
    pub port: u16,
}

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

/// The socket's protocol (IPPROTO_TCP / IPPROTO_UDP), readable in every
/// sock_addr hook.
#[inline(always)]
pub fn protocol(ctx: &SockAddrContext) -> u8 {
    // SAFETY: the kernel hands every sock_addr program a valid context; the
    // verifier checks field offsets and access sizes (u32 loads here).
    unsafe { (*sa(ctx)).protocol as u8 }
}

/// The user (destination, or peer for recvmsg/getpeername) address of an
/// AF_INET hook.
#[inline(always)]
pub fn user_addr4(ctx: &SockAddrContext) -> SockAddr {
    // SAFETY: as in `protocol`; user_ip4 and user_port are u32 loads.
    let (ip, port) = unsafe { ((*sa(ctx)).user_ip4, (*sa(ctx)).user_port) };
    SockAddr {
        addr: svclb_common::v4_mapped(ip),
        port: u16::from_be(port as u16),
    }
}

/// The user address of an AF_INET6 hook.
#[inline(always)]
pub fn user_addr6(ctx: &SockAddrContext) -> SockAddr {
    // SAFETY: as in `protocol`; each user_ip6 word is a u32 load.
    unsafe {
        let s = sa(ctx);
        SockAddr {
            addr: [
                (*s).user_ip6[0],
                (*s).user_ip6[1],
                (*s).user_ip6[2],
                (*s).user_ip6[3],
            ],
            port: u16::from_be((*s).user_port as u16),
        }
    }
}

/// Rewrite the user address of an AF_INET hook; `addr` must be IPv4-mapped.
#[inline(always)]
pub fn set_user_addr4(ctx: &SockAddrContext, to: &SockAddr) {
    // SAFETY: writes to user_ip4/user_port are allowed in connect4, sendmsg4,
    // recvmsg4 and getpeername4, the only hooks that call this; u32 stores.
    unsafe {
        (*sa(ctx)).user_ip4 = to.addr[3];
        (*sa(ctx)).user_port = u16::to_be(to.port) as u32;
    }
}

/// Rewrite the user address of an AF_INET6 hook.
#[inline(always)]
pub fn set_user_addr6(ctx: &SockAddrContext, to: &SockAddr) {
    // SAFETY: as in `set_user_addr4`, for the *6 hooks; u32 stores.
    unsafe {
        let s = sa(ctx);
        (*s).user_ip6[0] = to.addr[0];
        (*s).user_ip6[1] = to.addr[1];
        (*s).user_ip6[2] = to.addr[2];
        (*s).user_ip6[3] = to.addr[3];
        (*s).user_port = u16::to_be(to.port) as u32;
    }
}

#[inline(always)]
pub fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_socket_cookie is allowed for sock_addr programs and
    // only reads the context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// The cookie of the socket's network namespace: at the socket hooks, a pod.
#[inline(always)]
pub fn netns_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: bpf_get_netns_cookie is allowed for sock_addr programs (5.7+)
    // and only reads the context.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: no arguments, no memory access.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
pub fn random() -> u32 {
    // SAFETY: no arguments, no memory access.
    unsafe { bpf_get_prandom_u32() }
}

/// Make the syscall fail with `-errno` when the program returns 0 (reject).
/// Only called when the loader found bpf_set_retval (kernel 5.18+); the
/// verifier prunes the call otherwise because the flag is read-only data.
#[inline(always)]
pub fn set_retval(errno: i32) {
    // SAFETY: helper with a plain integer argument.
    unsafe {
        bpf_set_retval(-errno);
    }
}

/// Copy a hash map value out, so no reference into the map outlives the lookup.
#[inline(always)]
pub fn lookup<K, V: Copy>(map: &HashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: the services/backends maps are BPF_F_NO_PREALLOC, so an element
    // removed or replaced concurrently is freed only after an RCU grace
    // period; copying it immediately always yields one whole old or new value.
    unsafe { map.get(key).copied() }
}

/// Copy an LRU map value out.
#[inline(always)]
pub fn lookup_lru<K, V: Copy>(map: &LruHashMap<K, V>, key: &K) -> Option<V> {
    // SAFETY: copied at once; an entry evicted meanwhile can at worst yield a
    // stale reverse translation for one datagram, never an invalid pointer.
    unsafe { map.get(key).copied() }
}

/// A conntrack entry in the map, read and updated in place: an
/// established packet copies nothing.
#[derive(Clone, Copy)]
pub struct CtEntry(NonNull<Flow>);

impl CtEntry {
    #[inline(always)]
    pub fn flow(&self) -> &Flow {
        // SAFETY: a pointer from a successful lookup in this program run.
        // LRU map elements are preallocated and live as long as the map (which
        // the program holds), so the memory stays a valid Flow for the run.
        // If the entry were evicted and reused meanwhile (it was just marked
        // recently used), one packet would see a mix of two flows: the same
        // exposure as copying it out, which could also be torn.
        unsafe { self.0.as_ref() }
    }

    /// Copy the entry out (for code that builds other entries from it).
    #[inline(always)]
    pub fn copy_to(&self, out: &mut Flow) {
        // SAFETY: as in `flow`; copy_nonoverlapping compiles to word copies,
        // where a plain assignment may become a byte-by-byte memmove call.
        unsafe { core::ptr::copy_nonoverlapping(self.0.as_ptr(), out, 1) };
    }

    /// Cache `route` in the entry.
    #[inline(always)]
    pub fn set_route(&self, route: &Route) {
        // SAFETY: as in `flow`; a racing writer (another CPU refreshing the
        // same flow) stores an equally valid route.
        unsafe { (*self.0.as_ptr()).route = *route };
    }
}

// Conntrack: the programs work on `FlowKey`s (IPv4 addresses mapped);
// IPv4 entries are stored under the shorter `FlowKey4`, in their own map.

/// The conntrack entry for `key`.
#[inline(always)]
pub fn conntrack_entry(key: &FlowKey, v6: bool) -> Option<CtEntry> {
    let p = if v6 {
        CONNTRACK6.get_ptr_mut(key)
    } else {
        CONNTRACK4.get_ptr_mut(&FlowKey4::from_mapped(key))
    };
    p.and_then(NonNull::new).map(CtEntry)
}

/// A copy of the conntrack entry for `key`.
#[inline(always)]
pub fn conntrack_copy(key: &FlowKey, v6: bool) -> Option<Flow> {
    if v6 {
        lookup_lru(&CONNTRACK6, key)
    } else {
        lookup_lru(&CONNTRACK4, &FlowKey4::from_mapped(key))
    }
}

/// Add or replace (`flags` 0) or only add (BPF_NOEXIST) an entry; false
/// when the map refused it.
#[inline(always)]
pub fn conntrack_insert(key: &FlowKey, flow: &Flow, flags: u64, v6: bool) -> bool {
    if v6 {
        CONNTRACK6.insert(key, flow, flags).is_ok()
    } else {
        CONNTRACK4
            .insert(&FlowKey4::from_mapped(key), flow, flags)
            .is_ok()
    }
}

#[inline(always)]
pub fn conntrack_remove(key: &FlowKey, v6: bool) {
    let _ = if v6 {
        CONNTRACK6.remove(key)
    } else {
        CONNTRACK4.remove(&FlowKey4::from_mapped(key))
    };
}

/// The low 32 bits of jiffies (inlined by the verifier: a single load).
#[inline(always)]
pub fn jiffies() -> u32 {
    // SAFETY: no arguments, no memory access.
    unsafe { bpf_jiffies64() as u32 }
}

/// The agent's backends epoch (see `svclb_common::maps::BACKENDS_EPOCH`).
#[inline(always)]
pub fn backends_epoch() -> u32 {
    crate::maps::BACKENDS_EPOCH.get(0).copied().unwrap_or(0)
}

/// One entry of a Maglev table chunk, without copying the 4 KB chunk onto
/// the 512-byte stack.
#[inline(always)]
pub fn maglev_entry(key: &svclb_common::MaglevKey, index: u32) -> Option<u32> {
    let chunk = crate::maps::MAGLEV.get_ptr(key)?;
    // The compiler knows callers pass `x % MAGLEV_CHUNK` and would drop the
    // bounds check the verifier needs; a volatile read hides that.
    // SAFETY: reading a local.
    let index = unsafe { core::ptr::read_volatile(&index) } as usize;
    // SAFETY: the pointer comes from a successful lookup of a
    // BPF_F_NO_PREALLOC map, so the element stays valid until an RCU grace
    // period after its removal; `get` bounds-checks the index.
    unsafe { (*chunk).backend_ids.get(index).copied() }
}

/// The SNAT address of the family and the port range; None when the agent
/// has set no address for the family (or no valid range).
#[inline(always)]
pub fn snat_config(v6: bool) -> Option<([u32; 4], u16, u16)> {
    let cfg = crate::maps::XDP_CONFIG.get(0)?;
    let addr = if v6 { cfg.snat_addr6 } else { cfg.snat_addr4 };
    if addr == [0; 4] || cfg.snat_port_min == 0 || cfg.snat_port_max < cfg.snat_port_min {
        return None;
    }
    Some((addr, cfg.snat_port_min, cfg.snat_port_max))
}

/// Bump one of the `svclb_common::stats` counters (per CPU, no atomics).
#[inline(always)]
pub fn count(stat: u32) {
    if let Some(p) = crate::maps::STATS.get_ptr_mut(stat) {
        // SAFETY: a per-CPU array element of this CPU, valid for the
        // program's run; nothing else on this CPU runs concurrently.
        unsafe { *p += 1 };
    }
}

/// This CPU's per-packet working memory.
#[inline(always)]
pub fn scratch() -> Option<&'static mut crate::external::Scratch> {
    let p = crate::maps::SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU array element, valid while the program runs; an XDP
    // program runs to completion on its CPU, so no other reference exists.
    Some(unsafe { &mut *p })
}
