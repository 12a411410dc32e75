//! Service lookup and backend selection: the socket hooks' (random choice,
//! session affinity, UDP flows, the socket's reverse translation) and the Maglev table
//! reads of the external path.
use svclb_common::{
    Affinity, AffinityKey, AffinityMatchKey, Backend, MaglevKey, ServiceKey, ServiceValue,
    SockRevNat, SockRevNatKey, UdpFlow, UdpFlowKey, BACKEND_ID_NONE, SCOPE_SOCKET,
    SVC_FLAG_AFFINITY, SVC_FLAG_DROP_EMPTY, SVC_FLAG_MEMBERS,
};

use crate::{
    helpers::{self, SockAddr},
    maps::{
        AFFINITY, AFFINITY_MATCH, BACKENDS, MAGLEV, SERVICES, SOCK_REV_NAT,
        SVCLB_UDP_STREAM_TIMEOUT_NS, SVCLB_UDP_TIMEOUT_NS, UDP_FLOWS,
    },
};

/// The outcome of looking a destination up.
pub enum Verdict {
    /// Not a frontend: leave the socket alone.
    Pass,
    /// A frontend with no usable backend: refuse, as kube-proxy's REJECT does.
    Refuse,
    /// No backend under a Local traffic policy: kube-proxy DROPs.
    Drop,
    /// A frontend: connect/send to this backend instead.
    Translate { backend: SockAddr, rev_nat_id: u32 },
}

/// Pick a backend of the frontend `dst`/`proto`: the one this client used
/// last if the frontend has session affinity and it is still a backend;
/// else, for a UDP datagram (`udp_socket`: the sending socket's cookie),
/// the one this socket's flow to the frontend went to if the flow is fresh
/// and the backend still a member; else one uniformly at random.
///
/// Reads slot 0 (the frontend record with the backend count), then one
/// backend slot, then the backend. The writer (userspace dataplane) orders
/// its updates so that every slot within the count read here, and every
/// backend a slot names, exists for as long as this program can be running.
#[inline(always)]
pub fn select_backend(
    dst: &SockAddr,
    proto: u8,
    client: impl Fn() -> u64,
    udp_socket: Option<u64>,
) -> Verdict {
    let mut key = ServiceKey {
        addr: dst.addr,
        port: dst.port,
        proto,
        scope: SCOPE_SOCKET,
        slot: 0,
        _pad: 0,
    };
    let Some(frontend) = helpers::lookup(&SERVICES, &key) else {
        return Verdict::Pass;
    };
    if frontend.count == 0 {
        if frontend.flags & SVC_FLAG_DROP_EMPTY != 0 {
            return Verdict::Drop;
        }
        return Verdict::Refuse;
    }
    // Session affinity takes precedence: it already keeps every socket of
    // the client on one backend, for longer.
    let affinity = if frontend.flags & SVC_FLAG_AFFINITY != 0 {
        Some(AffinityKey {
            client: client(),
            rev_nat_id: frontend.rev_nat_id,
            _pad: 0,
        })
    } else {
        None
    };
    // Without the members flag the writer lists no members to check a
    // remembered backend against (a frontend written by an older agent).
    // The key is built whole even when unused: LLVM may load a field of an
    // `Option`'s payload before testing the tag, and verifiers before 6.3
    // reject a read of uninitialized stack.
    let has_flow =
        udp_socket.is_some() && affinity.is_none() && frontend.flags & SVC_FLAG_MEMBERS != 0;
    let fkey = UdpFlowKey {
        cookie: udp_socket.unwrap_or(0),
        rev_nat_id: frontend.rev_nat_id,
        _pad: 0,
    };
    let now = helpers::now_ns();
    let remembered = match (&affinity, has_flow) {
        (Some(akey), _) => affine_backend(akey, &frontend, now),
        (None, true) => flow_backend(&fkey, &frontend, now),
        (None, false) => None,
    };
    let (backend_id, backend, replied, fresh) = match remembered {
        Some(found) => found,
        None => {
            key.slot = (helpers::random() % frontend.count as u32) as u16 + 1;
            let backend_id = match helpers::lookup(&SERVICES, &key) {
                Some(slot) => slot.backend_id,
                None => BACKEND_ID_NONE,
            };
            // A miss here would be a writer bug; refusing is safer than
            // letting the connect go to the service address, which nothing
            // answers.
            let Some(backend) = helpers::lookup(&BACKENDS, &backend_id) else {
                return Verdict::Refuse;
            };
            (backend_id, backend, 0, false)
        }
    };
    if let Some(akey) = affinity {
        let value = Affinity {
            last_used_ns: now,
            backend_id,
            _pad: 0,
        };
        let _ = AFFINITY.insert(akey, value, 0);
    }
    // A flow refreshed moments ago is not written again: most datagrams of
    // a busy flow cost two lookups, no map update.
    if has_flow && !fresh {
        let value = UdpFlow {
            last_used_ns: now,
            backend_id,
            replied,
            _pad: 0,
            _pad2: 0,
        };
        // Best effort, as for the reverse translation: on failure the
        // next datagram picks anew.
        let _ = UDP_FLOWS.insert(fkey, value, 0);
    }
    Verdict::Translate {
        backend: SockAddr {
            addr: backend.addr,
            port: backend.port,
        },
        rev_nat_id: frontend.rev_nat_id,
    }
}

