//! tc egress on the node's external devices: replies of local backends to
//! external clients leave with the frontend's address and port, and so do
//! their ICMP errors about the clients' packets. The
//! kernel's checksum helpers are used (not XDP's arithmetic) because
//! locally forwarded packets may carry partial (offloaded) checksums.
use aya_ebpf::{macros::classifier, programs::TcContext};
use svclb_common::{v4_mapped, Flow};

use crate::{
    consts::{
        l4, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, IP4_CSUM, IP4_DST, IP4_L4, IP4_PROTO, IP4_SRC,
        IP6_DST, IP6_L4, IP6_NEXT_HEADER, IP6_SRC, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
        TC_ACT_OK,
    },
    external, icmp, parse,
    scratch::Tuple,
};

#[classifier]
pub fn svclb_tc_egress(ctx: TcContext) -> i32 {
    let _ = egress(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Option<()> {
    let v6 = parse::is_ipv6(ctx)?;
    let (proto, src, dst, l4_at) = if v6 {
        if !parse::ip6_valid(ctx)? {
            return None;
        }
        let proto = ctx.load::<u8>(IP6_NEXT_HEADER).ok()?;
        let src = ctx.load::<[u32; 4]>(IP6_SRC).ok()?;
        let dst = ctx.load::<[u32; 4]>(IP6_DST).ok()?;
        (proto, src, dst, IP6_L4)
    } else {
        if !parse::ip4_plain(ctx)? {
            return None;
        }
        let proto = ctx.load::<u8>(IP4_PROTO).ok()?;
        let src = v4_mapped(ctx.load::<u32>(IP4_SRC).ok()?);
        let dst = v4_mapped(ctx.load::<u32>(IP4_DST).ok()?);
        (proto, src, dst, IP4_L4)
    };
    if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        // A local backend's error about a client's packet (say, port
        // unreachable) must come from the frontend and quote it.
        let mut t = Tuple::default();
        icmp::parse(ctx, v6, proto, &mut t)?;
        let f = external::egress(&t, v6, 0)?;
        return icmp::rewrite(ctx, v6, &t, &f);
    }
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let csum_at = parse::l4_csum(l4_at, proto);
    let sport = ctx.load::<u16>(l4_at + l4::SPORT).ok()?;
    let dport = ctx.load::<u16>(l4_at + l4::DPORT).ok()?;
    let t = Tuple {
        src,
        dst,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        proto,
        _pad: 0,
        _pad2: 0,
    };
    let flags = if proto == PROTO_TCP {
        ctx.load::<u8>(l4_at + l4::TCP_FLAGS).unwrap_or(0)
    } else {
        0
    };
    let f = external::egress(&t, v6, parse::ct_bits(flags))?;
    rewrite_source(ctx, v6, proto, csum_at, l4_at, &t, &f)
}

/// Replace the source address and port (the destination is the client
/// already), fixing the checksums.
#[inline(always)]
fn rewrite_source(
    ctx: &TcContext,
    v6: bool,
    proto: u8,
    csum_at: usize,
    l4_at: usize,
    t: &Tuple,
    f: &Flow,
) -> Option<()> {
    let mangled0 = if proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    if v6 {
        for i in 0..4 {
            ctx.l4_csum_replace(
                csum_at,
                t.src[i] as u64,
                f.src[i] as u64,
                BPF_F_PSEUDO_HDR | mangled0 | 4,
            )
            .ok()?;
        }
        ctx.store(IP6_SRC, &f.src, 0).ok()?;
    } else {
        let (from, to) = (t.src[3] as u64, f.src[3] as u64);
        ctx.l4_csum_replace(csum_at, from, to, BPF_F_PSEUDO_HDR | mangled0 | 4)
            .ok()?;
        ctx.l3_csum_replace(IP4_CSUM, from, to, 4).ok()?;
        ctx.store(IP4_SRC, &f.src[3], 0).ok()?;
    }
    let (from, to) = (t.sport.to_be() as u64, f.sport.to_be() as u64);
    ctx.l4_csum_replace(csum_at, from, to, mangled0 | 2).ok()?;
    ctx.store(l4_at + l4::SPORT, &f.sport.to_be(), 0).ok()?;
    Some(())
}
