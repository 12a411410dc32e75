//! svclb-probe: the traffic tool of the test harness.
//!
//! - `serve`: TCP and UDP echo-ish servers that say who they are and who
//!   called, so a client can tell which backend (and port) it reached and
//!   what address the server saw (TCP and SCTP on one epoll loop).
//! - `connect`: N independent attempts (a new socket each, so each one is a
//!   new load-balancing decision), one JSON line per attempt.
//! - `hold`: a long-lived connection plus a stream of new ones, to show
//!   that nothing breaks while the agent restarts.
//! - `rate`: as many request/replies as it can for a duration, taking
//!   one or more targets in turn, then one JSON line with each target's
//!   ops/s (the benchmarks' client).
//! - `watch`: long-lived connected UDP sockets and TCP connections, one
//!   request on each every interval until stdin closes, then one JSON line
//!   per request with its wall-clock time (what an application holding
//!   sockets sees while backends change).
//! - `http-get`: one HTTP/1.1 GET, one JSON line with status, headers and
//!   body (health check ports).
//! - `whoami`: where the probe runs (cgroup, netns), for harness self-tests.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::FromRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Traffic probe for the svclb netns test harness")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
    /// SCTP one-to-one (SOCK_STREAM) sockets: connect, one request line.
    Sctp,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve TCP and UDP on [::]:PORT (IPv4 too) for each --port; reply
    /// "NAME PORT PEER\n" to each request line / datagram. Prints
    /// "listening" once every port is bound. Runs until killed.
    Serve {
        #[arg(long)]
        name: String,
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
    },
    /// COUNT attempts, one JSON line each.
    Connect {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: Proto,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// connect() the UDP socket (send/recv/getpeername) instead of
        /// sendto/recvfrom.
        #[arg(long)]
        udp_connected: bool,
        /// UDP: send from this local port (default: an ephemeral one).
        #[arg(long, default_value_t = 0)]
        source_port: u16,
    },
    /// One unconnected UDP socket sending a datagram every INTERVAL
    /// (COUNT of them, 0: until stdin reaches EOF); one JSON line per
    /// datagram, as `connect` prints them, flushed at once.
    UdpFlow {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 0)]
        count: u32,
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Read replies with recv() (no sender address) instead of
        /// recvfrom(): svclb's recvmsg hook then never sees a reply.
        #[arg(long)]
        no_peer: bool,
    },
    /// For DURATION: every INTERVAL one request on a long-lived TCP
    /// connection and one new short TCP connection; then a JSON summary.
    Hold {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        duration_ms: u64,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Also stop as soon as stdin reaches EOF.
        #[arg(long)]
        until_eof: bool,
        /// Long-lived connections, each sent one request per interval.
        #[arg(long, default_value_t = 1)]
        connections: usize,
    },
    /// Back-to-back request/replies for DURATION, taking the targets in
    /// turn (one request each), then one JSON line: {"proto","seconds",
    /// "results":[{"target","ops","errors","seconds","ops_per_sec",
    /// "first_error"}]}, where a target's seconds is the time spent in its
    /// own requests. tcp: a new connection per request (connect, one
    /// request/reply, close); udp: one unconnected socket per target,
    /// sendto + recvfrom per request.
    Rate {
        /// ADDR:PORT ([ADDR]:PORT for IPv6); repeat to interleave targets.
        #[arg(long = "target", required = true)]
        targets: Vec<SocketAddr>,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: Proto,
        #[arg(long)]
        duration_ms: u64,
        /// Receive timeout per reply (a lost datagram costs this much).
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// At most this many requests per second over all targets (0: back
        /// to back), for a steady background load rather than a maximum.
        #[arg(long, default_value_t = 0)]
        per_sec: u32,
    },
    /// One long-lived socket per --udp target (connect()ed UDP) and per
    /// --tcp target (one connection); every INTERVAL one request on each,
    /// until stdin reaches EOF; then one JSON line per request:
    /// {"target":"udp ADDR:PORT","unix_ms","ok":true,"server"} or
    /// {...,"ok":false,"error","stage"}. A failed socket is kept, as by an
    /// application that does not reconnect.
    Watch {
        #[arg(long = "udp")]
        udp: Vec<SocketAddr>,
        #[arg(long = "tcp")]
        tcp: Vec<SocketAddr>,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        #[arg(long, default_value_t = 300)]
        timeout_ms: u64,
    },
    /// One GET PATH; prints {"ok":true,"status","headers":{lower-case
    /// name: value},"body"} or {"ok":false,"error","stage","detail"}.
    HttpGet {
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Print {"pid","cgroup","netns"} of this process.
    Whoami,
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Serve { name, ports } => serve(&name, &ports),
        Cmd::Connect {
            addr,
            port,
            proto,
            count,
            timeout_ms,
            udp_connected,
            source_port,
        } => {
            let target = SocketAddr::new(addr, port);
            let timeout = Duration::from_millis(timeout_ms);
            let mut out = io::stdout().lock();
            for _ in 0..count {
                let r = match proto {
                    Proto::Tcp => tcp_once(target, timeout),
                    Proto::Udp => udp_once(target, timeout, udp_connected, source_port),
                    Proto::Sctp => sctp_once(target, timeout),
                };
                let line = match r {
                    Ok(v) => v,
                    Err(f) => f.to_json(),
                };
                if writeln!(out, "{line}").is_err() {
                    break;
                }
            }
            Ok(())
        }
        Cmd::UdpFlow {
            addr,
            port,
            count,
            interval_ms,
            timeout_ms,
            no_peer,
        } => udp_flow(
            SocketAddr::new(addr, port),
            count,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
            no_peer,
        ),
        Cmd::Hold {
            addr,
            port,
            duration_ms,
            interval_ms,
            timeout_ms,
            until_eof,
            connections,
        } => {
            hold(
                SocketAddr::new(addr, port),
                Duration::from_millis(duration_ms),
                Duration::from_millis(interval_ms),
                Duration::from_millis(timeout_ms),
                until_eof,
                connections,
            );
            Ok(())
        }
        Cmd::Rate {
            targets,
            proto,
            duration_ms,
            timeout_ms,
            per_sec,
        } => rate(
            &targets,
            proto,
            Duration::from_millis(duration_ms),
            Duration::from_millis(timeout_ms),
            per_sec,
        ),
        Cmd::Watch {
            udp,
            tcp,
            interval_ms,
            timeout_ms,
        } => watch(
            &udp,
            &tcp,
            Duration::from_millis(interval_ms),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::HttpGet {
            addr,
            port,
            path,
            timeout_ms,
        } => {
            let target = SocketAddr::new(addr, port);
            let r = http_get(target, &path, Duration::from_millis(timeout_ms));
            println!("{}", r.unwrap_or_else(|f| f.to_json()));
            Ok(())
        }
        Cmd::Whoami => {
            let v = json!({
                "pid": std::process::id(),
                "cgroup": fs::read_to_string("/proc/self/cgroup").unwrap_or_default(),
                "netns": fs::read_link("/proc/self/ns/net").map(|p| p.display().to_string()).unwrap_or_default(),
            });
            println!("{v}");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("svclb-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

/// IPv4 peers of a dual-stack socket show up as ::ffff:a.b.c.d; print
/// them as plain IPv4 so results compare with pod addresses.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

// ---- serve ----

/// A [::]:port socket with IPV6_V6ONLY off, so it also serves IPv4
/// whatever net.ipv6.bindv6only says. std cannot set options before bind.
fn dual_stack_socket(kind: libc::c_int, proto: libc::c_int, port: u16) -> io::Result<libc::c_int> {
    // SAFETY: plain socket syscalls on a descriptor we own; the sockaddr is
    // a zeroed sockaddr_in6 with family and port filled in.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, kind | libc::SOCK_CLOEXEC, proto);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fail = |fd| {
            let e = io::Error::last_os_error();
            libc::close(fd);
            Err(e)
        };
        let off: libc::c_int = 0;
        let on: libc::c_int = 1;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::setsockopt(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            (&off as *const libc::c_int).cast(),
            len,
        ) != 0
            || libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&on as *const libc::c_int).cast(),
                len,
            ) != 0
        {
            return fail(fd);
        }
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_port = port.to_be();
        let salen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        if libc::bind(fd, (&sa as *const libc::sockaddr_in6).cast(), salen) != 0 {
            return fail(fd);
        }
        if kind == libc::SOCK_STREAM && libc::listen(fd, 1024) != 0 {
            return fail(fd);
        }
        Ok(fd)
    }
}

