//! Which address external traffic to remote backends is SNATed to, per
//! family: the source the kernel's routing picks toward those backends
//! (RTM_GETROUTE's RTA_PREFSRC, what `ip route get` prints as "src").
//!
//! The Node object's addresses are no good for this: on clouds the
//! ExternalIP is often a NAT'd public address that no device here has, and
//! replies to it never come back to the node.
//!
//! One address per family, not one per backend: the external path's
//! config holds one per family, and a per-backend source would put an
//! address in every backend entry and split SNAT ports by source. On a
//! node all pod networks are normally reached through one device; when
//! remote backends route via different sources, the source most of them
//! use is taken and the difference is reported (see [`Choice`]).
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// At most this many remote backends are asked about per family (spread
/// over the sorted list), so a pass costs a bounded number of netlink
/// round trips however many backends there are.
pub const MAX_PROBES: usize = 64;

/// The SNAT sources chosen, and what to warn about.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Choice {
    pub v4: Option<IpAddr>,
    pub v6: Option<IpAddr>,
    /// People-readable problems: sources that differ between backends,
    /// route sources on no local device, no source for a family.
    pub warnings: Vec<String>,
}

/// What the routing answered for one remote backend address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteAnswer {
    pub backend: IpAddr,
    /// The preferred source; None: no route, or no source in the answer.
    pub source: Option<IpAddr>,
}

/// Choose one source per family from the route answers toward remote
/// backends. Only addresses in `local` (on a device of this node) are ever
/// chosen. A family without answers falls back to the first of
/// `node_addresses` (the Node object's, sorted) that is local, so the
/// first remote backend of a family works before the next recompute.
pub fn choose(answers: &[RouteAnswer], local: &[IpAddr], node_addresses: &[IpAddr]) -> Choice {
    let mut choice = Choice::default();
    for v4 in [true, false] {
        let family = if v4 { "IPv4" } else { "IPv6" };
        let mut by_source: BTreeMap<IpAddr, usize> = BTreeMap::new();
        let mut asked = 0;
        for a in answers.iter().filter(|a| a.backend.is_ipv4() == v4) {
            asked += 1;
            match a.source {
                Some(s) if local.contains(&s) => *by_source.entry(s).or_default() += 1,
                Some(s) => choice.warnings.push(format!(
                    "the route to backend {} has source {s}, which no device here has; not used",
                    a.backend
                )),
                None => choice
                    .warnings
                    .push(format!("no route (with a source) to backend {}", a.backend)),
            }
        }
        // The most used source; the lowest address on a tie.
        let best = by_source
            .iter()
            .max_by(|(a, n), (b, m)| n.cmp(m).then(b.cmp(a)))
            .map(|(s, _)| *s);
        if by_source.len() > 1 {
            let counts: Vec<String> = by_source
                .iter()
                .map(|(s, n)| format!("{s} ({n})"))
                .collect();
            choice.warnings.push(format!(
                "remote {family} backends are routed via different sources: {}; SNAT uses {}",
                counts.join(", "),
                best.expect("not empty")
            ));
        }
        let fallback = || {
            node_addresses
                .iter()
                .find(|a| a.is_ipv4() == v4 && local.contains(a))
                .copied()
        };
        let chosen = best.or_else(|| if asked == 0 { fallback() } else { None });
        if chosen.is_none() && asked > 0 {
            choice.warnings.push(format!(
                "no usable {family} source toward the remote backends: SNATed {family} flows are dropped"
            ));
        }
        if v4 {
            choice.v4 = chosen;
        } else {
            choice.v6 = chosen;
        }
    }
    choice
}

/// Up to [`MAX_PROBES`] of each family's `addresses` (sorted), evenly
/// spread, to ask the routing about.
pub fn probes(addresses: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        let mut family: Vec<IpAddr> = addresses
            .iter()
            .filter(|a| a.is_ipv4() == v4)
            .copied()
            .collect();
        family.sort();
        family.dedup();
        let step = family.len().div_ceil(MAX_PROBES).max(1);
        out.extend(family.into_iter().step_by(step));
    }
    out
}

