//! kube-proxy compatible health server: /healthz and /livez.
//!
//! Cloud load balancers probe a node's /healthz on port 10256 to decide
//! whether to send it traffic, and node drain tooling relies on it turning
//! 503 while the node is being deleted. So the bodies and status rules follow
//! kube-proxy's pkg/proxy/healthcheck exactly:
//!
//! - healthy unless an update was queued more than the health timeout ago
//!   and no sync succeeded since (a failed sync counts as an update still
//!   queued);
//! - /healthz is also 503 while the Node is not eligible (being deleted, or
//!   tainted ToBeDeletedByClusterAutoscaler); /livez ignores the Node;
//! - bodies: `{"lastUpdated": "..","currentTime": "..", "nodeEligible": true}`
//!   and `{"lastUpdated": "..","currentTime": ".."}` with Go's time.Time
//!   formatting; when healthy, lastUpdated is the current time (kube-proxy
//!   keeps that for compatibility with releases that synced periodically).
//!
//! Differences:
//! - /healthz is 503 until the first successful sync. kube-proxy marks
//!   itself updated when its loop starts (pkg/proxy/runner.go, Run), so it
//!   answers 200 before it has programmed anything; svclb's readiness and
//!   startup probes use /healthz, and an agent that cannot sync (RBAC
//!   denied, API unreachable) must stop a rolling update rather than roll
//!   through every node. /livez keeps kube-proxy's rule: a slow start is no
//!   reason to restart.
//! - Go appends the monotonic clock reading (` m=+12.345`) to times it
//!   prints; that is an artefact of Go's runtime, so we leave it out.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::jiff::Timestamp;

use super::metrics::Metrics;
use super::{Response, ServeError, Server};

pub const DEFAULT_HEALTHZ_BIND_ADDRESS: &str = "0.0.0.0:10256";

/// kube-proxy's: 2 × its default sync period (30 s); the agent uses
/// 2 × --sync-period.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

const JSON: &str = "application/json";

type Clock = Box<dyn Fn() -> SystemTime + Send + Sync>;

/// The agent's health, shared (`Arc`) between the sync loop and the server.
pub struct ProxyHealth {
    timeout: Duration,
    clock: Clock,
    metrics: Option<Arc<Metrics>>,
    state: Mutex<State>,
}

struct State {
    /// The last successful sync; None before the first.
    last_updated: Option<SystemTime>,
    /// The first update queued since the last sync finished.
    oldest_queued: Option<SystemTime>,
    node_eligible: bool,
}

impl ProxyHealth {
    pub fn new(timeout: Duration) -> Self {
        Self::with_clock(timeout, SystemTime::now)
    }

    /// Tests pass a fake clock so they never sleep.
    pub fn with_clock(
        timeout: Duration,
        clock: impl Fn() -> SystemTime + Send + Sync + 'static,
    ) -> Self {
        ProxyHealth {
            timeout,
            clock: Box::new(clock),
            metrics: None,
            state: Mutex::new(State {
                last_updated: None,
                oldest_queued: None,
                // Eligible until a Node event says otherwise, as kube-proxy.
                node_eligible: true,
            }),
        }
    }

    /// Count responses in kubeproxy_proxy_{healthz,livez}_total.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A change arrived that the dataplane does not reflect yet.
    pub fn queued_update(&self) {
        let now = (self.clock)();
        self.state().oldest_queued.get_or_insert(now);
    }

    /// A sync succeeded: the dataplane reflects every queued change.
    pub fn updated(&self) {
        let now = (self.clock)();
        let mut state = self.state();
        state.oldest_queued = None;
        state.last_updated = Some(now);
    }

    /// False while this node is being deleted (see
    /// [`crate::model::node_eligible`]).
    pub fn set_node_eligible(&self, eligible: bool) {
        self.state().node_eligible = eligible;
    }

    /// The proxy's own health, ignoring the Node (kube-proxy's IsHealthy).
    pub fn is_healthy(&self) -> bool {
        self.check((self.clock)()).0
    }

