//! `svclb cleanup`: remove everything svclb attached to or changed on a
//! node, with the agent down (or crashed), from the node's network
//! namespace:
//! 1. the links pinned under the bpffs dir (DIR/links: the cgroup links of
//!    the socket programs, the XDP links), detached with BPF_LINK_DETACH,
//!    and the tc egress filters the DIR/links/tc-DEV markers name;
//! 2. whatever still runs svclb's programs on this namespace's devices
//!    (an XDP program or tc egress filter by program name), e.g. after
//!    the pins were deleted by hand;
//! 3. what DIR/undo records (`dataplane::undo`): the clsact qdiscs svclb
//!    created (unless other filters use them now) and the sysctls it
//!    changed, set back to their original values;
//! 4. the pins: svclb's maps (SVCLB_*), DIR/links, DIR/undo, then DIR
//!    if nothing else is left in it.
//!
//! With `--kube-proxy`, kube-proxy's leftovers too (`kube_proxy.rs`).
//! Each step goes on when another fails; running it again finds nothing.
use std::fs;
use std::os::fd::AsFd;
use std::path::Path;

use aya::programs::TcAttachType;

use crate::dataplane::devconf;
use crate::dataplane::loader::{TC_PROGRAM, XDP_PROGRAM};
use crate::dataplane::undo::{self, Record};

pub mod bpf;
pub mod kube_proxy;
pub mod rtnl;

/// What a cleanup did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// One line per thing removed or restored.
    pub removed: Vec<String>,
    /// Things left alone on purpose, or not checked.
    pub notes: Vec<String>,
    /// Failures (the rest was still done).
    pub errors: Vec<String>,
}

/// Clean up svclb's state (with `svclb`: its pins under that bpffs dir,
/// this network namespace's devices) and, with `kube_proxy`, kube-proxy's.
pub fn run(svclb: Option<&Path>, kube_proxy: bool) -> Outcome {
    let mut out = Outcome::default();
    if let Some(bpffs) = svclb {
        let names = bpf::program_names();
        pinned_links(bpffs, &names, &mut out);
        devices(&names, &mut out);
        undo_records(bpffs, &[], &mut out);
        pins(bpffs, &mut out);
    }
    if kube_proxy {
        kube_proxy::cleanup(&mut out);
    }
    out
}

/// Step 1: DIR/links.
fn pinned_links(bpffs: &Path, names: &std::collections::HashMap<u32, String>, out: &mut Outcome) {
    let Ok(entries) = fs::read_dir(bpffs.join("links")) else {
        return;
    };
    let mut entries: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(dev) = file.strip_prefix("tc-") {
            // A pinned program marking the device (the filter is no link).
            detach_tc(dev, &list_devices(out), out);
        } else {
            match bpf::open_pinned(&path).and_then(|fd| {
                let info = bpf::link_info(fd.as_fd())?;
                bpf::link_detach(fd.as_fd())?;
                Ok(info)
            }) {
                Ok(info) => {
                    let prog = names.get(&info.prog_id).map_or("?", String::as_str);
                    let what = match info.kind {
                        bpf::LINK_TYPE_CGROUP => {
                            format!("cgroup link of {prog} (cgroup id {})", info.cgroup_id)
                        }
                        bpf::LINK_TYPE_XDP => {
                            format!("XDP link of {prog} (ifindex {})", info.ifindex)
                        }
                        kind => format!("link of {prog} (type {kind})"),
                    };
                    out.removed.push(format!("detached {what}"));
                }
                // Unpinning below releases it if nothing else holds it.
                Err(e) => out
                    .errors
                    .push(format!("detaching {}: {e}", path.display())),
            }
        }
        match fs::remove_file(&path) {
            Ok(()) => out.removed.push(format!("pin {}", path.display())),
            Err(e) => out.errors.push(format!("removing {}: {e}", path.display())),
        }
    }
}

/// Detach svclb's tc egress filter from `dev` if it has one.
fn detach_tc(dev: &str, devices: &[rtnl::Device], out: &mut Outcome) {
    // Without the device or a clsact qdisc there is nothing to detach (and
    // aya's filter search would fail).
    let Some(index) = devices.iter().find(|d| d.name == dev).map(|d| d.index) else {
        return;
    };
    let filters = rtnl::Rtnl::open()
        .and_then(|mut nl| nl.filter_count(index, rtnl::CLSACT_EGRESS))
        .unwrap_or(0);
    if filters == 0 {
        return;
    }
    match aya::programs::tc::qdisc_detach_program(dev, TcAttachType::Egress, TC_PROGRAM) {
        Ok(()) => out
            .removed
            .push(format!("tc egress filter {TC_PROGRAM} on {dev}")),
        Err(e) => {
            let gone = matches!(&e, aya::programs::tc::TcError::IoError(io) if io.kind() == std::io::ErrorKind::NotFound);
            if !gone {
                out.errors.push(format!("tc egress filter on {dev}: {e}"));
            }
        }
    }
}

