//! The cgroup socket hooks: connect and sendmsg translate a frontend to a
//! backend once per connection (or datagram); recvmsg and getpeername
//! translate the backend back so the application only ever sees the service.
//!
//! Protocol 132 (SCTP) is accepted too, for kernels that run the connect
//! hook for SCTP sockets; Linux 5.10 to 6.12 do not (net/sctp/socket.c
//! connects without it, and sctp_sendmsg runs no sendmsg hook), so there
//! SCTP Services are not translated (README).
use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use svclb_common::{is_loopback, is_v4_mapped, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::{
    consts::{ECONNREFUSED, ETIMEDOUT, SOCK_ALLOW, SOCK_REJECT},
    helpers::{self, SockAddr},
    lb::{self, Verdict},
    maps::{SVCLB_HAS_SET_RETVAL, SVCLB_HOST_NETNS_COOKIE},
};

/// Fail the connect/sendmsg with `errno`; without bpf_set_retval (kernel
/// < 5.18) the caller sees EPERM instead.
#[inline(always)]
fn fail(errno: i32) -> i32 {
    if SVCLB_HAS_SET_RETVAL.load() != 0 {
        helpers::set_retval(errno);
    }
    SOCK_REJECT
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

fn user_addr(ctx: &SockAddrContext, family: Family) -> SockAddr {
    match family {
        Family::V4 => helpers::user_addr4(ctx),
        Family::V6 => helpers::user_addr6(ctx),
    }
}

fn set_user_addr(ctx: &SockAddrContext, family: Family, to: &SockAddr) {
    match family {
        Family::V4 => helpers::set_user_addr4(ctx, to),
        Family::V6 => helpers::set_user_addr6(ctx, to),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    Connect,
    /// A datagram sent with an address (unconnected UDP).
    Sendmsg,
}

/// connect and sendmsg: frontend -> backend.
#[inline(always)]
fn translate_destination(ctx: &SockAddrContext, family: Family, hook: Hook) -> i32 {
    let proto = helpers::protocol(ctx);
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
        return SOCK_ALLOW;
    }
    let dst = user_addr(ctx, family);
    // Node ports on loopback are the host's: a pod's localhost is its own.
    if is_loopback(&dst.addr) {
        let host = SVCLB_HOST_NETNS_COOKIE.load();
        if host != 0 && helpers::netns_cookie(ctx) != host {
            return SOCK_ALLOW;
        }
    }
    // Each datagram comes through sendmsg; its socket's flow keeps it on
    // one backend, as conntrack keeps a UDP 5-tuple. A connect translates
    // once for the socket's life and needs no flow.
    let cookie = helpers::socket_cookie(ctx);
    let udp_socket = (hook == Hook::Sendmsg && proto == PROTO_UDP).then_some(cookie);
    match lb::select_backend(&dst, proto, || helpers::netns_cookie(ctx), udp_socket) {
        Verdict::Pass => SOCK_ALLOW,
        Verdict::Refuse => fail(ECONNREFUSED),
        // kube-proxy drops the packets and the client eventually times out;
        // a socket hook can't swallow a connect, so it fails at once with
        // the error the client would have seen.
        Verdict::Drop => fail(ETIMEDOUT),
        Verdict::Translate {
            backend,
            rev_nat_id,
        } => {
            // An AF_INET socket can only reach an IPv4 backend; the model
            // never mixes families, so this guards against bad map content.
            if family == Family::V4 && !is_v4_mapped(&backend.addr) {
                return SOCK_REJECT;
            }
            set_user_addr(ctx, family, &backend);
            lb::remember(cookie, &backend, &dst, rev_nat_id);
            SOCK_ALLOW
        }
    }
}

/// recvmsg (`reply`: a datagram read with its sender's address) and
/// getpeername: backend -> frontend.
#[inline(always)]
fn translate_peer(ctx: &SockAddrContext, family: Family, reply: bool) -> i32 {
    let peer = user_addr(ctx, family);
    let cookie = helpers::socket_cookie(ctx);
    if let Some((frontend, rev_nat_id)) = lb::recall(cookie, &peer) {
        set_user_addr(ctx, family, &frontend);
        if reply {
            lb::mark_replied(cookie, rev_nat_id, &peer);
        }
    }
    SOCK_ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn svclb_connect4(ctx: SockAddrContext) -> i32 {
    translate_destination(&ctx, Family::V4, Hook::Connect)
}

#[cgroup_sock_addr(connect6)]
pub fn svclb_connect6(ctx: SockAddrContext) -> i32 {
    translate_destination(&ctx, Family::V6, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn svclb_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate_destination(&ctx, Family::V4, Hook::Sendmsg)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn svclb_sendmsg6(ctx: SockAddrContext) -> i32 {
    translate_destination(&ctx, Family::V6, Hook::Sendmsg)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn svclb_recvmsg4(ctx: SockAddrContext) -> i32 {
    translate_peer(&ctx, Family::V4, true)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn svclb_recvmsg6(ctx: SockAddrContext) -> i32 {
    translate_peer(&ctx, Family::V6, true)
}

#[cgroup_sock_addr(getpeername4)]
pub fn svclb_getpeername4(ctx: SockAddrContext) -> i32 {
    translate_peer(&ctx, Family::V4, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn svclb_getpeername6(ctx: SockAddrContext) -> i32 {
    translate_peer(&ctx, Family::V6, false)
}