    /// The /healthz response.
    pub fn healthz(&self) -> Response {
        let now = (self.clock)();
        let (healthy, last_updated, eligible) = self.check(now);
        let synced_once = last_updated.is_some();
        let (status, last_updated) = status(healthy && synced_once && eligible, last_updated, now);
        if let Some(m) = &self.metrics {
            m.healthz_response(status);
        }
        let body = format!(
            r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {eligible}}}"#,
            go_time(last_updated),
            go_time(Some(now)),
        );
        Response::new(status, JSON, body)
    }

    /// The /livez response: like /healthz without the Node, so kubelet does
    /// not restart an agent whose node is merely being drained.
    pub fn livez(&self) -> Response {
        let now = (self.clock)();
        let (healthy, last_updated, _) = self.check(now);
        let (status, last_updated) = status(healthy, last_updated, now);
        if let Some(m) = &self.metrics {
            m.livez_response(status);
        }
        let body = format!(
            r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#,
            go_time(last_updated),
            go_time(Some(now)),
        );
        Response::new(status, JSON, body)
    }

    /// (healthy, last updated, node eligible) at `now`.
    fn check(&self, now: SystemTime) -> (bool, Option<SystemTime>, bool) {
        let state = self.state();
        let healthy = match state.oldest_queued {
            None => true,
            // A clock stepped back makes the wait look like zero: healthy.
            Some(queued) => now.duration_since(queued).unwrap_or_default() < self.timeout,
        };
        (healthy, state.last_updated, state.node_eligible)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Status code and the lastUpdated to report.
fn status(
    healthy: bool,
    last_updated: Option<SystemTime>,
    now: SystemTime,
) -> (u16, Option<SystemTime>) {
    if healthy {
        (200, Some(now))
    } else {
        (503, last_updated)
    }
}

/// Serve /healthz and /livez on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, health: Arc<ProxyHealth>) -> Result<(), ServeError> {
    serve_on(Server::bind(addr).await?, health).await;
    Ok(())
}

/// Serve on an already bound server (bind first to fail early, or to use port 0).
pub async fn serve_on(server: Server, health: Arc<ProxyHealth>) {
    tracing::info!(addr = %server.local_addr(), "serving /healthz and /livez");
    server
        .run(move |path| match path {
            "/healthz" => health.healthz(),
            "/livez" => health.livez(),
            _ => Response::not_found(),
        })
        .await
}

