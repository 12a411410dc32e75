//! The external path's decisions, shared by the XDP program: connection
//! tracking, the frontend lookup, Maglev backend choice and SNAT port
//! allocation. Packet parsing and rewriting live in `xdp.rs` and `tc.rs`
//! (with the header checks they share in `parse.rs`).
//!
//! A new flow creates two conntrack entries:
//! - client -> frontend (applied by XDP): rewrite to client -> backend for a
//!   backend on this node, or to node:snat_port -> backend for one elsewhere;
//! - the reply direction: backend -> client (applied by tc egress when the
//!   local backend's reply leaves the node) or backend -> node:snat_port
//!   (applied by XDP when the remote backend's reply comes back), both
//!   rewritten to come from the frontend and go to the client.
use svclb_common::{
    ct_closed, ct_now, ct_state, flow_hash, stats, Flow, FlowKey, MaglevKey, Route, ServiceKey,
    SourceRangeKey, BACKEND_DRAINING, CT_CLOSED, FLOW_EGRESS, FLOW_INGRESS, MAGLEV_CHUNK,
    ROUTE_TTL_JIFFIES, SCOPE_EXTERNAL, SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_NODE_PORT,
    SVC_FLAG_SOURCE_RANGES,
};

use crate::{
    conntrack::{self, CtEntry},
    consts::BPF_NOEXIST,
    csum::Delta,
    helpers, lb,
    maps::{BACKENDS, BACKENDS_EPOCH, SERVICES, SOURCE_RANGES, XDP_CONFIG},
    scratch::{Scratch, Tuple},
    stats::count,
};

/// SNAT ports tried for a free one (no entry holds it) before giving up
/// on free ports. A range of at most SNAT_TRIES ports is scanned whole,
/// from a random port on: that pass fails only when every port is held.
/// In a larger range each try is an independent random port, so whatever
/// pattern the held ports form (no clustering, unlike a scan), with a
/// fraction p of the range held toward the backend all tries fail with
/// probability p^SNAT_TRIES: at 90%, 0.9^256 = 2e-12 (one new flow in 500
/// billion); at 99%, 0.99^256 = 8%. The expected tries are 1/(1-p): 10 at
/// 90%. (`tests/tests/xdp_fixtures.rs` allocates at 90-92%.)
///
/// No bpf_loop on 5.10: the verifier walks the loop once per try, so a
/// try is one map update (the entry's checksum deltas are filled in
/// after: nothing can match a reply entry before its flow's first packet
/// is sent).
const SNAT_TRIES: u32 = 256;

/// Then ports tried for one a closed flow holds (RST, or FINs both ways:
/// its reply entry is `CT_CLOSED`), as netfilter lets a new SYN reuse a
/// TIME_WAIT tuple; the agent's sweeper frees expired flows' ports. Each
/// of these tries costs the verifier some 30 times a free-port try.
const RECLAIM_TRIES: u32 = 16;

pub enum Decision {
    /// Not ours: leave the packet to the stack untouched.
    Pass,
    Drop,
    /// Rewrite the packet's addresses and ports to the flow's: this
    /// conntrack entry's, or `s.flow` if the new entry is gone already.
    /// See `s.fresh`.
    Translate(Option<CtEntry>),
}

