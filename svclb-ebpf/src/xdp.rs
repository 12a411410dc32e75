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
use aya_ebpf::{macros::xdp, programs::XdpContext};
use svclb_common::{stats, v4_mapped, Flow, Route, FLOW_INGRESS};

use crate::{
    conntrack::CtEntry,
    consts::{
        ip6, l4, AF_INET, AF_INET6, ETH_HLEN, FIB_BLACKHOLE, FIB_PROHIBIT, FIB_SUCCESS, IP4_CSUM,
        IP4_DST, IP4_L4, IP4_PROTO, IP4_SRC, IP4_TOT_LEN, IP4_TTL, IP6_DST, IP6_HOP_LIMIT, IP6_L4,
        IP6_NEXT_HEADER, IP6_PAYLOAD_LEN, IP6_SRC, NEXTHDR_AUTH, NEXTHDR_DEST, NEXTHDR_FRAGMENT,
        NEXTHDR_HOP, NEXTHDR_ROUTING, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, XDP_DROP,
        XDP_PASS, XDP_TX,
    },
    csum::Delta,
    external::{self, Decision},
    helpers, icmp,
    maps::{SCRATCH, TX_DEVICES},
    parse,
    pkt::{Frame, Packet},
    scratch::{Scratch, Tuple},
    stats::count,
};

#[xdp]
pub fn svclb_xdp(ctx: XdpContext) -> u32 {
    // The 512-byte stack is shared along the call chain (and kernels
    // before 6.x count every frame as at least 32 bytes): this frame only
    // parses and dispatches; the work happens in callees on separate paths.
    let Some(s) = helpers::this_cpu(&SCRATCH, 0) else {
        return XDP_PASS;
    };
    let Some((v6, icmp_error)) = parse_packet(&ctx, s) else {
        return XDP_PASS;
    };
    if icmp_error {
        return icmp_error_path(&ctx, s, v6);
    }
    match external::ingress(s, v6) {
        Decision::Pass => XDP_PASS,
        Decision::Drop => XDP_DROP,
        Decision::Translate(entry) => translate(&ctx, s, v6, entry),
    }
}

/// Rewrite a tracked packet and send it on, by the route cached in its
/// conntrack entry when that is fresh and the packet fits it.
#[inline(never)]
fn translate(ctx: &XdpContext, s: &mut Scratch, v6: bool, entry: Option<CtEntry>) -> u32 {
    let f = match &entry {
        Some(e) => e.flow(),
        None => &s.flow,
    };
    let Some(p) = rewrite(ctx, v6, &s.t, f) else {
        return XDP_DROP;
    };
    let ip = Delta::from_folded(f.csum_ip);
    let len = ip_len(&p, v6);
    if s.fresh && len <= f.route.max_len {
        return forward(ctx, &p, v6, &f.route, ip);
    }
    match route(ctx, v6, f, len, &mut s.route) {
        Err(()) => return XDP_DROP,
        Ok(true) => {
            if let Some(entry) = entry {
                s.route.checked_at = s.now;
                s.route.epoch = s.epoch;
                entry.set_route(&s.route);
            }
        }
        Ok(false) => {}
    }
    forward(ctx, &p, v6, &s.route, ip)
}

/// An ICMP error about a flow svclb translates goes where that flow's
/// packets go.
#[inline(never)]
fn icmp_error_path(ctx: &XdpContext, s: &mut Scratch, v6: bool) -> u32 {
    if !external::related(s, FLOW_INGRESS, v6) {
        return XDP_PASS;
    }
    if icmp::rewrite(ctx, v6, &s.t, &s.flow).is_none() {
        return XDP_DROP;
    }
    count(stats::ICMP_TRANSLATED);
    let Some(p) = Frame::new(ctx, if v6 { IP6_L4 } else { IP4_L4 }) else {
        return XDP_DROP;
    };
    if route(ctx, v6, &s.flow, ip_len(&p, v6), &mut s.route).is_err() {
        return XDP_DROP;
    }
    forward(ctx, &p, v6, &s.route, Delta::default())
}

/// Fill `s.t` and `s.syn` from a packet svclb may translate: Some((is
/// IPv6, is an ICMP error)) then, where for an ICMP error `s.t` is its flow
/// as conntrack knows it. (Fields are written in place: no tuple copies on
/// the stack.)
#[inline(always)]
fn parse_packet(ctx: &XdpContext, s: &mut Scratch) -> Option<(bool, bool)> {
    let v6 = parse::is_ipv6(&Frame::new(ctx, ETH_HLEN)?);
    s.syn = false;
    s.t._pad = 0;
    s.t._pad2 = 0;
    if v6? {
        parse6(ctx, s).map(|icmp| (true, icmp))
    } else {
        parse4(ctx, s).map(|icmp| (false, icmp))
    }
}

