//! Conversions between the model's types and the kernel ABI (svclb-common):
//! every map key and value the writer and `svclb maps dump` handle is
//! encoded and decoded here, and nowhere else.
use std::net::{IpAddr, Ipv6Addr};

use svclb_common::{
    Backend as AbiBackend, MaglevChunk, MaglevKey, RevNat, ServiceKey, ServiceValue,
    SourceRangeKey, XdpConfig, BACKEND_ACTIVE, BACKEND_DRAINING, BACKEND_TERMINATING, MAGLEV_CHUNK,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL, SCOPE_SOCKET, SVC_FLAG_AFFINITY,
    SVC_FLAG_CLUSTER_IP, SVC_FLAG_DRAINING_MEMBERS, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXTERNAL_IP,
    SVC_FLAG_LOAD_BALANCER, SVC_FLAG_MEMBERS, SVC_FLAG_NODE_PORT, SVC_FLAG_SOURCE_RANGES,
};

use crate::model::{Cidr, Frontend, FrontendKey, FrontendKind, Protocol, Scope, WhenEmpty};

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
        Protocol::Sctp => PROTO_SCTP,
    }
}

pub fn proto_from_abi(p: u8) -> Option<Protocol> {
    match p {
        PROTO_TCP => Some(Protocol::Tcp),
        PROTO_UDP => Some(Protocol::Udp),
        PROTO_SCTP => Some(Protocol::Sctp),
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

/// A services-map entry, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceEntry {
    /// Slot 0: the frontend's record.
    Frontend(FrontendKey, FrontendRecord),
    /// Slots 1..=count: the backend id the slot names.
    Slot(FrontendKey, u16, u32),
}

/// None for keys svclb can't have written.
pub fn service_entry(key: &ServiceKey, value: &ServiceValue) -> Option<ServiceEntry> {
    let fk = frontend_key(key)?;
    Some(match key.slot {
        0 => ServiceEntry::Frontend(fk, FrontendRecord::from_abi(value)),
        slot => ServiceEntry::Slot(fk, slot, value.backend_id),
    })
}

/// The value of backend slot 1..=count.
pub fn slot_to_abi(backend_id: u32) -> ServiceValue {
    ServiceValue {
        backend_id,
        ..ServiceValue::default()
    }
}

/// Slot 0: what a reader needs before it picks a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendRecord {
    pub count: u16,
    pub rev_nat_id: u32,
    pub settings: Settings,
    /// External frontends with backends.
    pub table: Option<MaglevTable>,
}

impl FrontendRecord {
    pub fn to_abi(&self) -> ServiceValue {
        ServiceValue {
            count: self.count,
            flags: self.settings.flags,
            rev_nat_id: self.rev_nat_id,
            affinity_timeout: self.settings.affinity_timeout,
            maglev_generation: self.table.map_or(0, |t| t.generation),
            maglev_size: self.table.map_or(0, |t| t.size),
            ..ServiceValue::default()
        }
    }

    pub fn from_abi(value: &ServiceValue) -> Self {
        FrontendRecord {
            count: value.count,
            rev_nat_id: value.rev_nat_id,
            settings: Settings {
                flags: value.flags,
                affinity_timeout: value.affinity_timeout,
            },
            table: (value.maglev_size > 0).then_some(MaglevTable {
                generation: value.maglev_generation,
                size: value.maglev_size,
            }),
        }
    }
}

/// What a frontend's Service asks for, as slot 0 holds it: flag bits and
/// the affinity timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    pub flags: u16,
    pub affinity_timeout: u32,
}