/// What to do with a packet arriving at the node from outside. (Flows are
/// passed by reference throughout: the stack holds 512 bytes in all.)
#[inline(always)]
pub fn ingress(s: &mut Scratch, v6: bool) -> Decision {
    s.now = helpers::jiffies();
    s.epoch = backends_epoch();
    if let Some(entry) = conntrack::entry(&s.t, v6) {
        let f = entry.flow();
        if f.direction == FLOW_INGRESS {
            // Only for tracked packets: a miss (the node's own traffic)
            // need not read the clock.
            s.tick = s.clock.tick();
            let r = &f.route;
            // The backend was there when the route was cached, and no
            // backend has been deleted since: skip the check.
            let fresh = r.epoch == s.epoch && s.now.wrapping_sub(r.checked_at) < ROUTE_TTL_JIFFIES;
            // A flow whose backend left the service picks a new one.
            if fresh || f.backend_id == 0 || helpers::lookup(&BACKENDS, &f.backend_id).is_some() {
                if s.syn && f.backend_id != 0 {
                    // A new connection on the tuple (netfilter, too, lets a
                    // SYN reuse a closed one): its states start over, on
                    // a backend new flows may use. A draining one (still
                    // serving, kept only for established flows) is not.
                    if draining(f.backend_id) {
                        return new_flow(s, v6);
                    }
                    entry.copy_to(&mut s.flow);
                    refresh_reply(s, v6);
                    entry.restart(s.tick, s.ct_bits);
                } else if entry.touch(s.tick, s.ct_bits) {
                    note_close(s, entry, v6);
                }
                s.fresh = fresh;
                return Decision::Translate(Some(entry));
            }
        }
    }
    new_flow(s, v6)
}

/// A new connection on a tracked tuple (a client reusing its port; its
/// entry in `s.flow`): make sure its reply entry exists again, since a
/// direct connection in between may have dropped it (see `forget_reply`).
#[inline(never)]
fn refresh_reply(s: &mut Scratch, v6: bool) {
    let (t, f) = (&s.t, &s.flow);
    // The backend answers the address it saw: the client's own (local
    // backend, rewritten by tc) or the SNAT address (rewritten by XDP).
    let local = f.src == t.src && f.sport == t.sport;
    s.key = FlowKey {
        src: f.dst,
        dst: f.src,
        sport: f.dport,
        dport: f.sport,
        proto: t.proto,
        _pad: 0,
        _pad2: 0,
    };
    let mut reply = Flow {
        src: t.dst,
        dst: t.src,
        sport: t.dport,
        dport: t.sport,
        backend_id: 0,
        rev_nat_id: f.rev_nat_id,
        direction: if local { FLOW_EGRESS } else { FLOW_INGRESS },
        state: 0,
        csum_ip: 0,
        csum_l4: 0,
        _pad2: 0,
        route: Route::default(),
        last_seen: s.tick,
    };
    set_checksum_deltas(&mut reply, &s.key, v6);
    conntrack::insert(&s.key, &reply, 0, v6);
}

/// A FIN or RST went through `entry` (for `s.t`): if that closed the flow
/// (a RST, or the second direction's FIN), mark its SNAT reply entry
/// `CT_CLOSED`, so its port may go to a new flow. Once per flow and
/// direction, so the lookup of the other entry costs nothing per packet.
#[inline(never)]
fn note_close(s: &mut Scratch, entry: CtEntry, v6: bool) {
    let f = entry.flow();
    // The other direction's entry: this one's translation, reversed.
    s.key = FlowKey {
        src: f.dst,
        dst: f.src,
        sport: f.dport,
        dport: f.sport,
        proto: s.t.proto,
        _pad: 0,
        _pad2: 0,
    };
    let forward = f.backend_id != 0;
    let Some(other) = conntrack::entry(&s.key, v6) else {
        return;
    };
    let o = other.flow();
    let (reply, fwd_bits, reply_bits) = if forward {
        (other, f.state, o.state)
    } else {
        (entry, o.state, f.state)
    };
    // Only SNAT reply entries hold ports (a local backend's is tc's).
    if reply.flow().direction == FLOW_INGRESS
        && ct_closed(ct_state(s.t.proto, fwd_bits, reply_bits))
    {
        reply.mark(CT_CLOSED);
    }
}

/// The conntrack entry of `s.t` into `s.flow`, if it is for `direction`
/// (ICMP errors: related to a flow, never creating one).
#[inline(always)]
pub fn related(s: &mut Scratch, direction: u8, v6: bool) -> bool {
    match conntrack::entry(&s.t, v6) {
        Some(entry) => {
            entry.copy_to(&mut s.flow);
            s.flow.direction == direction
        }
        None => false,
    }
}

