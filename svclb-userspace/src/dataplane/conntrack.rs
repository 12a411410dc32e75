//! The external path's conntrack, userspace side: the timeouts (written
//! into `XdpConfig` for the programs' SNAT port reuse) and the sweeper,
//! which removes expired flows.
//!
//! Why a sweeper and not BPF timers: `bpf_timer` needs a timer per entry
//! (or a map walk from a timer callback, 5.13+ / `bpf_for_each_map_elem`),
//! and 5.10, in the kernel matrix, has neither. A thread of the agent walks
//! both maps every `--ct-sweep-interval` instead, with batched lookups
//! (`BPF_MAP_LOOKUP_BATCH`, 5.6+: one syscall per few thousand entries),
//! and removes a flow's two entries together: the reply entry first (it
//! holds the SNAT port), then the client-to-backend one. An entry left
//! alone (its partner evicted by the LRU, or dropped by the programs) is
//! removed too: a forward entry at once, a reply entry when the next sweep
//! still finds it alone (the programs add a new flow's reply entry a moment
//! before its forward entry). While the agent is down nothing is swept;
//! the LRU and the programs' reclaiming of closed and expired flows' SNAT
//! ports keep new flows working meanwhile.
use std::hash::Hash;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use aya::maps::MapData;
// foldhash, randomly seeded per process: a sweep hashes every entry into a
// map, and SipHash made that half the sweep's cost; the keys come from
// clients' packets, so the hash stays seeded.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use svclb_common::{
    ct_expired, ct_now, ct_state, Flow, FlowKey, FlowKey4, CT_TICK_SHIFT, FLOW_INGRESS,
};

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("opening {map}: {source}")]
    Open {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{map}: {op}: {source}")]
    Syscall {
        map: &'static str,
        op: &'static str,
        source: std::io::Error,
    },
}

/// How long a flow may be idle, by state. The defaults are netfilter's,
/// with kube-proxy's where it sets them (established: its
/// tcpEstablishedTimeout, 24 h; close wait: its tcpCloseWaitTimeout, 1 h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_syn_sent: Duration,
    pub tcp_established: Duration,
    pub tcp_close_wait: Duration,
    pub tcp_time_wait: Duration,
    /// After a RST.
    pub tcp_close: Duration,
    pub udp_unreplied: Duration,
    pub udp_replied: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        let s = Duration::from_secs;
        Timeouts {
            tcp_syn_sent: s(120),
            tcp_established: s(86_400),
            tcp_close_wait: s(3_600),
            tcp_time_wait: s(120),
            tcp_close: s(10),
            udp_unreplied: s(30),
            udp_replied: s(120),
        }
    }
}

impl Timeouts {
    /// `XdpConfig::ct_timeouts`: in ticks, rounded up, by `ct_state`.
    pub fn to_ticks(&self) -> [u32; 8] {
        use svclb_common::ct_state::*;
        let ticks = |d: Duration| {
            let tick = 1u128 << CT_TICK_SHIFT;
            d.as_nanos().div_ceil(tick).min(u32::MAX as u128) as u32
        };
        let mut t = [0; 8];
        t[TCP_SYN_SENT] = ticks(self.tcp_syn_sent);
        t[TCP_ESTABLISHED] = ticks(self.tcp_established);
        t[TCP_CLOSE_WAIT] = ticks(self.tcp_close_wait);
        t[TCP_TIME_WAIT] = ticks(self.tcp_time_wait);
        t[TCP_CLOSE] = ticks(self.tcp_close);
        t[UDP_UNREPLIED] = ticks(self.udp_unreplied);
        t[UDP_REPLIED] = ticks(self.udp_replied);
        t
    }
}

/// What one sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries in both maps before the sweep.
    pub entries: usize,
    /// Flows (pairs of entries) left, by `ct_state`.
    pub flows_by_state: [u64; svclb_common::ct_state::COUNT],
    /// Flows removed for being idle past their timeout, by `ct_state`.
    pub expired: [u64; svclb_common::ct_state::COUNT],
    /// Entries removed because their partner was gone.
    pub orphans_removed: u64,
    /// SNAT ports held by the flows left (reply entries of remote backends).
    pub snat_ports_in_use: u64,
    /// The most of them toward one backend (address and port).
    pub snat_ports_in_use_max: u64,
}

