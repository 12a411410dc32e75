//! The svclb-probe binary as seen from the harness: where it is, how to
//! build its command lines, and the JSON it prints.

use std::collections::BTreeMap;
use std::env;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::manifests::Proto;

/// SVCLB_PROBE, else next to the running executable (cargo puts test
/// binaries in target/<profile>/deps and bins in target/<profile>), else
/// the debug build in the target dir.
pub fn probe_bin() -> Result<PathBuf> {
    if let Some(p) = env::var_os("SVCLB_PROBE") {
        return Ok(PathBuf::from(p));
    }
    let mut tried = Vec::new();
    if let Ok(exe) = env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            tried.push(dir.join("svclb-probe"));
        }
    }
    for target in crate::target_dirs() {
        tried.push(target.join("debug/svclb-probe"));
    }
    if let Some(p) = tried.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    bail!(
        "svclb-probe not found (set SVCLB_PROBE or `cargo build -p svclb-tests`); tried {tried:?}"
    )
}

/// One line of `svclb-probe connect` output.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeResult {
    pub ok: bool,
    /// The server's --name.
    pub server: Option<String>,
    /// The port the server received on (the backend's target port).
    pub server_port: Option<u16>,
    /// getpeername() (TCP, connected UDP) or the recvfrom() source
    /// (unconnected UDP) as the client saw it.
    pub peer: Option<String>,
    /// The client's address:port as the server saw it.
    pub client: Option<String>,
    /// getsockname() of the client socket.
    pub local: Option<String>,
    /// Errno name (ECONNREFUSED, EPERM, ETIMEDOUT, ...) when !ok.
    pub error: Option<String>,
    /// Which step failed: socket, connect, send or recv.
    pub stage: Option<String>,
    pub detail: Option<String>,
}

/// The line `svclb-probe http-get` prints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpResult {
    pub ok: bool,
    pub status: Option<u16>,
    /// Names in lower case.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    /// Errno name (ECONNREFUSED, ...) when !ok.
    pub error: Option<String>,
    pub stage: Option<String>,
    pub detail: Option<String>,
}

/// The summary line of `svclb-probe hold`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldSummary {
    pub requests: u64,
    pub failures: u64,
    pub new_connections: u64,
    pub new_connection_failures: u64,
    pub errors: Vec<String>,
    /// Server names seen on the long-lived and short connections.
    #[serde(default)]
    pub servers: BTreeMap<String, u64>,
    /// The server each long-lived connection reached first.
    #[serde(default)]
    pub long_servers: Vec<String>,
}

/// Successful results per server name.
pub fn by_server(results: &[ProbeResult]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results.iter().filter(|r| r.ok) {
        *m.entry(r.server.clone().unwrap_or_default()).or_default() += 1;
    }
    m
}

/// Failed results per error name.
pub fn by_error(results: &[ProbeResult]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in results.iter().filter(|r| !r.ok) {
        *m.entry(r.error.clone().unwrap_or_default()).or_default() += 1;
    }
    m
}

/// Arguments for `svclb-probe connect`.
#[derive(Clone, Debug)]
pub struct Connect {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub count: u32,
    pub timeout_ms: u64,
    pub udp_connected: bool,
    /// UDP only: the local port to send from (0: ephemeral).
    pub source_port: u16,
}

impl Connect {
    pub fn new(proto: Proto, addr: impl Into<IpAddr>, port: u16) -> Self {
        Connect {
            addr: addr.into(),
            port,
            proto,
            count: 1,
            timeout_ms: 1000,
            udp_connected: false,
            source_port: 0,
        }
    }

    pub fn tcp(addr: impl Into<IpAddr>, port: u16) -> Self {
        Self::new(Proto::Tcp, addr, port)
    }

    pub fn udp(addr: impl Into<IpAddr>, port: u16) -> Self {
        Self::new(Proto::Udp, addr, port)
    }

    pub fn count(mut self, count: u32) -> Self {
        self.count = count;
        self
    }

    pub fn timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.timeout_ms = timeout_ms;
        self
    }

    /// UDP: send from `port` (a fixed flow, as far as the network sees).
    pub fn source_port(mut self, port: u16) -> Self {
        self.source_port = port;
        self
    }

    /// UDP: connect() the socket and use send/recv instead of sendto/recvfrom.
    pub fn connected(mut self) -> Self {
        self.udp_connected = true;
        self
    }

    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "connect".into(),
            "--addr".into(),
            self.addr.to_string(),
            "--port".into(),
            self.port.to_string(),
            "--proto".into(),
            self.proto.probe().into(),
            "--count".into(),
            self.count.to_string(),
            "--timeout-ms".into(),
            self.timeout_ms.to_string(),
        ];
        if self.udp_connected {
            a.push("--udp-connected".into());
        }
        if self.source_port != 0 {
            a.push("--source-port".into());
            a.push(self.source_port.to_string());
        }
        a
    }
}

/// Arguments for `svclb-probe hold`.
#[derive(Clone, Debug)]
pub struct Hold {
    pub addr: IpAddr,
    pub port: u16,
    pub duration_ms: u64,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Also stop when stdin is closed ([`crate::Client::finish`] closes it),
    /// so a test can end the run at the right moment.
    pub until_eof: bool,
    /// Long-lived connections (1 unless set).
    pub connections: usize,
}

impl Hold {
    pub fn new(addr: impl Into<IpAddr>, port: u16, duration_ms: u64, interval_ms: u64) -> Self {
        Hold {
            addr: addr.into(),
            port,
            duration_ms,
            interval_ms,
            timeout_ms: 1000,
            until_eof: false,
            connections: 1,
        }
    }

    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    pub fn until_eof(mut self) -> Self {
        self.until_eof = true;
        self
    }

    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "hold".into(),
            "--addr".into(),
            self.addr.to_string(),
            "--port".into(),
            self.port.to_string(),
            "--duration-ms".into(),
            self.duration_ms.to_string(),
            "--interval-ms".into(),
            self.interval_ms.to_string(),
            "--timeout-ms".into(),
            self.timeout_ms.to_string(),
        ];
        if self.until_eof {
            a.push("--until-eof".into());
        }
        if self.connections != 1 {
            a.push("--connections".into());
            a.push(self.connections.to_string());
        }
        a
    }
}
