//! Loading the eBPF object, pinning its maps and attaching its programs.
//!
//! Maps are pinned by name in the agent's bpffs directory and reused by the
//! next agent, so their content survives restarts. Program links are pinned
//! too (DIR/links/<program>), so the programs stay attached while no agent
//! runs. A new agent attaches its programs first and only then releases the
//! old links: in between both run, which is harmless because translating an
//! already-translated address is a no-op (a backend is not a frontend).
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use aya::maps::{Array, DevMapHash, Map, MapData, MapError};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::xdp::XdpLink;
use aya::programs::{
    links::FdLink, links::PinnedLink, CgroupAttachMode, CgroupSockAddr, SchedClassifier,
    TcAttachType, Xdp, XdpMode,
};
use aya::{Ebpf, EbpfLoader};
use svclb_common::{globals, XdpConfig};

use super::{Capacity, DataplaneError, KernelMaps, Writer, WriterMaps};

/// The object svclb-userspace/build.rs built from svclb-ebpf.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svclb"));

/// The socket programs (function names in svclb-ebpf/src/sock.rs).
pub const PROGRAMS: [&str; 8] = [
    "svclb_connect4",
    "svclb_connect6",
    "svclb_sendmsg4",
    "svclb_sendmsg6",
    "svclb_recvmsg4",
    "svclb_recvmsg6",
    "svclb_getpeername4",
    "svclb_getpeername6",
];

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn on_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into the zeroed struct we pass.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Make sure `dir` exists on a bpf filesystem, mounting one if needed: at
/// /sys/fs/bpf for paths below it (the usual place), else at `dir` itself.
pub fn ensure_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let err = |what: &str, e: std::io::Error| DataplaneError::Bpffs {
        path: dir.to_owned(),
        reason: format!("{what}: {e}"),
    };
    let standard = Path::new("/sys/fs/bpf");
    let mount_point = if dir.starts_with(standard) {
        standard
    } else {
        dir
    };
    fs::create_dir_all(mount_point).map_err(|e| err("create", e))?;
    if !on_bpffs(mount_point) {
        tracing::info!(path = %mount_point.display(), "mounting bpffs");
        let target = std::ffi::CString::new(mount_point.as_os_str().as_encoded_bytes())
            .map_err(|_| err("path", std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: plain mount(2) with NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(err("mount bpffs", std::io::Error::last_os_error()));
        }
    }
    fs::create_dir_all(dir.join("links")).map_err(|e| err("create", e))?;
    if !on_bpffs(dir) {
        return Err(DataplaneError::Bpffs {
            path: dir.to_owned(),
            reason: "not on a bpf filesystem".into(),
        });
    }
    Ok(())
}

/// How long the socket programs keep an unconnected UDP socket's datagrams
/// to a frontend on one backend after its last datagram: `idle` until a
/// reply was received, `stream` after (netfilter's UDP conntrack timeouts,
/// whose defaults these are).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpTimeouts {
    pub idle: std::time::Duration,
    pub stream: std::time::Duration,
}

impl Default for UdpTimeouts {
    fn default() -> Self {
        UdpTimeouts {
            idle: std::time::Duration::from_secs(30),
            stream: std::time::Duration::from_secs(120),
        }
    }
}

/// Load the object with its maps pinned in (or reused from) `bpffs`, each
/// conntrack map (IPv4, IPv6) sized `conntrack_size`, default UDP timeouts.
pub fn load(bpffs: &Path, conntrack_size: u32) -> Result<Ebpf, DataplaneError> {
    load_with(bpffs, conntrack_size, UdpTimeouts::default())
}