/// Go's time.Time.String() for a UTC time: `2006-01-02 15:04:05.999999999
/// +0000 UTC`, fraction without trailing zeros. None is Go's zero time.
fn go_time(t: Option<SystemTime>) -> String {
    // A clock before 1970 is broken: shown as the zero time.
    let t = t.filter(|t| *t >= UNIX_EPOCH);
    match t.and_then(|t| Timestamp::try_from(t).ok()) {
        Some(t) => t.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string(),
        None => "0001-01-01 00:00:00 +0000 UTC".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2024-02-29 12:34:56.5 UTC
    const T0: u64 = 1_709_210_096;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0 + secs) + Duration::from_millis(500)
    }

    /// A ProxyHealth with a 60 s timeout and a clock the test moves.
    fn fixture() -> (Arc<ProxyHealth>, Arc<Mutex<SystemTime>>) {
        let now = Arc::new(Mutex::new(at(0)));
        let clock = now.clone();
        let health =
            ProxyHealth::with_clock(DEFAULT_HEALTH_TIMEOUT, move || *clock.lock().unwrap());
        (Arc::new(health), now)
    }

    fn set(clock: &Mutex<SystemTime>, t: SystemTime) {
        *clock.lock().unwrap() = t;
    }

    const NOW: &str = "2024-02-29 12:34:56.5 +0000 UTC";

    /// svclb's rule (kube-proxy answers 200 here): not ready before the
    /// first successful sync, however long it takes; alive meanwhile.
    #[test]
    fn unready_until_the_first_sync() {
        let (h, clock) = fixture();
        assert!(h.is_healthy());
        let r = h.healthz();
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            format!(
                r#"{{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","currentTime": "{NOW}", "nodeEligible": true}}"#
            )
        );
        assert_eq!(h.livez().status, 200);
        set(&clock, at(3600));
        assert_eq!(h.healthz().status, 503);
        assert_eq!(h.livez().status, 200);

        set(&clock, at(0));
        h.updated();
        assert!(h.is_healthy());
        let r = h.healthz();
        assert_eq!(r.status, 200);
        assert_eq!(r.content_type, "application/json");
        assert_eq!(
            r.body,
            format!(r#"{{"lastUpdated": "{NOW}","currentTime": "{NOW}", "nodeEligible": true}}"#)
        );
        let r = h.livez();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            format!(r#"{{"lastUpdated": "{NOW}","currentTime": "{NOW}"}}"#)
        );
    }

    #[test]
    fn queued_update_within_timeout_is_healthy() {
        let (h, clock) = fixture();
        h.updated();
        h.queued_update();
        set(&clock, at(59));
        assert_eq!(h.healthz().status, 200);
        assert_eq!(h.livez().status, 200);
    }

    #[test]
    fn queued_update_past_timeout_is_stale() {
        let (h, clock) = fixture();
        h.updated(); // lastUpdated = at(0)
        set(&clock, at(10));
        h.queued_update();
        set(&clock, at(30));
        h.queued_update(); // the oldest pending one counts, not the newest
        set(&clock, at(70));
        assert!(!h.is_healthy());
        let r = h.healthz();
        assert_eq!(r.status, 503);
        // Unhealthy: lastUpdated is the last sync, not now.
        assert_eq!(
            r.body,
            r#"{"lastUpdated": "2024-02-29 12:34:56.5 +0000 UTC","currentTime": "2024-02-29 12:36:06.5 +0000 UTC", "nodeEligible": true}"#
        );
        let r = h.livez();
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            r#"{"lastUpdated": "2024-02-29 12:34:56.5 +0000 UTC","currentTime": "2024-02-29 12:36:06.5 +0000 UTC"}"#
        );

        // A finished sync clears it.
        h.updated();
        assert_eq!(h.healthz().status, 200);
        assert_eq!(h.livez().status, 200);
    }

    #[test]
    fn stale_before_first_sync_reports_go_zero_time() {
        let (h, clock) = fixture();
        h.queued_update();
        set(&clock, at(60)); // exactly the timeout: stale
        let r = h.livez();
        assert_eq!(r.status, 503);
        assert!(
            r.body
                .starts_with(r#"{"lastUpdated": "0001-01-01 00:00:00 +0000 UTC","#),
            "{}",
            r.body
        );
    }

    #[test]
    fn ineligible_node_fails_healthz_only() {
        let (h, _) = fixture();
        h.updated();
        h.set_node_eligible(false);
        let r = h.healthz();
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            format!(r#"{{"lastUpdated": "{NOW}","currentTime": "{NOW}", "nodeEligible": false}}"#)
        );
        assert_eq!(h.livez().status, 200);
        assert!(h.is_healthy());
        h.set_node_eligible(true);
        assert_eq!(h.healthz().status, 200);
    }

    #[test]
    fn responses_are_counted() {
        let metrics = Arc::new(Metrics::new());
        let h = ProxyHealth::new(DEFAULT_HEALTH_TIMEOUT).with_metrics(metrics.clone());
        h.updated();
        h.healthz();
        h.set_node_eligible(false);
        h.healthz();
        h.livez();
        let text = metrics.render();
        assert!(
            text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_proxy_livez_total{code=\"200\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn go_time_format() {
        let t = |secs: u64, nanos: u32| Some(UNIX_EPOCH + Duration::new(secs, nanos));
        assert_eq!(go_time(t(0, 0)), "1970-01-01 00:00:00 +0000 UTC");
        assert_eq!(go_time(None), "0001-01-01 00:00:00 +0000 UTC");
        assert_eq!(go_time(t(T0, 0)), "2024-02-29 12:34:56 +0000 UTC");
        assert_eq!(
            go_time(t(T0, 120_000)),
            "2024-02-29 12:34:56.00012 +0000 UTC"
        );
        assert_eq!(
            go_time(t(T0, 999_999_999)),
            "2024-02-29 12:34:56.999999999 +0000 UTC"
        );
        assert_eq!(go_time(t(951_782_400, 0)), "2000-02-29 00:00:00 +0000 UTC");
        assert_eq!(
            go_time(t(4_102_444_799, 0)),
            "2099-12-31 23:59:59 +0000 UTC"
        );
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let (h, clock) = fixture();
        h.updated();
        let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.local_addr();
        tokio::spawn(serve_on(server, h.clone()));

        let (status, headers, body) = crate::serve::get(addr, "/healthz").await;
        assert_eq!(status, 200);
        assert!(headers.contains(&("content-type".into(), "application/json".into())));
        assert!(headers.contains(&("x-content-type-options".into(), "nosniff".into())));
        assert_eq!(
            body,
            format!(r#"{{"lastUpdated": "{NOW}","currentTime": "{NOW}", "nodeEligible": true}}"#)
        );
        // Probes may add a query string.
        assert_eq!(crate::serve::get(addr, "/livez?x=1").await.0, 200);
        assert_eq!(crate::serve::get(addr, "/metrics").await.0, 404);

        h.set_node_eligible(false);
        assert_eq!(crate::serve::get(addr, "/healthz").await.0, 503);
        assert_eq!(crate::serve::get(addr, "/livez").await.0, 200);

        h.queued_update();
        set(&clock, at(61));
        assert_eq!(crate::serve::get(addr, "/livez").await.0, 503);
    }
}
