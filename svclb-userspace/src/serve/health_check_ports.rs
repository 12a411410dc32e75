//! Health check node ports: one HTTP server per port the model asks for
//! ([`crate::model::HealthCheck`]), answering as kube-proxy's
//! ServiceHealthServer (pkg/proxy/healthcheck/service_health.go) does,
//! because cloud load balancers are configured for exactly that:
//!
//! - any path; 200 when the Service has a ready endpoint on this node and
//!   the proxy itself is healthy ([`ProxyHealth::is_healthy`]), else 503;
//! - `Content-Type: application/json`, `X-Content-Type-Options: nosniff`,
//!   and `X-Load-Balancing-Endpoint-Weight: <local endpoints>` (which some
//!   load balancers use to weight nodes);
//! - kube-proxy's JSON body, byte for byte (tab-indented, no final newline).
//!
//! One difference: the shared HTTP server ([`super::Server`]) answers
//! methods other than GET and HEAD with 405, where Go's handler ignores the
//! method. Load balancers probe with GET.
//!
//! A port that cannot be bound is logged with its Service and retried on the
//! next sync; it never stops the agent.
use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use socket2::{Domain, Socket, Type};
use tokio::task::JoinHandle;

use super::healthz::ProxyHealth;
use super::{Response, Server};
use crate::model::{HealthCheck, ModelError, ServiceId};

#[derive(Debug, thiserror::Error)]
pub enum HealthCheckError {
    #[error("health check port {port} of Service {service}: {source}")]
    Bind {
        service: ServiceId,
        port: u16,
        source: io::Error,
    },
}

/// What a server reports; the sync loop updates it in place.
struct Status {
    service: ServiceId,
    local_endpoints: usize,
}

struct Running {
    status: Arc<Mutex<Status>>,
    task: JoinHandle<()>,
}

impl Drop for Running {
    /// Ending the task drops its listener: the port closes. So a server
    /// stops when the manager forgets it, or goes away itself.
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The running health check servers, keyed by port.
pub struct HealthCheckServers {
    health: Arc<ProxyHealth>,
    /// None: every address of both families, as kube-proxy listens.
    ip: Option<IpAddr>,
    running: BTreeMap<u16, Running>,
    /// Warnings logged by the last sync, so they are not repeated after
    /// every batch while nothing changes.
    warned: Vec<ModelError>,
}

impl HealthCheckServers {
    /// Servers on all addresses (IPv4 and IPv6).
    pub fn new(health: Arc<ProxyHealth>) -> Self {
        HealthCheckServers {
            health,
            ip: None,
            running: BTreeMap::new(),
            warned: Vec::new(),
        }
    }

    /// Servers on one address only (tests use loopback).
    pub fn on_ip(health: Arc<ProxyHealth>, ip: IpAddr) -> Self {
        HealthCheckServers {
            ip: Some(ip),
            ..Self::new(health)
        }
    }

    /// Make the running servers exactly `desired` (as
    /// [`crate::model::ObjectStore::health_checks`] returns it: one per port):
    /// stop the others, start the missing ones, and update the Service and
    /// count of the rest without closing their sockets. `warnings` are the model's
    /// problems with health checks; each is logged once while it lasts.
    /// Must run inside the Tokio runtime.
    pub fn sync(&mut self, desired: Vec<HealthCheck>, warnings: Vec<ModelError>) {
        for w in warnings.iter().filter(|w| !self.warned.contains(w)) {
            tracing::warn!("{w}");
        }
        self.warned = warnings;

        let desired: BTreeMap<u16, HealthCheck> =
            desired.into_iter().map(|hc| (hc.port, hc)).collect();
        self.running.retain(|&port, _| {
            let keep = desired.contains_key(&port);
            if !keep {
                tracing::info!(port, "health check server stopped");
            }
            keep
        });
        for (port, hc) in desired {
            if let Some(server) = self.running.get(&port) {
                *lock(&server.status) = Status {
                    service: hc.service,
                    local_endpoints: hc.local_endpoints,
                };
                continue;
            }
            match self.start(hc) {
                Ok(server) => {
                    self.running.insert(port, server);
                }
                // Another process may hold the port; the next sync retries.
                Err(e) => tracing::warn!("{e}"),
            }
        }
    }

