//! Connected UDP sockets whose backend left their frontend are destroyed.
//!
//! connect() on a UDP socket to a frontend is translated once (sock.rs): the
//! socket then sends to the backend directly, so when that backend goes
//! away it would send into nothing for as long as the application keeps
//! it. kube-proxy deletes such flows' conntrack entries so the next
//! datagram is NATed afresh; a socket-level translation has no next
//! datagram to catch, so the socket is failed instead: the application
//! sees ECONNABORTED and reconnects (through the frontend, to a remaining
//! backend). TCP connections are left alone, as kube-proxy leaves TCP
//! conntrack alone.
//!
//! The sockets live in the pods' network namespaces. A dedicated thread
//! (never a tokio worker: it changes its own network namespace) visits every
//! namespace it can find (`/proc/*/ns/net`, `/run/netns/*`), lists the
//! connected UDP sockets there with sock_diag, and destroys (SOCK_DESTROY)
//! those whose peer is a gone backend and whose cookie `SVCLB_SOCK_RNAT`
//! records as connected through that frontend, so a pod that connected to
//! the backend's address itself is left alone. SOCK_DESTROY needs
//! CONFIG_INET_DIAG_DESTROY (Debian's kernels set it) and udp_diag.
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use bytemuck::{Pod, Zeroable};
use svclb_common::{SockRevNat, SockRevNatKey};

use super::abi::addr_to_abi;
use crate::model::{Frontend, Protocol, Scope};

/// The one mechanism svclb uses, as the metric labels it.
pub const MECHANISM: &str = "sock_diag";

#[derive(Debug, thiserror::Error)]
pub enum SocketsError {
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: io::Error,
    },
    #[error("opening {path}: {source}")]
    Map {
        path: PathBuf,
        source: aya::maps::MapError,
    },
}

fn os(what: &'static str) -> impl FnOnce(io::Error) -> SocketsError {
    move |source| SocketsError::Os { what, source }
}

/// A backend that left a socket-scope UDP frontend (or whose frontend went).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gone {
    pub frontend: (IpAddr, u16),
    pub backend: (IpAddr, u16),
}

/// The backends of `old`'s socket-scope UDP frontends that `new` (the same
/// service's next frontends) no longer lists under the same frontend, as a
/// backend or as a draining (still serving) endpoint.
pub fn gone_backends(old: &[Frontend], new: &[Frontend]) -> Vec<Gone> {
    let mut gone = Vec::new();
    for f in old {
        if f.key.protocol != Protocol::Udp || f.key.scope != Scope::Socket {
            continue;
        }
        let kept: BTreeSet<(IpAddr, u16)> = new
            .iter()
            .filter(|n| n.key == f.key)
            .flat_map(|n| n.backends.iter().chain(&n.draining))
            .map(|b| (b.addr, b.port))
            .collect();
        for b in &f.backends {
            if !kept.contains(&(b.addr, b.port)) {
                gone.push(Gone {
                    frontend: (f.key.addr, f.key.port),
                    backend: (b.addr, b.port),
                });
            }
        }
    }
    gone
}

/// Hands batches of gone backends to the socket thread.
pub struct Terminator {
    tx: mpsc::Sender<Vec<Gone>>,
    destroyed: Arc<AtomicU64>,
}

impl Terminator {
    /// Start the thread; it reads `SVCLB_SOCK_RNAT` from `sock_rnat_pin`.
    pub fn start(sock_rnat_pin: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel();
        let destroyed = Arc::new(AtomicU64::new(0));
        let counter = destroyed.clone();
        let spawned = std::thread::Builder::new()
            .name("svclb-sockets".into())
            .spawn(move || match File::open("/proc/thread-self/ns/net") {
                Ok(home) => Worker::new(sock_rnat_pin, home, counter).run(rx),
                Err(e) => tracing::warn!(error = %e, "opening the agent's network namespace; connected UDP sockets will not leave removed backends"),
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "starting the socket thread; connected UDP sockets will not leave removed backends");
        }
        Terminator { tx, destroyed }
    }

    /// Destroy the sockets connected to `gone` (in the background).
    pub fn terminate(&self, gone: Vec<Gone>) {
        if !gone.is_empty() {
            let _ = self.tx.send(gone);
        }
    }

    /// Sockets destroyed so far (svclb_sockets_destroyed_total).
    pub fn destroyed(&self) -> Arc<AtomicU64> {
        self.destroyed.clone()
    }
}

struct Worker {
    pin: PathBuf,
    /// The agent's network namespace, where the thread returns after a pass.
    home: File,
    map: Option<aya::maps::HashMap<aya::maps::MapData, SockRevNatKey, SockRevNat>>,
    destroyed: Arc<AtomicU64>,
    /// Failure kinds already warned about (each is warned once).
    warned: HashSet<String>,
}

