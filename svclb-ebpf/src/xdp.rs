//! XDP on the node's external devices: NodePort, LoadBalancer and
//! ExternalIP traffic from outside the cluster, and the replies of remote
//! backends reached through SNAT. Everything else passes untouched after
//! at most two map lookups.
//!
//! Supported: Ethernet + IPv4 without options or IPv6 without extension
//! headers, carrying TCP or UDP, and ICMP errors about such flows (see
//! `icmp.rs`). Anything else (VLAN tags, IPv4 options,
//! fragments, IPv6 extension headers) goes to the stack untranslated;
//! such packets are counted (`stats::UNSUPPORTED`) and never rewritten.
use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use svclb_common::{stats, v4_mapped, Flow, FLOW_INGRESS, PROTO_TCP, PROTO_UDP};

use crate::{
    csum::Delta,
    ctx,
    external::{self, Decision, Scratch, Tuple},
    icmp,
    maps::TX_DEVICES,
    pkt::{self, load, store},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// bpf_fib_lookup results that mean "no route": drop, as the stack would.
const FIB_BLACKHOLE: i64 = 1;
const FIB_PROHIBIT: i64 = 3;

/// Offsets in an untagged Ethernet frame.
const IP4_TTL: usize = 22;
const IP4_CSUM: usize = 24;
const IP4_SRC: usize = 26;
const IP4_DST: usize = 30;
const IP4_L4: usize = 34;
const IP6_HOP_LIMIT: usize = 21;
const IP6_SRC: usize = 22;
const IP6_DST: usize = 38;
const IP6_L4: usize = 54;

#[xdp]
pub fn svclb_xdp(ctx: XdpContext) -> u32 {
    // The 512-byte stack is shared along the call chain (and kernels
    // before 6.x count every frame as at least 32 bytes): this frame only
    // parses and dispatches; the work happens in callees on separate paths.
    let Some(s) = ctx::scratch() else {
        return XDP_PASS;
    };
    let Some((v6, icmp_error)) = parse(&ctx, &mut s.t) else {
        return XDP_PASS;
    };
    if icmp_error {
        return icmp_error_path(&ctx, s, v6);
    }
    match external::ingress(s, v6) {
        Decision::Pass => XDP_PASS,
        Decision::Drop => XDP_DROP,
        Decision::Translate => translate(&ctx, s, v6),
    }
}

/// Rewrite a tracked packet and send it on.
#[inline(never)]
fn translate(ctx: &XdpContext, s: &Scratch, v6: bool) -> u32 {
    if rewrite(ctx, v6, &s.t, &s.flow).is_none() {
        return XDP_DROP;
    }
    forward(ctx, v6, &s.flow)
}

/// An ICMP error about a flow svclb translates goes where that flow's
/// packets go.
#[inline(never)]
fn icmp_error_path(ctx: &XdpContext, s: &mut Scratch, v6: bool) -> u32 {
    if !external::related(s, FLOW_INGRESS) {
        return XDP_PASS;
    }
    if icmp::rewrite(ctx, v6, &s.t, &s.flow).is_none() {
        return XDP_DROP;
    }
    ctx::count(stats::ICMP_TRANSLATED);
    forward(ctx, v6, &s.flow)
}

/// Fill `t` from a packet svclb may translate: Some((is IPv6, is an ICMP
/// error)) then, where for an ICMP error `t` is its flow as conntrack
/// knows it. (Fields are written in place: no tuple copies on the stack.)
#[inline(always)]
fn parse(ctx: &XdpContext, t: &mut Tuple) -> Option<(bool, bool)> {
    let ethertype = load::<u16>(ctx, 12)?;
    match u16::from_be(ethertype) {
        ETH_P_IP => parse4(ctx, t).map(|icmp| (false, icmp)),
        ETH_P_IPV6 => parse6(ctx, t).map(|icmp| (true, icmp)),
        _ => None,
    }
}

/// An IPv4 TCP/UDP packet svclb can translate (false), or an ICMP error
/// about one (true).
#[inline(always)]
fn parse4(ctx: &XdpContext, t: &mut Tuple) -> Option<bool> {
    let version_ihl = load::<u8>(ctx, 14)?;
    let frag = u16::from_be(load::<u16>(ctx, 20)?);
    if version_ihl != 0x45 || frag & 0x3fff != 0 {
        ctx::count(stats::UNSUPPORTED);
        return None;
    }
    let proto = load::<u8>(ctx, 23)?;
    if proto == PROTO_ICMP {
        return icmp::parse(ctx, false, proto, t).map(|()| true);
    }
    ports(ctx, IP4_L4, proto, t)?;
    t.src = v4_mapped(load::<u32>(ctx, IP4_SRC)?);
    t.dst = v4_mapped(load::<u32>(ctx, IP4_DST)?);
    Some(false)
}

#[inline(always)]
fn parse6(ctx: &XdpContext, t: &mut Tuple) -> Option<bool> {
    let proto = load::<u8>(ctx, 20)?;
    if load::<u8>(ctx, 14)? >> 4 != 6 {
        return None;
    }
    if proto == PROTO_ICMPV6 {
        return icmp::parse(ctx, true, proto, t).map(|()| true);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        // Extension headers (hop-by-hop, routing, fragment, AH, destination
        // options) may hide TCP/UDP for a frontend: count them like IPv4
        // options and fragments. Other protocols are simply not ours.
        if matches!(proto, 0 | 43 | 44 | 51 | 60) {
            ctx::count(stats::UNSUPPORTED);
        }
        return None;
    }
    ports(ctx, IP6_L4, proto, t)?;
    t.src = load::<[u32; 4]>(ctx, IP6_SRC)?;
    t.dst = load::<[u32; 4]>(ctx, IP6_DST)?;
    Some(false)
}

/// Protocol and ports into `t`, when the whole TCP or UDP header is there.
#[inline(always)]
fn ports(ctx: &XdpContext, l4: usize, proto: u8, t: &mut Tuple) -> Option<()> {
    let header = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return None,
    };
    // Bounds check of the whole header (the checksum sits at its end).
    load::<u8>(ctx, l4 + header - 1)?;
    t.proto = proto;
    t.sport = u16::from_be(load::<u16>(ctx, l4)?);
    t.dport = u16::from_be(load::<u16>(ctx, l4 + 2)?);
    // TCP flags: SYN (0x02) without ACK (0x10).
    t.syn = proto == PROTO_TCP && load::<u8>(ctx, l4 + 13)? & 0x12 == 0x02;
    Some(())
}

