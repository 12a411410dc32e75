//! What the agent changes on the node besides its pins, recorded where
//! `svclb cleanup` finds it with the agent down: the clsact qdiscs it
//! created and the sysctls it changed, with their original values.
//!
//! bpffs holds no regular files, so each record is an empty directory
//! under DIR/undo whose name is the record:
//! - `clsact-DEV`: svclb added the clsact qdisc of DEV;
//! - `sysctl-KEY=VALUE`: KEY (the path under /proc/sys, `/` written as
//!   `:`, which no device name contains) was VALUE before svclb changed it.
//!
//! A record is written before the change it describes (and removed again
//! when the change fails or turns out not to be ours), so a crash between
//! the two leaves at worst a record of nothing, never a change without one.
//! An existing record is never overwritten: a restarted agent finds the
//! value its predecessor set, not the node's original.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// svclb added this device's clsact qdisc.
    Clsact { device: String },
    /// The sysctl at /proc/sys/`key` was `original` before svclb set it.
    Sysctl { key: String, original: String },
}

impl Record {
    /// The device the record is about, if any (a sysctl under
    /// net/ipv{4,6}/conf/DEV/).
    pub fn device(&self) -> Option<&str> {
        match self {
            Record::Clsact { device } => Some(device),
            Record::Sysctl { key, .. } => {
                let parts: Vec<&str> = key.split('/').collect();
                match parts[..] {
                    ["net", _, "conf", dev, _] => Some(dev),
                    _ => None,
                }
            }
        }
    }

    fn name(&self) -> String {
        match self {
            Record::Clsact { device } => format!("clsact-{device}"),
            Record::Sysctl { key, original } => {
                format!("sysctl-{}={original}", key.replace('/', ":"))
            }
        }
    }

    fn parse(name: &str) -> Option<Record> {
        if let Some(device) = name.strip_prefix("clsact-") {
            return Some(Record::Clsact {
                device: device.to_string(),
            });
        }
        let (key, original) = name.strip_prefix("sysctl-")?.rsplit_once('=')?;
        Some(Record::Sysctl {
            key: key.replace(':', "/"),
            original: original.to_string(),
        })
    }
}

fn dir(bpffs: &Path) -> PathBuf {
    bpffs.join("undo")
}

/// Every record under `bpffs` (none when the directory is missing).
pub fn records(bpffs: &Path) -> Vec<Record> {
    let Ok(entries) = fs::read_dir(dir(bpffs)) else {
        return Vec::new();
    };
    let mut out: Vec<Record> = entries
        .flatten()
        .filter_map(|e| Record::parse(&e.file_name().to_string_lossy()))
        .collect();
    out.sort_by_key(Record::name);
    out
}

/// Write `record`; false when it was there already.
fn add(bpffs: &Path, record: &Record) -> io::Result<bool> {
    fs::create_dir_all(dir(bpffs))?;
    match fs::create_dir(dir(bpffs).join(record.name())) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

/// Remove `record` (done, or not ours after all).
pub fn remove(bpffs: &Path, record: &Record) {
    let _ = fs::remove_dir(dir(bpffs).join(record.name()));
}

/// Add the clsact qdisc to `device`, recording it when svclb created it.
/// Errors are the qdisc's (it may exist already, which is fine: a failing
/// filter attach reports them).
pub fn add_clsact(bpffs: &Path, device: &str) -> Result<(), String> {
    let record = Record::Clsact {
        device: device.to_string(),
    };
    let fresh = add(bpffs, &record).map_err(|e| format!("recording the clsact qdisc: {e}"))?;
    match aya::programs::tc::qdisc_add_clsact(device) {
        Ok(()) => Ok(()),
        Err(e) => {
            // Someone else's qdisc (or a record of ours from before): a
            // record we just wrote would claim it.
            if fresh {
                remove(bpffs, &record);
            }
            Err(e.to_string())
        }
    }
}

/// Set the sysctl at /proc/sys/`key` (e.g. `net/ipv4/conf/eth0/accept_local`)
/// to `value`, recording its original value first when it differs.
pub fn set_sysctl(bpffs: &Path, key: &str, value: &str) -> io::Result<()> {
    let path = Path::new("/proc/sys").join(key);
    let current = fs::read_to_string(&path)?.trim().replace('\t', " ");
    if current == value {
        return Ok(());
    }
    let already = records(bpffs)
        .into_iter()
        .any(|r| matches!(&r, Record::Sysctl { key: k, .. } if k == key));
    let record = Record::Sysctl {
        key: key.to_string(),
        original: current,
    };
    let recorded = !already && {
        if record.name().contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{key}: cannot record the original value"),
            ));
        }
        add(bpffs, &record)?
    };
    super::devconf::write_sysctl(key, value).inspect_err(|_| {
        if recorded {
            remove(bpffs, &record);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_their_names() {
        for r in [
            Record::Clsact {
                device: "eth0.100".into(),
            },
            Record::Sysctl {
                key: "net/ipv4/conf/eth0.100/accept_local".into(),
                original: "0".into(),
            },
            Record::Sysctl {
                key: "net/ipv4/ip_local_port_range".into(),
                original: "32768 60999".into(),
            },
        ] {
            assert_eq!(Record::parse(&r.name()), Some(r.clone()), "{}", r.name());
            assert!(!r.name().contains('/'));
        }
        let accept_local = Record::Sysctl {
            key: "net/ipv4/conf/eth0.100/accept_local".into(),
            original: "0".into(),
        };
        assert_eq!(accept_local.device(), Some("eth0.100"));
        let global = Record::Sysctl {
            key: "net/ipv4/ip_local_port_range".into(),
            original: "1 2".into(),
        };
        assert_eq!(global.device(), None);
        assert_eq!(Record::parse("something-else"), None);
    }
}
