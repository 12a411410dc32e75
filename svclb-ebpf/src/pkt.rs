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

/// The first `len` bytes of an XDP frame, bounds-checked once, so that the
/// reads and writes inside need no check of their own: for constant
/// offsets `offset + size <= len` folds away, and the verifier knows the
/// checked range. (Per-access checks cost five instructions each.)
#[derive(Clone, Copy)]
pub struct Frame {
    data: usize,
    len: usize,
}

impl Frame {
    #[inline(always)]
    pub fn new(ctx: &XdpContext, len: usize) -> Option<Frame> {
        let data = ctx.data();
        if data + len > ctx.data_end() {
            return None;
        }
        Some(Frame { data, len })
    }

    /// Copy `T` out at `offset` (aligned as in `load`).
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        if offset + core::mem::size_of::<T>() > self.len {
            return None;
        }
        // SAFETY: within the `len` bytes `new` checked; alignment as in `load`.
        Some(unsafe { ((self.data + offset) as *const T).read() })
    }

    #[inline(always)]
    pub fn write<T>(&self, offset: usize, value: T) -> Option<()> {
        if offset + core::mem::size_of::<T>() > self.len {
            return None;
        }
        // SAFETY: as in `read`; XDP packet memory is writable.
        unsafe { ((self.data + offset) as *mut T).write(value) };
        Some(())
    }
}

/// Arrays element by element. Copying an array between the packet and a
/// map value with `read` or `write` lets LLVM merge the copy through the
/// stack into one `memmove` (the pointers may alias), which the BPF
/// backend cannot inline: a byte loop in a subprogram, on the hot path.
/// Volatile element reads keep the copies apart.
impl Frame {
    #[inline(always)]
    pub fn read_each<T: Copy, const N: usize>(&self, offset: usize) -> Option<[T; N]> {
        if offset + core::mem::size_of::<[T; N]>() > self.len {
            return None;
        }
        let at = (self.data + offset) as *const T;
        // SAFETY: within the bounds checked above; alignment as in `load`.
        Some(core::array::from_fn(|i| unsafe {
            core::ptr::read_volatile(at.add(i))
        }))
    }

    #[inline(always)]
    pub fn write_each<T: Copy, const N: usize>(&self, offset: usize, items: &[T; N]) -> Option<()> {
        if offset + core::mem::size_of::<[T; N]>() > self.len {
            return None;
        }
        let mut i = 0;
        while i < N {
            // SAFETY: `items[i]` is in bounds.
            let v = unsafe { core::ptr::read_volatile(&items[i]) };
            // SAFETY: within the bounds checked above; alignment as in `load`.
            unsafe { ((self.data + offset) as *mut T).add(i).write(v) };
            i += 1;
        }
        Some(())
    }
}

/// Copy `T` out of the packet at `offset`; None when the packet is shorter.
///
/// Fields are read at their natural alignment, as word loads: the kernel
/// places the IP header of a frame 4-aligned (NET_IP_ALIGN), which is what
/// the verifier assumes when it checks alignment, so every header field
/// svclb reads (16-bit words at even offsets, addresses at offsets that are
/// 2 modulo 4 from the frame start) is aligned. Unaligned reads would cost
/// a byte load per byte, and a byte loop for arrays.
#[inline(always)]
pub fn load<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that offset..offset+size_of::<T>() lies
    // within the packet; alignment as above (and x86-64 and arm64, the
    // targets svclb supports, load unaligned words correctly anyway).
    Some(unsafe { p.read() })
}

/// Write `value` into the packet at `offset`; None when the packet is shorter.
#[inline(always)]
pub fn store<T>(ctx: &XdpContext, offset: usize, value: T) -> Option<()> {
    let p = ptr_at::<T>(ctx, offset)?;
    // SAFETY: bounds checked by `ptr_at`; XDP packet memory is writable;
    // alignment as in `load`.
    unsafe { p.write(value) };
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
