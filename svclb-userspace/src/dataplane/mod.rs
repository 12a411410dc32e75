//! The dataplane: loads and attaches the eBPF programs and keeps their maps
//! equal to the model's desired state.
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aya::Ebpf;

use crate::model::{Frontend, FrontendKey, ServiceId};

pub mod abi;
mod barrier;
pub mod conntrack;
pub mod devconf;
pub mod drift;
mod kernel;
pub mod loader;
pub mod maglev;
pub mod mounts;
pub mod names;
pub mod snat;
pub mod sockets;
pub mod undo;
mod writer;

pub use kernel::{entries, open_pinned, KernelMaps, WriterMaps};
pub use loader::XdpModeChoice;
pub use writer::{ApplyStats, Capacity, MapContents, MapOps, SourceRange, Writer};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("bpffs at {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("loading the eBPF object: {0}")]
    Load(String),
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("attaching {program}: {reason}")]
    Attach {
        program: &'static str,
        reason: String,
    },
    #[error("map {map}: {op} failed: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        source: aya::maps::MapError,
    },
    #[error("RCU barrier (map-of-maps update) failed: {0}")]
    Barrier(std::io::Error),
    #[error("asking the routing table for the SNAT source: {0}")]
    Routes(std::io::Error),
    #[error(
        "service {service}: maps full, not applied (services map {services_needed}/{services_capacity} entries, backends map {backends_needed}/{backends_capacity}, Maglev map {maglev_needed}/{maglev_capacity})"
    )]
    Full {
        service: ServiceId,
        services_needed: usize,
        services_capacity: usize,
        backends_needed: usize,
        backends_capacity: usize,
        maglev_needed: usize,
        maglev_capacity: usize,
    },
    #[error("service {service}: frontend {frontend} already belongs to service {owner}; skipped")]
    Conflict {
        service: ServiceId,
        frontend: FrontendKey,
        owner: ServiceId,
    },
}