impl Settings {
    pub fn of(f: &Frontend) -> Self {
        let kind = match f.kind {
            FrontendKind::ClusterIp => SVC_FLAG_CLUSTER_IP,
            FrontendKind::NodePort => SVC_FLAG_NODE_PORT,
            FrontendKind::ExternalIp => SVC_FLAG_EXTERNAL_IP,
            FrontendKind::LoadBalancer => SVC_FLAG_LOAD_BALANCER,
        };
        let drop = match f.when_empty {
            WhenEmpty::Drop => SVC_FLAG_DROP_EMPTY,
            WhenEmpty::Refuse => 0,
        };
        let affinity = if f.affinity_timeout.is_some() {
            SVC_FLAG_AFFINITY
        } else {
            0
        };
        let ranges = if f.source_ranges.is_empty() {
            0
        } else {
            SVC_FLAG_SOURCE_RANGES
        };
        // The programs check a remembered backend (affinity, a UDP socket's
        // flow) against the frontend's members.
        let udp_flows = f.key.protocol == Protocol::Udp && f.key.scope == Scope::Socket;
        let members = match (affinity != 0, udp_flows) {
            (_, true) => SVC_FLAG_MEMBERS | SVC_FLAG_DRAINING_MEMBERS,
            (true, false) => SVC_FLAG_MEMBERS,
            (false, false) => 0,
        };
        Settings {
            flags: kind | drop | affinity | ranges | members,
            affinity_timeout: f.affinity_timeout.unwrap_or(0),
        }
    }

    pub fn affinity(&self) -> bool {
        self.flags & SVC_FLAG_AFFINITY != 0
    }

    /// Whether the affinity-match map lists the frontend's backends.
    pub fn members(&self) -> bool {
        self.flags & SVC_FLAG_MEMBERS != 0
    }

    /// Whether the members include the draining backends (UDP socket flows).
    pub fn draining_members(&self) -> bool {
        self.flags & SVC_FLAG_DRAINING_MEMBERS != 0
    }

    /// The flags set, by name, for people.
    pub fn flag_names(&self) -> Vec<&'static str> {
        [
            (SVC_FLAG_CLUSTER_IP, "ClusterIP"),
            (SVC_FLAG_NODE_PORT, "NodePort"),
            (SVC_FLAG_EXTERNAL_IP, "ExternalIP"),
            (SVC_FLAG_LOAD_BALANCER, "LoadBalancer"),
            (SVC_FLAG_DROP_EMPTY, "DropEmpty"),
            (SVC_FLAG_AFFINITY, "Affinity"),
            (SVC_FLAG_SOURCE_RANGES, "SourceRanges"),
            (SVC_FLAG_MEMBERS, "Members"),
            (SVC_FLAG_DRAINING_MEMBERS, "DrainingMembers"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.flags & bit != 0)
        .map(|(_, name)| name)
        .collect()
    }
}

/// The Maglev table an external frontend's slot 0 points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct MaglevTable {
    /// Which of the frontend's two tables (0 or 1).
    pub generation: u16,
    /// Entries (a prime).
    pub size: u32,
}

impl MaglevTable {
    pub fn chunks(self) -> u16 {
        self.size.div_ceil(MAGLEV_CHUNK) as u16
    }

    pub fn keys(self, rev_nat_id: u32) -> impl Iterator<Item = MaglevKey> {
        (0..self.chunks()).map(move |chunk| MaglevKey {
            rev_nat_id,
            generation: self.generation,
            chunk,
        })
    }
}

/// One chunk of a Maglev table: `entries` are indexes into `backend_ids`.
pub fn maglev_chunk_to_abi(entries: &[u16], backend_ids: &[u32]) -> MaglevChunk {
    let mut chunk = MaglevChunk {
        backend_ids: [0; MAGLEV_CHUNK as usize],
    };
    for (slot, &index) in chunk.backend_ids.iter_mut().zip(entries) {
        *slot = backend_ids[usize::from(index)];
    }
    chunk
}

pub fn rev_nat_to_abi(key: &FrontendKey) -> RevNat {
    RevNat {
        addr: addr_to_abi(key.addr),
        port: key.port,
        _pad: [0; 6],
    }
}

/// A backend as the maps know it: address, port, protocol and whether it
/// is on this node. Locality is part of the identity, so services whose
/// slices disagree about an endpoint's node can't flip each other's.
pub type BackendAddr = (IpAddr, u16, Protocol, bool);

