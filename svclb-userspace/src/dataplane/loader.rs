//! Loading the eBPF object, pinning its maps and attaching its programs.
//!
//! Maps are pinned by name in the agent's bpffs directory and reused by the
//! next agent, so their content survives restarts. Program links are pinned
//! too (DIR/links/<program>), so the programs stay attached while no agent
//! runs. A new agent attaches its programs first and only then releases the
//! old links: in between both run, which is harmless because translating an
//! already-translated address is a no-op (a backend is not a frontend).
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use aya::programs::{links::FdLink, links::PinnedLink, CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use svclb_common::globals;

use super::DataplaneError;

/// The object svclb-userspace/build.rs built from svclb-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/svclb"));

/// The socket programs (function names in svclb-ebpf/src/sock.rs).
pub const PROGRAMS: [&str; 8] = [
    "svclb_connect4",
    "svclb_connect6",
    "svclb_sendmsg4",
    "svclb_sendmsg6",
    "svclb_recvmsg4",
    "svclb_recvmsg6",
    "svclb_getpeername4",
    "svclb_getpeername6",
];

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn on_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into the zeroed struct we pass.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Make sure `dir` exists on a bpf filesystem, mounting one if needed: at
/// /sys/fs/bpf for paths below it (the usual place), else at `dir` itself.
pub fn ensure_bpffs(dir: &Path) -> Result<(), DataplaneError> {
    let err = |what: &str, e: std::io::Error| DataplaneError::Bpffs {
        path: dir.to_owned(),
        reason: format!("{what}: {e}"),
    };
    let standard = Path::new("/sys/fs/bpf");
    let mount_point = if dir.starts_with(standard) {
        standard
    } else {
        dir
    };
    fs::create_dir_all(mount_point).map_err(|e| err("create", e))?;
    if !on_bpffs(mount_point) {
        tracing::info!(path = %mount_point.display(), "mounting bpffs");
        let target = std::ffi::CString::new(mount_point.as_os_str().as_encoded_bytes())
            .map_err(|_| err("path", std::io::ErrorKind::InvalidInput.into()))?;
        // SAFETY: plain mount(2) with NUL-terminated strings.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(err("mount bpffs", std::io::Error::last_os_error()));
        }
    }
    fs::create_dir_all(dir.join("links")).map_err(|e| err("create", e))?;
    if !on_bpffs(dir) {
        return Err(DataplaneError::Bpffs {
            path: dir.to_owned(),
            reason: "not on a bpf filesystem".into(),
        });
    }
    Ok(())
}

/// Load the object with its maps pinned in (or reused from) `bpffs`.
pub fn load(bpffs: &Path) -> Result<Ebpf, DataplaneError> {
    if OBJECT.is_empty() {
        return Err(DataplaneError::Load(
            "this svclb was built with AYA_BUILD_SKIP: no eBPF object".into(),
        ));
    }
    ensure_bpffs(bpffs)?;
    let has_set_retval = u8::from(
        aya::util::KernelVersion::current()
            .is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 18, 0)),
    );
    if has_set_retval == 0 {
        tracing::warn!(
            "kernel older than 5.18 (no bpf_set_retval for cgroup programs): connects to services \
             without endpoints fail with EPERM instead of ECONNREFUSED, and dropped ones with EPERM \
             instead of ETIMEDOUT"
        );
    }
    EbpfLoader::new()
        .default_map_pin_directory(bpffs)
        .override_global(globals::HAS_SET_RETVAL, &has_set_retval, true)
        .load(OBJECT)
        .map_err(|e| DataplaneError::Load(chain(&e)))
}

/// An error with its sources, so syscall errors show their errno.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Attach every socket program to `cgroup` and pin the links, replacing the
/// links a previous agent pinned.
pub fn attach(ebpf: &mut Ebpf, cgroup: &Path, bpffs: &Path) -> Result<(), DataplaneError> {
    let cg = File::open(cgroup).map_err(|e| DataplaneError::Cgroup {
        path: cgroup.to_owned(),
        source: e,
    })?;
    for name in PROGRAMS {
        let attach_err = |e: &dyn std::error::Error| DataplaneError::Attach {
            program: name,
            reason: chain(e),
        };
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or_else(|| DataplaneError::Attach {
                program: name,
                reason: "missing from the object".into(),
            })?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| attach_err(&e))?;
        prog.load().map_err(|e| attach_err(&e))?;
        // Link-based cgroup attachments always coexist with other programs;
        // the kernel rejects attach flags for them, so the mode must be Single.
        let id = prog
            .attach(&cg, CgroupAttachMode::Single)
            .map_err(|e| attach_err(&e))?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|e| attach_err(&e))?
            .try_into()
            .map_err(|e: aya::programs::links::LinkError| attach_err(&e))?;
        replace_pinned_link(&link_path(bpffs, name), link).map_err(|reason| {
            DataplaneError::Attach {
                program: name,
                reason,
            }
        })?;
    }
    Ok(())
}

pub fn link_path(bpffs: &Path, program: &str) -> PathBuf {
    bpffs.join("links").join(program)
}

/// Pin `new` at `path`; the link pinned there before (if any) is released
/// only after the new one is attached and pinned.
fn replace_pinned_link(path: &Path, new: FdLink) -> Result<(), String> {
    let old = if path.exists() {
        match PinnedLink::from_pin(path) {
            Ok(pinned) => Some(
                pinned
                    .unpin()
                    .map_err(|e| format!("unpin {}: {}", path.display(), chain(&e)))?,
            ),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = chain(&e), "removing unusable pinned link");
                fs::remove_file(path).map_err(|e| format!("remove {}: {e}", path.display()))?;
                None
            }
        }
    } else {
        None
    };
    new.pin(path)
        .map_err(|e| format!("pin {}: {}", path.display(), chain(&e)))?;
    // Dropping the last reference to the old link detaches the old program.
    drop(old);
    Ok(())
}