/// [`load`] with the given UDP flow timeouts.
pub fn load_with(
    bpffs: &Path,
    conntrack_size: u32,
    udp: UdpTimeouts,
) -> Result<Ebpf, DataplaneError> {
    if OBJECT.is_empty() {
        return Err(DataplaneError::Load(
            "this svclb was built with AYA_BUILD_SKIP: no eBPF object".into(),
        ));
    }
    ensure_bpffs(bpffs)?;
    let features = probe_features();
    let has_set_retval = u8::from(features.set_retval);
    if has_set_retval == 0 {
        tracing::warn!(
            "kernel older than 5.18 (no bpf_set_retval for cgroup programs): connects to services \
             without endpoints fail with EPERM instead of ECONNREFUSED, and dropped ones with EPERM \
             instead of ETIMEDOUT"
        );
    }
    let host_netns_cookie = own_netns_cookie().unwrap_or_else(|e| {
        tracing::warn!(
            error = %e,
            "no network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14): node ports on \
             127.0.0.1 and ::1 are translated in pods too, not only on the host"
        );
        0
    });
    let ifindex_only_tx_devices = !features.devmap_program_values;
    let needed = pinned_layouts(conntrack_size, ifindex_only_tx_devices)?;
    unpin_incompatible(bpffs, &needed);
    unpin_unknown(bpffs, &needed);
    if ifindex_only_tx_devices {
        pin_ifindex_only_tx_devices(bpffs)?;
    }
    super::names::ensure_pinned(bpffs)?;
    EbpfLoader::new()
        .default_map_pin_directory(bpffs)
        .map_max_entries(svclb_common::maps::CONNTRACK4, conntrack_size)
        .map_max_entries(svclb_common::maps::CONNTRACK6, conntrack_size)
        .override_global(globals::HAS_SET_RETVAL, &has_set_retval, true)
        .override_global(globals::HOST_NETNS_COOKIE, &host_netns_cookie, true)
        .override_global(globals::UDP_TIMEOUT_NS, &nanos(udp.idle), true)
        .override_global(globals::UDP_STREAM_TIMEOUT_NS, &nanos(udp.stream), true)
        .load(OBJECT)
        .map_err(|e| DataplaneError::Load(chain(&e)))
}

/// What the loader finds out about the kernel, and so which fallbacks it
/// uses (for `svclb status`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelFeatures {
    pub kernel: String,
    /// bpf_set_retval in cgroup programs (5.18+).
    pub set_retval: bool,
    /// SO_NETNS_COOKIE (5.14+).
    pub netns_cookie: bool,
    /// Generic XDP accepts devmaps whose values may carry programs (5.15+).
    pub devmap_program_values: bool,
    /// BPF_MAP_LOOKUP_BATCH, used by the conntrack sweeper (5.6+).
    pub batch_lookup: bool,
}

impl KernelFeatures {
    /// Each feature: (name, available, what svclb does without it).
    pub fn list(&self) -> [(&'static str, bool, &'static str); 4] {
        [
            (
                "bpf_set_retval",
                self.set_retval,
                "connects to services without endpoints fail with EPERM instead of ECONNREFUSED",
            ),
            (
                "netns_cookie",
                self.netns_cookie,
                "node ports on 127.0.0.1 and ::1 are translated in pods too",
            ),
            (
                "devmap_program_values",
                self.devmap_program_values,
                "XDP's device map holds ifindexes only (for generic XDP)",
            ),
            (
                "map_lookup_batch",
                self.batch_lookup,
                "the conntrack sweeper fails: expired flows stay until the LRU evicts them",
            ),
        ]
    }
}

/// Probe the running kernel as [`load`] does.
pub fn probe_features() -> KernelFeatures {
    use aya::util::KernelVersion;
    let version = KernelVersion::current().ok();
    let at_least = |a, b| version.is_some_and(|v| v >= KernelVersion::new(a, b, 0));
    KernelFeatures {
        kernel: version.map_or("unknown".into(), |v| format!("{v}")),
        set_retval: at_least(5, 18),
        netns_cookie: own_netns_cookie().is_ok(),
        // An unknown version is taken as new enough, as before.
        devmap_program_values: version.is_none() || at_least(5, 15),
        batch_lookup: at_least(5, 6),
    }
}

