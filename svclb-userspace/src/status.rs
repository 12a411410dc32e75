//! `svclb status` and `svclb version`: what runs on this node. The agent
//! serves its part (version, features, devices, last sync) on its metrics
//! address; the maps' usage is read from the pins, so most of it shows
//! while the agent is down too.
use std::os::fd::{AsFd, AsRawFd};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cli::Output;
use crate::dataplane::loader::{probe_features, KernelFeatures};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// `git rev-parse --short HEAD` at build time, or "unknown".
pub const COMMIT: &str = env!("SVCLB_GIT_COMMIT");
/// Where the metrics server serves [`AgentStatus`].
pub const STATUS_PATH: &str = "/debug/svclb/status";

/// "svclb 0.1.0 (commit abc1234)"
pub fn version_line() -> String {
    format!("svclb {VERSION} (commit {COMMIT})")
}

/// What the agent knows once started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub commit: String,
    pub node: String,
    pub bpffs: String,
    pub features: Option<KernelFeatures>,
    /// --devices and the XDP mode used on each; empty: socket hooks only.
    pub devices: Vec<DeviceMode>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMode {
    pub device: String,
    pub xdp_mode: String,
}

/// The agent's syncs (applying changes to the maps).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Unix time of the last sync that succeeded.
    pub last_success: Option<f64>,
    /// Unix time and result ("ok" or "failed") of the last sync.
    pub last_attempt: Option<f64>,
    pub last_result: Option<String>,
    /// The last reason a map update failed (retried), if any.
    pub last_error: Option<String>,
    pub retries_pending: Option<usize>,
}

/// /debug/svclb/status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    #[serde(flatten)]
    pub info: AgentInfo,
    pub sync: SyncStatus,
}

/// One pinned map's usage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapUsage {
    pub name: String,
    /// None for arrays, whose entries always exist.
    pub entries: Option<usize>,
    pub capacity: u32,
}

/// What `svclb status` prints.
#[derive(Debug, Serialize)]
pub struct Status {
    /// This command's own version.
    pub version: String,
    pub commit: String,
    /// The agent's status; None when it did not answer (`agent_error`).
    pub agent: Option<AgentStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_error: Option<String>,
    /// The agent's, or probed by this command when the agent is down (the
    /// same kernel).
    pub features: KernelFeatures,
    pub features_from: &'static str,
    /// The agent's, or the devices with XDP links pinned when it is down.
    pub devices: Vec<DeviceMode>,
    pub maps: Vec<MapUsage>,
}

