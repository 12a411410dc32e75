//! The ABI shared by the svclb eBPF programs and the userspace agent: map
//! names and sizes, key/value layouts and flag bits. Nothing else lives here.
//!
//! Every struct is `#[repr(C)]` with explicit padding so that both sides agree
//! byte for byte and keys hash identically (no uninitialised padding).
//!
//! Addresses are `[u32; 4]` holding the 16 bytes of an IPv6 address in network
//! order, exactly as `bpf_sock_addr.user_ip6` does; IPv4 addresses are stored
//! IPv4-mapped (`::ffff:a.b.c.d`), so one map serves both families and a
//! dual-stack socket connecting to a mapped address finds IPv4 services.
//! Ports are stored in host byte order.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Map names, as declared in svclb-ebpf and pinned under the agent's bpffs dir.
pub mod maps {
    /// [`crate::ServiceKey`] -> [`crate::ServiceValue`]: frontends and their backend slots.
    pub const SERVICES: &str = "SVCLB_SERVICES";
    /// backend id (u32) -> [`crate::Backend`].
    pub const BACKENDS: &str = "SVCLB_BACKENDS";
    /// rev-NAT id (u32) -> [`crate::RevNat`]: the frontend a translated flow belongs to.
    pub const REV_NAT: &str = "SVCLB_REV_NAT";
    /// [`crate::SockRevNatKey`] -> [`crate::SockRevNat`] (LRU): per-socket reverse
    /// translation for recvmsg and getpeername.
    pub const SOCK_REV_NAT: &str = "SVCLB_SOCK_RNAT";
    /// [`crate::AffinityKey`] -> [`crate::Affinity`] (LRU): the backend a
    /// client (network namespace) was last sent to, per frontend.
    pub const AFFINITY: &str = "SVCLB_AFFINITY";
    /// [`crate::AffinityMatchKey`] -> u8: the backends of each frontend
    /// with [`crate::SVC_FLAG_MEMBERS`] (session affinity, UDP socket
    /// frontends), so a remembered backend that left the service is not
    /// reused.
    pub const AFFINITY_MATCH: &str = "SVCLB_AFF_MATCH";
    /// [`crate::UdpFlowKey`] -> [`crate::UdpFlow`] (LRU): the backend each
    /// UDP socket was last sent to, per frontend, so one socket's datagrams
    /// stay on one backend (as conntrack keeps a UDP flow). Runtime state
    /// of the programs, like [`SOCK_REV_NAT`]: the agent never writes it.
    pub const UDP_FLOWS: &str = "SVCLB_UDP_FLOWS";
    /// [`crate::MaglevKey`] -> [`crate::MaglevChunk`]: the Maglev lookup
    /// tables of external frontends, in chunks, two generations at most.
    pub const MAGLEV: &str = "SVCLB_MAGLEV";
    /// [`crate::FlowKey4`] -> [`crate::Flow`] (LRU): connection tracking
    /// for external IPv4 traffic, one entry per direction the programs
    /// translate.
    pub const CONNTRACK4: &str = "SVCLB_CT4";
    /// [`crate::FlowKey`] -> [`crate::Flow`] (LRU): the same for IPv6.
    pub const CONNTRACK6: &str = "SVCLB_CT6";
    /// LPM trie [`crate::SourceRangeKey`] -> u8: loadBalancerSourceRanges.
    pub const SOURCE_RANGES: &str = "SVCLB_SRC_RANGES";
    /// Array of one [`crate::XdpConfig`], written by the agent.
    pub const XDP_CONFIG: &str = "SVCLB_XDP_CONFIG";
    /// Per-CPU array of u64 counters, indexed by `crate::stats::*`.
    pub const STATS: &str = "SVCLB_STATS";
    /// Devmap (hash by ifindex) of the devices XDP may redirect to: the
    /// agent's --devices. Anything else (pod veths) goes through the stack.
    pub const TX_DEVICES: &str = "SVCLB_TX_DEVICES";
    /// Array of one u32, bumped by the agent after each backend deletion:
    /// conntrack entries whose route was checked at another epoch check
    /// their backend again.
    pub const BACKENDS_EPOCH: &str = "SVCLB_BACKENDS_EPOCH";