/// What the sweeps have found and done since the agent started, for
/// metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// The last sweep.
    pub last: SweepReport,
    pub expired_total: [u64; svclb_common::ct_state::COUNT],
    pub orphans_removed_total: u64,
    /// SNAT ports toward one backend (the --snat-ports range).
    pub snat_ports_capacity: u64,
}

impl ConntrackStats {
    pub fn add(&mut self, sweep: SweepReport) {
        for (total, n) in self.expired_total.iter_mut().zip(sweep.expired) {
            *total += n;
        }
        self.orphans_removed_total += sweep.orphans_removed;
        self.last = sweep;
    }
}

/// The clock the programs stamp entries with (`bpf_ktime_get_ns`:
/// CLOCK_MONOTONIC), in ticks.
pub fn now_ticks() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass; CLOCK_MONOTONIC
    // always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ct_now(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// A conntrack map key: the IPv4 map's short one or the IPv6 map's.
trait CtKey: aya::Pod + Default + Eq + Hash {
    fn from_mapped(k: &FlowKey) -> Self;
    fn proto(&self) -> u8;
}

impl CtKey for FlowKey4 {
    fn from_mapped(k: &FlowKey) -> Self {
        FlowKey4::from_mapped(k)
    }
    fn proto(&self) -> u8 {
        self.proto
    }
}

impl CtKey for FlowKey {
    fn from_mapped(k: &FlowKey) -> Self {
        *k
    }
    fn proto(&self) -> u8 {
        self.proto
    }
}

/// The key of the entry translating the other direction of `f`, an entry
/// of protocol `proto`: a forward entry's reply key, or a reply entry's
/// forward key (each translation, reversed).
fn partner_key(f: &Flow, proto: u8) -> FlowKey {
    FlowKey {
        src: f.dst,
        dst: f.src,
        sport: f.dport,
        dport: f.sport,
        proto,
        _pad: 0,
        _pad2: 0,
    }
}

/// Opens the pinned conntrack maps and sweeps them.
pub struct Sweeper {
    v4: Family<FlowKey4>,
    v6: Family<FlowKey>,
    timeouts: [u32; 8],
}

struct Family<K> {
    name: &'static str,
    map: MapData,
    /// Reply entries found alone by the last sweep.
    alone: HashSet<K>,
}

impl Sweeper {
    /// The maps pinned under `bpffs`.
    pub fn open(bpffs: &Path, timeouts: &Timeouts) -> Result<Sweeper, ConntrackError> {
        use svclb_common::maps::{CONNTRACK4, CONNTRACK6};
        let open = |name: &'static str| {
            MapData::from_pin(super::map_path(bpffs, name))
                .map_err(|source| ConntrackError::Open { map: name, source })
        };
        Ok(Sweeper {
            v4: Family {
                name: CONNTRACK4,
                map: open(CONNTRACK4)?,
                alone: HashSet::new(),
            },
            v6: Family {
                name: CONNTRACK6,
                map: open(CONNTRACK6)?,
                alone: HashSet::new(),
            },
            timeouts: timeouts.to_ticks(),
        })
    }

    /// One pass over both maps at the current time.
    pub fn sweep(&mut self) -> Result<SweepReport, ConntrackError> {
        self.sweep_at(now_ticks())
    }

    /// One pass, as if it were `now` (ticks).
    pub fn sweep_at(&mut self, now: u32) -> Result<SweepReport, ConntrackError> {
        let mut report = SweepReport::default();
        let mut per_backend = HashMap::new();
        self.v4
            .sweep(now, &self.timeouts, &mut report, &mut per_backend)?;
        self.v6
            .sweep(now, &self.timeouts, &mut report, &mut per_backend)?;
        report.snat_ports_in_use_max = per_backend.values().copied().max().unwrap_or(0);
        Ok(report)
    }
}

