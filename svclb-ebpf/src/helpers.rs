//! The audited `unsafe`: wrappers around the kernel contexts, the BPF
//! helpers and map memory, so that the other modules (but `pkt` for packet
//! memory and `conntrack` for entries used in place) work on safe
//! functions and copies.
use aya_ebpf::{
    bindings::{bpf_fib_lookup, bpf_sock_addr},
    helpers::{
        bpf_fib_lookup as fib_lookup_helper, bpf_get_netns_cookie, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_jiffies64, bpf_ktime_get_ns, bpf_set_retval,
    },
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, XdpContext},
    EbpfContext,
};

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

/// The low 32 bits of jiffies (inlined by the verifier: a single load).
#[inline(always)]
pub fn jiffies() -> u32 {
    jiffies64() as u32
}

/// Jiffies (inlined by the verifier: a single load).
#[inline(always)]
pub fn jiffies64() -> u64 {
    // SAFETY: no arguments, no memory access.
    unsafe { bpf_jiffies64() }
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

/// `value`, opaque to the compiler. The compiler knows, say, that an index
/// is `x % N` and would drop a bounds check the verifier needs; a volatile
/// read hides that.
#[inline(always)]
pub fn opaque<T: Copy>(value: T) -> T {
    // SAFETY: reading a local.
    unsafe { core::ptr::read_volatile(&value) }
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

/// A hash map value read in place, for values too large to copy onto the
/// 512-byte stack. Only for BPF_F_NO_PREALLOC maps whose values the agent
/// replaces whole (never changes in place).
#[inline(always)]
pub fn lookup_in_place<'a, K, V>(map: &'a HashMap<K, V>, key: &K) -> Option<&'a V> {
    let p = map.get_ptr(key)?;
    // SAFETY: an element of a BPF_F_NO_PREALLOC map stays valid until an
    // RCU grace period after its removal, which is after this program run.
    Some(unsafe { &*p })
}

/// This CPU's element `index` of a per-CPU array. Take one reference per
/// element at a time.
// The map is shared, but this CPU's element belongs to the running program.
#[allow(clippy::mut_from_ref)]
#[inline(always)]
pub fn this_cpu<T>(map: &'static PerCpuArray<T>, index: u32) -> Option<&'static mut T> {
    let p = map.get_ptr_mut(index)?;
    // SAFETY: a per-CPU array element, valid while the program runs; a
    // program runs to completion on its CPU, so nothing else on this CPU
    // uses the element concurrently.
    Some(unsafe { &mut *p })
}

/// bpf_fib_lookup on the packet's netns, as the ingress device would route.
/// Returns the BPF_FIB_LKUP_RET_* code; `params` holds the result.
#[inline(always)]
pub fn fib_lookup(ctx: &XdpContext, params: &mut bpf_fib_lookup) -> i64 {
    // SAFETY: `params` is a valid, exclusively borrowed struct of the size
    // passed; the helper only writes inside it.
    unsafe {
        fib_lookup_helper(
            ctx.as_ptr(),
            params as *mut bpf_fib_lookup,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    }
}

/// A zeroed lookup request.
#[inline(always)]
pub fn fib_params() -> bpf_fib_lookup {
    // SAFETY: bpf_fib_lookup is plain data (integers, byte arrays and
    // unions of them); all zeroes is a valid value.
    unsafe { core::mem::zeroed() }
}

/// Set the addresses of an IPv4 lookup (network order).
#[inline(always)]
pub fn fib_set_v4(params: &mut bpf_fib_lookup, src: u32, dst: u32) {
    params.__bindgen_anon_3.ipv4_src = src;
    params.__bindgen_anon_4.ipv4_dst = dst;
}

#[inline(always)]
pub fn fib_set_v6(params: &mut bpf_fib_lookup, src: &[u32; 4], dst: &[u32; 4]) {
    params.__bindgen_anon_3.ipv6_src = *src;
    params.__bindgen_anon_4.ipv6_dst = *dst;
}

/// The MTU a successful lookup returned in place of the length (5.12+;
/// before, the length set).
#[inline(always)]
pub fn fib_mtu(params: &bpf_fib_lookup) -> u16 {
    // SAFETY: both members of the union are u16.
    unsafe { params.__bindgen_anon_1.mtu_result }
}

#[inline(always)]
pub fn fib_set_tot_len(params: &mut bpf_fib_lookup, len: u16) {
    params.__bindgen_anon_1.tot_len = len;
}