    pub const SERVICES_MAX_ENTRIES: u32 = 262_144;
    pub const BACKENDS_MAX_ENTRIES: u32 = 131_072;
    pub const REV_NAT_MAX_ENTRIES: u32 = 65_536;
    pub const SOCK_REV_NAT_MAX_ENTRIES: u32 = 262_144;
    pub const AFFINITY_MAX_ENTRIES: u32 = 65_536;
    /// One entry per backend slot of a frontend with members at most, so
    /// as many as the services map can hold.
    pub const AFFINITY_MATCH_MAX_ENTRIES: u32 = SERVICES_MAX_ENTRIES;
    /// Concurrent (socket, frontend) UDP flows remembered; when full the
    /// least recently used flow is forgotten and picks anew on its next
    /// datagram.
    pub const UDP_FLOWS_MAX_ENTRIES: u32 = 65_536;
    /// 16 chunks per table at the default table size: 16k tables.
    pub const MAGLEV_MAX_ENTRIES: u32 = 262_144;
    /// Default, per family; the agent sets it from --conntrack-size.
    pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
    pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 16_384;
    pub const TX_DEVICES_MAX_ENTRIES: u32 = 64;
    /// `BPF_F_NO_PREALLOC`: the writer relies on freed elements being
    /// RCU-deferred, so a reader holding a value never sees it reused.
    pub const NO_PREALLOC: u32 = 1;
}

/// Names of the global (read-only data) settings the loader fills in.
pub mod globals {
    /// u8: 1 when the kernel has `bpf_set_retval` for cgroup programs (5.18+),
    /// so a refused connect returns ECONNREFUSED instead of EPERM.
    pub const HAS_SET_RETVAL: &str = "SVCLB_HAS_SET_RETVAL";
    /// u64: the cookie of the agent's (the host's) network namespace; node
    /// ports on 127.0.0.1 and ::1 are translated only there. 0: unknown
    /// (kernel < 5.14): translated in every namespace.
    pub const HOST_NETNS_COOKIE: &str = "SVCLB_HOST_NETNS_COOKIE";
    /// u64 nanoseconds: a UDP flow with no reply seen is forgotten after
    /// this long without a datagram (netfilter's nf_conntrack_udp_timeout,
    /// kube-proxy's conntrack.udpTimeout).
    pub const UDP_TIMEOUT_NS: &str = "SVCLB_UDP_TIMEOUT_NS";
    /// u64 nanoseconds: the same once a reply was seen
    /// (nf_conntrack_udp_timeout_stream, conntrack.udpStreamTimeout).
    pub const UDP_STREAM_TIMEOUT_NS: &str = "SVCLB_UDP_STREAM_TIMEOUT_NS";
}

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Which traffic a frontend serves: connections made on this node (the
/// socket hooks), or packets arriving from outside (XDP).
pub const SCOPE_SOCKET: u8 = 0;
pub const SCOPE_EXTERNAL: u8 = 1;

/// Most backends one frontend may have (slots 1..=count).
pub const MAX_BACKENDS_PER_FRONTEND: u16 = 4096;

/// Backend id 0 is never allocated, so a zeroed value can't name a backend.
pub const BACKEND_ID_NONE: u32 = 0;

/// `Backend::state` values.
pub const BACKEND_ACTIVE: u8 = 0;
pub const BACKEND_TERMINATING: u8 = 1;
/// Named by no slot or Maglev table, kept only so that established
/// external flows stay on it while it still serves (graceful termination).
/// The XDP program reads it only for a SYN on a tracked tuple (a new
/// connection must not land on it); the agent keeps such entries across
/// restarts.
pub const BACKEND_DRAINING: u8 = 2;

/// `ServiceValue::flags` bits (slot 0 only). One of the first four says
/// what kind of address the frontend is.
pub const SVC_FLAG_CLUSTER_IP: u16 = 1 << 0;
pub const SVC_FLAG_NODE_PORT: u16 = 1 << 1;
pub const SVC_FLAG_EXTERNAL_IP: u16 = 1 << 2;
pub const SVC_FLAG_LOAD_BALANCER: u16 = 1 << 3;
/// With no backends, drop (a Local traffic policy without local endpoints)
/// instead of refusing (a service without endpoints).
pub const SVC_FLAG_DROP_EMPTY: u16 = 1 << 4;
/// ClientIP session affinity; `ServiceValue::affinity_timeout` is set.
pub const SVC_FLAG_AFFINITY: u16 = 1 << 5;
/// External scope: only clients in the frontend's source ranges
/// ([`maps::SOURCE_RANGES`]) may connect.
pub const SVC_FLAG_SOURCE_RANGES: u16 = 1 << 6;
/// External scope: externalTrafficPolicy Local (informational; the backend
/// set already holds only local endpoints).
pub const SVC_FLAG_LOCAL: u16 = 1 << 7;
/// The frontend's backends are listed in [`maps::AFFINITY_MATCH`]: it has
/// session affinity, or it is a UDP socket frontend (whose unconnected
/// flows stay on their backend while it is a member). Slots can't tell:
/// they move when another backend leaves.
pub const SVC_FLAG_MEMBERS: u16 = 1 << 8;
/// [`maps::AFFINITY_MATCH`] also lists the frontend's draining backends
/// (terminating but serving, kept for flows only): a UDP socket's flow stays
/// on such a backend, as conntrack keeps a UDP flow to a serving endpoint,
/// while new flows avoid it. Userspace bookkeeping; the programs only look
/// the members up.
pub const SVC_FLAG_DRAINING_MEMBERS: u16 = 1 << 9;

/// Key of the services map. Slot 0 holds the frontend record; slots
/// 1..=count hold the backend ids the frontend load-balances over.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub slot: u16,
    pub _pad: u16,
}