fn nanos(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The cookie of this process's network namespace (the host's, for the
/// agent), from SO_NETNS_COOKIE (Linux 5.14+).
pub(crate) fn own_netns_cookie() -> std::io::Result<u64> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: socket(2) has no memory arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The eBPF object loaded, with its maps pinned in (or reused from) the
/// pin directory, and the maps userspace writes taken from it; no program
/// is loaded into the kernel or attached yet. [`super::Dataplane::start`]
/// attaches the programs; the BPF_PROG_RUN harness of svclb-tests runs them
/// unattached, over the same maps.
pub struct Unattached {
    pub ebpf: Ebpf,
    /// Adopted what the maps held.
    pub writer: Writer<KernelMaps>,
    pub xdp_config: Array<MapData, XdpConfig>,
    /// The devices XDP may redirect to.
    pub tx_devices: DevMapHash<MapData>,
}

/// [`load`], then take the maps userspace writes.
pub fn load_unattached(bpffs: &Path, conntrack_size: u32) -> Result<Unattached, DataplaneError> {
    load_unattached_with(bpffs, conntrack_size, UdpTimeouts::default())
}

/// [`load_with`], then take the maps userspace writes.
pub fn load_unattached_with(
    bpffs: &Path,
    conntrack_size: u32,
    udp: UdpTimeouts,
) -> Result<Unattached, DataplaneError> {
    use svclb_common::maps::*;
    let mut ebpf = load_with(bpffs, conntrack_size, udp)?;
    let mut take = |name| take_map(&mut ebpf, name);
    let maps = KernelMaps::new(WriterMaps {
        services: take(SERVICES)?,
        backends: take(BACKENDS)?,
        rev_nat: take(REV_NAT)?,
        affinity_match: take(AFFINITY_MATCH)?,
        maglev: take(MAGLEV)?,
        source_ranges: take(SOURCE_RANGES)?,
        backends_epoch: take(BACKENDS_EPOCH)?,
    })?;
    let xdp_config = take_typed(&mut ebpf, XDP_CONFIG)?;
    let tx_devices = take_typed(&mut ebpf, TX_DEVICES)?;
    let writer = Writer::adopt(maps, Capacity::default())?;
    Ok(Unattached {
        ebpf,
        writer,
        xdp_config,
        tx_devices,
    })
}

/// Take map `name` out of the loaded object.
pub fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DataplaneError> {
    ebpf.take_map(name)
        .ok_or_else(|| DataplaneError::Load(format!("map {name} missing from the object")))
}

/// [`take_map`] as its typed view (`HashMap`, `Array`, ...).
pub fn take_typed<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(take_map(ebpf, name)?).map_err(|source| DataplaneError::Map {
        map: name,
        op: "open",
        source,
    })
}

/// Let XDP redirect to the device `ifindex`.
pub fn add_tx_device(
    tx_devices: &mut DevMapHash<MapData>,
    ifindex: u32,
) -> Result<(), DataplaneError> {
    tx_devices
        .insert(ifindex, ifindex, None, 0)
        .map_err(|e| DataplaneError::Attach {
            program: XDP_PROGRAM,
            reason: format!("{} update: {e}", svclb_common::maps::TX_DEVICES),
        })
}

