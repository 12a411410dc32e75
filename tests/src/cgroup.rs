//! cgroup v2 directories for simulated nodes. The agent attaches its socket
//! programs to a node's cgroup; clients join it so the programs apply to
//! them. Nothing is ever attached to, or moved out of, the root cgroup.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub fn create(path: &Path) -> Result<()> {
    fs::create_dir(path).with_context(|| format!("creating cgroup {}", path.display()))
}

/// Pids currently in the cgroup (not its descendants).
pub fn procs(path: &Path) -> Vec<u32> {
    fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Kill what still runs in the cgroup, then rmdir it. rmdir fails with
/// EBUSY until killed processes are fully gone, hence the retry loop.
pub fn remove(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        kill_all(path);
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "rmdir {}: {e} (pids still inside: {:?})",
                    path.display(),
                    procs(path)
                )
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// cgroup.kill (5.14+) kills the whole subtree at once; fall back to
/// signalling each pid on older kernels.
fn kill_all(path: &Path) {
    if fs::write(path.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    for pid in procs(path) {
        // SAFETY: plain kill(2) on a pid listed in our own test cgroup.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
}