/// Whether `backend_id` is still one of the frontend's backends (the
/// frontend has [`SVC_FLAG_MEMBERS`] or session affinity). Not whether the
/// backends map has it: backend entries are shared between services.
#[inline(always)]
fn is_member(frontend: &ServiceValue, backend_id: u32) -> Option<Backend> {
    let member = AffinityMatchKey {
        rev_nat_id: frontend.rev_nat_id,
        backend_id,
    };
    helpers::lookup(&AFFINITY_MATCH, &member)?;
    helpers::lookup(&BACKENDS, &backend_id)
}

/// The backend this client was sent to within the affinity timeout, if it
/// still belongs to the frontend.
#[inline(always)]
fn affine_backend(
    akey: &AffinityKey,
    frontend: &ServiceValue,
    now: u64,
) -> Option<(u32, Backend, u8, bool)> {
    let last = helpers::lookup_lru(&AFFINITY, akey)?;
    if now.wrapping_sub(last.last_used_ns) > frontend.affinity_timeout as u64 * 1_000_000_000 {
        return None;
    }
    let backend = is_member(frontend, last.backend_id)?;
    Some((last.backend_id, backend, 0, false))
}

/// The backend of this socket's UDP flow to the frontend, if the flow was
/// used within its timeout (the stream timeout once a reply was seen, as
/// netfilter's) and the backend still belongs to the frontend; with the
/// flow's replied flag, which the flow keeps, and whether the flow is fresh
/// (used within the last eighth of its timeout: no need to refresh it).
#[inline(always)]
fn flow_backend(
    fkey: &UdpFlowKey,
    frontend: &ServiceValue,
    now: u64,
) -> Option<(u32, Backend, u8, bool)> {
    let last = helpers::lookup_lru(&UDP_FLOWS, fkey)?;
    let timeout = if last.replied != 0 {
        SVCLB_UDP_STREAM_TIMEOUT_NS.load()
    } else {
        SVCLB_UDP_TIMEOUT_NS.load()
    };
    let idle = now.wrapping_sub(last.last_used_ns);
    if idle > timeout {
        return None;
    }
    let backend = is_member(frontend, last.backend_id)?;
    Some((
        last.backend_id,
        backend,
        last.replied,
        is_fresh(idle, timeout),
    ))
}

/// Whether a flow idle for `idle` ns need not be refreshed yet: a flow's
/// last use is recorded at most timeout/8 late, so it may end up to 12.5%
/// before its timeout, never after it.
#[inline(always)]
fn is_fresh(idle: u64, timeout: u64) -> bool {
    idle < timeout >> 3
}

/// A reply from `backend` reached this socket's application: its flow to
/// the frontend (`rev_nat_id`) is refreshed and lasts the stream timeout
/// from now on. Replies from a backend the flow has left change nothing.
#[inline(always)]
pub fn mark_replied(cookie: u64, rev_nat_id: u32, backend: &SockAddr) {
    let fkey = UdpFlowKey {
        cookie,
        rev_nat_id,
        _pad: 0,
    };
    let Some(mut flow) = helpers::lookup_lru(&UDP_FLOWS, &fkey) else {
        return;
    };
    let Some(b) = helpers::lookup(&BACKENDS, &flow.backend_id) else {
        return;
    };
    if b.addr != backend.addr || b.port != backend.port {
        return;
    }
    let now = helpers::now_ns();
    let idle = now.wrapping_sub(flow.last_used_ns);
    if flow.replied != 0 && is_fresh(idle, SVCLB_UDP_STREAM_TIMEOUT_NS.load()) {
        return;
    }
    flow.last_used_ns = now;
    flow.replied = 1;
    let _ = UDP_FLOWS.insert(fkey, flow, 0);
}

/// Remember that this socket's `backend` stands for `frontend`, for
/// recvmsg and getpeername.
#[inline(always)]
pub fn remember(cookie: u64, backend: &SockAddr, frontend: &SockAddr, rev_nat_id: u32) {
    let key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    let value = SockRevNat {
        addr: frontend.addr,
        port: frontend.port,
        _pad: 0,
        rev_nat_id,
    };
    // A UDP socket sends many datagrams through one translation: a lookup
    // costs less than rewriting the same entry.
    if let Some(old) = helpers::lookup_lru(&SOCK_REV_NAT, &key) {
        if old.addr == value.addr && old.port == value.port && old.rev_nat_id == rev_nat_id {
            return;
        }
    }
    // Best effort: the LRU map makes room itself; on failure the socket still
    // works, only recvmsg/getpeername would show the backend.
    let _ = SOCK_REV_NAT.insert(key, value, 0);
}

/// The frontend this socket's peer `backend` stands for, if any, and its
/// rev-NAT id.
#[inline(always)]
pub fn recall(cookie: u64, backend: &SockAddr) -> Option<(SockAddr, u32)> {
    let key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    helpers::lookup_lru(&SOCK_REV_NAT, &key).map(|v| {
        let frontend = SockAddr {
            addr: v.addr,
            port: v.port,
        };
        (frontend, v.rev_nat_id)
    })
}

/// One entry of a Maglev table chunk, without copying the 4 KB chunk onto
/// the 512-byte stack.
#[inline(always)]
pub fn maglev_entry(key: &MaglevKey, index: u32) -> Option<u32> {
    let chunk = helpers::lookup_in_place(&MAGLEV, key)?;
    // Callers pass `x % MAGLEV_CHUNK`; `get` must still check the index,
    // for the verifier.
    let index = helpers::opaque(index) as usize;
    chunk.backend_ids.get(index).copied()
}
