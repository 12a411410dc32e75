//! A tiny packet builder (Ethernet + IPv4/IPv6 + TCP/UDP) that computes
//! every checksum from scratch, and a checksum verifier. Fixtures build the
//! packet they expect independently of the program's incremental checksum
//! updates, so a byte-for-byte comparison checks those too.
//!
//! Truncated packets are prefixes of built ones (`&built[..n]`).
use std::net::{IpAddr, SocketAddr};

use svclb_common::{PROTO_TCP, PROTO_UDP};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IPv6 next header: fragment extension header.
const NEXT_FRAGMENT: u8 = 44;
/// IPv4 flags/fragment offset field: more fragments.
pub const IP4_MF: u16 = 0x2000;

/// What to build; every field is a header field as it appears on the wire.
#[derive(Clone, Debug)]
pub struct Packet {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    /// Same family as `dst`.
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// PROTO_TCP or PROTO_UDP.
    pub proto: u8,
    /// TTL / hop limit.
    pub ttl: u8,
    /// IPv4 options (a multiple of 4 bytes; none by default).
    pub ip4_options: Vec<u8>,
    /// IPv4 flags and fragment offset (host order), e.g. [`IP4_MF`].
    pub ip4_frag: u16,
    /// IPv6: put a fragment extension header (first fragment) before the L4 header.
    pub ip6_fragment: bool,
    /// UDP: send without a checksum (0; only valid in IPv4).
    pub udp_no_checksum: bool,
    /// TCP flags ([`TCP_SYN`] by default: a new connection).
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
/// An established connection's segment.
pub const TCP_ACK: u8 = 0x10;

impl Packet {
    pub fn tcp(src: SocketAddr, dst: SocketAddr) -> Self {
        Packet {
            dst_mac: [0x02, 0, 0, 0, 0, 0x01],
            src_mac: [0x02, 0, 0, 0, 0, 0xfe],
            src,
            dst,
            proto: PROTO_TCP,
            ttl: 64,
            ip4_options: Vec::new(),
            ip4_frag: 0,
            ip6_fragment: false,
            udp_no_checksum: false,
            tcp_flags: TCP_SYN,
            payload: b"svclb fixture".to_vec(),
        }
    }

    pub fn udp(src: SocketAddr, dst: SocketAddr) -> Self {
        Packet {
            proto: PROTO_UDP,
            ..Packet::tcp(src, dst)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.src.port().to_be_bytes());
        l4.extend_from_slice(&self.dst.port().to_be_bytes());
        let csum_at = if self.proto == PROTO_TCP {
            l4.extend_from_slice(&1u32.to_be_bytes()); // sequence number
            l4.extend_from_slice(&0u32.to_be_bytes()); // acknowledgement
            l4.extend_from_slice(&[5 << 4, self.tcp_flags]); // data offset 5 words
            l4.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, checksum, urgent
            16
        } else {
            let len = (8 + self.payload.len()) as u16;
            l4.extend_from_slice(&len.to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            6
        };
        l4.extend_from_slice(&self.payload);
        if !(self.proto == PROTO_UDP && self.udp_no_checksum) {
            let mut c = checksum(&pseudo_header(
                self.src.ip(),
                self.dst.ip(),
                self.proto,
                &l4,
            ));
            if c == 0 && self.proto == PROTO_UDP {
                c = 0xffff;
            }
            l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
        }

        let mut p = Vec::new();
        p.extend_from_slice(&self.dst_mac);
        p.extend_from_slice(&self.src_mac);
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                p.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let hlen = 20 + self.ip4_options.len();
                assert!(
                    hlen.is_multiple_of(4) && hlen <= 60,
                    "bad IPv4 options length"
                );
                let mut h = vec![0x40 | (hlen / 4) as u8, 0];
                h.extend_from_slice(&((hlen + l4.len()) as u16).to_be_bytes());
                h.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
                h.extend_from_slice(&self.ip4_frag.to_be_bytes());
                h.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
                h.extend_from_slice(&s.octets());
                h.extend_from_slice(&d.octets());
                h.extend_from_slice(&self.ip4_options);
                let c = checksum(&h);
                h[10..12].copy_from_slice(&c.to_be_bytes());
                p.extend_from_slice(&h);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                p.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                let ext = if self.ip6_fragment { 8 } else { 0 };
                p.extend_from_slice(&[0x60, 0, 0, 0]);
                p.extend_from_slice(&((ext + l4.len()) as u16).to_be_bytes());
                let next = if self.ip6_fragment {
                    NEXT_FRAGMENT
                } else {
                    self.proto
                };
                p.extend_from_slice(&[next, self.ttl]);
                p.extend_from_slice(&s.octets());
                p.extend_from_slice(&d.octets());
                if self.ip6_fragment {
                    // Offset 0, more fragments: the first fragment.
                    p.extend_from_slice(&[self.proto, 0, 0, 1, 0, 0, 0x12, 0x34]);
                }
            }
            _ => panic!("source and destination of different families"),
        }
        p.extend_from_slice(&l4);
        p
    }
}

