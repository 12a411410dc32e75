//! Finding (and if needed mounting) the cgroup2 and bpf filesystems.
//! Paths differ between machines (/sys/fs/cgroup vs /sys/fs/cgroup/unified),
//! so they always come from /proc/self/mountinfo.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use svclb_userspace::dataplane::mounts::{self, Mount};

/// Where svclb agents pin their maps and links: one subdirectory per node.
pub const BPFFS: &str = "/sys/fs/bpf";

fn read_mounts() -> Result<Vec<Mount>> {
    mounts::read().context("reading /proc/self/mountinfo")
}

/// The cgroup v2 mount point (the whole hierarchy, root "/").
pub fn cgroup2_root() -> Result<PathBuf> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(p) = ROOT.get() {
        return Ok(p.clone());
    }
    let found = read_mounts()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2" && m.is_whole())
        .map(|m| m.point)
        .ok_or_else(|| anyhow!("no cgroup2 mount in /proc/self/mountinfo"))?;
    Ok(ROOT.get_or_init(|| found).clone())
}

fn is_bpffs(path: &Path) -> Result<bool> {
    Ok(read_mounts()?
        .iter()
        .any(|m| m.point == path && m.fstype == "bpf"))
}

/// Make sure /sys/fs/bpf is a bpf filesystem; mount it when it is not.
/// A file lock serialises the check-and-mount across processes, because a
/// second mount stacked on the first would hide the first one's pins.
pub fn ensure_bpffs() -> Result<PathBuf> {
    let path = PathBuf::from(BPFFS);
    if is_bpffs(&path)? {
        return Ok(path);
    }
    let lock = File::create("/run/svclb-tests.lock").context("creating /run/svclb-tests.lock")?;
    // SAFETY: flock(2) on an fd we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("flock: {}", std::io::Error::last_os_error());
    }
    if is_bpffs(&path)? {
        return Ok(path);
    }
    fs::create_dir_all(&path).with_context(|| format!("creating {BPFFS}"))?;
    let c = |s: &str| CString::new(s).expect("no NUL");
    let (src, target, fstype) = (c("bpf"), c(BPFFS), c("bpf"));
    // SAFETY: mount(2) with valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        bail!(
            "mount -t bpf bpf {BPFFS}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(path)
}
