//! Load the programs without attaching them, fill the maps through the real
//! Writer, and run packets through BPF_PROG_RUN — for fixtures and
//! benchmarks. Needs root (BPF, bpffs, network namespaces).
//!
//! BPF_PROG_RUN never sends a packet: the verdict (XDP_TX, redirect, ...)
//! and the rewritten bytes are only reported back. `bpf_fib_lookup` in the
//! XDP program resolves routes and neighbours in the calling thread's
//! network namespace, from the ingress device given; [`TestNode`] is such a
//! namespace with a fixed, deterministic topology.
use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray};
use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions, TestRunResult, Xdp};
use aya::Ebpf;
use svclb_common::{Flow, FlowKey, FlowKey4, XdpConfig};
use svclb_userspace::dataplane::conntrack::{ConntrackError, Sweeper, Timeouts};
use svclb_userspace::dataplane::loader::{self, TC_PROGRAM, XDP_PROGRAM};
use svclb_userspace::dataplane::{self, ApplyStats, DataplaneError, KernelMaps, Writer};
use svclb_userspace::model::{Frontend, ServiceId};

use crate::{cmd, netns};

pub mod packet;

/// XDP verdicts (enum xdp_action).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;
/// tc verdict: let the packet continue.
pub const TC_ACT_OK: u32 = 0;

/// Makes the scratch names of one process unique.
static NEXT: AtomicUsize = AtomicUsize::new(0);

