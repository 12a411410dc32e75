//! The rtnetlink requests cleanup needs, in the calling thread's network
//! namespace: list devices with their XDP programs, detach an XDP program
//! attached without a link, count a device's clsact filters, delete the
//! clsact qdisc, delete a device.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const RTM_GETTFILTER: u16 = 46;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLA_F_NESTED: u16 = 0x8000;

const IFLA_IFNAME: u16 = 3;
const IFLA_XDP: u16 = 43;
const IFLA_XDP_FD: u16 = 1;
const IFLA_XDP_ATTACHED: u16 = 2;
const IFLA_XDP_FLAGS: u16 = 3;
const IFLA_XDP_PROG_ID: u16 = 4;
const IFLA_XDP_DRV_PROG_ID: u16 = 5;
const IFLA_XDP_SKB_PROG_ID: u16 = 6;
const IFLA_XDP_HW_PROG_ID: u16 = 7;
const TCA_KIND: u16 = 1;

/// `XDP_ATTACHED_*` -> the `XDP_FLAGS_*` mode flag that detaches it.
const XDP_MODES: [(u8, u16, u32); 3] = [
    (1, IFLA_XDP_DRV_PROG_ID, 1 << 2),
    (2, IFLA_XDP_SKB_PROG_ID, 1 << 1),
    (3, IFLA_XDP_HW_PROG_ID, 1 << 3),
];
const XDP_ATTACHED_MULTI: u8 = 4;

/// The clsact qdisc's handle and parent, and its two filter parents.
const TC_H_CLSACT: u32 = 0xffff_fff1;
const CLSACT_HANDLE: u32 = 0xffff_0000;
pub const CLSACT_INGRESS: u32 = 0xffff_fff2;
pub const CLSACT_EGRESS: u32 = 0xffff_fff3;

/// A device of this network namespace.
#[derive(Clone, Debug)]
pub struct Device {
    pub index: u32,
    pub name: String,
    /// XDP programs attached: (program id, mode flag to detach it with).
    pub xdp: Vec<(u32, u32)>,
}

pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
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
        Ok(Rtnl { fd, seq: 0 })
    }

    /// Send one request and collect the payloads of its replies: every
    /// message of a dump, none for an acknowledged change. An error reply
    /// fails with its errno.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
        self.seq += 1;
        let seq = self.seq;
        let len = NLMSG_HDRLEN + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: msg is valid for its length; a netlink socket without an
        // address sends to the kernel.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            // SAFETY: buf is valid for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut at = 0;
            let data = &buf[..n as usize];
            while at + NLMSG_HDRLEN <= data.len() {
                let mlen = u32_at(data, at) as usize;
                if mlen < NLMSG_HDRLEN || at + mlen > data.len() {
                    break;
                }
                let mkind = u16_at(data, at + 4);
                let mseq = u32_at(data, at + 8);
                let payload = &data[at + NLMSG_HDRLEN..at + mlen];
                at += align4(mlen);
                if mseq != seq {
                    continue;
                }
                match mkind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = -(u32_at(payload, 0) as i32);
                        if errno == 0 {
                            return Ok(out);
                        }
                        return Err(io::Error::from_raw_os_error(errno));
                    }
                    _ => out.push((mkind, payload.to_vec())),
                }
            }
        }
    }

    /// Every device with the XDP programs attached to it.
    pub fn devices(&mut self) -> io::Result<Vec<Device>> {
        let replies = self.request(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0))?;
        let mut out = Vec::new();
        for (_, payload) in replies {
            let index = u32_at(&payload, 4);
            let mut name = String::new();
            let mut xdp = Vec::new();
            for (kind, value) in attrs(payload.get(16..).unwrap_or_default()) {
                match kind {
                    IFLA_IFNAME => {
                        let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
                        name = String::from_utf8_lossy(&value[..end]).into_owned();
                    }
                    IFLA_XDP => xdp = parse_xdp(value),
                    _ => {}
                }
            }
            out.push(Device { index, name, xdp });
        }
        Ok(out)
    }

    /// Detach the XDP program attached in `mode` (an `XDP_FLAGS_*` mode
    /// flag) without a link.
    pub fn detach_xdp(&mut self, index: u32, mode: u32) -> io::Result<()> {
        let mut nested = attr(IFLA_XDP_FD, &(-1i32).to_ne_bytes());
        nested.extend(attr(IFLA_XDP_FLAGS, &mode.to_ne_bytes()));
        let mut body = ifinfomsg(index);
        body.extend(attr(IFLA_XDP | NLA_F_NESTED, &nested));
        self.request(RTM_SETLINK, NLM_F_ACK, &body).map(drop)
    }

    /// How many tc filters hang below `parent` (e.g. [`CLSACT_EGRESS`]).
    pub fn filter_count(&mut self, index: u32, parent: u32) -> io::Result<usize> {
        let replies = self.request(RTM_GETTFILTER, NLM_F_DUMP, &tcmsg(index, 0, parent))?;
        Ok(replies.iter().filter(|(k, _)| *k == RTM_NEWTFILTER).count())
    }

    pub fn delete_clsact(&mut self, index: u32) -> io::Result<()> {
        let mut body = tcmsg(index, CLSACT_HANDLE, TC_H_CLSACT);
        body.extend(attr(TCA_KIND, b"clsact\0"));
        self.request(RTM_DELQDISC, NLM_F_ACK, &body).map(drop)
    }

    pub fn delete_device(&mut self, index: u32) -> io::Result<()> {
        self.request(RTM_DELLINK, NLM_F_ACK, &ifinfomsg(index))
            .map(drop)
    }
}