/// What this version creates for one map it pins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: String,
    /// `bpf_map_type`
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The layout of every map the object pins by name, as the loader creates
/// it: conntrack maps sized `conntrack_size`, and devmap values the ifindex
/// alone when `ifindex_only_tx_devices` (else aya's 8-byte values).
pub fn pinned_layouts(
    conntrack_size: u32,
    ifindex_only_tx_devices: bool,
) -> Result<Vec<MapLayout>, DataplaneError> {
    use aya_obj::generated::bpf_map_type::{BPF_MAP_TYPE_DEVMAP, BPF_MAP_TYPE_DEVMAP_HASH};
    use svclb_common::maps::{CONNTRACK4, CONNTRACK6};
    let object = aya_obj::Object::parse(OBJECT).map_err(|e| DataplaneError::Load(chain(&e)))?;
    let mut layouts: Vec<MapLayout> = (object.maps.iter())
        .filter(|(_, m)| m.pinning() == aya_obj::maps::PinningType::ByName)
        .map(|(name, m)| {
            let mut layout = MapLayout {
                name: name.clone(),
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            if [CONNTRACK4, CONNTRACK6].contains(&name.as_str()) {
                layout.max_entries = conntrack_size;
            }
            let devmap = [BPF_MAP_TYPE_DEVMAP as u32, BPF_MAP_TYPE_DEVMAP_HASH as u32];
            if devmap.contains(&layout.map_type) {
                layout.value_size = if ifindex_only_tx_devices { 4 } else { 8 };
            }
            layout
        })
        .collect();
    layouts.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(layouts)
}

/// Flags the kernel adds itself (BPF_F_RDONLY_PROG on devmaps, whose
/// lookups return the device's ifindex in place).
const KERNEL_SET_FLAGS: u32 = 1 << 7;

/// How `pinned` differs from `needed`, e.g. "value size 24, this version
/// needs 28"; empty when it fits.
fn differences(pinned: &aya::maps::MapInfo, needed: &MapLayout) -> Vec<String> {
    let map_type = |t: u32| {
        aya_obj::generated::bpf_map_type::try_from(t)
            .ok()
            .and_then(|t| aya::maps::MapType::try_from(t).ok())
    };
    let mut out = Vec::new();
    let (have, want) = (pinned.map_type().ok(), map_type(needed.map_type));
    if have.is_none() || have != want {
        out.push(format!(
            "type {have:?}, this version needs {want:?}",
            have = have.map_or("unknown".into(), |t| format!("{t:?}")),
            want = want.map_or("unknown".into(), |t| format!("{t:?}")),
        ));
    }
    for (what, have, want) in [
        ("key size", pinned.key_size(), needed.key_size),
        ("value size", pinned.value_size(), needed.value_size),
        ("max entries", pinned.max_entries(), needed.max_entries),
        (
            "flags",
            pinned.map_flags() & !KERNEL_SET_FLAGS,
            needed.flags,
        ),
    ] {
        if have != want {
            out.push(format!("{what} {have}, this version needs {want}"));
        }
    }
    out
}

/// Maps whose entries name backends or rev-NAT ids by number, and the
/// maps those ids are defined in: when one of the latter is recreated the
/// ids start over, so every map holding ids goes with it.
const ID_HOLDERS: [&str; 11] = {
    use svclb_common::maps::*;
    [
        super::names::FRONTEND_NAMES,
        SERVICES,
        BACKENDS,
        REV_NAT,
        AFFINITY_MATCH,
        MAGLEV,
        AFFINITY,
        UDP_FLOWS,
        SOCK_REV_NAT,
        CONNTRACK4,
        CONNTRACK6,
    ]
};
const ID_DEFINERS: [&str; 2] = [svclb_common::maps::BACKENDS, svclb_common::maps::REV_NAT];

/// What recreating a map costs while the agent starts.
fn what_is_lost(name: &str) -> &'static str {
    use svclb_common::maps::*;
    match name {
        CONNTRACK4 | CONNTRACK6 => {
            "established external (XDP) connections through this node are picked anew or reset"
        }
        SOCK_REV_NAT => "replies to UDP sockets opened before show the backend's address",
        AFFINITY => "session affinity starts over",
        UDP_FLOWS => "unconnected UDP sockets pick their backends anew",
        STATS => "the external path's counters start from zero",
        super::names::FRONTEND_NAMES => "`svclb maps dump` names no Services until the first sync",
        _ => "the agent refills it on its first sync; until then new connections to the services it held are not translated",
    }
}

/// Unpin every map pinned in `bpffs` that this version would not create as
/// it is (another svclb version's, another --conntrack-size): aya would
/// reuse it silently and the programs would misread it. The running
/// programs keep the old map until they are replaced; the loader then
/// creates and pins a new, empty one.
fn unpin_incompatible(bpffs: &Path, needed: &[MapLayout]) {
    let mut unpinned = Vec::new();
    for layout in needed {
        let path = super::map_path(bpffs, &layout.name);
        if !path.exists() {
            continue;
        }
        let diff = match aya::maps::MapData::from_pin(&path).and_then(|m| m.info()) {
            Ok(info) => differences(&info, layout),
            Err(e) => vec![format!("unreadable: {}", chain(&e))],
        };
        if diff.is_empty() {
            continue;
        }
        tracing::warn!(
            map = layout.name,
            "{}: {}; pinned by another svclb version or configuration: recreating it empty ({})",
            layout.name,
            diff.join(", "),
            what_is_lost(&layout.name),
        );
        let _ = fs::remove_file(&path);
        unpinned.push(layout.name.as_str());
    }
    if !unpinned.iter().any(|name| ID_DEFINERS.contains(name)) {
        return;
    }
    for name in ID_HOLDERS.iter().filter(|name| !unpinned.contains(name)) {
        let path = super::map_path(bpffs, name);
        if fs::remove_file(&path).is_ok() {
            tracing::warn!(
                map = name,
                "{name}: recreating it empty too, its backend and rev-NAT ids refer to a recreated map ({})",
                what_is_lost(name),
            );
        }
    }
}

/// Unpin maps of earlier versions that this one no longer has (svclb's
/// names start with SVCLB_). The programs holding them keep them until they
/// are replaced; nothing reads them after that.
fn unpin_unknown(bpffs: &Path, needed: &[MapLayout]) {
    let Ok(dir) = fs::read_dir(bpffs) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let userspace_only = name == super::names::FRONTEND_NAMES;
        if !name.starts_with("SVCLB_") || userspace_only || needed.iter().any(|l| l.name == name) {
            continue;
        }
        if fs::remove_file(entry.path()).is_ok() {
            tracing::warn!(
                map = name,
                "{name}: not used by this svclb version; unpinned"
            );
        }
    }
}