fn serve(name: &str, ports: &[u16]) -> Result<(), String> {
    let mut streams = Vec::new();
    let mut threads = Vec::new();
    for &port in ports {
        let err = |e: io::Error| format!("binding [::]:{port}: {e}");
        // SAFETY: the descriptors are fresh, owned, and of the right kind.
        let tcp = unsafe {
            TcpListener::from_raw_fd(dual_stack_socket(libc::SOCK_STREAM, 0, port).map_err(err)?)
        };
        let udp = unsafe {
            UdpSocket::from_raw_fd(dual_stack_socket(libc::SOCK_DGRAM, 0, port).map_err(err)?)
        };
        // SCTP too where the kernel has it (an accepted one-to-one SCTP
        // socket reads and writes like a TCP stream).
        match dual_stack_socket(libc::SOCK_STREAM, libc::IPPROTO_SCTP, port) {
            // SAFETY: as above.
            Ok(fd) => streams.push((port, unsafe { TcpListener::from_raw_fd(fd) })),
            Err(e) if no_sctp(&e) => {}
            Err(e) => return Err(err(e)),
        }
        streams.push((port, tcp));
        let n = name.to_string();
        threads.push(thread::spawn(move || serve_udp(&n, port, udp)));
    }
    // Stream connections on one epoll loop (a tokio current-thread
    // runtime): a thread per connection capped short connections at about
    // 1,400/s, which made the benchmarks measure thread creation.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    rt.block_on(async move {
        for (port, listener) in streams {
            listener
                .set_nonblocking(true)
                .map_err(|e| format!("[::]:{port}: {e}"))?;
            let listener = tokio::net::TcpListener::from_std(listener)
                .map_err(|e| format!("[::]:{port}: {e}"))?;
            tokio::spawn(serve_stream(name.to_string(), port, listener));
        }
        println!("listening");
        io::stdout().flush().map_err(|e| e.to_string())?;
        std::future::pending::<()>().await;
        Ok::<(), String>(())
    })?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// Accept TCP (or one-to-one SCTP) connections; on each, reply