impl Worker {
    fn new(pin: PathBuf, home: File, destroyed: Arc<AtomicU64>) -> Self {
        Worker {
            pin,
            home,
            map: None,
            destroyed,
            warned: HashSet::new(),
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Vec<Gone>>) {
        while let Ok(mut gone) = rx.recv() {
            // Everything queued meanwhile in one pass over the namespaces.
            while let Ok(more) = rx.try_recv() {
                gone.extend(more);
            }
            let started = Instant::now();
            let (namespaces, destroyed) = self.pass(&gone);
            // Back home: holding a pod's namespace would keep it alive.
            if let Err(e) = setns(&self.home) {
                self.warn_once(
                    "setns",
                    format!("returning to the agent's network namespace: {e}"),
                );
            }
            self.destroyed.fetch_add(destroyed, Ordering::Relaxed);
            tracing::debug!(
                backends = gone.len(),
                namespaces,
                destroyed,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "destroyed connected UDP sockets of removed backends"
            );
        }
    }

    fn warn_once(&mut self, kind: &str, message: String) {
        if self.warned.insert(kind.to_string()) {
            tracing::warn!("connected UDP sockets of removed backends: {message}");
        }
    }

    /// Visit every namespace; returns (namespaces visited, sockets destroyed).
    fn pass(&mut self, gone: &[Gone]) -> (usize, u64) {
        // backend -> the frontends it left
        let mut by_backend: BTreeMap<(IpAddr, u16), BTreeSet<(IpAddr, u16)>> = BTreeMap::new();
        for g in gone {
            by_backend.entry(g.backend).or_default().insert(g.frontend);
        }
        if self.map.is_none() {
            match open_map(&self.pin) {
                Ok(m) => self.map = Some(m),
                Err(e) => {
                    self.warn_once("map", e.to_string());
                    return (0, 0);
                }
            }
        }
        let namespaces = namespaces();
        if namespaces.len() == 1 {
            self.warn_once(
                "namespaces",
                "only the agent's own network namespace is visible (no hostPID, no /run/netns): pods' sockets are not reached".into(),
            );
        }
        let mut destroyed = 0;
        for path in &namespaces {
            match self.visit(path, &by_backend) {
                Ok(n) => destroyed += n,
                // The process or the namespace went away meanwhile.
                Err(SocketsError::Os { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT)
                        || source.raw_os_error() == Some(libc::ESRCH) => {}
                Err(e) => {
                    let kind = match &e {
                        SocketsError::Os { what, .. } => *what,
                        SocketsError::Map { .. } => "map",
                    };
                    self.warn_once(kind, format!("{}: {e}", path.display()));
                }
            }
        }
        (namespaces.len(), destroyed)
    }

    /// Destroy the matching sockets of the namespace at `path`.
    fn visit(
        &mut self,
        path: &Path,
        by_backend: &BTreeMap<(IpAddr, u16), BTreeSet<(IpAddr, u16)>>,
    ) -> Result<u64, SocketsError> {
        let ns = File::open(path).map_err(os("opening the namespace"))?;
        // Entering a namespace needs CAP_SYS_ADMIN; the one the thread is
        // in needs no setns (the agent's own, visited first: the host's,
        // where hostNetwork pods' sockets are).
        let current =
            File::open("/proc/thread-self/ns/net").map_err(os("opening the thread's namespace"))?;
        if !same_file(&ns, &current)? {
            setns(&ns).map_err(os("setns (needs CAP_SYS_ADMIN)"))?;
        }
        let diag = SockDiag::open()?;
        let mut destroyed = 0;
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            for msg in diag.dump_connected_udp(family)? {
                let peer = (msg.id.peer(family), u16::from_be_bytes(msg.id.dport));
                let Some(frontends) = by_backend.get(&peer) else {
                    continue;
                };
                if !self.through(msg.id.cookie(), peer, frontends) {
                    continue;
                }
                match diag.destroy(family, &msg.id) {
                    Ok(()) => destroyed += 1,
                    // Closed meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => {
                        let hint = if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                            " (kernel built without CONFIG_INET_DIAG_DESTROY)"
                        } else {
                            ""
                        };
                        self.warn_once("destroy", format!("SOCK_DESTROY: {e}{hint}"));
                    }
                }
            }
        }
        Ok(destroyed)
    }

    /// Whether the socket `cookie` reached `backend` through one of `frontends`.
    fn through(
        &self,
        cookie: u64,
        backend: (IpAddr, u16),
        frontends: &BTreeSet<(IpAddr, u16)>,
    ) -> bool {
        let Some(map) = &self.map else { return false };
        let key = SockRevNatKey {
            cookie,
            addr: addr_to_abi(backend.0),
            port: backend.1,
            _pad: [0; 6],
        };
        map.get(&key, 0).is_ok_and(|v| {
            frontends
                .iter()
                .any(|&(addr, port)| addr_to_abi(addr) == v.addr && port == v.port)
        })
    }
}

