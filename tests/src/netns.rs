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

/// Run `f` on a short-lived thread that has entered the namespace (setns
/// changes only the calling thread), so /proc/sys/net and new sockets
/// belong to that namespace and no process is spawned.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    let name = name.to_string();
    thread::spawn(move || -> Result<T> {
        // SAFETY: setns(2) on an fd we own; this thread ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {name}: {}", std::io::Error::last_os_error());
        }
        f().with_context(|| format!("in netns {name}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// Settings [`sysctls`] skips where the kernel has no per-namespace copy.
const OPTIONAL: &[&str] = &["net.ipv4.icmp_msgs_per_sec", "net.ipv4.icmp_msgs_burst"];

/// Write sysctls inside a namespace.
pub fn sysctls(name: &str, settings: &[(&str, &str)]) -> Result<()> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    in_netns(name, move || {
        for (key, value) in &settings {
            let p = Path::new("/proc/sys").join(key.replace('.', "/"));
            // Some settings are per namespace only on newer kernels (the ICMP
            // rate limits from 6.x); they only speed tests up, so a kernel
            // without them in a namespace is fine.
            if OPTIONAL.contains(&key.as_str()) && !p.exists() {
                continue;
            }
            fs::write(&p, value).with_context(|| format!("{key} = {value}"))?;
        }
        Ok(())
    })
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// struct ethtool_value of <linux/ethtool.h>.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// One ETHTOOL_{G,S}* value command on `ifname` in the calling thread's
/// netns; returns the value the kernel left in `data`.
fn ethtool_value(ifname: &str, cmd: u32, data: u32) -> Result<u32> {
    use std::os::fd::{FromRawFd, OwnedFd};
    if ifname.len() >= libc::IFNAMSIZ {
        bail!("interface name {ifname:?} too long");
    }
    let mut value = EthtoolValue { cmd, data };
    // SAFETY: an all-zero ifreq is valid; the name fits (checked above) and
    // stays NUL-terminated; ifr_data points at `value`, which outlives the
    // ioctl; the socket fd is owned and closed on return.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (dst, src) in ifr.ifr_name.iter_mut().zip(ifname.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
        if libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL as _, &mut ifr) != 0 {
            bail!(
                "SIOCETHTOOL {cmd:#x} on {ifname}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(value.data)
}

/// Switch tx checksum offload of `ifname` in netns `name` on or off (what
/// `ethtool -K IF tx on|off` does; ethtool itself is not needed). With it
/// off, veths carry fully checksummed packets instead of CHECKSUM_PARTIAL
/// ones, which XDP programs' incremental checksum updates get wrong.
pub fn set_tx_checksum(name: &str, ifname: &str, on: bool) -> Result<()> {
    let ifname = ifname.to_string();
    in_netns(name, move || {
        ethtool_value(&ifname, ETHTOOL_STXCSUM, on.into()).map(drop)
    })
}

/// Whether tx checksum offload of `ifname` in netns `name` is on.
pub fn tx_checksum(name: &str, ifname: &str) -> Result<bool> {
    let ifname = ifname.to_string();
    in_netns(name, move || {
        Ok(ethtool_value(&ifname, ETHTOOL_GTXCSUM, 0)? != 0)
    })
}