impl<K: CtKey> Family<K> {
    fn sweep(
        &mut self,
        now: u32,
        timeouts: &[u32; 8],
        report: &mut SweepReport,
        per_backend: &mut HashMap<([u32; 4], u16), u64>,
    ) -> Result<(), ConntrackError> {
        let fd = self.map.fd().as_fd().as_raw_fd();
        let entries: HashMap<K, Flow> = lookup_all(fd, self.name)?.into_iter().collect();
        report.entries += entries.len();
        let mut paired = HashSet::new();
        let mut gone = Vec::new();
        for (k, f) in &entries {
            if f.direction != FLOW_INGRESS || f.backend_id == 0 {
                continue;
            }
            let proto = k.proto();
            let rk = K::from_mapped(&partner_key(f, proto));
            let reply = entries
                .get(&rk)
                .filter(|r| r.backend_id == 0 && K::from_mapped(&partner_key(r, proto)) == *k);
            let Some(r) = reply else {
                // Replies are not translated any more: the flow is broken.
                // Unless the reply entry came after the lookup passed its
                // bucket (a new flow): ask the map again.
                if lookup(fd, self.name, &rk)?.is_none() {
                    gone.push(*k);
                    report.orphans_removed += 1;
                }
                continue;
            };
            paired.insert(rk);
            let state = ct_state(proto, f.state, r.state);
            if ct_expired(now, f.last_seen, r.last_seen, timeouts[state]) {
                // Checked again on the entries as they are now: a packet
                // (say, a SYN reusing the tuple) may have come since.
                if self.still_expired(&rk, k, proto, now, timeouts)? {
                    gone.push(rk);
                    gone.push(*k);
                    report.expired[state] += 1;
                    continue;
                }
            }
            report.flows_by_state[state] += 1;
            if r.direction == FLOW_INGRESS {
                report.snat_ports_in_use += 1;
                // The reply key: backend -> SNAT address and port.
                *per_backend.entry((f.dst, f.dport)).or_default() += 1;
            }
        }
        let mut alone = HashSet::new();
        for (k, f) in &entries {
            if f.backend_id != 0 || paired.contains(k) {
                continue;
            }
            if self.alone.contains(k) {
                gone.push(*k);
                report.orphans_removed += 1;
            } else {
                alone.insert(*k);
            }
        }
        self.alone = alone;
        for k in &gone {
            delete(fd, self.name, k)?;
        }
        Ok(())
    }

    /// Whether the flow of entries `rk` and `k` is still expired, by
    /// what the map holds now.
    fn still_expired(
        &self,
        rk: &K,
        k: &K,
        proto: u8,
        now: u32,
        timeouts: &[u32; 8],
    ) -> Result<bool, ConntrackError> {
        let fd = self.map.fd().as_fd().as_raw_fd();
        let (Some(r), Some(f)) = (lookup(fd, self.name, rk)?, lookup(fd, self.name, k)?) else {
            return Ok(true);
        };
        let state = ct_state(proto, f.state, r.state);
        Ok(ct_expired(now, f.last_seen, r.last_seen, timeouts[state]))
    }
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// union bpf_attr for BPF_MAP_*_ELEM.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// union bpf_attr for BPF_MAP_*_BATCH.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<()> {
    // SAFETY: `attr` is a valid bpf_attr prefix of the size passed,
    // pointing at buffers that live through the call; the kernel reads it
    // and writes only into those buffers and `attr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Entries per batched lookup.
const BATCH: usize = 4096;

/// Every entry of the map, a batch of up to `BATCH` per syscall. (aya
/// 0.14 has no batch operations; iterating its keys costs two syscalls
/// per entry.)
fn lookup_all<K: aya::Pod + Default>(
    fd: RawFd,
    map: &'static str,
) -> Result<Vec<(K, Flow)>, ConntrackError> {
    let mut out = Vec::new();
    let mut keys: Vec<K> = vec![K::default(); BATCH];
    let mut values: Vec<Flow> = vec![Flow::default(); BATCH];
    // The position in the map (a bucket index for hash maps): 8 bytes
    // is more than any map type's token.
    let (mut token, mut next) = ([0u8; 8], [0u8; 8]);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match result {
            Ok(()) => {}
            // The end of the map (with the last entries in this batch).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(source) => {
                return Err(ConntrackError::Syscall {
                    map,
                    op: "lookup batch",
                    source,
                })
            }
        }
        token = next;
        first = false;
    }
}

