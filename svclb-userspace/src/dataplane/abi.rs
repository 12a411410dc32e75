//! Conversions between the model's types and the kernel ABI (svclb-common).
use std::net::{IpAddr, Ipv6Addr};

use svclb_common::{ServiceKey, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_SOCKET};

use crate::model::{FrontendKey, Protocol, Scope};

/// An address as the maps hold it: 16 bytes in network order, IPv4 mapped.
pub fn addr_to_abi(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

pub fn addr_from_abi(words: [u32; 4]) -> IpAddr {
    let mut o = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(o);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

pub fn proto_to_abi(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => PROTO_TCP,
        Protocol::Udp => PROTO_UDP,
    }
}

pub fn proto_from_abi(p: u8) -> Option<Protocol> {
    match p {
        PROTO_TCP => Some(Protocol::Tcp),
        PROTO_UDP => Some(Protocol::Udp),
        _ => None,
    }
}

pub fn service_key(key: &FrontendKey, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: addr_to_abi(key.addr),
        port: key.port,
        proto: proto_to_abi(key.protocol),
        scope: match key.scope {
            Scope::Socket => SCOPE_SOCKET,
            Scope::External => SCOPE_EXTERNAL,
        },
        slot,
        _pad: 0,
    }
}

/// The frontend a services-map key belongs to; None for keys svclb can't
/// have written (unknown protocol or scope).
pub fn frontend_key(key: &ServiceKey) -> Option<FrontendKey> {
    let scope = match key.scope {
        SCOPE_SOCKET => Scope::Socket,
        SCOPE_EXTERNAL => Scope::External,
        _ => return None,
    };
    Some(FrontendKey {
        addr: addr_from_abi(key.addr),
        port: key.port,
        protocol: proto_from_abi(key.proto)?,
        scope,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_and_v4_is_mapped() {
        for s in ["198.19.0.10", "fd00:5::a", "::1", "0.0.0.0"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(addr_from_abi(addr_to_abi(ip)), ip);
        }
        let v4: IpAddr = "198.19.0.10".parse().unwrap();
        let words = addr_to_abi(v4);
        assert!(svclb_common::is_v4_mapped(&words));
        // The kernel's user_ip4 is the address in network order in memory.
        assert_eq!(words[3], u32::from_ne_bytes([198, 19, 0, 10]));
    }
}