/// An IPv4 TCP/UDP packet svclb can translate (false), or an ICMP error
/// about one (true).
#[inline(always)]
fn parse4(ctx: &XdpContext, s: &mut Scratch) -> Option<bool> {
    let ip = Frame::new(ctx, IP4_L4)?;
    if !parse::ip4_plain(&ip)? {
        count(stats::UNSUPPORTED);
        return None;
    }
    let proto = ip.read::<u8>(IP4_PROTO)?;
    if proto == PROTO_ICMP {
        return icmp::parse(ctx, false, proto, &mut s.t).map(|()| true);
    }
    let p = l4_frame(ctx, IP4_L4, proto)?;
    ports(&p, IP4_L4, proto, s)?;
    s.t.src = v4_mapped(p.read::<u32>(IP4_SRC)?);
    s.t.dst = v4_mapped(p.read::<u32>(IP4_DST)?);
    Some(false)
}

#[inline(always)]
fn parse6(ctx: &XdpContext, s: &mut Scratch) -> Option<bool> {
    let ip = Frame::new(ctx, IP6_L4)?;
    let proto = ip.read::<u8>(IP6_NEXT_HEADER)?;
    if !parse::ip6_valid(&ip)? {
        return None;
    }
    if proto == PROTO_ICMPV6 {
        return icmp::parse(ctx, true, proto, &mut s.t).map(|()| true);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        // Extension headers may hide TCP/UDP for a frontend: count them like
        // IPv4 options and fragments. Other protocols are simply not ours.
        if matches!(
            proto,
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_FRAGMENT | NEXTHDR_AUTH | NEXTHDR_DEST
        ) {
            count(stats::UNSUPPORTED);
        }
        return None;
    }
    let p = l4_frame(ctx, IP6_L4, proto)?;
    ports(&p, IP6_L4, proto, s)?;
    s.t.src = p.read_each(IP6_SRC)?;
    s.t.dst = p.read_each(IP6_DST)?;
    Some(false)
}

/// The frame up to the end of the TCP or UDP header at `l4_at`, if it is
/// all there (the checksum sits at its end).
#[inline(always)]
fn l4_frame(ctx: &XdpContext, l4_at: usize, proto: u8) -> Option<Frame> {
    // A check per protocol, not one on a selected length: the established
    // path was measured with this shape of code.
    match proto {
        PROTO_TCP => Frame::new(ctx, l4_at + l4::TCP_HLEN),
        PROTO_UDP => Frame::new(ctx, l4_at + l4::UDP_HLEN),
        _ => None,
    }
}

/// Protocol, ports, SYN flag and conntrack state bits into `s`.
#[inline(always)]
fn ports(p: &Frame, l4_at: usize, proto: u8, s: &mut Scratch) -> Option<()> {
    s.t.proto = proto;
    s.t.sport = u16::from_be(p.read::<u16>(l4_at + l4::SPORT)?);
    s.t.dport = u16::from_be(p.read::<u16>(l4_at + l4::DPORT)?);
    let flags = if proto == PROTO_TCP {
        p.read::<u8>(l4_at + l4::TCP_FLAGS).unwrap_or(0)
    } else {
        0
    };
    s.syn = flags & (l4::TCP_SYN | l4::TCP_ACK) == l4::TCP_SYN;
    s.ct_bits = parse::ct_bits(flags);
    Some(())
}

/// Rewrite addresses and ports from `t` to `f`, updating the TCP/UDP
/// checksum (pseudo-header included) by the entry's delta; the IPv4 header
/// checksum is left to `forward`, which may change the TTL too. Returns the
/// frame up to the end of the L4 header.
#[inline(always)]
fn rewrite(ctx: &XdpContext, v6: bool, t: &Tuple, f: &Flow) -> Option<Frame> {
    let l4_at = if v6 { IP6_L4 } else { IP4_L4 };
    let p = l4_frame(ctx, l4_at, t.proto)?;
    if v6 {
        p.write_each(IP6_SRC, &f.src)?;
        p.write_each(IP6_DST, &f.dst)?;
    } else {
        p.write(IP4_SRC, f.src[3])?;
        p.write(IP4_DST, f.dst[3])?;
    }
    let csum_at = parse::l4_csum(l4_at, t.proto);
    let c = p.read::<u16>(csum_at)?;
    // An IPv4 UDP datagram without checksum (0) stays without one.
    if !(c == 0 && t.proto == PROTO_UDP && !v6) {
        let mut c = Delta::from_folded(f.csum_l4).apply(c);
        if c == 0 && t.proto == PROTO_UDP {
            c = 0xffff;
        }
        p.write(csum_at, c)?;
    }
    p.write(l4_at + l4::SPORT, f.sport.to_be())?;
    p.write(l4_at + l4::DPORT, f.dport.to_be())?;
    Some(p)
}