fn lookup<K: aya::Pod>(
    fd: RawFd,
    map: &'static str,
    key: &K,
) -> Result<Option<Flow>, ConntrackError> {
    let mut value = Flow::default();
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        key: key as *const K as u64,
        value: &mut value as *mut Flow as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(source) => Err(ConntrackError::Syscall {
            map,
            op: "lookup",
            source,
        }),
    }
}

fn delete<K: aya::Pod>(fd: RawFd, map: &'static str, key: &K) -> Result<(), ConntrackError> {
    let mut attr = ElemAttr {
        map_fd: fd as u32,
        key: key as *const K as u64,
        ..Default::default()
    };
    match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
        // Gone already (evicted, or removed by the programs).
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(source) => Err(ConntrackError::Syscall {
            map,
            op: "delete",
            source,
        }),
        Ok(()) => Ok(()),
    }
}

/// One tracked external flow, from its client-to-backend entry and (if
/// present) its reply entry, for `svclb conntrack list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrackedFlow {
    /// IP protocol number.
    pub proto: u8,
    pub client: std::net::SocketAddr,
    /// The address the client sent to (node port, external or LB IP).
    pub frontend: std::net::SocketAddr,
    pub backend: std::net::SocketAddr,
    /// The packets' source toward the backend: the client's, or the SNAT
    /// address and port for a remote backend.
    pub source: std::net::SocketAddr,
    pub backend_id: u32,
    pub rev_nat_id: u32,
    /// Index into `svclb_common::ct_state::NAMES`; None when the reply
    /// entry is gone (the sweeper removes such a flow).
    pub state: Option<usize>,
    /// Ticks since the newer of its entries' last packets.
    pub idle_ticks: u32,
}

impl TrackedFlow {
    pub fn state_name(&self) -> &'static str {
        self.state
            .map_or("orphan", |s| svclb_common::ct_state::NAMES[s])
    }

    pub fn idle(&self) -> Duration {
        Duration::from_nanos(u64::from(self.idle_ticks) << CT_TICK_SHIFT)
    }
}

/// A conntrack key's addresses and ports (host order, as in every
/// conntrack key and value), client to frontend.
trait KeyAddrs: CtKey {
    fn addrs(&self) -> (std::net::SocketAddr, std::net::SocketAddr);
}

impl KeyAddrs for FlowKey4 {
    fn addrs(&self) -> (std::net::SocketAddr, std::net::SocketAddr) {
        let ip = |a: u32| std::net::IpAddr::from(a.to_ne_bytes());
        (
            (ip(self.src), self.sport).into(),
            (ip(self.dst), self.dport).into(),
        )
    }
}

impl KeyAddrs for FlowKey {
    fn addrs(&self) -> (std::net::SocketAddr, std::net::SocketAddr) {
        use super::abi::addr_from_abi;
        (
            (addr_from_abi(self.src), self.sport).into(),
            (addr_from_abi(self.dst), self.dport).into(),
        )
    }
}

/// Every external flow in the conntrack maps pinned under `bpffs`, read
/// with batched lookups as the sweeper reads them.
pub fn list_flows(bpffs: &Path) -> Result<Vec<TrackedFlow>, ConntrackError> {
    use svclb_common::maps::{CONNTRACK4, CONNTRACK6};
    let now = now_ticks();
    let mut out = Vec::new();
    for name in [CONNTRACK4, CONNTRACK6] {
        let map = MapData::from_pin(super::map_path(bpffs, name))
            .map_err(|source| ConntrackError::Open { map: name, source })?;
        let fd = map.fd().as_fd().as_raw_fd();
        if name == CONNTRACK4 {
            out.extend(family_flows::<FlowKey4>(fd, name, now)?);
        } else {
            out.extend(family_flows::<FlowKey>(fd, name, now)?);
        }
    }
    Ok(out)
}

