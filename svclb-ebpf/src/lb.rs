//! Service lookup and backend selection, shared by the socket hooks.
use svclb_common::{ServiceKey, SockRevNat, SockRevNatKey, BACKEND_ID_NONE, SCOPE_SOCKET};

use crate::{
    ctx::{self, SockAddr},
    maps::{BACKENDS, SERVICES, SOCK_REV_NAT},
};

/// The outcome of looking a destination up.
pub enum Verdict {
    /// Not a frontend: leave the socket alone.
    Pass,
    /// A frontend with no usable backend: refuse, as kube-proxy's REJECT does.
    Refuse,
    /// A frontend: connect/send to this backend instead.
    Translate { backend: SockAddr, rev_nat_id: u32 },
}

/// Pick a backend of the frontend `dst`/`proto` uniformly at random.
///
/// Reads slot 0 (the frontend record with the backend count), then one
/// backend slot, then the backend. The writer (userspace dataplane) orders
/// its updates so that every slot within the count read here, and every
/// backend a slot names, exists for as long as this program can be running.
#[inline(always)]
pub fn select_backend(dst: &SockAddr, proto: u8) -> Verdict {
    let mut key = ServiceKey {
        addr: dst.addr,
        port: dst.port,
        proto,
        scope: SCOPE_SOCKET,
        slot: 0,
        _pad: 0,
    };
    let Some(frontend) = ctx::lookup(&SERVICES, &key) else {
        return Verdict::Pass;
    };
    if frontend.count == 0 {
        return Verdict::Refuse;
    }
    key.slot = (ctx::random() % frontend.count as u32) as u16 + 1;
    let backend_id = match ctx::lookup(&SERVICES, &key) {
        Some(slot) => slot.backend_id,
        None => BACKEND_ID_NONE,
    };
    // A miss here would be a writer bug; refusing is safer than letting the
    // connect go to the service address, which nothing answers.
    let Some(backend) = ctx::lookup(&BACKENDS, &backend_id) else {
        return Verdict::Refuse;
    };
    Verdict::Translate {
        backend: SockAddr {
            addr: backend.addr,
            port: backend.port,
        },
        rev_nat_id: frontend.rev_nat_id,
    }
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
    // Best effort: the LRU map makes room itself; on failure the socket still
    // works, only recvmsg/getpeername would show the backend.
    let _ = SOCK_REV_NAT.insert(key, value, 0);
}

/// The frontend this socket's peer `backend` stands for, if any.
#[inline(always)]
pub fn recall(cookie: u64, backend: &SockAddr) -> Option<SockAddr> {
    let key = SockRevNatKey {
        cookie,
        addr: backend.addr,
        port: backend.port,
        _pad: [0; 6],
    };
    ctx::lookup_lru(&SOCK_REV_NAT, &key).map(|v| SockAddr {
        addr: v.addr,
        port: v.port,
    })
}
