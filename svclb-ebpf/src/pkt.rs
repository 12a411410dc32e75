//! Audited access to packet memory and the XDP helpers that need raw
//! pointers. With `ctx.rs`, the only module with `unsafe`: every packet
//! access goes through `ptr_at`, which checks the bounds the verifier wants.
use aya_ebpf::{
    bindings::bpf_fib_lookup,
    helpers::bpf_fib_lookup as fib_lookup_helper,
    programs::{TcContext, XdpContext},
    EbpfContext,
};

/// Bounds-checked packet reads and writes, so code that parses and
/// rewrites headers (ICMP errors) serves both XDP and tc.
pub trait Packet {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    fn write<T>(&self, offset: usize, value: T) -> Option<()>;
}

impl Packet for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        load(self, offset)
    }
    #[inline(always)]
    fn write<T>(&self, offset: usize, value: T) -> Option<()> {
        store(self, offset, value)
    }
}

impl Packet for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        self.load(offset).ok()
    }
    /// Plain byte stores: callers fix complete checksums themselves (only
    /// used for ICMP, whose checksums are never offloaded).
    #[inline(always)]
    fn write<T>(&self, offset: usize, value: T) -> Option<()> {
        self.store(offset, &value, 0).ok()
    }
}

#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Copy `T` out of the packet at `offset`; None when the packet is shorter.
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that offset..offset+size_of::<T>() lies
    // within the packet; packet memory may be unaligned.
    Some(unsafe { p.read_unaligned() })
}

/// Write `value` into the packet at `offset`; None when the packet is shorter.
#[inline(always)]
pub fn store<T>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: bounds checked by `ptr_at`; XDP packet memory is writable.
    unsafe { p.write_unaligned(value) };
    Some(())
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

#[inline(always)]
pub fn fib_set_tot_len(params: &mut bpf_fib_lookup, len: u16) {
    params.__bindgen_anon_1.tot_len = len;
}