fn open_map(
    pin: &Path,
) -> Result<aya::maps::HashMap<aya::maps::MapData, SockRevNatKey, SockRevNat>, SocketsError> {
    let err = |source| SocketsError::Map {
        path: pin.to_path_buf(),
        source,
    };
    let data = aya::maps::MapData::from_pin(pin).map_err(err)?;
    aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data)).map_err(err)
}

fn same_file(a: &File, b: &File) -> Result<bool, SocketsError> {
    let (a, b) = (
        a.metadata().map_err(os("stat"))?,
        b.metadata().map_err(os("stat"))?,
    );
    Ok((a.dev(), a.ino()) == (b.dev(), b.ino()))
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: a valid descriptor; changes only this thread's namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One path per network namespace, distinct by inode: the thread's own
/// first (entered without setns), then every named one (`ip netns add`,
/// container runtimes' pins under /run/netns) and every process's.
fn namespaces() -> Vec<PathBuf> {
    let mut seen = HashSet::new();
    let mut paths = Vec::new();
    let mut add = |path: PathBuf| {
        if let Ok(m) = std::fs::metadata(&path) {
            if seen.insert((m.dev(), m.ino())) {
                paths.push(path);
            }
        }
    };
    add(PathBuf::from("/proc/thread-self/ns/net"));
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                add(e.path());
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let name = e.file_name();
            if name
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
            {
                add(e.path().join("ns/net"));
            }
        }
    }
    paths
}

// ---- sock_diag (linux/inet_diag.h, linux/sock_diag.h, linux/netlink.h) ----

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
/// A connected UDP socket's state (TCP's state numbers are reused).
const TCP_ESTABLISHED: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct NlMsgHdr {
    len: u32,
    ty: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

/// struct inet_diag_sockid: ports and addresses in network order.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    interface: u32,
    cookie: [u32; 2],
}