pub fn read(bpffs: &Path, agent: &str) -> anyhow::Result<Status> {
    let (agent_status, agent_error) = match fetch(agent) {
        Ok(s) => (Some(s), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let (features, features_from) =
        match agent_status.as_ref().and_then(|a| a.info.features.clone()) {
            Some(f) => (f, "agent"),
            None => (probe_features(), "probed by this command"),
        };
    let devices = match &agent_status {
        Some(a) => a.info.devices.clone(),
        None => pinned_devices(bpffs),
    };
    Ok(Status {
        version: VERSION.into(),
        commit: COMMIT.into(),
        agent: agent_status,
        agent_error,
        features,
        features_from,
        devices,
        maps: map_usage(bpffs)?,
    })
}

fn fetch(agent: &str) -> anyhow::Result<AgentStatus> {
    let body = crate::verify::http_get(agent, STATUS_PATH)?;
    Ok(serde_json::from_str(&body)?)
}

/// Devices an agent attached XDP to (its pinned links), mode unknown.
fn pinned_devices(bpffs: &Path) -> Vec<DeviceMode> {
    let Ok(dir) = std::fs::read_dir(bpffs.join("links")) else {
        return Vec::new();
    };
    let mut out: Vec<DeviceMode> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            Some(DeviceMode {
                device: name.strip_prefix("xdp-")?.to_string(),
                xdp_mode: "unknown (agent unreachable)".into(),
            })
        })
        .collect();
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// Every svclb map pinned in `bpffs`: entries in use and capacity.
pub fn map_usage(bpffs: &Path) -> anyhow::Result<Vec<MapUsage>> {
    use anyhow::Context;
    use aya::maps::{MapData, MapType};
    let dir = std::fs::read_dir(bpffs)
        .with_context(|| format!("reading {} (is an agent using it?)", bpffs.display()))?;
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("SVCLB_") {
            continue;
        }
        let Ok(map) = MapData::from_pin(entry.path()) else {
            continue;
        };
        let Ok(info) = map.info() else { continue };
        let array = matches!(
            info.map_type(),
            Ok(MapType::Array | MapType::PerCpuArray | MapType::DevMap | MapType::ProgramArray)
        );
        let entries = if array {
            None
        } else {
            count_keys(map.fd().as_fd().as_raw_fd(), info.key_size() as usize).ok()
        };
        out.push(MapUsage {
            name,
            entries,
            capacity: info.max_entries(),
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Keys in a map, walked with BPF_MAP_GET_NEXT_KEY (one syscall each; the
/// map types svclb pins all support it).
fn count_keys(fd: std::os::fd::RawFd, key_size: usize) -> std::io::Result<usize> {
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        next_key: u64,
        flags: u64,
    }
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut count = 0;
    let mut first = true;
    loop {
        let mut attr = Attr {
            map_fd: fd as u32,
            _pad: 0,
            key: if first { 0 } else { key.as_ptr() as u64 },
            next_key: next.as_mut_ptr() as u64,
            flags: 0,
        };
        // SAFETY: a bpf_attr prefix for BPF_MAP_GET_NEXT_KEY; the kernel
        // reads `key_size` bytes at `key` and writes as many at `next_key`,
        // both live buffers of that size.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_GET_NEXT_KEY,
                &mut attr as *mut Attr,
                size_of::<Attr>() as libc::c_uint,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT) => Ok(count),
                _ => Err(e),
            };
        }
        count += 1;
        std::mem::swap(&mut key, &mut next);
        first = false;
    }
}

pub fn run(bpffs: &Path, agent: &str, output: Output) -> anyhow::Result<()> {
    let status = read(bpffs, agent)?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Table => print!("{}", table(&status, agent, unix_now())),
    }
    Ok(())
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// An RFC 3339 time and how long ago it was.
fn when(t: f64, now: f64) -> String {
    let at = k8s_openapi::jiff::Timestamp::from_millisecond((t * 1000.0) as i64).map_or_else(
        |_| format!("{t}"),
        |ts| {
            ts.round(k8s_openapi::jiff::Unit::Second)
                .map_or(ts.to_string(), |r| r.to_string())
        },
    );
    format!("{at} ({}s ago)", (now - t).max(0.0).round() as u64)
}

pub fn table(s: &Status, agent_url: &str, now: f64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "svclb:     {} (commit {}) (this command)",
        s.version, s.commit
    );
    match (&s.agent, &s.agent_error) {
        (Some(a), _) => {
            let _ = writeln!(
                out,
                "agent:     {} (commit {}) on node {}, {} (pins in {})",
                a.info.version, a.info.commit, a.info.node, agent_url, a.info.bpffs
            );
        }
        (None, e) => {
            let _ = writeln!(
                out,
                "agent:     unreachable at {agent_url}: {}",
                e.as_deref().unwrap_or("")
            );
        }
    }
    let _ = writeln!(
        out,
        "kernel:    {} (features {})",
        s.features.kernel, s.features_from
    );
    for (name, ok, fallback) in s.features.list() {
        if ok {
            let _ = writeln!(out, "  {name:<24} yes");
        } else {
            let _ = writeln!(out, "  {name:<24} no: {fallback}");
        }
    }
    if s.devices.is_empty() {
        let _ = writeln!(out, "devices:   none (connections from this node only)");
    } else {
        let devices: Vec<String> = (s.devices.iter())
            .map(|d| format!("{} (XDP {})", d.device, d.xdp_mode))
            .collect();
        let _ = writeln!(out, "devices:   {}", devices.join(", "));
    }
    match &s.agent {
        None => {
            let _ = writeln!(out, "last sync: unknown (agent unreachable)");
        }
        Some(a) => {
            let sync = &a.sync;
            let result = match (sync.last_attempt, sync.last_result.as_deref()) {
                (Some(t), Some(r)) => format!("{} {r}", when(t, now)),
                _ => "none yet".into(),
            };
            let _ = writeln!(out, "last sync: {result}");
            if sync.last_result.as_deref() != Some("ok") {
                if let Some(t) = sync.last_success {
                    let _ = writeln!(out, "  last success: {}", when(t, now));
                }
            }
            if let Some(n) = sync.retries_pending.filter(|n| *n > 0) {
                let _ = writeln!(out, "  waiting for a retry: {n}");
                if let Some(e) = &sync.last_error {
                    let _ = writeln!(out, "  last error: {e}");
                }
            }
        }
    }
    let _ = writeln!(out, "maps:");
    let _ = writeln!(
        out,
        "  {:<24} {:>9} {:>9} {:>6}",
        "NAME", "ENTRIES", "CAPACITY", "USE"
    );
    for m in &s.maps {
        let (entries, share) = match m.entries {
            Some(n) => (
                n.to_string(),
                format!("{:.1}%", 100.0 * n as f64 / f64::from(m.capacity.max(1))),
            ),
            None => ("array".into(), String::new()),
        };
        let _ = writeln!(
            out,
            "  {:<24} {:>9} {:>9} {:>6}",
            m.name, entries, m.capacity, share
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features() -> KernelFeatures {
        KernelFeatures {
            kernel: "5.10.0".into(),
            set_retval: false,
            netns_cookie: false,
            devmap_program_values: false,
            batch_lookup: true,
        }
    }

    fn status(agent: Option<AgentStatus>) -> Status {
        Status {
            version: "0.1.0".into(),
            commit: "abc1234".into(),
            agent_error: agent.is_none().then(|| "connection refused".into()),
            agent,
            features: features(),
            features_from: "probed by this command",
            devices: Vec::new(),
            maps: vec![
                MapUsage {
                    name: "SVCLB_SERVICES".into(),
                    entries: Some(512),
                    capacity: 1024,
                },
                MapUsage {
                    name: "SVCLB_STATS".into(),
                    entries: None,
                    capacity: 16,
                },
            ],
        }
    }

    #[test]
    fn table_with_the_agent_down() {
        let text = table(&status(None), "http://127.0.0.1:10249", 0.0);
        assert!(
            text.contains("agent:     unreachable at http://127.0.0.1:10249: connection refused"),
            "{text}"
        );
        assert!(
            text.contains("last sync: unknown (agent unreachable)"),
            "{text}"
        );
        assert!(
            text.contains("bpf_set_retval           no: connects"),
            "{text}"
        );
        assert!(text.contains("map_lookup_batch         yes"), "{text}");
        let row = |name: &str| -> Vec<String> {
            let line = text.lines().find(|l| l.trim_start().starts_with(name));
            line.map(|l| l.split_whitespace().map(String::from).collect())
                .unwrap_or_default()
        };
        assert_eq!(
            row("SVCLB_SERVICES"),
            ["SVCLB_SERVICES", "512", "1024", "50.0%"],
            "{text}"
        );
        assert_eq!(row("SVCLB_STATS"), ["SVCLB_STATS", "array", "16"], "{text}");
        assert!(text.contains("devices:   none"), "{text}");
    }

    #[test]
    fn table_with_the_agent_up() {
        let agent = AgentStatus {
            info: AgentInfo {
                version: "0.1.0".into(),
                commit: "abc1234".into(),
                node: "n1".into(),
                bpffs: "/sys/fs/bpf/svclb".into(),
                features: Some(features()),
                devices: vec![DeviceMode {
                    device: "eth0".into(),
                    xdp_mode: "native".into(),
                }],
            },
            sync: SyncStatus {
                last_success: Some(1_000.0),
                last_attempt: Some(1_010.0),
                last_result: Some("failed".into()),
                last_error: Some("map_full".into()),
                retries_pending: Some(2),
            },
        };
        let mut s = status(Some(agent));
        s.devices = s.agent.as_ref().unwrap().info.devices.clone();
        let text = table(&s, "http://127.0.0.1:10249", 1_015.0);
        assert!(text.contains("on node n1"), "{text}");
        assert!(text.contains("devices:   eth0 (XDP native)"), "{text}");
        assert!(
            text.contains("last sync: 1970-01-01T00:16:50Z (5s ago) failed"),
            "{text}"
        );
        assert!(
            text.contains("last success: 1970-01-01T00:16:40Z (15s ago)"),
            "{text}"
        );
        assert!(text.contains("last error: map_full"), "{text}");
        // The agent's JSON round-trips.
        let json = serde_json::to_string(s.agent.as_ref().unwrap()).unwrap();
        let back: AgentStatus = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, s.agent.as_ref().unwrap());
    }
}
