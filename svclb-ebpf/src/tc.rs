//! tc egress on the node's external devices: replies of local backends to
//! external clients leave with the frontend's address and port, and so do
//! their ICMP errors about the clients' packets. The
//! kernel's checksum helpers are used (not XDP's arithmetic) because
//! locally forwarded packets may carry partial (offloaded) checksums.
use aya_ebpf::{macros::classifier, programs::TcContext};
use svclb_common::{v4_mapped, Flow, PROTO_TCP, PROTO_UDP};

use crate::{
    external::{self, Tuple},
    icmp,
};

const TC_ACT_OK: i32 = 0;
const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// bpf_l4_csum_replace flags: the field is in the pseudo-header; keep a
/// zero UDP checksum zero.
const F_PSEUDO_HDR: u64 = 1 << 4;
const F_MARK_MANGLED_0: u64 = 1 << 5;

#[classifier]
pub fn svclb_tc_egress(ctx: TcContext) -> i32 {
    let _ = egress(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn egress(ctx: &TcContext) -> Option<()> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let v6 = match ethertype {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return None,
    };
    let (proto, src, dst, l4) = if v6 {
        if ctx.load::<u8>(14).ok()? >> 4 != 6 {
            return None;
        }
        let proto = ctx.load::<u8>(20).ok()?;
        let src = ctx.load::<[u32; 4]>(22).ok()?;
        let dst = ctx.load::<[u32; 4]>(38).ok()?;
        (proto, src, dst, 54)
    } else {
        let frag = u16::from_be(ctx.load::<u16>(20).ok()?);
        if ctx.load::<u8>(14).ok()? != 0x45 || frag & 0x3fff != 0 {
            return None;
        }
        let proto = ctx.load::<u8>(23).ok()?;
        let src = v4_mapped(ctx.load::<u32>(26).ok()?);
        let dst = v4_mapped(ctx.load::<u32>(30).ok()?);
        (proto, src, dst, 34)
    };
    if proto == PROTO_ICMP || proto == PROTO_ICMPV6 {
        // A local backend's error about a client's packet (say, port
        // unreachable) must come from the frontend and quote it.
        let mut t = Tuple::default();
        icmp::parse(ctx, v6, proto, &mut t)?;
        let f = external::egress(&t, v6)?;
        return icmp::rewrite(ctx, v6, &t, &f);
    }
    let csum_at = match proto {
        PROTO_TCP => l4 + 16,
        PROTO_UDP => l4 + 6,
        _ => return None,
    };
    let sport = ctx.load::<u16>(l4).ok()?;
    let dport = ctx.load::<u16>(l4 + 2).ok()?;
    let t = Tuple {
        src,
        dst,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        proto,
        _pad: 0,
        _pad2: 0,
    };
    let f = external::egress(&t, v6)?;
    rewrite_source(ctx, v6, proto, csum_at, l4, &t, &f)
}

/// Replace the source address and port (the destination is the client
/// already), fixing the checksums.
#[inline(always)]
fn rewrite_source(
    ctx: &TcContext,
    v6: bool,
    proto: u8,
    csum_at: usize,
    l4: usize,
    t: &Tuple,
    f: &Flow,
) -> Option<()> {
    let mangled0 = if proto == PROTO_UDP {
        F_MARK_MANGLED_0
    } else {
        0
    };
    if v6 {
        for i in 0..4 {
            ctx.l4_csum_replace(
                csum_at,
                t.src[i] as u64,
                f.src[i] as u64,
                F_PSEUDO_HDR | mangled0 | 4,
            )
            .ok()?;
        }
        ctx.store(22, &f.src, 0).ok()?;
    } else {
        let (from, to) = (t.src[3] as u64, f.src[3] as u64);
        ctx.l4_csum_replace(csum_at, from, to, F_PSEUDO_HDR | mangled0 | 4)
            .ok()?;
        ctx.l3_csum_replace(24, from, to, 4).ok()?;
        ctx.store(26, &f.src[3], 0).ok()?;
    }
    let (from, to) = (t.sport.to_be() as u64, f.sport.to_be() as u64);
    ctx.l4_csum_replace(csum_at, from, to, mangled0 | 2).ok()?;
    ctx.store(l4, &f.sport.to_be(), 0).ok()?;
    Some(())
}