impl SockId {
    fn peer(&self, family: u8) -> IpAddr {
        if family == libc::AF_INET as u8 {
            IpAddr::V4(Ipv4Addr::new(
                self.dst[0],
                self.dst[1],
                self.dst[2],
                self.dst[3],
            ))
        } else {
            let v6 = Ipv6Addr::from(self.dst);
            // A dual-stack socket connected to an IPv4 address.
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
    }

    /// The socket cookie, as bpf_get_socket_cookie returns it.
    fn cookie(&self) -> u64 {
        u64::from(self.cookie[0]) | (u64::from(self.cookie[1]) << 32)
    }
}

/// struct inet_diag_req_v2.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct ReqV2 {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// struct inet_diag_msg.
#[repr(C)]
#[derive(Clone, Copy, Default, Pod, Zeroable)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// A NETLINK_SOCK_DIAG socket, in the namespace it was opened in.
struct SockDiag {
    fd: OwnedFd,
}

impl SockDiag {
    fn open() -> Result<Self, SocketsError> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(os("sock_diag socket")(io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A short receive timeout: a kernel that never answers must not
        // stall the thread.
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: a valid descriptor and a timeval of the right size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        Ok(SockDiag { fd })
    }

    fn send(&self, ty: u16, flags: u16, req: &ReqV2) -> io::Result<()> {
        let hdr = NlMsgHdr {
            len: (std::mem::size_of::<NlMsgHdr>() + std::mem::size_of::<ReqV2>()) as u32,
            ty,
            flags,
            seq: 1,
            pid: 0,
        };
        let mut buf = bytemuck::bytes_of(&hdr).to_vec();
        buf.extend_from_slice(bytemuck::bytes_of(req));
        // SAFETY: sending a buffer we own; the kernel is the default peer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: receiving into a buffer we own, at most its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Connected UDP sockets of `family`.
    fn dump_connected_udp(&self, family: u8) -> Result<Vec<DiagMsg>, SocketsError> {
        let req = ReqV2 {
            family,
            protocol: libc::IPPROTO_UDP as u8,
            states: 1 << TCP_ESTABLISHED,
            ..ReqV2::default()
        };
        self.send(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, &req)
            .map_err(os("sock_diag dump"))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = self.recv(&mut buf).map_err(os("sock_diag dump"))?;
            for (ty, body) in messages(&buf[..n]) {
                match ty {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        // No udp_diag: ENOENT from the dump is "no handler".
                        return Err(os("sock_diag dump (udp_diag loaded?)")(netlink_error(body)));
                    }
                    SOCK_DIAG_BY_FAMILY => {
                        if let Some(m) = body.get(..std::mem::size_of::<DiagMsg>()) {
                            out.push(bytemuck::pod_read_unaligned(m));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// SOCK_DESTROY the socket `id` (cookie included: a different socket
    /// on the same addresses is not touched).
    fn destroy(&self, family: u8, id: &SockId) -> io::Result<()> {
        let req = ReqV2 {
            family,
            protocol: libc::IPPROTO_UDP as u8,
            states: u32::MAX,
            id: *id,
            ..ReqV2::default()
        };
        self.send(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, &req)?;
        let mut buf = vec![0u8; 4096];
        let n = self.recv(&mut buf)?;
        for (ty, body) in messages(&buf[..n]) {
            if ty == NLMSG_ERROR {
                let e = netlink_error(body);
                return match e.raw_os_error() {
                    Some(0) => Ok(()),
                    _ => Err(e),
                };
            }
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no acknowledgement",
        ))
    }
}

/// The (type, body) of each netlink message in `buf`.
fn messages(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let hdr_len = std::mem::size_of::<NlMsgHdr>();
    let mut out = Vec::new();
    while buf.len() >= hdr_len {
        let hdr: NlMsgHdr = bytemuck::pod_read_unaligned(&buf[..hdr_len]);
        let len = hdr.len as usize;
        if len < hdr_len || len > buf.len() {
            break;
        }
        out.push((hdr.ty, &buf[hdr_len..len]));
        // NLMSG_ALIGN: 4 bytes.
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    out
}

/// The errno of an NLMSG_ERROR body (0: an acknowledgement).
fn netlink_error(body: &[u8]) -> io::Error {
    let code = body
        .get(..4)
        .map_or(libc::EIO, |b| -i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
    io::Error::from_raw_os_error(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backend, FrontendKey};

    fn backend(addr: &str, port: u16) -> Backend {
        Backend {
            addr: addr.parse().unwrap(),
            port,
            terminating: false,
            local: false,
        }
    }

    fn frontend(proto: Protocol, backends: Vec<Backend>) -> Frontend {
        let key = FrontendKey::new("198.19.0.10".parse().unwrap(), 53, proto);
        Frontend::cluster_ip(key, backends)
    }

    #[test]
    fn removed_udp_backends_are_gone() {
        let old = [frontend(
            Protocol::Udp,
            vec![backend("198.18.1.2", 53), backend("198.18.1.3", 53)],
        )];
        let new = [frontend(Protocol::Udp, vec![backend("198.18.1.3", 53)])];
        let gone = gone_backends(&old, &new);
        assert_eq!(
            gone,
            vec![Gone {
                frontend: ("198.19.0.10".parse().unwrap(), 53),
                backend: ("198.18.1.2".parse().unwrap(), 53),
            }]
        );
        // A deleted frontend: all its backends.
        assert_eq!(gone_backends(&old, &[]).len(), 2);
        // A port change is a different backend.
        let moved = [frontend(
            Protocol::Udp,
            vec![backend("198.18.1.2", 54), backend("198.18.1.3", 53)],
        )];
        assert_eq!(gone_backends(&old, &moved).len(), 1);
    }

    #[test]
    fn a_draining_backend_is_not_gone() {
        // Terminating but serving: kube-proxy keeps its UDP conntrack.
        let old = [frontend(Protocol::Udp, vec![backend("198.18.1.2", 53)])];
        let mut new = frontend(Protocol::Udp, vec![backend("198.18.1.3", 53)]);
        new.draining = vec![backend("198.18.1.2", 53)];
        assert!(gone_backends(&old, &[new]).is_empty());
    }

    #[test]
    fn tcp_and_external_frontends_are_left_alone() {
        let old = [frontend(Protocol::Tcp, vec![backend("198.18.1.2", 80)])];
        assert!(gone_backends(&old, &[]).is_empty());
        let mut external = frontend(Protocol::Udp, vec![backend("198.18.1.2", 53)]);
        external.key.scope = Scope::External;
        assert!(gone_backends(&[external], &[]).is_empty());
    }

    #[test]
    fn netlink_messages_are_split_at_aligned_lengths() {
        let mut buf = Vec::new();
        for (ty, body) in [(NLMSG_ERROR, vec![0u8; 5]), (NLMSG_DONE, vec![1u8; 4])] {
            let hdr = NlMsgHdr {
                len: (16 + body.len()) as u32,
                ty,
                ..NlMsgHdr::default()
            };
            buf.extend_from_slice(bytemuck::bytes_of(&hdr));
            buf.extend_from_slice(&body);
            buf.resize((buf.len() + 3) & !3, 0);
        }
        let m = messages(&buf);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].0, m[0].1.len()), (NLMSG_ERROR, 5));
        assert_eq!((m[1].0, m[1].1.len()), (NLMSG_DONE, 4));
    }
}