/// The IP total length (IPv6: payload plus header), as the FIB lookup
/// checks it against the route's MTU; 0 if unreadable.
#[inline(always)]
fn ip_len(p: &Frame, v6: bool) -> u16 {
    if v6 {
        p.read::<u16>(IP6_PAYLOAD_LEN)
            .map_or(0, |l| u16::from_be(l).saturating_add(ip6::HLEN as u16))
    } else {
        p.read::<u16>(IP4_TOT_LEN).map_or(0, u16::from_be)
    }
}

/// Where a translated packet of `f` (of IP length `len`) goes, into `r`:
/// straight back out (XDP_TX) or to another of the agent's devices when the route and neighbour are known, else to the stack
/// (which also resolves neighbours and serves pod veths). Err: no route
/// (drop, as the stack would); Ok(true): a result worth caching.
#[inline(never)]
fn route(ctx: &XdpContext, v6: bool, f: &Flow, len: u16, r: &mut Route) -> Result<bool, ()> {
    let ingress = ctx.ingress_ifindex() as u32;
    let mut p = helpers::fib_params();
    p.ifindex = ingress;
    p.sport = f.sport.to_be();
    p.dport = f.dport.to_be();
    if v6 {
        p.family = AF_INET6;
        helpers::fib_set_v6(&mut p, &f.src, &f.dst);
    } else {
        p.family = AF_INET;
        helpers::fib_set_v4(&mut p, f.src[3], f.dst[3]);
    }
    p.l4_protocol = ctx
        .read::<u8>(if v6 { IP6_NEXT_HEADER } else { IP4_PROTO })
        .unwrap_or(0);
    helpers::fib_set_tot_len(&mut p, len);
    let rc = helpers::fib_lookup(ctx, &mut p);
    if (FIB_BLACKHOLE..=FIB_PROHIBIT).contains(&rc) {
        return Err(());
    }
    let out = p.ifindex;
    if rc != FIB_SUCCESS || (out != ingress && TX_DEVICES.get_ifindex(out).is_none()) {
        r.ifindex = 0;
        return Ok(false);
    }
    r.ifindex = out;
    // 5.12+ return the route's MTU in place of the length; older kernels
    // leave the length, so longer packets look up again.
    r.max_len = helpers::fib_mtu(&p).max(len);
    let (d, s) = (p.dmac, p.smac);
    r.macs = [
        u16::from_ne_bytes([d[0], d[1]]),
        u16::from_ne_bytes([d[2], d[3]]),
        u16::from_ne_bytes([d[4], d[5]]),
        u16::from_ne_bytes([s[0], s[1]]),
        u16::from_ne_bytes([s[2], s[3]]),
        u16::from_ne_bytes([s[4], s[5]]),
    ];
    Ok(true)
}

/// Send a translated packet (`p`: at least its Ethernet and IP headers)
/// by `r` (see `route`), or to the stack (see `finish_ip_header`).
#[inline(always)]
fn forward(ctx: &XdpContext, p: &Frame, v6: bool, r: &Route, ip: Delta) -> u32 {
    let Some(ttl) = finish_ip_header(p, v6, r.ifindex != 0, ip) else {
        return XDP_DROP;
    };
    if ttl == 0 {
        count(stats::XDP_PASSED);
        return XDP_PASS;
    }
    if p.write_each(0, &r.macs).is_none() {
        return XDP_DROP;
    }
    count(stats::XDP_FORWARDED);
    if r.ifindex == ctx.ingress_ifindex() as u32 {
        XDP_TX
    } else {
        TX_DEVICES
            .redirect(r.ifindex, XDP_PASS as u64)
            .unwrap_or_else(|e| e)
    }
}

/// Complete the IP header of a translated packet and decide where it goes:
/// when `forwarding` and the TTL (hop limit) allows, decrement it and
/// return the new value; else leave it and return 0 (the stack takes the
/// packet, and answers one whose TTL ran out). The IPv4 header checksum
/// gets `ip` (the address change) and the TTL change in one update.
/// (The TTL and protocol form one checksummed word, read and written as
/// such: a byte store followed by a word load of the same bytes stalls the
/// CPU's store forwarding, which cost ~10% of the established path.)
#[inline(always)]
fn finish_ip_header(p: &Frame, v6: bool, forwarding: bool, mut ip: Delta) -> Option<u8> {
    if v6 {
        let hops = p.read::<u8>(IP6_HOP_LIMIT)?;
        if !forwarding || hops <= 1 {
            return Some(0);
        }
        p.write(IP6_HOP_LIMIT, hops - 1)?;
        return Some(hops - 1);
    }
    let word = p.read::<u16>(IP4_TTL)?;
    let ttl = (u16::from_be(word) >> 8) as u8;
    let mut left = 0;
    if forwarding && ttl > 1 {
        let new = (u16::from_be(word) - 0x100).to_be();
        ip.word16(word, new);
        p.write(IP4_TTL, new)?;
        left = ttl - 1;
    }
    let c = p.read::<u16>(IP4_CSUM)?;
    p.write(IP4_CSUM, ip.apply(c))?;
    Some(left)
}