/// Before Linux 5.15, generic (SKB-mode) XDP refuses a program that uses a
/// devmap whose entries can carry a program of their own, i.e. one with
/// 8-byte `struct bpf_devmap_val` values: `generic_xdp_install` returns
/// EINVAL (without an extended error) when `dev_map_can_have_prog` holds for
/// any map the program uses. aya creates devmaps with those values on every
/// kernel that has them (5.8+), so on 5.8-5.14 the XDP program could not
/// attach to veth (generic mode) at all. With values that are only the
/// ifindex (the layout before 5.8) it can.
///
/// aya's loader reuses a pinned map as it is, so pin such a map at the
/// place where it looks. aya's `DevMapHash` still writes 8-byte values into
/// it; the kernel copies only the map's value size, the leading ifindex,
/// and svclb stores no programs in the devmap. The XDP program reads only
/// the ifindex (`get_ifindex`).
fn pin_ifindex_only_tx_devices(bpffs: &Path) -> Result<(), DataplaneError> {
    use aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_DEVMAP_HASH;
    use aya_obj::maps::{bpf_map_def, LegacyMap, PinningType};
    use svclb_common::maps::{TX_DEVICES, TX_DEVICES_MAX_ENTRIES};

    const IFINDEX_SIZE: u32 = 4;
    let path = super::map_path(bpffs, TX_DEVICES);
    if let Ok(info) = aya::maps::MapData::from_pin(&path).and_then(|m| m.info()) {
        if info.value_size() == IFINDEX_SIZE {
            return Ok(());
        }
        tracing::warn!(
            map = TX_DEVICES,
            "replacing a pinned devmap with program-capable values (generic XDP rejects it before 5.15)"
        );
        let _ = fs::remove_file(&path);
    }
    let def = aya_obj::Map::Legacy(LegacyMap {
        def: bpf_map_def {
            map_type: BPF_MAP_TYPE_DEVMAP_HASH as u32,
            key_size: 4,
            value_size: IFINDEX_SIZE,
            max_entries: TX_DEVICES_MAX_ENTRIES,
            map_flags: 0,
            id: 0,
            pinning: PinningType::ByName,
        },
        inner_def: None,
        section_index: 0,
        section_kind: aya_obj::EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    });
    let map = aya::maps::MapData::create(def, TX_DEVICES, None)
        .map_err(|e| DataplaneError::Load(format!("creating {TX_DEVICES}: {}", chain(&e))))?;
    map.pin(&path).map_err(|e| DataplaneError::Bpffs {
        path: path.clone(),
        reason: format!("pin {TX_DEVICES}: {}", chain(&e)),
    })
}

/// An error with its sources, so syscall errors show their errno.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Attach every socket program to `cgroup` and pin the links, replacing the
/// links a previous agent pinned.
pub fn attach(ebpf: &mut Ebpf, cgroup: &Path, bpffs: &Path) -> Result<(), DataplaneError> {
    let cg = File::open(cgroup).map_err(|e| DataplaneError::Cgroup {
        path: cgroup.to_owned(),
        source: e,
    })?;
    for name in PROGRAMS {
        let attach_err = |e: &dyn std::error::Error| DataplaneError::Attach {
            program: name,
            reason: chain(e),
        };
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| DataplaneError::Attach {
                program: name,
                reason: "missing from the object".into(),
            })?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| attach_err(&e))?;
        prog.load().map_err(|e| attach_err(&e))?;
        // Link-based cgroup attachments always coexist with other programs;
        // the kernel rejects attach flags for them, so the mode must be Single.
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| attach_err(&e))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| attach_err(&e))?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| attach_err(&e))?;
        replace_pinned_link(&link_path(bpffs, name), link).map_err(|reason| {
            DataplaneError::Attach {
                program: name,
                reason,
            }
        })?;
    }
    Ok(())
}

pub fn link_path(bpffs: &Path, program: &str) -> PathBuf {
    bpffs.join("links").join(program)
}