fn parse_xdp(nested: &[u8]) -> Vec<(u32, u32)> {
    let mut attached = 0u8;
    let mut ids = std::collections::HashMap::new();
    for (kind, value) in attrs(nested) {
        match kind {
            IFLA_XDP_ATTACHED => attached = value.first().copied().unwrap_or(0),
            _ => {
                if value.len() >= 4 {
                    ids.insert(kind, u32_at(value, 0));
                }
            }
        }
    }
    XDP_MODES
        .iter()
        .filter_map(|&(mode, id_attr, flag)| {
            let id = if attached == XDP_ATTACHED_MULTI {
                *ids.get(&id_attr)?
            } else if attached == mode {
                *ids.get(&IFLA_XDP_PROG_ID)?
            } else {
                return None;
            };
            Some((id, flag))
        })
        .collect()
}

/// struct ifinfomsg for device `index` (0: all).
fn ifinfomsg(index: u32) -> Vec<u8> {
    let mut b = vec![0u8; 16];
    b[0] = libc::AF_UNSPEC as u8;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b
}

/// struct tcmsg.
fn tcmsg(index: u32, handle: u32, parent: u32) -> Vec<u8> {
    let mut b = vec![0u8; 20];
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&handle.to_ne_bytes());
    b[12..16].copy_from_slice(&parent.to_ne_bytes());
    b
}

fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut b = Vec::with_capacity(align4(len));
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(value);
    b.resize(align4(len), 0);
    b
}

/// The attributes in `b`: (type without the flag bits, value).
fn attrs(b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 4 <= b.len() {
        let len = u16_at(b, at) as usize;
        if len < 4 || at + len > b.len() {
            break;
        }
        out.push((u16_at(b, at + 2) & 0x3fff, &b[at + 4..at + len]));
        at += align4(len);
    }
    out
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_programs_by_mode() {
        let single = [
            attr(IFLA_XDP_ATTACHED, &[2]),
            attr(IFLA_XDP_PROG_ID, &42u32.to_ne_bytes()),
        ]
        .concat();
        assert_eq!(parse_xdp(&single), [(42, 1 << 1)]);
        let multi = [
            attr(IFLA_XDP_ATTACHED, &[XDP_ATTACHED_MULTI]),
            attr(IFLA_XDP_DRV_PROG_ID, &7u32.to_ne_bytes()),
            attr(IFLA_XDP_SKB_PROG_ID, &8u32.to_ne_bytes()),
        ]
        .concat();
        assert_eq!(parse_xdp(&multi), [(7, 1 << 2), (8, 1 << 1)]);
        assert_eq!(parse_xdp(&attr(IFLA_XDP_ATTACHED, &[0])), []);
    }
}