fn family_flows<K: KeyAddrs>(
    fd: RawFd,
    name: &'static str,
    now: u32,
) -> Result<Vec<TrackedFlow>, ConntrackError> {
    let entries: HashMap<K, Flow> = lookup_all(fd, name)?.into_iter().collect();
    let sock = |words: [u32; 4], port: u16| -> std::net::SocketAddr {
        (super::abi::addr_from_abi(words), port).into()
    };
    let mut out = Vec::new();
    for (k, f) in &entries {
        // Client-to-backend entries only; their reply entry completes them.
        if f.direction != FLOW_INGRESS || f.backend_id == 0 {
            continue;
        }
        let proto = k.proto();
        let reply = entries.get(&K::from_mapped(&partner_key(f, proto)));
        let last = reply.map_or(f.last_seen, |r| {
            // The newer of the two (the clock may wrap).
            if now.wrapping_sub(r.last_seen) < now.wrapping_sub(f.last_seen) {
                r.last_seen
            } else {
                f.last_seen
            }
        });
        let (client, frontend) = k.addrs();
        out.push(TrackedFlow {
            proto,
            client,
            frontend,
            backend: sock(f.dst, f.dport),
            source: sock(f.src, f.sport),
            backend_id: f.backend_id,
            rev_nat_id: f.rev_nat_id,
            state: reply.map(|r| ct_state(proto, f.state, r.state)),
            idle_ticks: now.wrapping_sub(last),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_round_up_to_ticks() {
        let t = Timeouts::default().to_ticks();
        use svclb_common::ct_state::*;
        // 2^30 ns ticks: 10 s -> 9.3 -> 10, 86400 s -> 80466.4 -> 80467.
        assert_eq!(t[TCP_CLOSE], 10);
        assert_eq!(t[TCP_ESTABLISHED], 80_467);
        assert_eq!(t[UDP_UNREPLIED], 28);
        let short = Timeouts {
            tcp_time_wait: Duration::from_millis(1),
            ..Timeouts::default()
        };
        assert_eq!(short.to_ticks()[TCP_TIME_WAIT], 1);
    }

    #[test]
    fn flow_states_follow_both_directions() {
        use svclb_common::{ct_state::*, CT_FIN, CT_RST, CT_SEEN, PROTO_TCP, PROTO_UDP};
        let tcp = |f, r| ct_state(PROTO_TCP, f, r);
        assert_eq!(tcp(CT_SEEN, 0), TCP_SYN_SENT);
        assert_eq!(tcp(CT_SEEN, CT_SEEN), TCP_ESTABLISHED);
        assert_eq!(tcp(CT_SEEN | CT_FIN, CT_SEEN), TCP_CLOSE_WAIT);
        assert_eq!(tcp(CT_SEEN, CT_SEEN | CT_FIN), TCP_CLOSE_WAIT);
        assert_eq!(tcp(CT_SEEN | CT_FIN, CT_SEEN | CT_FIN), TCP_TIME_WAIT);
        assert_eq!(tcp(CT_SEEN | CT_FIN, CT_SEEN | CT_RST), TCP_CLOSE);
        assert_eq!(ct_state(PROTO_UDP, CT_SEEN, 0), UDP_UNREPLIED);
        assert_eq!(ct_state(PROTO_UDP, CT_SEEN, CT_SEEN), UDP_REPLIED);
        // Idle is the newer of the two entries' last packets.
        assert!(!ct_expired(100, 50, 95, 10));
        assert!(ct_expired(100, 50, 89, 10));
        // The clock may wrap.
        assert!(!ct_expired(3, u32::MAX - 2, 0, 10));
    }
}