/// Offset of the TCP or UDP checksum.
#[inline(always)]
fn l4_csum(l4: usize, proto: u8) -> usize {
    if proto == PROTO_TCP {
        l4 + 16
    } else {
        l4 + 6
    }
}

/// Rewrite addresses and ports from `t` to `f`, updating the IPv4 header
/// checksum and the TCP/UDP checksum (pseudo-header included).
#[inline(always)]
fn rewrite(ctx: &XdpContext, v6: bool, t: &Tuple, f: &Flow) -> Option<()> {
    let mut addrs = Delta::default();
    addrs.addr(&t.src, &f.src, v6);
    addrs.addr(&t.dst, &f.dst, v6);
    let l4 = if v6 {
        store(ctx, IP6_SRC, f.src)?;
        store(ctx, IP6_DST, f.dst)?;
        IP6_L4
    } else {
        let c = load::<u16>(ctx, IP4_CSUM)?;
        store(ctx, IP4_CSUM, addrs.apply(c))?;
        store(ctx, IP4_SRC, f.src[3])?;
        store(ctx, IP4_DST, f.dst[3])?;
        IP4_L4
    };
    let mut l4_delta = addrs;
    l4_delta.word16(t.sport.to_be(), f.sport.to_be());
    l4_delta.word16(t.dport.to_be(), f.dport.to_be());
    let csum_at = l4_csum(l4, t.proto);
    let c = load::<u16>(ctx, csum_at)?;
    // An IPv4 UDP datagram without checksum (0) stays without one.
    if !(c == 0 && t.proto == PROTO_UDP && !v6) {
        let mut c = l4_delta.apply(c);
        if c == 0 && t.proto == PROTO_UDP {
            c = 0xffff;
        }
        store(ctx, csum_at, c)?;
    }
    store(ctx, l4, f.sport.to_be())?;
    store(ctx, l4 + 2, f.dport.to_be())?;
    Some(())
}

/// Send a translated packet on: straight back out (XDP_TX) or to another
/// of the agent's devices when the route and neighbour are known, else to
/// the stack (which also resolves neighbours and serves pod veths).
#[inline(never)]
fn forward(ctx: &XdpContext, v6: bool, f: &Flow) -> u32 {
    let ingress = ctx.ingress_ifindex() as u32;
    let mut p = pkt::fib_params();
    p.ifindex = ingress;
    p.sport = f.sport.to_be();
    p.dport = f.dport.to_be();
    let (ttl_at, tot_len) = if v6 {
        p.family = AF_INET6;
        pkt::fib_set_v6(&mut p, &f.src, &f.dst);
        let payload = load::<u16>(ctx, 18).map_or(0, u16::from_be);
        (IP6_HOP_LIMIT, payload.saturating_add(40))
    } else {
        p.family = AF_INET;
        pkt::fib_set_v4(&mut p, f.src[3], f.dst[3]);
        (IP4_TTL, load::<u16>(ctx, 16).map_or(0, u16::from_be))
    };
    // Protocol: the byte after the TTL in IPv4, the next header in IPv6.
    p.l4_protocol = load::<u8>(ctx, if v6 { 20 } else { 23 }).unwrap_or(0);
    pkt::fib_set_tot_len(&mut p, tot_len);
    let rc = pkt::fib_lookup(ctx, &mut p);
    if (FIB_BLACKHOLE..=FIB_PROHIBIT).contains(&rc) {
        return XDP_DROP;
    }
    let out = p.ifindex;
    let known = rc == 0 && (out == ingress || TX_DEVICES.get_ifindex(out).is_some());
    let Some(ttl) = load::<u8>(ctx, ttl_at) else {
        return XDP_DROP;
    };
    // The stack forwards (and answers TTL expiry) whatever XDP can't.
    if !known || ttl <= 1 {
        ctx::count(stats::XDP_PASSED);
        return XDP_PASS;
    }
    if decrement_ttl(ctx, v6, ttl).is_none()
        || store(ctx, 0, p.dmac).is_none()
        || store(ctx, 6, p.smac).is_none()
    {
        return XDP_DROP;
    }
    ctx::count(stats::XDP_FORWARDED);
    if out == ingress {
        XDP_TX
    } else {
        TX_DEVICES
            .redirect(out, XDP_PASS as u64)
            .unwrap_or_else(|e| e)
    }
}

#[inline(always)]
fn decrement_ttl(ctx: &XdpContext, v6: bool, ttl: u8) -> Option<()> {
    if v6 {
        return store(ctx, IP6_HOP_LIMIT, ttl - 1);
    }
    // TTL and protocol form one 16-bit word of the header checksum.
    let old = load::<u16>(ctx, IP4_TTL)?;
    store(ctx, IP4_TTL, ttl - 1)?;
    let new = load::<u16>(ctx, IP4_TTL)?;
    let mut d = Delta::default();
    d.word16(old, new);
    let c = load::<u16>(ctx, IP4_CSUM)?;
    store(ctx, IP4_CSUM, d.apply(c))
}
