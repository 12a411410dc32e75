//! The BPF syscalls cleanup needs that aya does not expose: open a pinned
//! link, read a link's info (its cgroup or device), list links, and detach
//! one (BPF_LINK_DETACH, Linux 5.9+: it detaches even while another process
//! still holds the link).
use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `bpf_link_type` values.
pub const LINK_TYPE_CGROUP: u32 = 3;
pub const LINK_TYPE_XDP: u32 = 6;

/// `union bpf_attr`, zeroed; each command reads its own leading fields.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn put_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn put_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_ne_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, zero-initialised bpf_attr of the size given;
    // any pointers in it (path, info buffer) outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.0.as_mut_ptr(),
            std::mem::size_of::<Attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us alone.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// The object pinned at `path`.
pub fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = Attr::new();
    attr.put_u64(0, c.as_ptr() as u64);
    bpf(BPF_OBJ_GET, &mut attr).map(owned)
}

/// What the kernel says about one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    pub id: u32,
    /// `bpf_link_type`
    pub kind: u32,
    pub prog_id: u32,
    /// The cgroup's id (its inode number in cgroup2), for cgroup links.
    pub cgroup_id: u64,
    /// The device's ifindex (in its own netns), for XDP links.
    pub ifindex: u32,
}

pub fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    // struct bpf_link_info: type, id, prog_id, then an 8-aligned union
    // (cgroup: cgroup_id u64; xdp: ifindex u32) at offset 16.
    #[repr(C, align(8))]
    struct Info([u8; 64]);
    let mut info = Info([0; 64]);
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32)
        .put_u32(4, info.0.len() as u32)
        .put_u64(8, info.0.as_mut_ptr() as u64);
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let b = &info.0;
    let u32_at = |at: usize| u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let kind = u32_at(0);
    Ok(LinkInfo {
        id: u32_at(4),
        kind,
        prog_id: u32_at(8),
        cgroup_id: if kind == LINK_TYPE_CGROUP {
            u64::from_ne_bytes(b[16..24].try_into().expect("8 bytes"))
        } else {
            0
        },
        ifindex: if kind == LINK_TYPE_XDP { u32_at(16) } else { 0 },
    })
}

/// Detach the link whatever holds it; the link object stays (detached)
/// until its last reference goes.
pub fn link_detach(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr::new();
    attr.put_u32(0, fd.as_raw_fd() as u32);
    bpf(BPF_LINK_DETACH, &mut attr).map(drop)
}

pub fn link_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = Attr::new();
    attr.put_u32(0, id);
    bpf(BPF_LINK_GET_FD_BY_ID, &mut attr).map(owned)
}

/// Every link in the system (links are not per network namespace) with
/// its info; links that go away meanwhile are left out.
pub fn links() -> Vec<(LinkInfo, OwnedFd)> {
    let mut out = Vec::new();
    let mut id = 0;
    loop {
        let mut attr = Attr::new();
        attr.put_u32(0, id);
        if bpf(BPF_LINK_GET_NEXT_ID, &mut attr).is_err() {
            return out; // ENOENT: no more
        }
        id = attr.u32_at(4);
        if let Ok(fd) = link_by_id(id) {
            if let Ok(info) = link_info(fd.as_fd()) {
                out.push((info, fd));
            }
        }
    }
}

/// Names of the loaded programs by id (the kernel keeps 15 characters).
pub fn program_names() -> HashMap<u32, String> {
    aya::programs::loaded_programs()
        .flatten()
        .filter_map(|p| Some((p.id(), p.name_as_str()?.to_string())))
        .collect()
}