/// The translation a tc egress packet (a local backend's reply) needs;
/// the entry notes the packet's `bits` (0: an ICMP error, which does not
/// count as the flow's traffic).
#[inline(always)]
pub fn egress(t: &Tuple, v6: bool, bits: u8) -> Option<Flow> {
    let entry = conntrack::entry(t, v6)?;
    if entry.flow().direction != FLOW_EGRESS {
        return None;
    }
    if bits != 0 {
        entry.touch(ct_now(helpers::now_ns()), bits);
    }
    let mut flow = Flow::default();
    entry.copy_to(&mut flow);
    Some(flow)
}

// Not inlined: its stack frame is separate from the rewrite's.
#[inline(never)]
fn new_flow(s: &mut Scratch, v6: bool) -> Decision {
    let Scratch {
        t,
        syn,
        flow,
        key: reply_key,
        fresh,
        tick,
        ct_bits,
        clock,
        ..
    } = s;
    let skey = ServiceKey {
        addr: t.dst,
        port: t.dport,
        proto: t.proto,
        scope: SCOPE_EXTERNAL,
        slot: 0,
        _pad: 0,
    };
    let Some(fe) = helpers::lookup(&SERVICES, &skey) else {
        if *syn {
            forget_reply(t, reply_key, v6);
        }
        return Decision::Pass;
    };
    if fe.flags & SVC_FLAG_SOURCE_RANGES != 0 && !source_allowed(fe.rev_nat_id, &t.src) {
        count(stats::SOURCE_RANGE_DENIED);
        return Decision::Drop;
    }
    if fe.count == 0 || fe.maglev_size == 0 {
        count(stats::NO_BACKEND);
        // A service without endpoints is refused, as kube-proxy does: on a
        // node address nothing listens at the node port, so the stack
        // answers with a reset or port unreachable. Other addresses are not
        // the node's; the stack would route them, so drop.
        if fe.flags & SVC_FLAG_DROP_EMPTY == 0 && fe.flags & SVC_FLAG_NODE_PORT != 0 {
            return Decision::Pass;
        }
        return Decision::Drop;
    }
    // Affinity: the client address alone picks the backend, so a client
    // stays on one backend (on every node) while the backend set is stable.
    let sport = if fe.flags & SVC_FLAG_AFFINITY != 0 {
        0
    } else {
        t.sport
    };
    let hash = flow_hash(&t.src, sport, t.proto);
    let index = hash % fe.maglev_size;
    let mkey = MaglevKey {
        rev_nat_id: fe.rev_nat_id,
        generation: fe.maglev_generation,
        chunk: (index / MAGLEV_CHUNK) as u16,
    };
    let Some(backend_id) = lb::maglev_entry(&mkey, index % MAGLEV_CHUNK) else {
        return Decision::Drop;
    };
    let Some(backend) = helpers::lookup(&BACKENDS, &backend_id) else {
        return Decision::Drop;
    };
    *tick = clock.tick();
    // `flow` serves as the reply entry first, then as the forward one.
    *flow = Flow {
        src: t.dst,
        dst: t.src,
        sport: t.dport,
        dport: t.sport,
        backend_id: 0,
        rev_nat_id: fe.rev_nat_id,
        direction: FLOW_INGRESS,
        state: 0,
        csum_ip: 0,
        csum_l4: 0,
        _pad2: 0,
        route: Route::default(),
        last_seen: *tick,
    };
    *reply_key = FlowKey {
        src: backend.addr,
        dst: t.src,
        sport: backend.port,
        dport: t.sport,
        proto: t.proto,
        _pad: 0,
        _pad2: 0,
    };
    if backend.local != 0 {
        // The backend sees the client's address; tc egress rewrites its
        // replies on their way out.
        flow.direction = FLOW_EGRESS;
        set_checksum_deltas(flow, reply_key, v6);
        conntrack::insert(reply_key, flow, 0, v6);
        flow.src = t.src;
        flow.sport = t.sport;
    } else {
        // Elsewhere: the backend's node must send replies back here.
        let Some((snat, min, max)) = snat_config(v6) else {
            count(stats::SNAT_EXHAUSTED);
            return Decision::Drop;
        };
        reply_key.dst = snat;
        // The checksum deltas but the port's, which the search adds to
        // each port it tries: the entry goes in complete, in one update.
        reply_key.dport = flow.dport;
        set_checksum_deltas(flow, reply_key, v6);
        let port = if v6 {
            snat_port::<true>(flow, reply_key, min, max)
        } else {
            snat_port::<false>(flow, reply_key, min, max)
        };
        if port == 0 {
            count(stats::SNAT_EXHAUSTED);
            return Decision::Drop;
        }
        flow.src = snat;
        flow.sport = port;
    }
    flow.dst = backend.addr;
    flow.dport = backend.port;
    flow.backend_id = backend_id;
    flow.direction = FLOW_INGRESS;
    flow.state = *ct_bits;
    set_checksum_deltas(flow, t, v6);
    conntrack::insert(t, flow, 0, v6);
    count(stats::CT_CREATED);
    // The entry as inserted, so that the route looked up for this first
    // packet is cached in it.
    *fresh = false;
    Decision::Translate(conntrack::entry(t, v6))
}