/// The loaded programs and the writer for their maps.
pub struct Dataplane {
    pub writer: Writer<KernelMaps>,
    xdp_config: aya::maps::Array<aya::maps::MapData, svclb_common::XdpConfig>,
    snat_ports: (u16, u16),
    /// The SNAT sources last written (IPv4, IPv6).
    snat_sources: Option<(Option<IpAddr>, Option<IpAddr>)>,
    /// --devices given: external frontends are served.
    external: bool,
    initial_sync_done: bool,
    /// What each service's last apply wanted in the maps (shared with
    /// /debug/svclb/desired: copied on write).
    wanted: Arc<drift::Wanted>,
    /// Backends that left socket-scope UDP frontends in this batch: their
    /// connected sockets are destroyed after the batch.
    gone: Vec<sockets::Gone>,
    terminator: sockets::Terminator,
    /// Each frontend's Service, for operators (see `names`).
    names: names::Names,
    /// The XDP mode used on each device.
    xdp_modes: Vec<(String, &'static str)>,
    // Keeps the programs loaded while the agent runs (the pinned links keep
    // them attached after it exits).
    _ebpf: Ebpf,
}

pub struct DataplaneConfig {
    pub bpffs: PathBuf,
    pub cgroup: PathBuf,
    /// External devices for XDP and tc (none: socket hooks only).
    pub devices: Vec<String>,
    pub xdp_mode: XdpModeChoice,
    pub maglev_table_size: u32,
    pub conntrack_size: u32,
    pub udp_timeouts: loader::UdpTimeouts,
    /// SNAT source ports for remote backends, inclusive.
    pub snat_ports: (u16, u16),
    /// Share of map writes and deletes to fail on purpose (soak tests).
    pub inject_map_faults: f64,
}

impl DataplaneConfig {
    /// Socket hooks only (no devices), default sizes.
    pub fn socket_only(bpffs: PathBuf, cgroup: PathBuf) -> Self {
        DataplaneConfig {
            bpffs,
            cgroup,
            devices: Vec::new(),
            xdp_mode: XdpModeChoice::Auto,
            maglev_table_size: maglev::DEFAULT_TABLE_SIZE,
            conntrack_size: svclb_common::maps::CONNTRACK_MAX_ENTRIES,
            udp_timeouts: loader::UdpTimeouts::default(),
            snat_ports: (61000, 65535),
            inject_map_faults: 0.0,
        }
    }
}

impl Dataplane {
    /// Load (reusing pinned maps), adopt what the maps hold, and attach.
    pub fn start(config: &DataplaneConfig) -> Result<Self, DataplaneError> {
        let loader::Unattached {
            mut ebpf,
            mut writer,
            xdp_config,
            mut tx_devices,
        } = loader::load_unattached_with(
            &config.bpffs,
            config.conntrack_size,
            config.udp_timeouts,
        )?;
        writer.set_maglev_size(config.maglev_table_size);
        // Only after adopting: a failed start is a crash loop, not the
        // retries the faults are there to exercise.
        writer.maps_mut().inject_faults(config.inject_map_faults);
        loader::attach(&mut ebpf, &config.cgroup, &config.bpffs)?;
        let modes =
            loader::attach_external(&mut ebpf, &config.devices, config.xdp_mode, &config.bpffs)?;
        for (device, mode) in &modes {
            tracing::info!(device, mode, "XDP attached");
            // Translated packets XDP can't forward itself (neighbour not yet
            // resolved) go to the stack; with SNAT their source is this
            // node's own address, which the stack drops as martian unless
            // the device accepts local sources. Through rtnetlink (in a
            // container /proc/sys is read-only); the original value is
            // recorded for `svclb cleanup`.
            let knob = format!("net/ipv4/conf/{device}/accept_local");
            if let Err(e) = undo::set_sysctl(&config.bpffs, &knob, "1") {
                tracing::warn!(device, error = %e, "setting accept_local; SNATed packets may be dropped until neighbours resolve");
            }
        }
        // The devices XDP may redirect to: exactly the current ones.
        let old: Vec<u32> = tx_devices.keys().filter_map(Result::ok).collect();
        let mut current = Vec::new();
        for dev in &config.devices {
            let index = nix_ifindex(dev).ok_or_else(|| DataplaneError::Attach {
                program: loader::XDP_PROGRAM,
                reason: format!("device {dev} not found"),
            })?;
            loader::add_tx_device(&mut tx_devices, index)?;
            current.push(index);
        }
        for index in old.into_iter().filter(|i| !current.contains(i)) {
            let _ = tx_devices.remove(index);
        }
        Ok(Dataplane {
            writer,
            xdp_config,
            snat_ports: config.snat_ports,
            snat_sources: None,
            external: !config.devices.is_empty(),
            initial_sync_done: false,
            wanted: Arc::default(),
            gone: Vec::new(),
            terminator: sockets::Terminator::start(map_path(
                &config.bpffs,
                svclb_common::maps::SOCK_REV_NAT,
            )),
            names: names::Names::open(&config.bpffs),
            xdp_modes: modes,
            _ebpf: ebpf,
        })
    }

    /// Choose the SNAT sources again (see `snat.rs`): per family, the
    /// source of the route toward the remote backends; without remote
    /// backends, the first of the Node's `node_addresses` that is on this
    /// node. Written when it changed; returns the choice when it did
    /// (with its warnings), for the log.
    pub fn update_snat_sources(
        &mut self,
        node_addresses: &[IpAddr],
    ) -> Result<Option<snat::Choice>, DataplaneError> {
        if !self.external {
            return Ok(None);
        }
        let probes = snat::probes(&self.writer.remote_backend_addrs());
        let answers = snat::route_answers(&probes).map_err(DataplaneError::Routes)?;
        let local = snat::local_addresses().map_err(DataplaneError::Routes)?;
        let choice = snat::choose(&answers, &local, node_addresses);
        let sources = (choice.v4, choice.v6);
        if self.snat_sources == Some(sources) {
            return Ok(None);
        }
        let addresses: Vec<IpAddr> = [choice.v4, choice.v6].into_iter().flatten().collect();
        write_xdp_config(&mut self.xdp_config, &addresses, self.snat_ports)?;
        self.snat_sources = Some(sources);
        Ok(Some(choice))
    }

    /// Every service has been applied once: remove what nobody claimed.
    pub fn finish_initial_sync(&mut self) -> Result<ApplyStats, DataplaneError> {
        self.initial_sync_done = true;
        self.prune_unclaimed()
    }

