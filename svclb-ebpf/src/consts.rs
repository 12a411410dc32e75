//! The kernel and wire facts the programs rely on, on one page: protocol
//! numbers, header offsets and lengths, verdicts and helper flags. (Map
//! layouts and names are the agent's ABI and live in svclb-common.)
pub use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX};
pub use svclb_common::{PROTO_TCP, PROTO_UDP};

// Verdicts.
/// tc: let the packet go on.
pub const TC_ACT_OK: i32 = 0;
/// sock_addr programs: let the syscall go on, or fail it.
pub const SOCK_ALLOW: i32 = 1;
pub const SOCK_REJECT: i32 = 0;

// Errors a socket hook makes connect/sendmsg fail with.
pub const ETIMEDOUT: i32 = 110;
pub const ECONNREFUSED: i32 = 111;

// Helper flags and results.
/// Map update: only add, never replace.
pub const BPF_NOEXIST: u64 = 1;
/// bpf_l4_csum_replace: the field is in the pseudo-header; keep a zero UDP
/// checksum zero.
pub const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
pub const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// bpf_fib_lookup families.
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
/// bpf_fib_lookup results: success, and the range that means "no route"
/// (blackhole, unreachable, prohibit).
pub const FIB_SUCCESS: i64 = 0;
pub const FIB_BLACKHOLE: i64 = 1;
pub const FIB_PROHIBIT: i64 = 3;

// Ethernet (untagged).
pub const ETH_HLEN: usize = 14;
pub const ETH_TYPE: usize = 12;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

// IP protocol numbers (PROTO_TCP and PROTO_UDP above).
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers.
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_DEST: u8 = 60;

/// Offsets within an IPv4 header without options.
pub mod ip4 {
    pub const VERSION_IHL: usize = 0;
    pub const TOT_LEN: usize = 2;
    pub const FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTO: usize = 9;
    pub const CSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    pub const HLEN: usize = 20;
    /// Version 4, header length 5 words: no options.
    pub const VERSION_IHL_PLAIN: u8 = 0x45;
    /// The more-fragments flag and the fragment offset.
    pub const FRAG_MASK: u16 = 0x3fff;
}

/// Offsets within an IPv6 header.
pub mod ip6 {
    /// The version is the high nibble.
    pub const VERSION: usize = 0;
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
    pub const HLEN: usize = 40;
}

/// Offsets within TCP and UDP headers (ports first in both).
pub mod l4 {
    pub const SPORT: usize = 0;
    pub const DPORT: usize = 2;
    pub const TCP_FLAGS: usize = 13;
    pub const TCP_CSUM: usize = 16;
    pub const TCP_HLEN: usize = 20;
    pub const UDP_CSUM: usize = 6;
    pub const UDP_HLEN: usize = 8;
    pub const TCP_FIN: u8 = 0x01;
    pub const TCP_SYN: u8 = 0x02;
    pub const TCP_RST: u8 = 0x04;
    pub const TCP_ACK: u8 = 0x10;
}

/// ICMP and ICMPv6: header offsets and the error types svclb translates.
pub mod icmp {
    pub const TYPE: usize = 0;
    pub const CSUM: usize = 2;
    /// The header; the quoted packet follows.
    pub const HLEN: usize = 8;
    /// The bytes of the offending packet's L4 header an error quotes at
    /// least.
    pub const QUOTED_L4: usize = 8;
    pub const DEST_UNREACH: u8 = 3;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
    /// ICMPv6 errors: destination unreachable, packet too big, time
    /// exceeded, parameter problem.
    pub const V6_ERRORS: core::ops::RangeInclusive<u8> = 1..=4;
}

// Frame offsets: untagged Ethernet, then IPv4 without options or IPv6
// without extension headers, then L4.
pub const IP4_VERSION_IHL: usize = ETH_HLEN + ip4::VERSION_IHL;
pub const IP4_TOT_LEN: usize = ETH_HLEN + ip4::TOT_LEN;
pub const IP4_FRAG: usize = ETH_HLEN + ip4::FRAG;
pub const IP4_TTL: usize = ETH_HLEN + ip4::TTL;
pub const IP4_PROTO: usize = ETH_HLEN + ip4::PROTO;
pub const IP4_CSUM: usize = ETH_HLEN + ip4::CSUM;
pub const IP4_SRC: usize = ETH_HLEN + ip4::SRC;
pub const IP4_DST: usize = ETH_HLEN + ip4::DST;
pub const IP4_L4: usize = ETH_HLEN + ip4::HLEN;
pub const IP6_VERSION: usize = ETH_HLEN + ip6::VERSION;
pub const IP6_PAYLOAD_LEN: usize = ETH_HLEN + ip6::PAYLOAD_LEN;
pub const IP6_NEXT_HEADER: usize = ETH_HLEN + ip6::NEXT_HEADER;
pub const IP6_HOP_LIMIT: usize = ETH_HLEN + ip6::HOP_LIMIT;
pub const IP6_SRC: usize = ETH_HLEN + ip6::SRC;
pub const IP6_DST: usize = ETH_HLEN + ip6::DST;
pub const IP6_L4: usize = ETH_HLEN + ip6::HLEN;