fn unique(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// What one BPF_PROG_RUN call reported.
#[derive(Clone, Debug)]
pub struct Run {
    /// The program's return value (XDP_* or TC_ACT_*).
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// The kernel's measurement: mean time per run over `repeat` runs.
    pub duration: Duration,
}

/// The loaded programs and their maps, pinned in a scratch bpffs directory
/// that is removed on drop.
pub struct ProgTest {
    pub writer: Writer<KernelMaps>,
    xdp_config: Array<MapData, XdpConfig>,
    tx_devices: DevMapHash<MapData>,
    conntrack4: HashMap<MapData, FlowKey4, Flow>,
    conntrack6: HashMap<MapData, FlowKey, Flow>,
    stats: PerCpuArray<MapData, u64>,
    bpffs: PathBuf,
    ebpf: Ebpf,
}

impl ProgTest {
    /// Load the object (maps pinned under /sys/fs/bpf/svclb-test-PID-N)
    /// and the XDP and tc programs, with a conntrack map of `conntrack_size`.
    pub fn load(conntrack_size: u32) -> Result<Self, DataplaneError> {
        let bpffs = Path::new("/sys/fs/bpf").join(unique("svclb-test"));
        let mut scratch = Scratch(Some(bpffs.clone()));
        let loader::Unattached {
            mut ebpf,
            writer,
            xdp_config,
            tx_devices,
        } = loader::load_unattached(&bpffs, conntrack_size)?;
        use svclb_common::maps::{CONNTRACK4, CONNTRACK6, STATS};
        let conntrack4 = loader::take_typed(&mut ebpf, CONNTRACK4)?;
        let conntrack6 = loader::take_typed(&mut ebpf, CONNTRACK6)?;
        let stats = loader::take_typed(&mut ebpf, STATS)?;
        let load_err = |program: &'static str| {
            move |e: ProgramError| DataplaneError::Attach {
                program,
                reason: e.to_string(),
            }
        };
        let xdp: &mut Xdp = program_mut(&mut ebpf, XDP_PROGRAM)?;
        xdp.load().map_err(load_err(XDP_PROGRAM))?;
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, TC_PROGRAM)?;
        tc.load().map_err(load_err(TC_PROGRAM))?;
        scratch.0 = None; // from here on, Drop of ProgTest removes it
        Ok(ProgTest {
            writer,
            xdp_config,
            tx_devices,
            conntrack4,
            conntrack6,
            stats,
            bpffs,
            ebpf,
        })
    }

    /// Make `service`'s frontends exactly `frontends` (and delete what that
    /// leaves stale, after an RCU grace period when there is any).
    pub fn apply(
        &mut self,
        service: &str,
        frontends: &[Frontend],
    ) -> Result<ApplyStats, DataplaneError> {
        let id = ServiceId {
            namespace: "prog-test".into(),
            name: service.into(),
        };
        let stats = self.writer.apply(&id, frontends)?;
        self.writer.flush()?;
        Ok(stats)
    }

    /// The directory the maps are pinned in (by name).
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The SNAT addresses for remote backends and the port range.
    pub fn set_snat(
        &mut self,
        v4: Option<Ipv4Addr>,
        v6: Option<Ipv6Addr>,
        ports: (u16, u16),
    ) -> Result<(), DataplaneError> {
        let addresses: Vec<IpAddr> = v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(v6.map(IpAddr::V6))
            .collect();
        dataplane::write_xdp_config(&mut self.xdp_config, &addresses, ports)
    }

    /// A conntrack sweeper on this test's maps, with `timeouts`.
    pub fn sweeper(&self, timeouts: &Timeouts) -> Result<Sweeper, ConntrackError> {
        Sweeper::open(&self.bpffs, timeouts)
    }

    /// Remove a conntrack entry (IPv4-mapped keys: from the IPv4 map).
    pub fn untrack(&mut self, key: &FlowKey) -> Result<(), aya::maps::MapError> {
        if svclb_common::is_v4_mapped(&key.src) {
            self.conntrack4.remove(&FlowKey4::from_mapped(key))
        } else {
            self.conntrack6.remove(key)
        }
    }

    /// Let XDP redirect to the device `ifindex` (the agent's --devices).
    pub fn add_tx_device(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        loader::add_tx_device(&mut self.tx_devices, ifindex)
    }

    /// Add a conntrack entry, as if the programs had made it (to the IPv4
    /// map when the key's addresses are IPv4-mapped).
    pub fn track(&mut self, key: &FlowKey, flow: &Flow) -> Result<(), DataplaneError> {
        use svclb_common::maps::{CONNTRACK4, CONNTRACK6};
        let (map, result) = if svclb_common::is_v4_mapped(&key.src) {
            let key = FlowKey4::from_mapped(key);
            (CONNTRACK4, self.conntrack4.insert(key, flow, 0))
        } else {
            (CONNTRACK6, self.conntrack6.insert(key, flow, 0))
        };
        result.map_err(|source| DataplaneError::Map {
            map,
            op: "update",
            source,
        })
    }

    /// Every conntrack entry of both families (IPv4 keys IPv4-mapped).
    pub fn conntrack(&self) -> Vec<(FlowKey, Flow)> {
        let v4 = self.conntrack4.iter().filter_map(Result::ok);
        let v6 = self.conntrack6.iter().filter_map(Result::ok);
        v4.map(|(k, f)| (k.to_mapped(), f)).chain(v6).collect()
    }

    /// A `svclb_common::stats` counter, summed over CPUs.
    pub fn stat(&self, index: u32) -> u64 {
        self.stats
            .get(&index, 0)
            .map_or(0, |values| values.iter().sum())
    }

    /// Run `svclb_xdp` once on `packet`, as received on `ingress_ifindex`
    /// of the calling thread's network namespace (default: its loopback).
    pub fn run_xdp(
        &self,
        packet: &[u8],
        ingress_ifindex: Option<u32>,
    ) -> Result<Run, ProgramError> {
        self.run_xdp_repeat(packet, ingress_ifindex, 1)
    }

    /// Run `svclb_xdp` `repeat` times. The kernel runs each repetition on
    /// the packet the previous one left, so only a packet the program
    /// doesn't rewrite gives `repeat` identical runs.
    pub fn run_xdp_repeat(
        &self,
        packet: &[u8],
        ingress_ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<Run, ProgramError> {
        let prog: &Xdp = program(&self.ebpf, XDP_PROGRAM)?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
        // rx_queue_index, egress_ifindex. data_end must be the packet length.
        let ctx: Vec<u8> = [
            0,
            packet.len() as u32,
            0,
            ingress_ifindex.unwrap_or(0),
            0,
            0,
        ]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
        run(prog, packet, Some(&ctx), repeat)
    }

    /// Run `svclb_tc_egress` once on `packet` (an skb on the namespace's loopback).
    pub fn run_tc(&self, packet: &[u8]) -> Result<Run, ProgramError> {
        let prog: &SchedClassifier = program(&self.ebpf, TC_PROGRAM)?;
        run(prog, packet, None, 1)
    }
}

