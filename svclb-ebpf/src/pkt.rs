//! Bounds-checked packet access: `Frame` for XDP, where one check covers a
//! whole header range, and the `Packet` trait, so code that parses and
//! rewrites headers (ICMP errors, the IP header checks) serves both XDP and
//! tc. With `helpers.rs` and the conntrack entry, the only `unsafe`: every
//! XDP packet access goes through `Frame`, which checks the bounds the
//! verifier wants.
use aya_ebpf::programs::{TcContext, XdpContext};

/// Bounds-checked packet reads and writes.
pub trait Packet {
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
    fn write<T>(&self, offset: usize, value: T) -> Option<()>;
}

/// Each access checks its own bounds.
impl Packet for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        Frame::new(self, offset + core::mem::size_of::<T>())?.read(offset)
    }
    #[inline(always)]
    fn write<T>(&self, offset: usize, value: T) -> Option<()> {
        Frame::new(self, offset + core::mem::size_of::<T>())?.write(offset, value)
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

impl Packet for Frame {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        Frame::read(self, offset)
    }
    #[inline(always)]
    fn write<T>(&self, offset: usize, value: T) -> Option<()> {
        Frame::write(self, offset, value)
    }
}

/// The first `len` bytes of an XDP frame, bounds-checked once, so that the
/// reads and writes inside need no check of their own: for constant
/// offsets `offset + size <= len` folds away, and the verifier knows the
/// checked range. (Per-access checks cost five instructions each.)
///
/// Fields are accessed at their natural alignment, as word loads and
/// stores: the kernel places the IP header of a frame 4-aligned
/// (NET_IP_ALIGN), which is what the verifier assumes when it checks
/// alignment, so every header field svclb reads (16-bit words at even
/// offsets, addresses at offsets that are 2 modulo 4 from the frame start)
/// is aligned. Unaligned reads would cost a byte load per byte, and a byte
/// loop for arrays. (x86-64 and arm64, the targets svclb supports, load
/// unaligned words correctly anyway.)
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

    /// Copy `T` out at `offset`; None when the frame is shorter.
    #[inline(always)]
    pub fn read<T: Copy>(&self, offset: usize) -> Option<T> {
        if offset + core::mem::size_of::<T>() > self.len {
            return None;
        }
        // SAFETY: within the `len` bytes `new` checked; alignment as above.
        Some(unsafe { ((self.data + offset) as *const T).read() })
    }

    /// Write `value` at `offset`; None when the frame is shorter.
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
        // SAFETY: within the bounds checked above; alignment as in `read`.
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
            // SAFETY: within the bounds checked above; alignment as in `read`.
            unsafe { ((self.data + offset) as *mut T).add(i).write(v) };
            i += 1;
        }
        Some(())
    }
}