/// "NAME PORT PEER\n" to every request line.
async fn serve_stream(name: String, port: u16, listener: tokio::net::TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            // Out of descriptors, or a connection reset before accept:
            // back off a little rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let reply = format!("{name} {port} {}\n", canonical(peer));
        tokio::spawn(reply_lines(stream, reply));
    }
}

/// `reply` once per line received, until EOF or an error (a last line
/// without its newline counts too).
async fn reply_lines(mut stream: tokio::net::TcpStream, reply: String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = [0u8; 2048];
    let mut partial = false;
    loop {
        let n = match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let lines = buf[..n].iter().filter(|&&b| b == b'\n').count();
        partial = buf[n - 1] != b'\n';
        for _ in 0..lines {
            if stream.write_all(reply.as_bytes()).await.is_err() {
                return;
            }
        }
    }
    if partial {
        let _ = stream.write_all(reply.as_bytes()).await;
    }
}

fn serve_udp(name: &str, port: u16, socket: UdpSocket) {
    let mut buf = [0u8; 2048];
    loop {
        let Ok((_, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let reply = format!("{name} {port} {}\n", canonical(peer));
        let _ = socket.send_to(reply.as_bytes(), peer);
    }
}

/// The errors socket() gives for SCTP on a kernel without it.
fn no_sctp(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPROTONOSUPPORT | libc::ESOCKTNOSUPPORT | libc::EAFNOSUPPORT)
    )
}

// ---- connect ----

/// A failed attempt: the step and the OS error.
struct Failure {
    stage: &'static str,
    err: io::Error,
}

impl Failure {
    fn at(stage: &'static str) -> impl FnOnce(io::Error) -> Failure {
        move |err| Failure { stage, err }
    }

    fn to_json(&self) -> Value {
        json!({ "ok": false, "error": errno_name(&self.err), "stage": self.stage, "detail": self.err.to_string() })
    }

    fn short(&self) -> String {
        format!("{} {}", self.stage, errno_name(&self.err))
    }
}

