//! Named network namespaces (/run/netns/NAME, as `ip netns` manages them).

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread;

use anyhow::{bail, Context, Result};

use crate::cmd;

pub const NETNS_DIR: &str = "/run/netns";

/// `ip netns add` makes /run/netns a shared mount the first time; two
/// concurrent first calls can stack two mounts there and hide each
/// other's namespaces. Serialise adds and deletes within this process.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

pub fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

pub fn create(name: &str) -> Result<()> {
    let _g = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    cmd::ip(None, &["netns", "add", name])?;
    Ok(())
}

/// Kill whatever still runs in the namespace, then delete it.
pub fn delete(name: &str) -> Result<()> {
    let p = path(name);
    if !p.exists() {
        return Ok(());
    }
    kill_processes_in(&p);
    let _g = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    match cmd::ip(None, &["netns", "del", name]) {
        // Someone else (a concurrent sweep) deleted it first: fine.
        Err(_) if !p.exists() => Ok(()),
        r => r.map(drop),
    }
}

/// Names under /run/netns.
pub fn list() -> Vec<String> {
    let Ok(rd) = fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect()
}

/// SIGKILL every process whose network namespace is the one bound at
/// `ns_path` (e.g. an orphaned server of a crashed run). Identified by the
/// nsfs inode, so nothing outside that namespace is ever touched.
pub fn kill_processes_in(ns_path: &Path) {
    let Ok(ino) = fs::metadata(ns_path).map(|m| m.ino()) else {
        return;
    };
    let want = format!("net:[{ino}]");
    let me = std::process::id();
    let Ok(rd) = fs::read_dir("/proc") else {
        return;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(link) = fs::read_link(e.path().join("ns/net")) else {
            continue;
        };
        if link.to_str() == Some(want.as_str()) {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Write sysctls inside a namespace: a short-lived thread enters it (setns
/// changes only the calling thread), so /proc/sys/net resolves to that
/// namespace, and no process is spawned.
/// Settings [`sysctls`] skips where the kernel has no per-namespace copy.
const OPTIONAL: &[&str] = &["net.ipv4.icmp_msgs_per_sec", "net.ipv4.icmp_msgs_burst"];

pub fn sysctls(name: &str, settings: &[(&str, &str)]) -> Result<()> {
    let ns = File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let name = name.to_string();
    thread::spawn(move || -> Result<()> {
        // SAFETY: setns(2) on an fd we own; this thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {name}: {}", std::io::Error::last_os_error());
        }
        for (key, value) in &settings {
            let p = Path::new("/proc/sys").join(key.replace('.', "/"));
            // Some settings are per namespace only on newer kernels (the ICMP
            // rate limits from 6.x); they only speed tests up, so a kernel
            // without them in a namespace is fine.
            if OPTIONAL.contains(&key.as_str()) && !p.exists() {
                continue;
            }
            fs::write(&p, value).with_context(|| format!("netns {name}: {key} = {value}"))?;
        }
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("sysctl thread panicked"))?
}