    /// The ports being served, in order.
    pub fn ports(&self) -> Vec<u16> {
        self.running.keys().copied().collect()
    }

    fn start(&self, hc: HealthCheck) -> Result<Running, HealthCheckError> {
        let listener = listen(self.ip, hc.port).map_err(|source| HealthCheckError::Bind {
            service: hc.service.clone(),
            port: hc.port,
            source,
        })?;
        tracing::info!(service = %hc.service, port = hc.port, "health check server started");
        let status = Arc::new(Mutex::new(Status {
            service: hc.service,
            local_endpoints: hc.local_endpoints,
        }));
        let (s, health) = (status.clone(), self.health.clone());
        let server = Server::from_listener(listener);
        let task = tokio::spawn(server.run(move |_path| respond(&lock(&s), health.is_healthy())));
        Ok(Running { status, task })
    }
}

/// kube-proxy's answer for any path.
fn respond(status: &Status, proxy_healthy: bool) -> Response {
    let count = status.local_endpoints;
    let code = if count > 0 && proxy_healthy { 200 } else { 503 };
    // JSON string literals; for Kubernetes names the same as Go's %q.
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let body = format!(
        "{{\n\t\"service\": {{\n\t\t\"namespace\": {},\n\t\t\"name\": {}\n\t}},\n\t\"localEndpoints\": {count},\n\t\"serviceProxyHealthy\": {proxy_healthy}\n}}",
        quote(&status.service.namespace),
        quote(&status.service.name),
    );
    Response::new(code, "application/json", body)
        .with_header("X-Load-Balancing-Endpoint-Weight", count.to_string())
}

/// A listener on `ip`:port, or on every address: one [::] socket that also
/// takes IPv4 (as Go's listeners do), or 0.0.0.0 where IPv6 is unavailable.
fn listen(ip: Option<IpAddr>, port: u16) -> io::Result<tokio::net::TcpListener> {
    let std = match ip {
        Some(ip) => bind(SocketAddr::new(ip, port))?,
        None => bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
            .or_else(|_| bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)))?,
    };
    tokio::net::TcpListener::from_std(std)
}

fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        // Explicit, whatever net.ipv6.bindv6only says.
        socket.set_only_v6(false)?;
    }
    // Probed connections end in TIME_WAIT on our side (we close first);
    // without this a port could not be reopened for a minute.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn lock(status: &Mutex<Status>) -> std::sync::MutexGuard<'_, Status> {
    // A Status is always whole: a panic elsewhere cannot leave it torn.
    status.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::serve::get;

    const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    fn id(name: &str) -> ServiceId {
        ServiceId {
            namespace: "demo".into(),
            name: name.into(),
        }
    }

    fn hc(name: &str, port: u16, local_endpoints: usize) -> HealthCheck {
        HealthCheck {
            service: id(name),
            port,
            local_endpoints,
        }
    }

    /// `n` distinct ports nothing listens on right now.
    fn free_ports<const N: usize>() -> [u16; N] {
        let held: Vec<std::net::TcpListener> = (0..N)
            .map(|_| std::net::TcpListener::bind((LOCALHOST, 0)).unwrap())
            .collect();
        std::array::from_fn(|i| held[i].local_addr().unwrap().port())
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::new(LOCALHOST, port)
    }

    fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Connection refused, once the stopped server's task has ended.
    async fn closed(port: u16) -> bool {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr(port)).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    fn healthy() -> Arc<ProxyHealth> {
        Arc::new(ProxyHealth::new(Duration::from_secs(60)))
    }

    #[tokio::test]
    async fn answers_like_kube_proxy() {
        let mut servers = HealthCheckServers::on_ip(healthy(), LOCALHOST);
        let [port] = free_ports();
        servers.sync(vec![hc("web", port, 2)], vec![]);

        let (status, headers, body) = get(addr(port), "/any/path?x=1").await;
        assert_eq!(status, 200);
        assert_eq!(
            body,
            "{\n\t\"service\": {\n\t\t\"namespace\": \"demo\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
        );
        assert_eq!(header(&headers, "content-type"), Some("application/json"));
        assert_eq!(header(&headers, "x-content-type-options"), Some("nosniff"));
        assert_eq!(
            header(&headers, "x-load-balancing-endpoint-weight"),
            Some("2")
        );

        // No local endpoint: 503, same socket (no restart).
        servers.sync(vec![hc("web", port, 0)], vec![]);
        let (status, headers, body) = get(addr(port), "/").await;
        assert_eq!(status, 503);
        assert!(body.contains("\"localEndpoints\": 0,"), "{body}");
        assert_eq!(
            header(&headers, "x-load-balancing-endpoint-weight"),
            Some("0")
        );
        assert_eq!(servers.ports(), [port]);
    }

    #[tokio::test]
    async fn unhealthy_proxy_fails_the_check() {
        let clock = Arc::new(Mutex::new(SystemTime::UNIX_EPOCH));
        let c = clock.clone();
        let health = ProxyHealth::with_clock(Duration::from_secs(60), move || *c.lock().unwrap());
        let health = Arc::new(health);
        let mut servers = HealthCheckServers::on_ip(health.clone(), LOCALHOST);
        let [port] = free_ports();
        servers.sync(vec![hc("web", port, 1)], vec![]);

        // An update waiting longer than the timeout: the proxy is stale.
        health.queued_update();
        *clock.lock().unwrap() += Duration::from_secs(61);
        let (status, _, body) = get(addr(port), "/").await;
        assert_eq!(status, 503);
        assert!(body.ends_with("\"localEndpoints\": 1,\n\t\"serviceProxyHealthy\": false\n}"));

        health.updated();
        assert_eq!(get(addr(port), "/").await.0, 200);
    }

    #[tokio::test]
    async fn servers_follow_the_desired_set() {
        let mut servers = HealthCheckServers::on_ip(healthy(), LOCALHOST);
        let [a, b] = free_ports();
        servers.sync(vec![hc("a", a, 1), hc("b", b, 1)], vec![]);
        assert_eq!(get(addr(a), "/").await.0, 200);
        assert_eq!(get(addr(b), "/").await.0, 200);

        // b no longer wanted: its port closes, a keeps serving.
        servers.sync(vec![hc("a", a, 1)], vec![]);
        assert!(closed(b).await, "port {b} still open");
        assert_eq!(get(addr(a), "/").await.0, 200);

        // Wanted again: reopened on the same port.
        servers.sync(vec![hc("a", a, 1), hc("b", b, 3)], vec![]);
        assert!(get(addr(b), "/").await.2.contains("\"localEndpoints\": 3,"));

        // The manager going away closes everything.
        drop(servers);
        assert!(closed(a).await && closed(b).await);
    }

    #[tokio::test]
    async fn a_taken_port_is_retried_on_the_next_sync() {
        let taken = std::net::TcpListener::bind((LOCALHOST, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let [other] = free_ports();
        let mut servers = HealthCheckServers::on_ip(healthy(), LOCALHOST);
        servers.sync(vec![hc("web", port, 1), hc("api", other, 1)], vec![]);
        // The other port is served regardless.
        assert_eq!(servers.ports(), [other]);

        let err = servers.start(hc("web", port, 1)).err().unwrap();
        assert!(
            err.to_string()
                .starts_with(&format!("health check port {port} of Service demo/web: ")),
            "{err}"
        );

        drop(taken);
        servers.sync(vec![hc("web", port, 1), hc("api", other, 1)], vec![]);
        let mut want = vec![port, other];
        want.sort();
        assert_eq!(servers.ports(), want);
        assert_eq!(get(addr(port), "/").await.0, 200);
    }
}