    pub fn initial_sync_done(&self) -> bool {
        self.initial_sync_done
    }

    /// Delete what the applies since the last flush left behind (after one
    /// RCU grace period: call once per batch).
    /// Also hands the batch's gone backends to the socket thread (the
    /// change is live already: a reconnect gets a remaining backend).
    pub fn flush(&mut self) -> Result<usize, DataplaneError> {
        self.terminator.terminate(std::mem::take(&mut self.gone));
        self.writer.flush()
    }

    /// Connected UDP sockets destroyed so far (svclb_sockets_destroyed_total).
    pub fn sockets_destroyed(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.terminator.destroyed()
    }

    /// (service map entries, backends) in use.
    pub fn usage(&self) -> (usize, usize) {
        self.writer.usage()
    }

    /// Without --devices nothing reads external frontends: they are not
    /// written (their Maglev tables would only take memory).
    pub fn apply(
        &mut self,
        id: &ServiceId,
        frontends: &[Frontend],
    ) -> Result<ApplyStats, DataplaneError> {
        let frontends: Vec<Frontend> = frontends
            .iter()
            .filter(|f| self.external || f.key.scope == crate::model::Scope::Socket)
            .cloned()
            .collect();
        let before = self.writer.owned(id);
        let result = self.writer.apply(id, &frontends);
        let after = self.writer.owned(id);
        self.names.update(id, &before, &after, &frontends);
        if let Some(old) = self.wanted.get(id) {
            self.gone.extend(sockets::gone_backends(old, &frontends));
        }
        self.record_wanted(id, frontends, &result);
        result
    }

    /// Remember what `id` wants in the maps: its frontends, less those the
    /// writer refused because another service holds them.
    fn record_wanted(
        &mut self,
        id: &ServiceId,
        mut frontends: Vec<Frontend>,
        result: &Result<ApplyStats, DataplaneError>,
    ) {
        if let Err(DataplaneError::Conflict { .. }) = result {
            frontends.retain(|f| self.writer.owner(&f.key).is_none_or(|o| o == id));
        }
        let unchanged = match self.wanted.get(id) {
            Some(old) => **old == frontends,
            None => frontends.is_empty(),
        };
        if unchanged {
            return;
        }
        let wanted = Arc::make_mut(&mut self.wanted);
        if frontends.is_empty() {
            wanted.remove(id);
        } else {
            wanted.insert(id.clone(), Arc::new(frontends));
        }
    }

    /// What the services' last applies wanted in the maps.
    pub fn wanted(&self) -> Arc<drift::Wanted> {
        self.wanted.clone()
    }

    /// Compare the maps with what the last applies wanted. When they
    /// differ, the writer rebuilds its bookkeeping from the maps before its
    /// next operation; applying every service and then
    /// [`Self::prune_unclaimed`] repairs them.
    pub fn check_drift(&mut self) -> Result<Vec<drift::Difference>, DataplaneError> {
        // The names too (not counted as drift): the applies that follow
        // a check rewrite what differs.
        self.names.reload();
        self.names.retain(&self.writer.rev_nat_ids());
        let observed = drift::Observed::read(self.writer.maps())?;
        let differences = drift::differences(&drift::wanted_frontends(&self.wanted), &observed);
        if !differences.is_empty() {
            let tables: Vec<FrontendKey> = differences
                .iter()
                .filter_map(drift::Difference::distrusts_table)
                .collect();
            self.writer.distrust(&tables);
        }
        Ok(differences)
    }

    /// Remove frontends no service owns (found in the maps, not written by
    /// this agent).
    pub fn prune_unclaimed(&mut self) -> Result<ApplyStats, DataplaneError> {
        let stats = self.writer.prune_unclaimed()?;
        self.names.retain(&self.writer.rev_nat_ids());
        Ok(stats)
    }

