//! Header checks shared by the XDP and tc parsers (over any `Packet`): the
//! packets svclb handles are untagged Ethernet, IPv4 without options and
//! not fragmented or IPv6, and TCP or UDP (or ICMP errors about those).
use crate::{
    consts::{
        ip4, l4, ETH_P_IP, ETH_P_IPV6, ETH_TYPE, IP4_FRAG, IP4_VERSION_IHL, IP6_VERSION, PROTO_TCP,
    },
    pkt::Packet,
};
use svclb_common::{CT_FIN, CT_RST, CT_SEEN};

/// Whether the frame carries IPv6 (true) or IPv4 (false); None for
/// anything else.
#[inline(always)]
pub fn is_ipv6<P: Packet>(p: &P) -> Option<bool> {
    match u16::from_be(p.read::<u16>(ETH_TYPE)?) {
        ETH_P_IP => Some(false),
        ETH_P_IPV6 => Some(true),
        _ => None,
    }
}

/// Whether an IPv4 header has no options and is no fragment (else svclb
/// does not translate the packet).
#[inline(always)]
pub fn ip4_plain<P: Packet>(p: &P) -> Option<bool> {
    let version_ihl = p.read::<u8>(IP4_VERSION_IHL)?;
    let frag = u16::from_be(p.read::<u16>(IP4_FRAG)?);
    Some(version_ihl == ip4::VERSION_IHL_PLAIN && frag & ip4::FRAG_MASK == 0)
}

/// Whether the IPv6 header says version 6.
#[inline(always)]
pub fn ip6_valid<P: Packet>(p: &P) -> Option<bool> {
    Some(p.read::<u8>(IP6_VERSION)? >> 4 == 6)
}

/// Offset of the checksum of a TCP or UDP header at `l4_at`.
#[inline(always)]
pub fn l4_csum(l4_at: usize, proto: u8) -> usize {
    if proto == PROTO_TCP {
        l4_at + l4::TCP_CSUM
    } else {
        l4_at + l4::UDP_CSUM
    }
}

/// The conntrack state bits (`svclb_common::Flow::state`) a packet with
/// these TCP flags (0 for UDP) sets in its entry.
#[inline(always)]
pub fn ct_bits(tcp_flags: u8) -> u8 {
    let mut bits = CT_SEEN;
    if tcp_flags & l4::TCP_FIN != 0 {
        bits |= CT_FIN;
    }
    if tcp_flags & l4::TCP_RST != 0 {
        bits |= CT_RST;
    }
    bits
}
