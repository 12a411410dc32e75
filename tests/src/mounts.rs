//! Finding (and if needed mounting) the cgroup2 and bpf filesystems.
//! Paths differ between machines (/sys/fs/cgroup vs /sys/fs/cgroup/unified),
//! so they always come from /proc/self/mountinfo.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};

/// Where svclb agents pin their maps and links: one subdirectory per node.
pub const BPFFS: &str = "/sys/fs/bpf";

struct Mount {
    root: String,
    point: PathBuf,
    fstype: String,
}

fn mounts() -> Result<Vec<Mount>> {
    let text = fs::read_to_string("/proc/self/mountinfo").context("reading mountinfo")?;
    let mut out = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mountpoint opts [optional...] - fstype source superopts
        let (left, right) = line.split_once(" - ").unwrap_or((line, ""));
        let f: Vec<&str> = left.split(' ').collect();
        let Some(fstype) = right.split(' ').next() else {
            continue;
        };
        if f.len() < 5 {
            continue;
        }
        out.push(Mount {
            root: unescape(f[3]),
            point: PathBuf::from(unescape(f[4])),
            fstype: fstype.to_string(),
        });
    }
    Ok(out)
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = |j: usize| b.get(j).is_some_and(|c| (b'0'..=b'7').contains(c));
        if b[i] == b'\\' && octal(i + 1) && octal(i + 2) && octal(i + 3) {
            let d = |j: usize| u32::from(b[j] - b'0');
            out.push((d(i + 1) * 64 + d(i + 2) * 8 + d(i + 3)) as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v2 mount point (the whole hierarchy, root "/").
pub fn cgroup2_root() -> Result<PathBuf> {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(p) = ROOT.get() {
        return Ok(p.clone());
    }
    let found = mounts()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2" && m.root == "/")
        .map(|m| m.point)
        .ok_or_else(|| anyhow!("no cgroup2 mount in /proc/self/mountinfo"))?;
    Ok(ROOT.get_or_init(|| found).clone())
}

fn is_bpffs(path: &Path) -> Result<bool> {
    Ok(mounts()?
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"\"), r"\");
    }
}
