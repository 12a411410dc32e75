//! An RCU barrier for BPF readers.
//!
//! The kernel waits for an RCU grace period (`synchronize_rcu`) before an
//! update of a map-of-maps returns, so that userspace knows no running
//! program still uses the old inner map (`maybe_wait_bpf_programs` in
//! kernel/bpf/syscall.c). Our socket programs are non-sleepable and run under
//! RCU, so once such an update returns, every program that could have read
//! an old services-map value has finished. The writer uses that before it
//! deletes entries an old reader might still follow.
//!
//! aya 0.14 can't create a standalone map-of-maps, so this issues the two
//! bpf(2) calls itself.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

pub struct RcuBarrier {
    outer: OwnedFd,
    inner: OwnedFd,
}

/// `union bpf_attr`, large enough for the two commands used here; unused
/// bytes must be zero.
#[repr(C, align(8))]
struct Attr([u32; 32]);

fn bpf(cmd: libc::c_long, attr: &Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr points to a properly sized, initialised bpf_attr; the
    // kernel reads at most size_of::<Attr>() bytes and any pointers inside it
    // (set by the callers) point to live stack values.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const Attr,
            std::mem::size_of::<Attr>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn map_create(map_type: u32, inner_map_fd: Option<&OwnedFd>) -> io::Result<OwnedFd> {
    let mut a = Attr([0; 32]);
    a.0[0] = map_type;
    a.0[1] = 4; // key size
    a.0[2] = 4; // value size
    a.0[3] = 1; // max entries
    a.0[5] = inner_map_fd.map_or(0, |fd| fd.as_raw_fd() as u32);
    let fd = bpf(BPF_MAP_CREATE, &a)?;
    // SAFETY: BPF_MAP_CREATE returned a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl RcuBarrier {
    pub fn new() -> io::Result<Self> {
        let inner = map_create(BPF_MAP_TYPE_ARRAY, None)?;
        let outer = map_create(BPF_MAP_TYPE_ARRAY_OF_MAPS, Some(&inner))?;
        Ok(Self { outer, inner })
    }

    /// Returns after every BPF program that was running when it was called
    /// has finished.
    pub fn wait(&self) -> io::Result<()> {
        let key: u32 = 0;
        let value: u32 = self.inner.as_raw_fd() as u32;
        let mut a = Attr([0; 32]);
        a.0[0] = self.outer.as_raw_fd() as u32;
        let key_ptr = &key as *const u32 as u64;
        let value_ptr = &value as *const u32 as u64;
        a.0[2] = key_ptr as u32;
        a.0[3] = (key_ptr >> 32) as u32;
        a.0[4] = value_ptr as u32;
        a.0[5] = (value_ptr >> 32) as u32;
        bpf(BPF_MAP_UPDATE_ELEM, &a).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_waits_for_a_grace_period() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root for bpf(2)");
            return;
        }
        let b = RcuBarrier::new().expect("create map-of-maps");
        b.wait().expect("update map-of-maps");
    }
}