pub fn backend_state(terminating: bool) -> u8 {
    if terminating {
        BACKEND_TERMINATING
    } else {
        BACKEND_ACTIVE
    }
}

pub fn backend_to_abi(addr: &BackendAddr, state: u8) -> AbiBackend {
    AbiBackend {
        addr: addr_to_abi(addr.0),
        port: addr.1,
        proto: proto_to_abi(addr.2),
        state,
        local: u8::from(addr.3),
        _pad: 0,
        _pad2: 0,
    }
}

/// A backends-map value, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendRecord {
    pub addr: IpAddr,
    pub port: u16,
    /// None: a protocol svclb can't have written.
    pub protocol: Option<Protocol>,
    pub state: u8,
    pub local: bool,
}

impl BackendRecord {
    pub fn from_abi(b: &AbiBackend) -> Self {
        BackendRecord {
            addr: addr_from_abi(b.addr),
            port: b.port,
            protocol: proto_from_abi(b.proto),
            state: b.state,
            local: b.local != 0,
        }
    }

    /// None for a backend svclb can't have written.
    pub fn backend_addr(&self) -> Option<BackendAddr> {
        Some((self.addr, self.port, self.protocol?, self.local))
    }

    pub fn terminating(&self) -> bool {
        self.state == BACKEND_TERMINATING
    }

    /// "active", "terminating" or "draining" (kept for established flows
    /// only), for people.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            BACKEND_TERMINATING => "terminating",
            BACKEND_DRAINING => "draining",
            _ => "active",
        }
    }
}

/// A source-ranges trie key: prefix length (of rev-NAT id + address) and data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SourceRange {
    pub prefix_len: u32,
    pub rev_nat_id: u32,
    pub addr: [u32; 4],
}

impl SourceRange {
    pub fn of(rev_nat_id: u32, c: &Cidr) -> Self {
        let bits = match c.addr {
            IpAddr::V4(_) => 96 + u32::from(c.prefix),
            IpAddr::V6(_) => u32::from(c.prefix),
        };
        SourceRange {
            prefix_len: 32 + bits,
            rev_nat_id,
            addr: addr_to_abi(c.addr),
        }
    }

    pub fn cidr(&self) -> Cidr {
        let addr = addr_from_abi(self.addr);
        let bits = self.prefix_len.saturating_sub(32);
        let prefix = match addr {
            IpAddr::V4(_) => bits.saturating_sub(96),
            IpAddr::V6(_) => bits,
        };
        Cidr {
            addr,
            prefix: prefix as u8,
        }
    }

    pub fn abi(&self) -> SourceRangeKey {
        SourceRangeKey {
            rev_nat_id_be: self.rev_nat_id.to_be(),
            addr: self.addr,
        }
    }

    pub fn from_abi(prefix_len: u32, key: &SourceRangeKey) -> Self {
        SourceRange {
            prefix_len,
            rev_nat_id: u32::from_be(key.rev_nat_id_be),
            addr: key.addr,
        }
    }
}

/// The external path's settings: the first IPv4 and IPv6 of `addresses` as
/// SNAT sources, and the SNAT port range.
pub fn xdp_config_to_abi(addresses: &[IpAddr], ports: (u16, u16)) -> XdpConfig {
    let first = |v4: bool| {
        addresses
            .iter()
            .find(|a| a.is_ipv4() == v4)
            .map_or([0; 4], |a| addr_to_abi(*a))
    };
    XdpConfig {
        snat_addr4: first(true),
        snat_addr6: first(false),
        snat_port_min: ports.0,
        snat_port_max: ports.1,
        _pad: 0,
    }
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

    #[test]
    fn loopback_as_the_socket_hooks_see_it() {
        for (s, want) in [
            ("127.0.0.1", true),
            ("127.255.3.4", true),
            ("::1", true),
            ("128.0.0.1", false),
            ("10.127.0.1", false),
            ("::2", false),
            ("fd00::1", false),
        ] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(svclb_common::is_loopback(&addr_to_abi(ip)), want, "{s}");
        }
    }
}