/// Pin `new` at `path`; the link pinned there before (if any) is released
/// only after the new one is attached and pinned.
fn replace_pinned_link(path: &Path, new: FdLink) -> Result<(), String> {
    let old = if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(pinned) => Some(
                pinned
                    .unpin()
                    .map_err(|e| format!("unpin {}: {}", path.display(), chain(&e)))?,
            ),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = chain(&e), "removing unusable pinned link");
                fs::remove_file(path).map_err(|e| format!("remove {}: {e}", path.display()))?;
                None
            }
        }
    } else {
        None
    };
    new.pin(path)
        .map_err(|e| format!("pin {}: {}", path.display(), chain(&e)))?;
    // Dropping the last reference to the old link detaches the old program.
    drop(old);
    Ok(())
}

/// How XDP attaches to a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpModeChoice {
    /// Native (driver) mode, except on veth, where XDP_TX and redirects only
    /// work when the peer runs XDP too: generic mode there.
    Auto,
    Native,
    Generic,
}

/// tc filter priority and handle of the egress program (fixed, so a new
/// agent finds and replaces the old filter).
const TC_PRIORITY: u16 = 0x5c1b;
const TC_HANDLE: TcHandle = TcHandle::new(0, 1);

/// Attach the XDP program and the tc egress program to each device, pinning
/// the XDP links (replaced in place by the next agent) and leaving the tc
/// filters attached (replaced by priority and handle). Devices attached by
/// an earlier agent but no longer listed are detached. Returns the XDP mode
/// used per device.
pub fn attach_external(
    ebpf: &mut Ebpf,
    devices: &[String],
    mode: XdpModeChoice,
    bpffs: &Path,
) -> Result<Vec<(String, &'static str)>, DataplaneError> {
    let err = |program: &'static str| {
        move |e: &dyn std::error::Error| DataplaneError::Attach {
            program,
            reason: chain(e),
        }
    };
    detach_stale(bpffs, devices);
    if devices.is_empty() {
        return Ok(Vec::new());
    }
    let mut modes = Vec::new();
    {
        let prog: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or_else(|| DataplaneError::Load(format!("{XDP_PROGRAM} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| err(XDP_PROGRAM)(&e))?;
        prog.load().map_err(|e| err(XDP_PROGRAM)(&e))?;
        for dev in devices {
            let used =
                attach_xdp(prog, dev, mode, bpffs).map_err(|reason| DataplaneError::Attach {
                    program: XDP_PROGRAM,
                    reason: format!("device {dev}: {reason}"),
                })?;
            modes.push((dev.clone(), used));
        }
    }
    let prog: &mut SchedClassifier = ebpf
        .program_mut(TC_PROGRAM)
        .ok_or_else(|| DataplaneError::Load(format!("{TC_PROGRAM} missing")))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| err(TC_PROGRAM)(&e))?;
    prog.load().map_err(|e| err(TC_PROGRAM)(&e))?;
    for dev in devices {
        attach_tc(prog, dev, bpffs).map_err(|reason| DataplaneError::Attach {
            program: TC_PROGRAM,
            reason: format!("device {dev}: {reason}"),
        })?;
    }
    Ok(modes)
}

pub const XDP_PROGRAM: &str = "svclb_xdp";
pub const TC_PROGRAM: &str = "svclb_tc_egress";

fn attach_xdp(
    prog: &mut Xdp,
    dev: &str,
    mode: XdpModeChoice,
    bpffs: &Path,
) -> Result<&'static str, String> {
    let path = bpffs.join("links").join(format!("xdp-{dev}"));
    if let Ok(pinned) = PinnedLink::from_pin(&path) {
        // Same device, same mode: swap the program under the existing link.
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| chain(&e))?;
        prog.attach_to_link(link).map_err(|e| chain(&e))?;
        return Ok("kept from the previous agent");
    }
    let tries: &[(XdpMode, &'static str)] = match mode {
        XdpModeChoice::Native => &[(XdpMode::Driver, "native")],
        XdpModeChoice::Generic => &[(XdpMode::Skb, "generic")],
        XdpModeChoice::Auto if driver_name(dev).as_deref() == Some("veth") => {
            &[(XdpMode::Skb, "generic (veth)")]
        }
        XdpModeChoice::Auto => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
    };
    let mut last = String::new();
    for &(m, name) in tries {
        match prog.attach(dev, m) {
            Ok(id) => {
                let link: FdLink = prog
                    .take_link(id)
                    .map_err(|e| chain(&e))?
                    .try_into()
                    .map_err(|e: aya::programs::links::LinkError| chain(&e))?;
                link.pin(&path)
                    .map_err(|e| format!("pin {}: {}", path.display(), chain(&e)))?;
                return Ok(name);
            }
            Err(e) => last = chain(&e),
        }
    }
    Err(last)
}