/// Value of the services map. In slot 0: `count`, `rev_nat_id`, `flags`,
/// `affinity_timeout` and, for external frontends, the Maglev table's
/// generation and size; in slots 1..: `backend_id`. One type keeps every map
/// value the same size.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u16,
    pub rev_nat_id: u32,
    /// Seconds (with `SVC_FLAG_AFFINITY`).
    pub affinity_timeout: u32,
    /// Which of the frontend's Maglev tables is current (0 or 1).
    pub maglev_generation: u16,
    pub _pad: u16,
    /// Entries in the Maglev table (a prime); 0 for socket frontends.
    pub maglev_size: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Backend {
    pub addr: [u32; 4],
    pub port: u16,
    pub proto: u8,
    pub state: u8,
    /// 1 when the endpoint runs on this node: external traffic reaches it
    /// with the client's address; other backends are reached through SNAT.
    pub local: u8,
    pub _pad: u8,
    pub _pad2: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RevNat {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// A connected or sending socket (by cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// The frontend address the socket's application believes it talks to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SockRevNat {
    pub addr: [u32; 4],
    pub port: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
}

/// A client of an affinity frontend. At the socket hooks the client is
/// the network namespace (a pod), by its cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    pub client: u64,
    pub rev_nat_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Affinity {
    /// bpf_ktime_get_ns() of the last connection.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// A UDP socket (by cookie) sending to a frontend (by rev-NAT id: at the
/// socket hooks one id stands for one address, port and protocol, and
/// 16 bytes hash faster than the address would).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct UdpFlowKey {
    pub cookie: u64,
    pub rev_nat_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct UdpFlow {
    /// bpf_ktime_get_ns() of the last datagram sent or reply received.
    pub last_used_ns: u64,
    pub backend_id: u32,
    /// 1 once the application received a reply from the backend (recvmsg
    /// with an address): the flow then lasts the stream timeout.
    pub replied: u8,
    pub _pad: u8,
    pub _pad2: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct AffinityMatchKey {
    pub rev_nat_id: u32,
    pub backend_id: u32,
}

/// Maglev table entries per [`MaglevChunk`]: 4000-byte values fit the
/// kernel's 4 KiB allocation class with the element header.
pub const MAGLEV_CHUNK: u32 = 1000;
/// Largest table size the agent accepts (a prime).
pub const MAGLEV_MAX_SIZE: u32 = 131_071;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct MaglevKey {
    pub rev_nat_id: u32,
    pub generation: u16,
    /// Table index / MAGLEV_CHUNK.
    pub chunk: u16,
}

/// Backend ids of table entries chunk*MAGLEV_CHUNK.. (0 past the table's end).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct MaglevChunk {
    pub backend_ids: [u32; MAGLEV_CHUNK as usize],
}

/// A flow as a packet shows it, in the direction the entry translates
/// (IPv4 addresses IPv4-mapped): the programs work on this form, and it is
/// the key of IPv6 conntrack entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    // Padding as scalars: a [u8; 3] compiles to a memset call in eBPF.
    pub _pad: u8,
    pub _pad2: u16,
}

/// The key of IPv4 conntrack entries: a [`FlowKey`] with plain IPv4
/// addresses (network order). The kernel hashes and compares the whole key
/// on every lookup, and 16 bytes cost about 10 ns less than 40 there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FlowKey4 {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _pad2: u16,
}

