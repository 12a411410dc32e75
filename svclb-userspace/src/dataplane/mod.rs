//! The dataplane: loads and attaches the eBPF programs and keeps their maps
//! equal to the model's desired state.
use std::path::{Path, PathBuf};

use aya::Ebpf;

use crate::model::{Frontend, FrontendKey, ServiceId};

pub mod abi;
mod barrier;
mod kernel;
pub mod loader;
pub mod maglev;
mod writer;

pub use kernel::{entries, KernelMaps};
pub use writer::{ApplyStats, Capacity, MapContents, MapOps, Writer};

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
    #[error(
        "service {service}: maps full, not applied (services map {services_needed}/{services_capacity} entries, backends map {backends_needed}/{backends_capacity})"
    )]
    Full {
        service: ServiceId,
        services_needed: usize,
        services_capacity: usize,
        backends_needed: usize,
        backends_capacity: usize,
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
    initial_sync_done: bool,
    // Keeps the programs loaded while the agent runs (the pinned links keep
    // them attached after it exits).
    _ebpf: Ebpf,
}

pub struct DataplaneConfig {
    pub bpffs: PathBuf,
    pub cgroup: PathBuf,
}

impl Dataplane {
    /// Load (reusing pinned maps), adopt what the maps hold, and attach.
    pub fn start(config: &DataplaneConfig) -> Result<Self, DataplaneError> {
        let mut ebpf = loader::load(&config.bpffs)?;
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| DataplaneError::Load(format!("map {name} missing from the object")))
        };
        use svclb_common::maps::*;
        let maps = KernelMaps::new(
            take(&mut ebpf, SERVICES)?,
            take(&mut ebpf, BACKENDS)?,
            take(&mut ebpf, REV_NAT)?,
            take(&mut ebpf, AFFINITY_MATCH)?,
        )?;
        let writer = Writer::adopt(maps, Capacity::default())?;
        loader::attach(&mut ebpf, &config.cgroup, &config.bpffs)?;
        Ok(Dataplane {
            writer,
            initial_sync_done: false,
            _ebpf: ebpf,
        })
    }

    /// Every service has been applied once: remove what nobody claimed.
    pub fn finish_initial_sync(&mut self) -> Result<ApplyStats, DataplaneError> {
        self.initial_sync_done = true;
        self.writer.prune_unclaimed()
    }

    pub fn initial_sync_done(&self) -> bool {
        self.initial_sync_done
    }

    pub fn apply(
        &mut self,
        id: &ServiceId,
        frontends: &[Frontend],
    ) -> Result<ApplyStats, DataplaneError> {
        self.writer.apply(id, frontends)
    }
}

/// The pin directory's map path for `name`.
pub fn map_path(bpffs: &Path, name: &str) -> PathBuf {
    bpffs.join(name)
}