/// A SNAT port in min..=max for the reply entry `flow` at `key` (the
/// port goes in `key.dport`): free toward the backend, or held by a flow
/// that is over (see `reclaim`). `flow` comes with the checksum deltas of
/// a translation that leaves `key.dport` alone; each try adds its port's
/// to the L4 one and inserts the entry complete. 0 when none was found.
/// The family is a constant, so a try has no branch on it.
#[inline(never)]
fn snat_port<const V6: bool>(flow: &mut Flow, key: &mut FlowKey, min: u16, max: u16) -> u16 {
    let base = Delta::from_folded(flow.csum_l4);
    let to = flow.dport.to_be();
    let range = (max - min) as u32 + 1;
    let start = helpers::random();
    let mut i = 0;
    while i < SNAT_TRIES {
        // Opaque: else the compiler counts in ports, from a random start,
        // and the verifier can no longer see that the loop ends.
        let n = helpers::opaque(i);
        if n >= range {
            break;
        }
        key.dport = candidate(min, range, start, n);
        flow.csum_l4 = port_delta(base, key.dport, to);
        if conntrack::insert(key, flow, BPF_NOEXIST, V6) {
            return key.dport;
        }
        i += 1;
    }
    let mut i = 0;
    while i < RECLAIM_TRIES {
        let n = helpers::opaque(i);
        key.dport = candidate(min, range, start, n);
        flow.csum_l4 = port_delta(base, key.dport, to);
        // Taken with BPF_NOEXIST: when two CPUs reclaim the same port, one
        // of them gets it.
        if reclaim::<V6>(key) && conntrack::insert(key, flow, BPF_NOEXIST, V6) {
            return key.dport;
        }
        i += 1;
    }
    0
}

/// The L4 checksum delta `base` plus the change of the destination port
/// from `port` to `to` (network order).
#[inline(always)]
fn port_delta(base: Delta, port: u16, to: u16) -> u16 {
    let mut d = base;
    d.word16(port.to_be(), to);
    d.folded()
}

/// Try `n` of a port search in a range of `range` ports from `min`: the
/// ports in turn from `start` when the range is small (it is scanned
/// whole), else a random one.
#[inline(always)]
fn candidate(min: u16, range: u32, start: u32, n: u32) -> u16 {
    let r = if range <= SNAT_TRIES {
        start.wrapping_add(n)
    } else {
        helpers::random()
    };
    min + (r % range) as u16
}

