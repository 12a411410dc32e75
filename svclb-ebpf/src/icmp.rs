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
use svclb_common::{v4_mapped, Flow, PROTO_TCP, PROTO_UDP};

use crate::{csum::Delta, external::Tuple, pkt::Packet};

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// Offsets (untagged Ethernet, IPv4 without options / IPv6 without
/// extension headers, outside and inside).
struct Layout {
    outer_src: usize,
    outer_dst: usize,
    icmp: usize,
    inner: usize,
    inner_src: usize,
    inner_dst: usize,
    inner_l4: usize,
}

const V4: Layout = Layout {
    outer_src: 26,
    outer_dst: 30,
    icmp: 34,
    inner: 42,
    inner_src: 54,
    inner_dst: 58,
    inner_l4: 62,
};

const V6: Layout = Layout {
    outer_src: 22,
    outer_dst: 38,
    icmp: 54,
    inner: 62,
    inner_src: 70,
    inner_dst: 86,
    inner_l4: 102,
};

/// For an ICMP error (IPv4 proto 1 / IPv6 next header 58) quoting a TCP or
/// UDP packet: fill `t` with the tuple of the packets flowing the other
/// way, which is how conntrack knows the flow. None for anything else.
#[inline(always)]
pub fn parse<P: Packet>(p: &P, v6: bool, proto: u8, t: &mut Tuple) -> Option<()> {
    let l = if v6 { &V6 } else { &V4 };
    let icmp_type = p.read::<u8>(l.icmp)?;
    let error = if v6 {
        proto == PROTO_ICMPV6 && (1..=4).contains(&icmp_type)
    } else {
        proto == PROTO_ICMP && matches!(icmp_type, 3 | 11 | 12)
    };
    if !error {
        return None;
    }
    let inner_proto = if v6 {
        if p.read::<u8>(l.inner)? >> 4 != 6 {
            return None;
        }
        p.read::<u8>(l.inner + 6)?
    } else {
        if p.read::<u8>(l.inner)? != 0x45 {
            return None;
        }
        p.read::<u8>(l.inner + 9)?
    };
    if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP {
        return None;
    }
    // The 8 quoted L4 bytes must be there.
    p.read::<u8>(l.inner_l4 + 7)?;
    // The quoted packet went the other way: its source is the flow's
    // destination.
    if v6 {
        t.dst = p.read::<[u32; 4]>(l.inner_src)?;
        t.src = p.read::<[u32; 4]>(l.inner_dst)?;
    } else {
        t.dst = v4_mapped(p.read::<u32>(l.inner_src)?);
        t.src = v4_mapped(p.read::<u32>(l.inner_dst)?);
    }
    t.dport = u16::from_be(p.read::<u16>(l.inner_l4)?);
    t.sport = u16::from_be(p.read::<u16>(l.inner_l4 + 2)?);
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
    let mut icmp = inner;
    icmp.add(ports);
    if v6 {
        // ICMPv6 covers a pseudo-header with the outer addresses.
        icmp.add(outer);
        p.write(l.outer_src, f.src)?;
        p.write(l.outer_dst, f.dst)?;
        p.write(l.inner_src, f.dst)?;
        p.write(l.inner_dst, f.src)?;
    } else {
        let c = p.read::<u16>(24)?;
        p.write(24, outer.apply(c))?;
        p.write(l.outer_src, f.src[3])?;
        p.write(l.outer_dst, f.dst[3])?;
        let ic = p.read::<u16>(l.inner + 10)?;
        let new_ic = inner.apply(ic);
        icmp.word16(ic, new_ic);
        p.write(l.inner + 10, new_ic)?;
        p.write(l.inner_src, f.dst[3])?;
        p.write(l.inner_dst, f.src[3])?;
    }
    if t.proto == PROTO_UDP {
        let uc = p.read::<u16>(l.inner_l4 + 6)?;
        if uc != 0 || v6 {
            let mut d = inner;
            d.add(ports);
            let mut new_uc = d.apply(uc);
            if new_uc == 0 {
                new_uc = 0xffff;
            }
            icmp.word16(uc, new_uc);
            p.write(l.inner_l4 + 6, new_uc)?;
        }
    }
    p.write(l.inner_l4, f.dport.to_be())?;
    p.write(l.inner_l4 + 2, f.sport.to_be())?;
    let cc = p.read::<u16>(l.icmp + 2)?;
    p.write(l.icmp + 2, icmp.apply(cc))
}