fn errno_name(e: &io::Error) -> String {
    let known = [
        (libc::EPERM, "EPERM"),
        (libc::EACCES, "EACCES"),
        (libc::ECONNREFUSED, "ECONNREFUSED"),
        (libc::ETIMEDOUT, "ETIMEDOUT"),
        (libc::ECONNRESET, "ECONNRESET"),
        (libc::ECONNABORTED, "ECONNABORTED"),
        (libc::ENETUNREACH, "ENETUNREACH"),
        (libc::EHOSTUNREACH, "EHOSTUNREACH"),
        (libc::ENETDOWN, "ENETDOWN"),
        (libc::EADDRNOTAVAIL, "EADDRNOTAVAIL"),
        (libc::EADDRINUSE, "EADDRINUSE"),
        (libc::EAFNOSUPPORT, "EAFNOSUPPORT"),
        (libc::EINVAL, "EINVAL"),
        (libc::EPIPE, "EPIPE"),
        (libc::ENOTCONN, "ENOTCONN"),
        (libc::ENOBUFS, "ENOBUFS"),
        (libc::EMSGSIZE, "EMSGSIZE"),
        (libc::EINTR, "EINTR"),
        (libc::EDESTADDRREQ, "EDESTADDRREQ"),
    ];
    if let Some(code) = e.raw_os_error() {
        // A receive timeout is EAGAIN; report it as what it means.
        if code == libc::EAGAIN {
            return "ETIMEDOUT".into();
        }
        return known
            .iter()
            .find(|(c, _)| *c == code)
            .map_or_else(|| format!("E{code}"), |(_, n)| n.to_string());
    }
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "ETIMEDOUT".into(),
        io::ErrorKind::UnexpectedEof => "EOF".into(),
        io::ErrorKind::InvalidData => "BADREPLY".into(),
        _ => format!("{:?}", e.kind()),
    }
}

/// "NAME PORT PEER" -> the success JSON (without the client's own view).
fn parse_reply(reply: &str) -> Result<(String, u16, String), io::Error> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {reply:?}"));
    let mut it = reply.split_whitespace();
    let name = it.next().ok_or_else(bad)?.to_string();
    let port = it.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let client = it.next().ok_or_else(bad)?.to_string();
    Ok((name, port, client))
}

fn success(reply: &str, peer: SocketAddr, local: SocketAddr) -> Result<Value, Failure> {
    let (server, server_port, client) = parse_reply(reply).map_err(Failure::at("recv"))?;
    Ok(json!({
        "ok": true,
        "server": server,
        "server_port": server_port,
        "peer": canonical(peer).to_string(),
        "client": client,
        "local": canonical(local).to_string(),
    }))
}

/// Send "hi\n" on an open stream and read one reply line.
fn request(stream: &TcpStream) -> Result<String, Failure> {
    (&*stream).write_all(b"hi\n").map_err(Failure::at("send"))?;
    let mut line = String::new();
    // One byte at a time: no buffered bytes may be lost between requests
    // on a long-lived connection.
    let mut byte = [0u8; 1];
    loop {
        match (&*stream).read(&mut byte) {
            Ok(0) => return Err(Failure::at("recv")(io::ErrorKind::UnexpectedEof.into())),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) => line.push(byte[0] as char),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Failure::at("recv")(e)),
        }
    }
}