/// Remove the reply entry at `key` (its SNAT port) and its flow's
/// client-to-backend entry if the flow is over (`CT_CLOSED`). True when
/// the port is free.
#[inline(never)]
fn reclaim<const V6: bool>(key: &FlowKey) -> bool {
    let v6 = V6;
    let Some(old) = conntrack::entry(key, v6) else {
        return true;
    };
    let r = old.flow();
    if r.state & CT_CLOSED == 0 {
        return false;
    }
    // The reply entry of client -> frontend translates to frontend ->
    // client: its forward key is its translation reversed.
    let forward = FlowKey {
        src: r.dst,
        dst: r.src,
        sport: r.dport,
        dport: r.sport,
        proto: key.proto,
        _pad: 0,
        _pad2: 0,
    };
    // Unless the client's tuple has a new flow meanwhile (on another port).
    if let Some(f) = conntrack::entry(&forward, v6) {
        if f.flow().sport == key.dport {
            conntrack::remove(&forward, v6);
        }
    }
    conntrack::remove(key, v6);
    count(stats::SNAT_RECLAIMED);
    true
}

/// Store in `f` what translating a packet of `key` to it does to the
/// checksums (the same for every packet of the entry).
#[inline(always)]
fn set_checksum_deltas(f: &mut Flow, key: &FlowKey, v6: bool) {
    let mut ip = Delta::default();
    ip.addr(&key.src, &f.src, v6);
    ip.addr(&key.dst, &f.dst, v6);
    let mut l4 = ip;
    l4.word16(key.sport.to_be(), f.sport.to_be());
    l4.word16(key.dport.to_be(), f.dport.to_be());
    f.csum_ip = ip.folded();
    f.csum_l4 = l4.folded();
}

/// A new connection straight to an address a translated flow used (say,
/// a client reusing its port to reach a pod directly): the old flow's reply
/// entry must not rewrite this connection's replies. Conntrack entries
/// outlive their connections (until the sweeper removes them after their
/// timeout), so they are dropped here, on SYNs that hit no frontend; the
/// sweeper then removes the forward entry left alone.
#[inline(always)]
fn forget_reply(t: &Tuple, key: &mut FlowKey, v6: bool) {
    *key = FlowKey {
        src: t.dst,
        dst: t.src,
        sport: t.dport,
        dport: t.sport,
        proto: t.proto,
        _pad: 0,
        _pad2: 0,
    };
    conntrack::remove(key, v6);
}

#[inline(always)]
fn source_allowed(rev_nat_id: u32, src: &[u32; 4]) -> bool {
    let key = aya_ebpf::maps::lpm_trie::Key::new(
        32 + 128,
        SourceRangeKey {
            rev_nat_id_be: rev_nat_id.to_be(),
            addr: *src,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

/// Whether the backend is kept only for established flows (see
/// `svclb_common::BACKEND_DRAINING`: no slot or Maglev table names it).
#[inline(always)]
fn draining(backend_id: u32) -> bool {
    helpers::lookup(&BACKENDS, &backend_id).is_some_and(|b| b.state == BACKEND_DRAINING)
}

/// The agent's backends epoch (see `svclb_common::maps::BACKENDS_EPOCH`).
#[inline(always)]
fn backends_epoch() -> u32 {
    BACKENDS_EPOCH.get(0).copied().unwrap_or(0)
}

/// The SNAT address of the family and the port range; None when the agent
/// has set no address for the family (or no valid range).
#[inline(always)]
fn snat_config(v6: bool) -> Option<([u32; 4], u16, u16)> {
    let cfg = XDP_CONFIG.get(0)?;
    let addr = if v6 { cfg.snat_addr6 } else { cfg.snat_addr4 };
    if addr == [0; 4] || cfg.snat_port_min == 0 || cfg.snat_port_max < cfg.snat_port_min {
        return None;
    }
    Some((addr, cfg.snat_port_min, cfg.snat_port_max))
}