    /// The XDP mode used on each device (--devices).
    pub fn xdp_modes(&self) -> &[(String, &'static str)] {
        &self.xdp_modes
    }
}

/// The external path's settings: the first IPv4 and IPv6 of `addresses`
/// as SNAT sources, and the SNAT port range.
pub fn write_xdp_config(
    map: &mut aya::maps::Array<aya::maps::MapData, svclb_common::XdpConfig>,
    addresses: &[std::net::IpAddr],
    ports: (u16, u16),
) -> Result<(), DataplaneError> {
    let config = abi::xdp_config_to_abi(addresses, ports);
    map.set(0, config, 0).map_err(|source| DataplaneError::Map {
        map: svclb_common::maps::XDP_CONFIG,
        op: "update",
        source,
    })
}

fn nix_ifindex(dev: &str) -> Option<u32> {
    let name = std::ffi::CString::new(dev).ok()?;
    // SAFETY: a NUL-terminated string; if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The pin directory's map path for `name`.
pub fn map_path(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join(name)
}

/// What the external path's counters and conntrack map say, read from the
/// pins (any process can, while the agent runs or not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExternalStats {
    /// `svclb_common::stats` counters, summed over CPUs.
    pub counters: Vec<u64>,
    pub conntrack_entries: usize,
    pub conntrack_capacity: usize,
    /// From the agent's sweeper (None elsewhere, e.g. `svclb maps dump`).
    pub conntrack: Option<conntrack::ConntrackStats>,
}

impl ExternalStats {
    pub fn counter(&self, index: u32) -> u64 {
        self.counters.get(index as usize).copied().unwrap_or(0)
    }

    /// Conntrack entries the LRU map evicted to make room: every new flow
    /// adds two (its direction and the reply's); the sweeper removes
    /// expired flows' two and orphans one, SNAT port reuse a flow's two:
    /// created minus present minus those. An estimate: a resized map or a
    /// restarted agent (its sweep totals) resets.
    pub fn conntrack_evictions(&self) -> u64 {
        use svclb_common::stats::{CT_CREATED, SNAT_RECLAIMED};
        let swept = self.conntrack.as_ref().map_or(0, |c| {
            2 * c.expired_total.iter().sum::<u64>() + c.orphans_removed_total
        });
        (2 * self.counter(CT_CREATED))
            .saturating_sub(self.conntrack_entries as u64)
            .saturating_sub(swept + 2 * self.counter(SNAT_RECLAIMED))
    }
}

/// Entries in a conntrack map and its size.
fn count_conntrack<K: aya::Pod>(
    data: aya::maps::MapData,
    name: &'static str,
) -> Result<(usize, usize), DataplaneError> {
    let capacity = data.info().map(|i| i.max_entries() as usize).unwrap_or(0);
    let ct: aya::maps::HashMap<_, K, svclb_common::Flow> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(|source| {
            DataplaneError::Map {
                map: name,
                op: "open",
                source,
            }
        })?;
    Ok((ct.keys().filter(Result::is_ok).count(), capacity))
}

/// Read the counters and count conntrack entries (one syscall per entry:
/// call it off the agent's sync loop).
pub fn read_external_stats(bpffs: &Path) -> Result<ExternalStats, DataplaneError> {
    use aya::maps::{MapData, PerCpuArray};
    use svclb_common::maps::{CONNTRACK4, CONNTRACK6, STATS};
    let open = |name: &'static str| {
        MapData::from_pin(map_path(bpffs, name)).map_err(|source| DataplaneError::Map {
            map: name,
            op: "open",
            source,
        })
    };
    let map_err =
        |map: &'static str, op: &'static str| move |source| DataplaneError::Map { map, op, source };
    let stats: PerCpuArray<_, u64> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(open(STATS)?))
            .map_err(map_err(STATS, "open"))?;
    let counters = (0..svclb_common::stats::COUNT)
        .map(|i| {
            stats
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum::<u64>())
                .map_err(map_err(STATS, "read"))
        })
        .collect::<Result<Vec<u64>, _>>()?;
    // Entries and capacity of both conntrack maps (IPv4, IPv6).
    let (v4, cap4) = count_conntrack::<svclb_common::FlowKey4>(open(CONNTRACK4)?, CONNTRACK4)?;
    let (v6, cap6) = count_conntrack::<svclb_common::FlowKey>(open(CONNTRACK6)?, CONNTRACK6)?;
    let (entries, capacity) = (v4 + v6, cap4 + cap6);
    Ok(ExternalStats {
        counters,
        conntrack_entries: entries,
        conntrack_capacity: capacity,
        conntrack: None,
    })
}