fn attach_tc(prog: &mut SchedClassifier, dev: &str, bpffs: &Path) -> Result<(), String> {
    // Fails harmlessly when the qdisc exists; otherwise its error explains
    // a failing attach (say, no sch_ingress module). Recorded when svclb
    // created it, so `svclb cleanup` removes it and only it.
    let qdisc = super::undo::add_clsact(bpffs, dev).err();
    let options = NlOptions {
        priority: TC_PRIORITY,
        handle: TC_HANDLE,
        ..NlOptions::default()
    };
    let id = match prog.attach_with_options(
        dev,
        TcAttachType::Egress,
        TcAttachOptions::Netlink(options),
    ) {
        Ok(id) => id,
        Err(_) => {
            // An earlier agent's filter: replace its program atomically.
            let old = SchedClassifierLink::attached(
                dev,
                TcAttachType::Egress,
                TC_PRIORITY,
                TC_HANDLE,
                None,
            )
            .map_err(|e| e.to_string())?;
            prog.attach_to_link(old).map_err(|e| match &qdisc {
                Some(q) => format!("{} (adding the clsact qdisc: {q})", chain(&e)),
                None => chain(&e),
            })?
        }
    };
    let link = prog.take_link(id).map_err(|e| chain(&e))?;
    // Dropping the link would detach the filter; it must outlive the agent.
    std::mem::forget(link);
    // bpffs holds no plain files: the pinned program marks the device as
    // ours, for `detach_stale`.
    let marker = bpffs.join("links").join(format!("tc-{dev}"));
    let _ = fs::remove_file(&marker);
    prog.pin(&marker)
        .map_err(|e| format!("pin {}: {}", marker.display(), chain(&e)))?;
    Ok(())
}

/// Detach what an earlier agent attached to devices not listed now.
fn detach_stale(bpffs: &Path, devices: &[String]) {
    let Ok(dir) = fs::read_dir(bpffs.join("links")) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let (kind, dev) = match name.split_once('-') {
            Some((k @ ("xdp" | "tc"), dev)) => (k, dev.to_string()),
            _ => continue,
        };
        if devices.contains(&dev) {
            continue;
        }
        tracing::info!(device = %dev, program = kind, "detaching from a device no longer in --devices");
        if kind == "tc" {
            if let Ok(link) = SchedClassifierLink::attached(
                &dev,
                TcAttachType::Egress,
                TC_PRIORITY,
                TC_HANDLE,
                None,
            ) {
                drop(link); // dropping an attached() link detaches the filter
            }
        }
        // Removing the pin releases the XDP link (and so detaches it).
        let _ = fs::remove_file(entry.path());
    }
    // The clsact qdiscs svclb added and the sysctls it set there.
    let undone = crate::cleanup::undo_other_devices(bpffs, devices);
    for line in undone.removed.iter().chain(&undone.notes) {
        tracing::info!("device no longer in --devices: {line}");
    }
    for line in &undone.errors {
        tracing::warn!("device no longer in --devices: {line}");
    }
}

/// The device's driver name (ETHTOOL_GDRVINFO), e.g. "veth".
fn driver_name(dev: &str) -> Option<String> {
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        data: *mut DrvInfo,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GDRVINFO: u32 = 0x3;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = IfReq {
        name: [0; 16],
        data: &mut info,
        _pad: [0; 16],
    };
    let bytes = dev.as_bytes();
    if bytes.len() >= 16 {
        return None;
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a datagram socket for the ioctl, closed below; the ioctl
    // writes only into `info` (through `req.data`), which outlives the call.
    let ok = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        if fd < 0 {
            return None;
        }
        // `as _`: the request is a c_ulong in glibc, a c_int in musl.
        let rc = libc::ioctl(fd, SIOCETHTOOL as _, &mut req);
        libc::close(fd);
        rc == 0
    };
    if !ok {
        return None;
    }
    let end = info.driver.iter().position(|&b| b == 0).unwrap_or(32);
    Some(String::from_utf8_lossy(&info.driver[..end]).into_owned())
}