impl FlowKey4 {
    /// The IPv4 key of a flow whose addresses are IPv4-mapped, made of
    /// four 32-bit words: the kernel hashes keys a word at a time, and in
    /// eBPF a word load of bytes stored narrower just before (field by
    /// field) stalls the CPU's store forwarding, on every lookup.
    #[inline(always)]
    pub fn from_mapped(k: &FlowKey) -> FlowKey4 {
        let [a, b] = k.sport.to_ne_bytes();
        let [c, d] = k.dport.to_ne_bytes();
        bytemuck::cast([
            k.src[3],
            k.dst[3],
            u32::from_ne_bytes([a, b, c, d]),
            u32::from_ne_bytes([k.proto, 0, 0, 0]),
        ])
    }

    #[inline(always)]
    pub fn to_mapped(&self) -> FlowKey {
        FlowKey {
            src: v4_mapped(self.src),
            dst: v4_mapped(self.dst),
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// `Flow::direction`: which program applies the entry.
/// XDP, on packets arriving at the node's devices.
pub const FLOW_INGRESS: u8 = 0;
/// tc egress on the node's devices: replies of local backends.
pub const FLOW_EGRESS: u8 = 1;

/// What to turn a tracked packet's addresses and ports into.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Flow {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    /// The backend of a client-to-backend entry (checked again after a
    /// backend deletion, so flows to a removed backend pick a new one); 0
    /// for reply entries.
    pub backend_id: u32,
    pub rev_nat_id: u32,
    pub direction: u8,
    /// `CT_SEEN`, `CT_FIN`, `CT_RST`: what the packets this entry
    /// translated showed (only its own direction's; the flow's state is
    /// both entries' together, see [`ct_state`]).
    pub state: u8,
    /// What the translation does to the IPv4 header checksum (addresses)
    /// and to the TCP/UDP checksum (addresses and ports), as one's-complement
    /// sums folded to 16 bits: fixed per entry, so computed when it is made.
    pub csum_ip: u16,
    pub csum_l4: u16,
    pub _pad2: u16,
    /// Where XDP sends the flow's packets, cached so an established packet
    /// needs no FIB lookup and no backend check.
    pub route: Route,
    /// When the entry last translated a packet, in [`ct_now`] ticks.
    /// Written only when it moved (at most once per tick per entry), so
    /// an established flow's packets do not dirty the entry's cache line.
    pub last_seen: u32,
}

/// Conntrack time unit: 2^30 ns (1.07 s) of CLOCK_MONOTONIC
/// (`bpf_ktime_get_ns`), so the programs get it with a shift.
pub const CT_TICK_SHIFT: u32 = 30;

/// The conntrack clock: `ktime_ns` (CLOCK_MONOTONIC) in ticks.
#[inline(always)]
pub const fn ct_now(ktime_ns: u64) -> u32 {
    (ktime_ns >> CT_TICK_SHIFT) as u32
}

/// `Flow::state` bits. A packet went through in the entry's direction
/// (for a reply entry: the flow was answered).
pub const CT_SEEN: u8 = 1 << 0;
/// A TCP FIN went through in the entry's direction.
pub const CT_FIN: u8 = 1 << 1;
/// A TCP RST went through in the entry's direction.
pub const CT_RST: u8 = 1 << 2;
/// Set on a SNAT reply entry (by the programs, on the FIN or RST that
/// closes the flow) when its flow is over ([`ct_closed`]): a new flow may
/// take its port at once (see `svclb-ebpf/src/external.rs`).
pub const CT_CLOSED: u8 = 1 << 3;

/// A flow's state, from its two entries' bits: the index of its timeout
/// in `XdpConfig::ct_timeouts`. As netfilter's, coarser: a TCP flow is
/// established once answered (netfilter waits for the handshake's last
/// ACK, with 60 s in SYN_RECV meanwhile).
pub mod ct_state {
    /// TCP, not answered yet (netfilter's SYN_SENT).
    pub const TCP_SYN_SENT: usize = 0;
    pub const TCP_ESTABLISHED: usize = 1;
    /// A FIN went one way (netfilter's FIN_WAIT / CLOSE_WAIT / LAST_ACK).
    pub const TCP_CLOSE_WAIT: usize = 2;
    /// FINs went both ways (netfilter's TIME_WAIT).
    pub const TCP_TIME_WAIT: usize = 3;
    /// A RST went either way (netfilter's CLOSE).
    pub const TCP_CLOSE: usize = 4;
    pub const UDP_UNREPLIED: usize = 5;
    /// UDP (and anything not TCP) answered at least once.
    pub const UDP_REPLIED: usize = 6;
    pub const COUNT: usize = 7;
    /// Names for metrics, by index.
    pub const NAMES: [&str; COUNT] = [
        "tcp_syn_sent",
        "tcp_established",
        "tcp_close_wait",
        "tcp_time_wait",
        "tcp_close",
        "udp_unreplied",
        "udp_replied",
    ];
}

/// The state of a flow of protocol `proto` whose client-to-backend entry
/// has the bits `forward` and whose reply entry has `reply`.
#[inline(always)]
pub const fn ct_state(proto: u8, forward: u8, reply: u8) -> usize {
    if proto != PROTO_TCP {
        return if reply & CT_SEEN != 0 {
            ct_state::UDP_REPLIED
        } else {
            ct_state::UDP_UNREPLIED
        };
    }
    let both = forward | reply;
    if both & CT_RST != 0 {
        ct_state::TCP_CLOSE
    } else if forward & reply & CT_FIN != 0 {
        ct_state::TCP_TIME_WAIT
    } else if both & CT_FIN != 0 {
        ct_state::TCP_CLOSE_WAIT
    } else if reply & CT_SEEN != 0 {
        ct_state::TCP_ESTABLISHED
    } else {
        ct_state::TCP_SYN_SENT
    }
}

/// Whether a TCP flow in `state` is over (RST, or FIN both ways): its
/// SNAT port may go to a new flow before its timeout, as netfilter lets a
/// new SYN reuse a TIME_WAIT tuple.
#[inline(always)]
pub const fn ct_closed(state: usize) -> bool {
    state == ct_state::TCP_CLOSE || state == ct_state::TCP_TIME_WAIT
}

/// Whether a flow whose entries were last seen at `a` and `b` (ticks) has
/// been idle longer than `timeout` ticks at `now`.
#[inline(always)]
pub const fn ct_expired(now: u32, a: u32, b: u32, timeout: u32) -> bool {
    let idle_a = now.wrapping_sub(a);
    let idle_b = now.wrapping_sub(b);
    let idle = if idle_a < idle_b { idle_a } else { idle_b };
    idle > timeout
}

/// A cached forwarding decision of the XDP program (all zero until the
/// first lookup). It is used while `epoch` equals [`maps::BACKENDS_EPOCH`]
/// (no backend deleted since) and `checked_at` is less than
/// [`ROUTE_TTL_JIFFIES`] old; then the backend is checked and the FIB
/// looked up again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Route {
    /// Low 32 bits of jiffies at the last check.
    pub checked_at: u32,
    pub epoch: u32,
    /// The device to send on (XDP_TX when it is the ingress device); 0:
    /// let the stack forward the packets.
    pub ifindex: u32,
    /// Packets up to this IP total length fit the route's MTU; longer ones
    /// go to the stack (which sends "fragmentation needed").
    pub max_len: u16,
    /// The Ethernet header's destination and source addresses, as they
    /// sit in the frame (16-bit words, so they are written as such).
    pub macs: [u16; 6],
    pub _pad: u16,
}

/// How long a cached route is used before the FIB is asked again (256
/// jiffies: 0.26 s at HZ=1000, 2.6 s at HZ=100), so route and neighbour
/// changes reach established flows within that time.
pub const ROUTE_TTL_JIFFIES: u32 = 256;

/// LPM trie key data (the trie's prefix length comes before it): the
/// prefix length counts the 32 bits of `rev_nat_id_be` (big-endian, so the
/// frontend always matches exactly) plus the address prefix (IPv4 prefixes
/// are IPv4-mapped: 96 more bits).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SourceRangeKey {
    pub rev_nat_id_be: u32,
    pub addr: [u32; 4],
}