/// Step 2: this namespace's devices.
fn devices(names: &std::collections::HashMap<u32, String>, out: &mut Outcome) {
    let devices = list_devices(out);
    for dev in &devices {
        for &(prog_id, mode) in &dev.xdp {
            if names.get(&prog_id).map(String::as_str) != Some(XDP_PROGRAM) {
                continue;
            }
            match detach_xdp(dev, prog_id, mode) {
                Ok(()) => out
                    .removed
                    .push(format!("XDP program {XDP_PROGRAM} on {}", dev.name)),
                Err(e) => out
                    .errors
                    .push(format!("detaching XDP from {}: {e}", dev.name)),
            }
        }
        detach_tc(&dev.name, &devices, out);
    }
}

fn list_devices(out: &mut Outcome) -> Vec<rtnl::Device> {
    rtnl::Rtnl::open()
        .and_then(|mut r| r.devices())
        .unwrap_or_else(|e| {
            out.errors.push(format!("listing devices: {e}"));
            Vec::new()
        })
}

/// Detach an XDP program: through its link when it has one (links are
/// global, but a program id belongs to one agent's load), else by netlink.
fn detach_xdp(dev: &rtnl::Device, prog_id: u32, mode: u32) -> std::io::Result<()> {
    let mut via_link = false;
    for (info, fd) in bpf::links() {
        if info.kind == bpf::LINK_TYPE_XDP && info.prog_id == prog_id && info.ifindex == dev.index {
            bpf::link_detach(fd.as_fd())?;
            via_link = true;
        }
    }
    if via_link {
        return Ok(());
    }
    rtnl::Rtnl::open()?.detach_xdp(dev.index, mode)
}

/// Undo what DIR/undo records for devices other than `devices` (the
/// agent, for devices no longer in its --devices).
pub fn undo_other_devices(bpffs: &Path, devices: &[String]) -> Outcome {
    let mut out = Outcome::default();
    undo_records(bpffs, devices, &mut out);
    out
}

/// Step 3: DIR/undo, except records about the devices in `keep`.
fn undo_records(bpffs: &Path, keep: &[String], out: &mut Outcome) {
    let records: Vec<Record> = undo::records(bpffs)
        .into_iter()
        .filter(|r| !r.device().is_some_and(|d| keep.iter().any(|k| k == d)))
        .collect();
    if records.is_empty() {
        return;
    }
    let devices = rtnl::Rtnl::open()
        .and_then(|mut r| r.devices())
        .unwrap_or_default();
    for record in records {
        match &record {
            Record::Clsact { device } => {
                if let Some(dev) = devices.iter().find(|d| &d.name == device) {
                    remove_clsact(dev, out);
                }
            }
            Record::Sysctl { key, original } => {
                let path = Path::new("/proc/sys").join(key);
                if path.exists() {
                    match devconf::write_sysctl(key, original) {
                        Ok(()) => out.removed.push(format!(
                            "sysctl {} set back to {original}",
                            key.replace('/', ".")
                        )),
                        Err(e) => {
                            out.errors
                                .push(format!("restoring {}: {e}", path.display()));
                            continue; // keep the record for the next run
                        }
                    }
                }
            }
        }
        undo::remove(bpffs, &record);
    }
}

/// Delete the clsact qdisc svclb created on `dev`, unless filters (now
/// someone else's: svclb's are gone) still use it.
fn remove_clsact(dev: &rtnl::Device, out: &mut Outcome) {
    let Ok(mut nl) = rtnl::Rtnl::open() else {
        return;
    };
    let others: usize = [rtnl::CLSACT_INGRESS, rtnl::CLSACT_EGRESS]
        .iter()
        .map(|&parent| nl.filter_count(dev.index, parent).unwrap_or(0))
        .sum();
    if others > 0 {
        out.notes.push(format!(
            "kept the clsact qdisc svclb added on {}: other tc filters use it now",
            dev.name
        ));
        return;
    }
    match nl.delete_clsact(dev.index) {
        Ok(()) => out.removed.push(format!("clsact qdisc on {}", dev.name)),
        // Already gone.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) => {}
        Err(e) => out
            .errors
            .push(format!("deleting the clsact qdisc on {}: {e}", dev.name)),
    }
}

/// Step 4: the pins and directories.
fn pins(bpffs: &Path, out: &mut Outcome) {
    let Ok(entries) = fs::read_dir(bpffs) else {
        return;
    };
    let mut maps: Vec<_> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("SVCLB_"))
        .map(|e| e.path())
        .collect();
    maps.sort();
    for path in maps {
        match fs::remove_file(&path) {
            Ok(()) => out.removed.push(format!("pin {}", path.display())),
            Err(e) => out.errors.push(format!("removing {}: {e}", path.display())),
        }
    }
    for dir in [bpffs.join("links"), bpffs.join("undo"), bpffs.to_owned()] {
        match fs::remove_dir(&dir) {
            Ok(()) => out.removed.push(format!("directory {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => {
                let left: Vec<String> = fs::read_dir(&dir)
                    .map(|d| {
                        d.flatten()
                            .map(|e| e.file_name().to_string_lossy().into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                out.notes.push(format!(
                    "kept {}: it holds what svclb did not put there: {}",
                    dir.display(),
                    left.join(" ")
                ));
            }
        }
    }
}
