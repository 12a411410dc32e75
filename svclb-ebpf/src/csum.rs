//! Incremental Internet checksum updates (RFC 1624, eqn. 3:
//! HC' = ~(~HC + ~m + m')). Values are used as they sit in packet memory
//! (network order read natively): the one's-complement sum does not depend
//! on byte order as long as every word is treated the same way.

/// The accumulated change of some 16-bit words covered by a checksum.
/// (A u32 holds the sum of up to 32768 word changes; svclb's take a few
/// dozen at most, and two folding steps then suffice.)
#[derive(Clone, Copy, Default)]
pub struct Delta(u32);

impl Delta {
    #[inline(always)]
    pub fn word16(&mut self, from: u16, to: u16) {
        self.0 += (!from) as u32 + to as u32;
    }

    #[inline(always)]
    pub fn word32(&mut self, from: u32, to: u32) {
        self.word16(from as u16, to as u16);
        self.word16((from >> 16) as u16, (to >> 16) as u16);
    }

    /// An address change: the last word only for IPv4 (mapped) addresses.
    #[inline(always)]
    pub fn addr(&mut self, from: &[u32; 4], to: &[u32; 4], v6: bool) {
        if v6 {
            self.word32(from[0], to[0]);
            self.word32(from[1], to[1]);
            self.word32(from[2], to[2]);
        }
        self.word32(from[3], to[3]);
    }

    /// Add another delta (a change covered by both checksums).
    #[inline(always)]
    pub fn add(&mut self, other: Delta) {
        self.0 += other.0;
    }

    /// The checksum field after the change.
    #[inline(always)]
    pub fn apply(self, csum: u16) -> u16 {
        !fold((!csum) as u32 + self.0)
    }

    /// The change folded to 16 bits (one's-complement sums fold without
    /// loss), to store it.
    #[inline(always)]
    pub fn folded(self) -> u16 {
        fold(self.0)
    }

    #[inline(always)]
    pub fn from_folded(d: u16) -> Delta {
        Delta(d as u32)
    }
}

#[inline(always)]
fn fold(s: u32) -> u16 {
    let s = (s & 0xffff) + (s >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}