/// Ask the kernel, for each address, which source its route uses (in the
/// calling thread's network namespace).
pub fn route_answers(backends: &[IpAddr]) -> io::Result<Vec<RouteAnswer>> {
    let sock = Netlink::open()?;
    backends
        .iter()
        .enumerate()
        .map(|(seq, &backend)| {
            Ok(RouteAnswer {
                backend,
                source: sock.route_source(backend, seq as u32 + 1)?,
            })
        })
        .collect()
}

/// The addresses on this node's devices (network namespace).
pub fn local_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not freed yet.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr of the family it names.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                        sin.sin_addr.s_addr,
                    ))));
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    out.sort();
    out.dedup();
    Ok(out)
}

/// A NETLINK_ROUTE socket, closed on drop.
struct Netlink(std::os::fd::OwnedFd);

const NLMSG_HDRLEN: usize = 16;
/// struct rtmsg.
const RTMSG_LEN: usize = 12;

impl Netlink {
    fn open() -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: plain socket(2); the descriptor is owned from here.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(Netlink(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// RTM_GETROUTE for `dst`; the RTA_PREFSRC of the answer. None when
    /// there is no route (unreachable, ENETUNREACH) or no source in it.
    fn route_source(&self, dst: IpAddr, seq: u32) -> io::Result<Option<IpAddr>> {
        use std::os::fd::AsRawFd;
        let (family, bytes) = match dst {
            IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
            IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
        };
        let attr_len = 4 + bytes.len();
        let len = NLMSG_HDRLEN + RTMSG_LEN + attr_len;
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        msg.extend_from_slice(&[family, (bytes.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        msg.extend_from_slice(&libc::RTA_DST.to_ne_bytes());
        msg.extend_from_slice(&bytes);
        // SAFETY: a zeroed sockaddr_nl (pid 0) addresses the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        let fd = self.0.as_raw_fd();
        // SAFETY: msg and kernel are valid for the lengths given.
        let sent = unsafe {
            libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            match parse_route_reply(&buf[..n as usize], seq) {
                Reply::Source(s) => return Ok(s),
                Reply::NoRoute => return Ok(None),
                Reply::Error(errno) => return Err(io::Error::from_raw_os_error(errno)),
                // Another message (an earlier request's): read on.
                Reply::Other => continue,
            }
        }
    }
}

enum Reply {
    Source(Option<IpAddr>),
    NoRoute,
    Error(i32),
    Other,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The answer to request `seq` in one datagram from the kernel.
fn parse_route_reply(buf: &[u8], seq: u32) -> Reply {
    let (Some(len), Some(kind), Some(got)) = (u32_at(buf, 0), u16_at(buf, 4), u32_at(buf, 8))
    else {
        return Reply::Other;
    };
    let msg = &buf[..(len as usize).min(buf.len())];
    if got != seq {
        return Reply::Other;
    }
    if kind == libc::NLMSG_ERROR as u16 {
        let errno = -(u32_at(msg, NLMSG_HDRLEN).unwrap_or(0) as i32);
        return match errno {
            0 => Reply::Other,
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::ESRCH => Reply::NoRoute,
            e => Reply::Error(e),
        };
    }
    if kind != libc::RTM_NEWROUTE {
        return Reply::Other;
    }
    let mut at = NLMSG_HDRLEN + RTMSG_LEN;
    while let (Some(alen), Some(atype)) = (u16_at(msg, at), u16_at(msg, at + 2)) {
        let alen = alen as usize;
        if alen < 4 {
            break;
        }
        if atype == libc::RTA_PREFSRC {
            let data = msg.get(at + 4..at + alen).unwrap_or_default();
            let addr = match data.len() {
                4 => <[u8; 4]>::try_from(data).ok().map(IpAddr::from),
                16 => <[u8; 16]>::try_from(data).ok().map(IpAddr::from),
                _ => None,
            };
            return Reply::Source(addr);
        }
        at += alen.div_ceil(4) * 4;
    }
    Reply::Source(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn answer(backend: &str, source: Option<&str>) -> RouteAnswer {
        RouteAnswer {
            backend: ip(backend),
            source: source.map(ip),
        }
    }

    /// A row: name, route answers, IPv4 and IPv6 source wanted, warnings.
    type Case = (
        &'static str,
        Vec<RouteAnswer>,
        Option<&'static str>,
        Option<&'static str>,
        usize,
    );

    /// One row: route answers, local addresses, Node addresses -> the
    /// sources chosen and how many warnings.
    #[test]
    fn the_route_source_wins_and_never_an_address_not_on_the_node() {
        let local = [
            ip("10.0.0.5"),
            ip("10.1.0.5"),
            ip("fd00::5"),
            ip("127.0.0.1"),
        ];
        let node = [ip("10.0.0.5"), ip("203.0.113.7"), ip("fd00::5")];
        let cases: Vec<Case> = vec![
            (
                "the route's source, not the Node's lowest or its ExternalIP",
                vec![answer("10.244.1.2", Some("10.1.0.5"))],
                Some("10.1.0.5"),
                Some("fd00::5"),
                0,
            ),
            (
                "backends via two sources: the one most use, reported",
                vec![
                    answer("10.244.1.2", Some("10.1.0.5")),
                    answer("10.244.2.2", Some("10.0.0.5")),
                    answer("10.244.3.2", Some("10.0.0.5")),
                ],
                Some("10.0.0.5"),
                Some("fd00::5"),
                1,
            ),
            (
                "a route source on no device is never used",
                vec![answer("10.244.1.2", Some("203.0.113.7"))],
                None,
                Some("fd00::5"),
                2,
            ),
            (
                "no route to the backends: none, reported",
                vec![answer("10.244.1.2", None)],
                None,
                Some("fd00::5"),
                2,
            ),
            (
                "no remote backends: a Node address that is on the node",
                vec![],
                Some("10.0.0.5"),
                Some("fd00::5"),
                0,
            ),
            (
                "IPv6 by its own routes",
                vec![answer("fd00:244::2", Some("fd00::5"))],
                Some("10.0.0.5"),
                Some("fd00::5"),
                0,
            ),
        ];
        for (name, answers, v4, v6, warnings) in cases {
            let c = choose(&answers, &local, &node);
            assert_eq!(c.v4, v4.map(ip), "{name}");
            assert_eq!(c.v6, v6.map(ip), "{name}");
            assert_eq!(c.warnings.len(), warnings, "{name}: {:?}", c.warnings);
        }
        // A Node whose only IPv4 is a NAT'd ExternalIP: no IPv4 source
        // rather than one replies never come back to.
        let c = choose(&[], &local, &[ip("203.0.113.7")]);
        assert_eq!(c.v4, None);
    }

    #[test]
    fn probes_are_bounded_per_family() {
        let many: Vec<IpAddr> = (0..1000u32)
            .map(|i| IpAddr::from(Ipv4Addr::from(0x0af4_0000 + i)))
            .chain([ip("fd00::1"), ip("fd00::1")])
            .collect();
        let p = probes(&many);
        assert!(p.iter().filter(|a| a.is_ipv4()).count() <= MAX_PROBES);
        assert_eq!(p.iter().filter(|a| a.is_ipv6()).count(), 1);
        assert!(p.contains(&ip("10.244.0.0")));
    }

    /// The kernel answers for loopback with a loopback source.
    #[test]
    fn route_source_of_loopback() {
        let answers = route_answers(&[ip("127.0.0.1")]).unwrap();
        assert_eq!(answers[0].source, Some(ip("127.0.0.1")));
    }
}