impl Drop for ProgTest {
    fn drop(&mut self) {
        remove_bpffs_dir(&self.bpffs);
    }
}

/// Removes a scratch bpffs directory when dropped while still `Some`.
struct Scratch(Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            remove_bpffs_dir(dir);
        }
    }
}

/// Unpin what the directory holds (maps stay alive while open) and remove it.
fn remove_bpffs_dir(dir: &Path) {
    let _ = fs::remove_dir_all(dir);
}

fn run<P>(prog: &P, packet: &[u8], ctx: Option<&[u8]>, repeat: u32) -> Result<Run, ProgramError>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    // The programs never grow packets; the spare room is for safety only.
    let mut out = vec![0u8; packet.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: ctx,
        repeat,
        ..TestRunOptions::default()
    };
    let result = prog.test_run(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok(Run {
        verdict: result.return_value,
        packet: out,
        duration: result.duration,
    })
}

fn program<'a, P>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a P, ProgramError>
where
    &'a P: TryFrom<&'a aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf.program(name).ok_or(ProgramError::NotLoaded)?;
    p.try_into()
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| DataplaneError::Load(format!("{name} missing from the object")))?;
    p.try_into()
        .map_err(|e: ProgramError| DataplaneError::Attach {
            program: name,
            reason: e.to_string(),
        })
}

/// A simulated node for fixtures: a network namespace this process creates
/// (`svlbfx-PID-N`, deleted on drop) with an external device `ext0` and a
/// pod veth `pod0`, and permanent neighbours, so that `bpf_fib_lookup`
/// gives the same answer every time:
///
/// | destination | route | next hop MAC |
/// |---|---|---|
/// | node subnets 198.19.200.0/24, 198.19.201.0/24, fd00:20::/64, fd00:21::/64 | ext0 | - |
/// | remote pods 198.18.2.0/24, fd00:2::/64 | via the peer node .2 / ::2 | [`PEER_MAC`] |
/// | clients 198.18.128.0/17, fd00:250::/64 | via the router .254 / ::fe | [`ROUTER_MAC`] |
/// | local pods 198.18.1.0/24, fd00:1::/64 | pod0 | - |
///
/// Forwarding is on (the FIB helper refuses otherwise). Nothing is sent:
/// BPF_PROG_RUN only reports what the program decided.
pub struct TestNode {
    pub name: String,
    pub ext_ifindex: u32,
    pub pod_ifindex: u32,
}

pub const EXT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
pub const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
/// The node's addresses on ext0 (two per family, as a node with two
/// InternalIP/ExternalIP addresses has).
pub const NODE_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 1);
pub const NODE2_V4: Ipv4Addr = Ipv4Addr::new(198, 19, 201, 1);
pub const NODE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 1);
pub const NODE2_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x21, 0, 0, 0, 0, 0, 1);

