//! Per-device IPv4 settings (what /proc/sys/net/ipv4/conf/DEV/ shows),
//! set through rtnetlink rather than /proc/sys: container runtimes mount
//! /proc/sys read-only in unprivileged containers, while RTM_SETLINK with
//! IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF only needs CAP_NET_ADMIN, which the
//! agent holds for its programs anyway.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `IPV4_DEVCONF_ACCEPT_LOCAL` of linux/ip.h.
pub const ACCEPT_LOCAL: u16 = 23;

const NLMSG_HDRLEN: usize = 16;
/// struct ifinfomsg.
const IFINFOMSG_LEN: usize = 16;
/// linux/if_link.h: IFLA_AF_SPEC and, inside AF_INET, IFLA_INET_CONF.
const IFLA_AF_SPEC: u16 = 26;
const IFLA_INET_CONF: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;

/// Set the IPv4 devconf entry `id` (an `IPV4_DEVCONF_*`) of interface
/// `ifindex` in the current network namespace to `value`.
pub fn set_ipv4(ifindex: u32, id: u16, value: u32) -> io::Result<()> {
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
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let msg = setlink_message(ifindex, id, value);
    // SAFETY: a zeroed sockaddr_nl (pid 0) addresses the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as u16;
    // SAFETY: msg and kernel are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
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
    // NLM_F_ACK: the kernel answers with an NLMSG_ERROR, errno 0 on success.
    let mut buf = [0u8; 1024];
    // SAFETY: buf is valid for its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let reply = &buf[..n as usize];
    let kind = reply.get(4..6).map(|b| u16::from_ne_bytes([b[0], b[1]]));
    let errno = reply
        .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    match (kind, errno) {
        (Some(k), Some(0)) if k == libc::NLMSG_ERROR as u16 => Ok(()),
        (Some(k), Some(e)) if k == libc::NLMSG_ERROR as u16 => {
            Err(io::Error::from_raw_os_error(-e))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "unexpected rtnetlink reply",
        )),
    }
}

/// RTM_SETLINK { ifinfomsg(index), IFLA_AF_SPEC { AF_INET { IFLA_INET_CONF { id: value } } } }.
fn setlink_message(ifindex: u32, id: u16, value: u32) -> Vec<u8> {
    let attr = |kind: u16, payload: &[u8]| {
        let mut a = Vec::with_capacity(4 + payload.len());
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a
    };
    let conf = attr(
        IFLA_INET_CONF | NLA_F_NESTED,
        &attr(id, &value.to_ne_bytes()),
    );
    let inet = attr(libc::AF_INET as u16 | NLA_F_NESTED, &conf);
    let spec = attr(IFLA_AF_SPEC | NLA_F_NESTED, &inet);

    let len = NLMSG_HDRLEN + IFINFOMSG_LEN + spec.len();
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_SETLINK.to_ne_bytes());
    msg.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
                                                // ifinfomsg: family, pad, type, index, flags, change.
    msg.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    msg.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&spec);
    msg
}

/// Write `value` to the sysctl at /proc/sys/`key`: an IPv4 per-device
/// setting this module knows (`net/ipv4/conf/DEV/accept_local`) through
/// rtnetlink, which works where /proc/sys is read-only; anything else
/// through /proc/sys.
pub fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    let parts: Vec<&str> = key.split('/').collect();
    if let ["net", "ipv4", "conf", device, "accept_local"] = parts[..] {
        let value: u32 = value
            .parse()
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{key}={value}")))?;
        let name = std::ffi::CString::new(device)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated string; if_nametoindex only reads it.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            return Err(io::Error::last_os_error());
        }
        return set_ipv4(index, ACCEPT_LOCAL, value);
    }
    std::fs::write(std::path::Path::new("/proc/sys").join(key), value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setlink_message_layout() {
        let m = setlink_message(7, ACCEPT_LOCAL, 1);
        // 16 header + 16 ifinfomsg + 4 AF_SPEC + 4 AF_INET + 4 INET_CONF + 8 entry.
        assert_eq!(m.len(), 52);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 52);
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        // The innermost attribute: length 8, type ACCEPT_LOCAL, value 1.
        assert_eq!(&m[44..46], &8u16.to_ne_bytes());
        assert_eq!(&m[46..48], &ACCEPT_LOCAL.to_ne_bytes());
        assert_eq!(&m[48..52], &1u32.to_ne_bytes());
    }
}