/// Per-node settings of the external path.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct XdpConfig {
    /// The node's addresses that SNATed traffic to remote backends leaves
    /// from (IPv4-mapped / IPv6); all zero when the node has none.
    pub snat_addr4: [u32; 4],
    pub snat_addr6: [u32; 4],
    /// SNAT source port range, inclusive, host order.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub _pad: u32,
}

/// Indexes of the [`maps::STATS`] counters.
pub mod stats {
    /// Conntrack entries created (client-to-backend direction).
    pub const CT_CREATED: u32 = 0;
    /// New flows dropped: no SNAT port found free (or reclaimable).
    pub const SNAT_EXHAUSTED: u32 = 1;
    /// New flows dropped: no (local) backend.
    pub const NO_BACKEND: u32 = 2;
    /// New flows dropped: client outside loadBalancerSourceRanges.
    pub const SOURCE_RANGE_DENIED: u32 = 3;
    /// Packets passed untouched because they are fragments or carry IP options.
    pub const UNSUPPORTED: u32 = 4;
    /// Packets translated and sent out by XDP (TX or redirect).
    pub const XDP_FORWARDED: u32 = 5;
    /// Packets translated and handed to the stack.
    pub const XDP_PASSED: u32 = 6;
    /// ICMP errors translated.
    pub const ICMP_TRANSLATED: u32 = 7;
    /// SNAT ports taken over from a closed or expired flow at allocation
    /// (its two entries removed then, not by the sweeper).
    pub const SNAT_RECLAIMED: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// The flow hash Maglev indexes with. Only the client's address, port and
/// the protocol go in, so every node maps a client's flow to the same
/// backend whichever node address it reached; affinity frontends pass
/// port 0 (client address only). Every node must compute it identically.
#[inline(always)]
pub fn flow_hash(src: &[u32; 4], sport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9e37_79b9 ^ proto as u32;
    let mut i = 0;
    while i < 4 {
        h = mix(h ^ u32::from_be(src[i]));
        i += 1;
    }
    fmix(mix(h ^ sport as u32))
}

#[inline(always)]
const fn mix(h: u32) -> u32 {
    h.wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593)
}

