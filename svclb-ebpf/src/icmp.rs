//! ICMP errors about translated flows (destination/port unreachable,
//! fragmentation needed / packet too big, time exceeded, parameter
//! problem). The error quotes the offending packet's headers; svclb finds
//! the flow from the quoted packet and rewrites the error so that it
//! reaches the other side of the translation and quotes the packet as that
//! side sent it. Shared by XDP (errors arriving from outside) and tc egress
//! (errors a local backend sends to a client).
//!
//! Only the quoted addresses, ports, IPv4 header checksum and UDP checksum
//! are rewritten (the TCP checksum is not within the 8 quoted bytes).
use svclb_common::{v4_mapped, Flow};

use crate::{
    consts::{
        icmp, ip4, ip6, l4, IP4_CSUM, IP4_DST, IP4_L4, IP4_SRC, IP6_DST, IP6_L4, IP6_SRC,
        PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    },
    csum::Delta,
    pkt::Packet,
    scratch::Tuple,
};

/// Frame offsets (untagged Ethernet, IPv4 without options / IPv6 without
/// extension headers, outside and inside).
struct Layout {
    outer_src: usize,
    outer_dst: usize,
    icmp: usize,
    /// The quoted IP header.
    inner: usize,
    inner_src: usize,
    inner_dst: usize,
    inner_l4: usize,
}

const V4: Layout = Layout {
    outer_src: IP4_SRC,
    outer_dst: IP4_DST,
    icmp: IP4_L4,
    inner: IP4_L4 + icmp::HLEN,
    inner_src: IP4_L4 + icmp::HLEN + ip4::SRC,
    inner_dst: IP4_L4 + icmp::HLEN + ip4::DST,
    inner_l4: IP4_L4 + icmp::HLEN + ip4::HLEN,
};

const V6: Layout = Layout {
    outer_src: IP6_SRC,
    outer_dst: IP6_DST,
    icmp: IP6_L4,
    inner: IP6_L4 + icmp::HLEN,
    inner_src: IP6_L4 + icmp::HLEN + ip6::SRC,
    inner_dst: IP6_L4 + icmp::HLEN + ip6::DST,
    inner_l4: IP6_L4 + icmp::HLEN + ip6::HLEN,
};

/// For an ICMP error (IPv4 proto 1 / IPv6 next header 58) quoting a TCP or
/// UDP packet: fill `t` with the tuple of the packets flowing the other
/// way, which is how conntrack knows the flow. None for anything else.
#[inline(always)]
pub fn parse<P: Packet>(p: &P, v6: bool, proto: u8, t: &mut Tuple) -> Option<()> {
    let l = if v6 { &V6 } else { &V4 };
    let icmp_type = p.read::<u8>(l.icmp + icmp::TYPE)?;
    let error = if v6 {
        proto == PROTO_ICMPV6 && icmp::V6_ERRORS.contains(&icmp_type)
    } else {
        proto == PROTO_ICMP
            && matches!(
                icmp_type,
                icmp::DEST_UNREACH | icmp::TIME_EXCEEDED | icmp::PARAMETER_PROBLEM
            )
    };
    if !error {
        return None;
    }
    let inner_proto = if v6 {
        if p.read::<u8>(l.inner + ip6::VERSION)? >> 4 != 6 {
            return None;
        }
        p.read::<u8>(l.inner + ip6::NEXT_HEADER)?
    } else {
        if p.read::<u8>(l.inner + ip4::VERSION_IHL)? != ip4::VERSION_IHL_PLAIN {
            return None;
        }
        p.read::<u8>(l.inner + ip4::PROTO)?
    };
    if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP {
        return None;
    }
    // The 8 quoted L4 bytes must be there.
    p.read::<u8>(l.inner_l4 + icmp::QUOTED_L4 - 1)?;
    // The quoted packet went the other way: its source is the flow's
    // destination.
    if v6 {
        t.dst = p.read::<[u32; 4]>(l.inner_src)?;
        t.src = p.read::<[u32; 4]>(l.inner_dst)?;
    } else {
        t.dst = v4_mapped(p.read::<u32>(l.inner_src)?);
        t.src = v4_mapped(p.read::<u32>(l.inner_dst)?);
    }
    t.dport = u16::from_be(p.read::<u16>(l.inner_l4 + l4::SPORT)?);
    t.sport = u16::from_be(p.read::<u16>(l.inner_l4 + l4::DPORT)?);
    t.proto = inner_proto;
    Some(())
}

/// Rewrite the error for flow entry `f` (found for `t`): the outer packet
/// goes f.src -> f.dst, and it quotes the packet f.dst would have sent
/// (f.dst:f.dport -> f.src:f.sport), the reverse of the translated flow.
#[inline(always)]
pub fn rewrite<P: Packet>(p: &P, v6: bool, t: &Tuple, f: &Flow) -> Option<()> {
    let l = if v6 { &V6 } else { &V4 };
    // Outer addresses.
    let (osrc, odst) = if v6 {
        (
            p.read::<[u32; 4]>(l.outer_src)?,
            p.read::<[u32; 4]>(l.outer_dst)?,
        )
    } else {
        (
            v4_mapped(p.read::<u32>(l.outer_src)?),
            v4_mapped(p.read::<u32>(l.outer_dst)?),
        )
    };
    let mut outer = Delta::default();
    outer.addr(&osrc, &f.src, v6);
    outer.addr(&odst, &f.dst, v6);
    // Quoted addresses and ports: src was t.dst:t.dport, dst t.src:t.sport.
    let mut inner = Delta::default();
    inner.addr(&t.dst, &f.dst, v6);
    inner.addr(&t.src, &f.src, v6);
    let mut ports = Delta::default();
    ports.word16(t.dport.to_be(), f.dport.to_be());
    ports.word16(t.sport.to_be(), f.sport.to_be());
    // Everything changed inside the ICMP message, for its checksum.
    let mut message = inner;
    message.add(ports);
    if v6 {
        // ICMPv6 covers a pseudo-header with the outer addresses.
        message.add(outer);
        p.write(l.outer_src, f.src)?;
        p.write(l.outer_dst, f.dst)?;
        p.write(l.inner_src, f.dst)?;
        p.write(l.inner_dst, f.src)?;
    } else {
        let c = p.read::<u16>(IP4_CSUM)?;
        p.write(IP4_CSUM, outer.apply(c))?;
        p.write(l.outer_src, f.src[3])?;
        p.write(l.outer_dst, f.dst[3])?;
        let ic = p.read::<u16>(l.inner + ip4::CSUM)?;
        let new_ic = inner.apply(ic);
        message.word16(ic, new_ic);
        p.write(l.inner + ip4::CSUM, new_ic)?;
        p.write(l.inner_src, f.dst[3])?;
        p.write(l.inner_dst, f.src[3])?;
    }
    if t.proto == PROTO_UDP {
        let uc = p.read::<u16>(l.inner_l4 + l4::UDP_CSUM)?;
        if uc != 0 || v6 {
            let mut d = inner;
            d.add(ports);
            let mut new_uc = d.apply(uc);
            if new_uc == 0 {
                new_uc = 0xffff;
            }
            message.word16(uc, new_uc);
            p.write(l.inner_l4 + l4::UDP_CSUM, new_uc)?;
        }
    }
    p.write(l.inner_l4 + l4::SPORT, f.dport.to_be())?;
    p.write(l.inner_l4 + l4::DPORT, f.sport.to_be())?;
    let cc = p.read::<u16>(l.icmp + icmp::CSUM)?;
    p.write(l.icmp + icmp::CSUM, message.apply(cc))
}