impl TestNode {
    pub fn create() -> Result<TestNode> {
        let name = unique("svlbfx");
        netns::create(&name)?;
        // From here on, Drop deletes the namespace.
        let mut node = TestNode {
            name,
            ext_ifindex: 0,
            pod_ifindex: 0,
        };
        let n = node.name.clone();
        let mac = mac_string;
        let (ext, peer, router) = (mac(EXT_MAC), mac(PEER_MAC), mac(ROUTER_MAC));
        let steps: Vec<Vec<&str>> = vec![
            vec!["link", "set", "lo", "up"],
            vec![
                "link", "add", "ext0", "address", &ext, "type", "veth", "peer", "name", "ext0p",
            ],
            vec![
                "link", "add", "pod0", "type", "veth", "peer", "name", "pod0p",
            ],
            vec!["link", "set", "ext0", "up"],
            vec!["link", "set", "ext0p", "up"],
            vec!["link", "set", "pod0", "up"],
            vec!["link", "set", "pod0p", "up"],
            vec!["addr", "add", "198.19.200.1/24", "dev", "ext0"],
            vec!["addr", "add", "198.19.201.1/24", "dev", "ext0"],
            vec!["addr", "add", "fd00:20::1/64", "dev", "ext0", "nodad"],
            vec!["addr", "add", "fd00:21::1/64", "dev", "ext0", "nodad"],
            vec![
                "neigh",
                "add",
                "198.19.200.2",
                "lladdr",
                &peer,
                "dev",
                "ext0",
                "nud",
                "permanent",
            ],
            vec![
                "neigh",
                "add",
                "198.19.200.254",
                "lladdr",
                &router,
                "dev",
                "ext0",
                "nud",
                "permanent",
            ],
            vec![
                "neigh",
                "add",
                "fd00:20::2",
                "lladdr",
                &peer,
                "dev",
                "ext0",
                "nud",
                "permanent",
            ],
            vec![
                "neigh",
                "add",
                "fd00:20::fe",
                "lladdr",
                &router,
                "dev",
                "ext0",
                "nud",
                "permanent",
            ],
            vec![
                "route",
                "add",
                "198.18.2.0/24",
                "via",
                "198.19.200.2",
                "dev",
                "ext0",
            ],
            vec![
                "route",
                "add",
                "198.18.128.0/17",
                "via",
                "198.19.200.254",
                "dev",
                "ext0",
            ],
            vec!["route", "add", "198.18.1.0/24", "dev", "pod0"],
            vec![
                "route",
                "add",
                "fd00:2::/64",
                "via",
                "fd00:20::2",
                "dev",
                "ext0",
            ],
            vec![
                "route",
                "add",
                "fd00:250::/64",
                "via",
                "fd00:20::fe",
                "dev",
                "ext0",
            ],
            vec!["route", "add", "fd00:1::/64", "dev", "pod0"],
        ];
        for step in steps {
            cmd::ip(Some(&n), &step)?;
        }
        node.ext_ifindex = ifindex(&n, "ext0")?;
        node.pod_ifindex = ifindex(&n, "pod0")?;
        node.in_netns(|| {
            // After the devices exist: these switch every device's setting.
            fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
            fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
        })??;
        Ok(node)
    }

    /// Give the neighbour at `addr` (on ext0) a new MAC address, as when
    /// a next hop is replaced.
    pub fn set_neighbour(&self, addr: IpAddr, mac: [u8; 6]) -> Result<()> {
        let (addr, mac) = (addr.to_string(), mac_string(mac));
        let args = [
            "neigh",
            "replace",
            &addr,
            "lladdr",
            &mac,
            "dev",
            "ext0",
            "nud",
            "permanent",
        ];
        cmd::ip(Some(&self.name), &args).map(drop)
    }

    /// Move the calling thread into the namespace (for good: call it on a
    /// thread of its own, see [`TestNode::in_netns`]).
    pub fn enter(&self) -> Result<()> {
        let path = netns::path(&self.name);
        let ns = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns(2) on a namespace fd we own; affects this thread only.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns into {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Run `f` on a new thread inside the namespace; panics propagate.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        let _ = netns::delete(&self.name);
    }
}

fn mac_string(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ifindex(netns: &str, dev: &str) -> Result<u32> {
    let out = cmd::ip(Some(netns), &["-o", "link", "show", dev])?;
    // "4: ext0@ext0p: <...> ..."
    out.split(':')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| anyhow!("no ifindex for {dev} in {netns}"))
}