#[inline(always)]
const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The IPv4-mapped form of an IPv4 address given as the network-order u32
/// that `bpf_sock_addr.user_ip4` holds.
#[inline(always)]
pub const fn v4_mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), ip4_be]
}

/// Whether an address is IPv4-mapped; its IPv4 address is then `addr[3]`.
#[inline(always)]
pub const fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

/// Whether an address (IPv4-mapped or IPv6) is a loopback address:
/// 127.0.0.0/8 or ::1.
#[inline(always)]
pub const fn is_loopback(addr: &[u32; 4]) -> bool {
    if is_v4_mapped(addr) {
        return addr[3].to_ne_bytes()[0] == 127;
    }
    addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == u32::from_ne_bytes([0, 0, 0, 1])
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are repr(C), padding-free (explicit pad fields) and
    // valid for any bit pattern (they are bytemuck::Pod).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::SockRevNatKey {}
    unsafe impl aya::Pod for super::SockRevNat {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::Affinity {}
    unsafe impl aya::Pod for super::AffinityMatchKey {}
    unsafe impl aya::Pod for super::UdpFlowKey {}
    unsafe impl aya::Pod for super::UdpFlow {}
    unsafe impl aya::Pod for super::MaglevKey {}
    unsafe impl aya::Pod for super::MaglevChunk {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey4 {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::SourceRangeKey {}
    unsafe impl aya::Pod for super::XdpConfig {}
}