/// The addresses, ports, TTL and MACs of a built (or translated) packet
/// without extension headers or options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub proto: u8,
    pub ttl: u8,
}

pub fn summary(p: &[u8]) -> Option<Summary> {
    let (ip, l4, proto, ttl) = match u16::from_be_bytes(p.get(12..14)?.try_into().ok()?) {
        ETH_P_IP => {
            let h = p.get(14..34)?;
            let src: [u8; 4] = h[12..16].try_into().ok()?;
            let dst: [u8; 4] = h[16..20].try_into().ok()?;
            let hlen = usize::from(h[0] & 0xf) * 4;
            (
                (IpAddr::from(src), IpAddr::from(dst)),
                14 + hlen,
                h[9],
                h[8],
            )
        }
        ETH_P_IPV6 => {
            let h = p.get(14..54)?;
            let src: [u8; 16] = h[8..24].try_into().ok()?;
            let dst: [u8; 16] = h[24..40].try_into().ok()?;
            ((IpAddr::from(src), IpAddr::from(dst)), 54, h[6], h[7])
        }
        _ => return None,
    };
    let port = |at: usize| Some(u16::from_be_bytes(p.get(at..at + 2)?.try_into().ok()?));
    Some(Summary {
        dst_mac: p[0..6].try_into().ok()?,
        src_mac: p[6..12].try_into().ok()?,
        src: SocketAddr::new(ip.0, port(l4)?),
        dst: SocketAddr::new(ip.1, port(l4 + 2)?),
        proto,
        ttl,
    })
}

/// Check the IPv4 header checksum and the TCP/UDP checksum of a packet
/// without options or extension headers; a zero IPv4 UDP checksum is valid.
pub fn verify_checksums(p: &[u8]) -> Result<(), String> {
    let s = summary(p).ok_or("not an IPv4/IPv6 packet")?;
    let l4 = match s.src {
        SocketAddr::V4(_) => {
            if checksum(&p[14..34]) != 0 {
                return Err("bad IPv4 header checksum".into());
            }
            let total = usize::from(u16::from_be_bytes([p[16], p[17]]));
            p.get(34..14 + total)
                .ok_or("IPv4 total length past the end")?
        }
        SocketAddr::V6(_) => {
            let payload = usize::from(u16::from_be_bytes([p[18], p[19]]));
            p.get(54..54 + payload)
                .ok_or("IPv6 payload length past the end")?
        }
    };
    if s.proto == PROTO_UDP && s.src.is_ipv4() && l4.get(6..8) == Some(&[0, 0]) {
        return Ok(());
    }
    match checksum(&pseudo_header(s.src.ip(), s.dst.ip(), s.proto, l4)) {
        0 => Ok(()),
        c => Err(format!("bad L4 checksum (sum {c:#06x})")),
    }
}

/// The pseudo-header followed by the L4 segment.
fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            v.extend_from_slice(&s.octets());
            v.extend_from_slice(&d.octets());
            v.extend_from_slice(&[0, proto]);
            v.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            v.extend_from_slice(&s.octets());
            v.extend_from_slice(&d.octets());
            v.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            v.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("source and destination of different families"),
    }
    v.extend_from_slice(l4);
    v
}

/// The Internet checksum (RFC 1071) of `data`; 0 when `data` includes a
/// correct checksum field.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_packets_have_valid_checksums() {
        for (src, dst) in [
            ("198.18.128.10:40000", "198.19.200.1:30080"),
            ("[fd00:250::10]:40000", "[fd00:20::1]:30080"),
        ] {
            let (src, dst) = (src.parse().unwrap(), dst.parse().unwrap());
            for p in [Packet::tcp(src, dst), Packet::udp(src, dst)] {
                let built = p.build();
                verify_checksums(&built).unwrap();
                let s = summary(&built).unwrap();
                assert_eq!((s.src, s.dst, s.proto, s.ttl), (src, dst, p.proto, 64));
                let mut broken = built.clone();
                *broken.last_mut().unwrap() ^= 1;
                assert!(verify_checksums(&broken).is_err());
            }
        }
    }
}