fn tcp_open(target: SocketAddr, timeout: Duration) -> Result<TcpStream, Failure> {
    let s = TcpStream::connect_timeout(&target, timeout).map_err(Failure::at("connect"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(Failure::at("socket"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(Failure::at("socket"))?;
    Ok(s)
}

fn tcp_once(target: SocketAddr, timeout: Duration) -> Result<Value, Failure> {
    let s = tcp_open(target, timeout)?;
    let reply = request(&s)?;
    let peer = s.peer_addr().map_err(Failure::at("getpeername"))?;
    let local = s.local_addr().map_err(Failure::at("getsockname"))?;
    success(&reply, peer, local)
}

/// GET `path` with Connection: close and read the response to EOF.
fn http_get(target: SocketAddr, path: &str, timeout: Duration) -> Result<Value, Failure> {
    let mut s = tcp_open(target, timeout)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())
        .map_err(Failure::at("send"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(Failure::at("recv"))?;
    let raw = String::from_utf8_lossy(&raw);
    let bad = || {
        Failure::at("recv")(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad response {raw:?}"),
        ))
    };
    let (head, body) = raw.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.split("\r\n");
    let status: u16 = (lines.next().and_then(|l| l.split(' ').nth(1)))
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(json!({ "ok": true, "status": status, "headers": headers, "body": body }))
}

/// A UDP socket of `target`'s family on an ephemeral port, reads timing
/// out after `timeout`.
fn udp_socket(target: SocketAddr, timeout: Duration) -> Result<UdpSocket, String> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(any).map_err(|e| format!("udp socket: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| format!("udp socket: {e}"))?;
    Ok(s)
}

fn udp_once(
    target: SocketAddr,
    timeout: Duration,
    connected: bool,
    source_port: u16,
) -> Result<Value, Failure> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, source_port).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, source_port).into(),
    };
    let s = UdpSocket::bind(any).map_err(Failure::at("socket"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(Failure::at("socket"))?;
    let mut buf = [0u8; 2048];
    let (n, peer) = if connected {
        s.connect(target).map_err(Failure::at("connect"))?;
        s.send(b"hi\n").map_err(Failure::at("send"))?;
        let n = s.recv(&mut buf).map_err(Failure::at("recv"))?;
        (n, s.peer_addr().map_err(Failure::at("getpeername"))?)
    } else {
        s.send_to(b"hi\n", target).map_err(Failure::at("send"))?;
        s.recv_from(&mut buf).map_err(Failure::at("recv"))?
    };
    let local = s.local_addr().map_err(Failure::at("getsockname"))?;
    success(&String::from_utf8_lossy(&buf[..n]), peer, local)
}

/// A connected one-to-one SCTP socket, as a stream.
fn sctp_open(target: SocketAddr, timeout: Duration) -> Result<TcpStream, Failure> {
    let family = match target {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket(2) has no memory arguments.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            libc::IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        return Err(Failure::at("socket")(io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own; it reads and writes like a stream.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    // SO_SNDTIMEO bounds SCTP's blocking connect as well.
    s.set_write_timeout(Some(timeout))
        .map_err(Failure::at("socket"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(Failure::at("socket"))?;
    let (sa, len) = sockaddr(target);
    // SAFETY: `sa` is a sockaddr_storage holding a sockaddr of `len` bytes.
    let rc = unsafe { libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // A blocking SCTP connect whose SO_SNDTIMEO ran out before the
        // association came up returns EINPROGRESS: a timeout.
        let e = match e.raw_os_error() {
            Some(libc::EINPROGRESS) => io::Error::from_raw_os_error(libc::ETIMEDOUT),
            _ => e,
        };
        return Err(Failure::at("connect")(e));
    }
    Ok(s)
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all zeroes is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn sctp_once(target: SocketAddr, timeout: Duration) -> Result<Value, Failure> {
    let s = sctp_open(target, timeout)?;
    let reply = request(&s)?;
    let peer = s.peer_addr().map_err(Failure::at("getpeername"))?;
    let local = s.local_addr().map_err(Failure::at("getsockname"))?;
    success(&reply, peer, local)
}

// ---- udp-flow ----

fn udp_flow(
    target: SocketAddr,
    count: u32,
    interval: Duration,
    timeout: Duration,
    no_peer: bool,
) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    if count == 0 {
        let stop = stop.clone();
        thread::spawn(move || {
            let _ = io::copy(&mut io::stdin(), &mut io::sink());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let s = udp_socket(target, timeout)?;
    let local = s.local_addr().map_err(|e| format!("getsockname: {e}"))?;
    let mut out = io::stdout().lock();
    let mut buf = [0u8; 2048];
    let mut sent = 0u32;
    while (count == 0 || sent < count) && !stop.load(Ordering::Relaxed) {
        if sent > 0 {
            thread::sleep(interval);
        }
        sent += 1;
        let r = s
            .send_to(b"hi\n", target)
            .map_err(Failure::at("send"))
            .and_then(|_| {
                if no_peer {
                    let n = s.recv(&mut buf).map_err(Failure::at("recv"))?;
                    Ok((n, target))
                } else {
                    s.recv_from(&mut buf).map_err(Failure::at("recv"))
                }
            })
            .and_then(|(n, peer)| success(&String::from_utf8_lossy(&buf[..n]), peer, local));
        let line = r.unwrap_or_else(|f| f.to_json());
        if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    Ok(())
}

// ---- hold ----

fn hold(
    target: SocketAddr,
    duration: Duration,
    interval: Duration,
    timeout: Duration,
    until_eof: bool,
    connections: usize,
) {
    let stop = Arc::new(AtomicBool::new(false));
    if until_eof {
        let stop = stop.clone();
        thread::spawn(move || {
            let _ = io::copy(&mut io::stdin(), &mut io::sink());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let start = Instant::now();
    let (mut requests, mut failures, mut new_conns, mut new_failures) = (0u64, 0u64, 0u64, 0u64);
    let mut errors: Vec<String> = Vec::new();
    let mut servers: BTreeMap<String, u64> = BTreeMap::new();
    let note = |errors: &mut Vec<String>, what: &str, f: &Failure| {
        // Bounded: a broken setup must not produce megabytes of output.
        if errors.len() < 50 {
            errors.push(format!(
                "t={}ms {what}: {}",
                start.elapsed().as_millis(),
                f.short()
            ));
        }
    };
    let mut long: Vec<Option<TcpStream>> = (0..connections).map(|_| None).collect();
    // The server each long-lived connection reached first.
    let mut long_servers: Vec<String> = vec![String::new(); connections];
    let mut tick = start;
    while start.elapsed() < duration && !stop.load(Ordering::Relaxed) {
        // The long-lived connections: (re)opened when missing; an open or
        // request failure counts as a failed request.
        for (conn, first) in long.iter_mut().zip(&mut long_servers) {
            requests += 1;
            let r = match conn.take() {
                Some(s) => Ok(s),
                None => tcp_open(target, timeout),
            }
            .and_then(|s| request(&s).map(|reply| (s, reply)));
            match r {
                Ok((s, reply)) => {
                    if let Some(name) = reply.split_whitespace().next() {
                        *servers.entry(name.to_string()).or_default() += 1;
                        if first.is_empty() {
                            *first = name.to_string();
                        }
                    }
                    *conn = Some(s);
                }
                Err(f) => {
                    failures += 1;
                    note(&mut errors, "long", &f);
                }
            }
        }
        new_conns += 1;
        match tcp_once(target, timeout) {
            Ok(v) => {
                if let Some(name) = v["server"].as_str() {
                    *servers.entry(name.to_string()).or_default() += 1;
                }
            }
            Err(f) => {
                new_failures += 1;
                note(&mut errors, "new", &f);
            }
        }
        tick += interval;
        if let Some(wait) = tick.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        } else {
            tick = Instant::now();
        }
    }
    println!(
        "{}",
        json!({
            "requests": requests,
            "failures": failures,
            "new_connections": new_conns,
            "new_connection_failures": new_failures,
            "errors": errors,
            "servers": servers,
            "long_servers": long_servers,
        })
    );
}

// ---- watch ----

fn watch(
    udp: &[SocketAddr],
    tcp: &[SocketAddr],
    interval: Duration,
    timeout: Duration,
) -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        thread::spawn(move || {
            let _ = io::copy(&mut io::stdin(), &mut io::sink());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let mut sockets = Vec::new();
    for &t in udp {
        let s = udp_socket(t, timeout)?;
        s.connect(t).map_err(|e| format!("udp connect {t}: {e}"))?;
        sockets.push((format!("udp {t}"), s));
    }
    let mut conns: Vec<(String, Option<TcpStream>)> = tcp
        .iter()
        .map(|&t| (format!("tcp {t}"), tcp_open(t, timeout).ok()))
        .collect();
    let unix_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    let mut lines = Vec::new();
    let mut record = |target: &str, at: u64, r: Result<String, Failure>| {
        lines.push(match r {
            Ok(reply) => {
                let server = reply
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                json!({ "target": target, "unix_ms": at, "ok": true, "server": server })
            }
            Err(f) => json!({
                "target": target, "unix_ms": at, "ok": false,
                "error": errno_name(&f.err), "stage": f.stage,
            }),
        });
    };
    while !stop.load(Ordering::Relaxed) {
        for (name, s) in &sockets {
            let at = unix_ms();
            let r = udp_request(s);
            record(name, at, r);
        }
        for (name, conn) in &mut conns {
            let at = unix_ms();
            let r = match conn {
                Some(s) => request(s),
                None => Err(Failure::at("connect")(io::Error::from_raw_os_error(
                    libc::ENOTCONN,
                ))),
            };
            if r.is_err() {
                *conn = None;
            }
            record(name, at, r);
        }
        thread::sleep(interval);
    }
    let mut out = io::stdout().lock();
    for l in lines {
        writeln!(out, "{l}").map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One request on a connected UDP socket: the reply line.
fn udp_request(s: &UdpSocket) -> Result<String, Failure> {
    s.send(b"hi\n").map_err(Failure::at("send"))?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).map_err(Failure::at("recv"))?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

// ---- rate ----

/// Read until the reply's final newline (a reply is one short line, so
/// this is almost always a single read).
fn read_reply(mut r: impl Read, buf: &mut [u8]) -> io::Result<()> {
    let mut n = 0;
    loop {
        match r.read(&mut buf[n..]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(m) => {
                n += m;
                if buf[n - 1] == b'\n' {
                    return Ok(());
                }
                if n == buf.len() {
                    return Err(io::ErrorKind::InvalidData.into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// One short TCP connection. Plain blocking connect and no extra socket
/// options: every syscall here is part of what is measured.
fn tcp_op(target: SocketAddr, timeout: Duration, buf: &mut [u8]) -> Result<(), Failure> {
    let mut s = TcpStream::connect(target).map_err(Failure::at("connect"))?;
    // Bounds a lost reply; one setsockopt, the same in every mode.
    s.set_read_timeout(Some(timeout))
        .map_err(Failure::at("socket"))?;
    s.write_all(b"hi\n").map_err(Failure::at("send"))?;
    read_reply(&s, buf).map_err(Failure::at("recv"))
}

fn udp_op(s: &UdpSocket, target: SocketAddr, buf: &mut [u8]) -> Result<(), Failure> {
    s.send_to(b"hi\n", target).map_err(Failure::at("send"))?;
    let (n, _) = s.recv_from(buf).map_err(Failure::at("recv"))?;
    if n == 0 || buf[n - 1] != b'\n' {
        return Err(Failure::at("recv")(io::ErrorKind::InvalidData.into()));
    }
    Ok(())
}

/// What `rate` counted for one target.
#[derive(Default)]
struct Tally {
    ops: u64,
    errors: u64,
    busy: Duration,
    first_error: Option<String>,
}

fn rate(
    targets: &[SocketAddr],
    proto: Proto,
    duration: Duration,
    timeout: Duration,
    per_sec: u32,
) -> Result<(), String> {
    // UDP: a socket per target, so that state one target leaves on a
    // socket (svclb's reverse translation entry) never affects another.
    let mut udp = Vec::new();
    if let Proto::Udp = proto {
        for t in targets {
            let s = udp_socket(*t, timeout)?;
            udp.push(s);
        }
    }
    let mut tallies: Vec<Tally> = targets.iter().map(|_| Tally::default()).collect();
    let mut buf = [0u8; 256];
    let start = Instant::now();
    let mut started = 0u64;
    // Targets take turns request by request, so whatever else loads the
    // machine hits them alike. Two clock reads per request: the same
    // overhead for every target.
    'run: loop {
        for (i, &target) in targets.iter().enumerate() {
            if per_sec > 0 {
                let due = start + Duration::from_secs_f64(started as f64 / f64::from(per_sec));
                thread::sleep(due.saturating_duration_since(Instant::now()));
            }
            started += 1;
            let t0 = Instant::now();
            if t0 - start >= duration {
                break 'run;
            }
            let r = match proto {
                Proto::Tcp => tcp_op(target, timeout, &mut buf),
                Proto::Udp => udp_op(&udp[i], target, &mut buf),
                Proto::Sctp => sctp_open(target, timeout).and_then(|s| request(&s).map(drop)),
            };
            let tally = &mut tallies[i];
            tally.busy += t0.elapsed();
            match r {
                Ok(()) => tally.ops += 1,
                Err(f) => {
                    tally.errors += 1;
                    tally.first_error.get_or_insert_with(|| f.short());
                }
            }
        }
    }
    let results: Vec<Value> = targets
        .iter()
        .zip(&tallies)
        .map(|(t, c)| {
            let secs = c.busy.as_secs_f64();
            json!({
                "target": t.to_string(),
                "ops": c.ops,
                "errors": c.errors,
                "seconds": secs,
                "ops_per_sec": if secs > 0.0 { c.ops as f64 / secs } else { 0.0 },
                "first_error": c.first_error,
            })
        })
        .collect();
    println!(
        "{}",
        json!({
            "proto": match proto { Proto::Tcp => "tcp", Proto::Udp => "udp", Proto::Sctp => "sctp" },
            "seconds": start.elapsed().as_secs_f64(),
            "results": results,
        })
    );
    Ok(())
}
