//! Prometheus metrics (/metrics), /proxyMode and /healthz on
//! --metrics-bind-address, as kube-proxy serves them.
//!
//! kube-proxy's metric names, help texts and buckets (pkg/proxy/metrics) are
//! kept where svclb does the same thing, so existing dashboards and alerts
//! work. Left out, because svclb has nothing that matches them: the
//! full/partial sync split and rule counts of the iptables mode, nftables
//! failures, conntrack reconciler, pending-change gauges. Recent kube-proxy
//! releases also label some metrics with ip_family; svclb syncs both
//! families in one pass, so it reports them unlabelled (sums are equal).
//!
//! svclb's own: `svclb_bpf_map_entries` / `svclb_bpf_map_capacity`
//! {map}, `svclb_translation_errors_total` {reason},
//! `svclb_sync_errors_total` {reason}, `svclb_sync_retries_pending` and
//! `svclb_sockets_destroyed_total` {mechanism}.
//!
//! Plus the `process_*` series Go's process collector adds to every
//! kube-proxy ([`process`]).
//!
//! The text format is written here, not by prometheus-client: its encoder
//! (0.2x) writes OpenMetrics, which appends "." to every help text, declares
//! counters without their `_total` in `# TYPE` and ends with `# EOF`, so
//! kube-proxy's exposition could not be kept byte for byte.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Response, ServeError, Server, TEXT};
use crate::dataplane::drift::Published;

mod process;

pub const DEFAULT_METRICS_BIND_ADDRESS: &str = "127.0.0.1:10249";

/// What /proxyMode answers (kube-proxy: iptables, ipvs, nftables, ...).
pub const PROXY_MODE: &str = "ebpf";

/// Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// kube-proxy's sync buckets: ExponentialBuckets(0.001, 2, 15).
const SYNC_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384,
];

/// kube-proxy's network programming buckets: 0 (component-base's
/// MergeBuckets starts with it), 0.25 s, 0.5 s, 1..59 s, 60..115 s by 5,
/// 120..300 s by 30.
fn network_programming_buckets() -> Vec<f64> {
    let mut b = vec![0.0, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((60..=115).step_by(5).map(f64::from));
    b.extend((120..=300).step_by(30).map(f64::from));
    b
}

/// The agent's metrics, shared (`Arc`) between the sync loop and the server.
pub struct Metrics {
    inner: Mutex<Inner>,
}

struct Inner {
    sync_duration: Histogram,
    network_programming: Histogram,
    last_sync: f64,
    last_queued: f64,
    service_changes: u64,
    endpoint_changes: u64,
    healthz: BTreeMap<u16, u64>,
    livez: BTreeMap<u16, u64>,
    /// map name -> (entries, capacity)
    maps: BTreeMap<String, (usize, usize)>,
    translation_errors: BTreeMap<String, u64>,
    sync_errors: BTreeMap<String, u64>,
    /// Differences found between the maps and the desired state, by map.
    map_drift: BTreeMap<String, u64>,
    /// None until the first sync.
    retries_pending: Option<usize>,
    external: Option<crate::dataplane::ExternalStats>,
    /// Connected UDP sockets destroyed because their backend went away.
    sockets_destroyed: Option<Arc<AtomicU64>>,
    /// For /debug/svclb/status (`svclb status`).
    info: crate::status::AgentInfo,
    /// The last sync: when, and whether it succeeded.
    last_attempt: Option<(f64, bool)>,
    last_error: Option<String>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                sync_duration: Histogram::new(SYNC_BUCKETS.to_vec()),
                network_programming: Histogram::new(network_programming_buckets()),
                last_sync: 0.0,
                last_queued: 0.0,
                service_changes: 0,
                endpoint_changes: 0,
                healthz: BTreeMap::new(),
                livez: BTreeMap::new(),
                maps: BTreeMap::new(),
                translation_errors: BTreeMap::new(),
                sync_errors: BTreeMap::new(),
                map_drift: BTreeMap::new(),
                retries_pending: None,
                external: None,
                sockets_destroyed: None,
                info: Default::default(),
                last_attempt: None,
                last_error: None,
            }),
        }
    }

    /// A sync (applying queued changes to the maps) finished successfully.
    pub fn observe_sync(&self, duration: Duration) {
        let mut m = self.inner();
        m.sync_duration.observe(duration.as_secs_f64());
        m.last_sync = unix_now();
        m.last_attempt = Some((m.last_sync, true));
    }

    /// A sync finished with failures: its duration counts, but as in
    /// kube-proxy the last sync timestamp stays at the last success.
    pub fn observe_failed_sync(&self, duration: Duration) {
        let mut m = self.inner();
        m.sync_duration.observe(duration.as_secs_f64());
        m.last_attempt = Some((unix_now(), false));
    }

    /// Something failed to reach the maps and will be retried. `reason`
    /// must be a short fixed word (it becomes a label value).
    pub fn sync_error(&self, reason: &str) {
        let mut m = self.inner();
        count(&mut m.sync_errors, reason);
        m.last_error = Some(reason.to_string());
    }

    /// What the agent runs with, for /debug/svclb/status.
    pub fn set_info(&self, info: crate::status::AgentInfo) {
        self.inner().info = info;
    }

    /// /debug/svclb/status.
    pub fn status(&self) -> crate::status::AgentStatus {
        let m = self.inner();
        crate::status::AgentStatus {
            info: m.info.clone(),
            sync: crate::status::SyncStatus {
                last_success: (m.last_sync > 0.0).then_some(m.last_sync),
                last_attempt: m.last_attempt.map(|(t, _)| t),
                last_result: m
                    .last_attempt
                    .map(|(_, ok)| if ok { "ok" } else { "failed" }.to_string()),
                last_error: m.last_error.clone(),
                retries_pending: m.retries_pending,
            },
        }
    }

    /// A difference between a BPF map and the desired state, found by the
    /// periodic check (and repaired).
    pub fn map_drift(&self, map: &str) {
        count(&mut self.inner().map_drift, map);
    }

    /// Services (and other work) waiting to be retried.
    pub fn set_sync_retries_pending(&self, n: usize) {
        self.inner().retries_pending = Some(n);
    }

    /// A sync was requested: changes arrived that are not applied yet.
    pub fn sync_queued(&self) {
        self.inner().last_queued = unix_now();
    }

    pub fn service_changes(&self, n: u64) {
        self.inner().service_changes += n;
    }

    pub fn endpoint_changes(&self, n: u64) {
        self.inner().endpoint_changes += n;
    }

    /// From an EndpointSlice's endpoints.kubernetes.io/last-change-trigger-time
    /// to its change being in the maps.
    pub fn observe_network_programming(&self, duration: Duration) {
        self.inner()
            .network_programming
            .observe(duration.as_secs_f64());
    }

    pub fn set_map_usage(&self, map: &str, entries: usize, capacity: usize) {
        self.inner()
            .maps
            .insert(map.to_owned(), (entries, capacity));
    }

    /// The external path's counters and conntrack usage (sampled).
    pub fn set_external(&self, mut stats: crate::dataplane::ExternalStats) {
        let mut m = self.inner();
        stats.conntrack = m.external.as_mut().and_then(|x| x.conntrack.take());
        m.external = Some(stats);
    }

    /// What the conntrack sweeper found (shown with the external path's
    /// counters).
    pub fn set_conntrack(&self, stats: crate::dataplane::conntrack::ConntrackStats) {
        self.inner()
            .external
            .get_or_insert_with(Default::default)
            .conntrack = Some(stats);
    }

    /// Report this count of destroyed sockets (the dataplane's socket
    /// thread adds to it).
    pub fn watch_sockets_destroyed(&self, counter: Arc<AtomicU64>) {
        self.inner().sockets_destroyed = Some(counter);
    }

    /// An object or service that could not be translated or applied.
    /// `reason` must be a short fixed word (it becomes a label value).
    pub fn translation_error(&self, reason: &str) {
        count(&mut self.inner().translation_errors, reason);
    }

    pub fn healthz_response(&self, code: u16) {
        *self.inner().healthz.entry(code).or_default() += 1;
    }

    pub fn livez_response(&self, code: u16) {
        *self.inner().livez.entry(code).or_default() += 1;
    }

    /// The agent's metrics in the text exposition format, families sorted
    /// by name as Prometheus client libraries do.
    pub fn render(&self) -> String {
        self.render_with(None)
    }

    /// What /metrics serves: [`Self::render`] and the process series, read now.
    pub fn scrape(&self) -> String {
        let process = process::ProcessStats::read()
            .inspect_err(|e| tracing::debug!(error = %e, "reading process statistics"))
            .ok();
        self.render_with(process.as_ref())
    }

    fn render_with(&self, process: Option<&process::ProcessStats>) -> String {
        let m = self.inner();
        let mut out = String::new();
        kube_proxy_series(&mut out, &m);
        if let Some(p) = process {
            p.render(&mut out);
        }
        labelled(
            &mut out,
            "svclb_bpf_map_capacity",
            "Maximum number of entries of each BPF map",
            "gauge",
            "map",
            m.maps.iter().map(|(k, (_, cap))| (k.clone(), *cap as f64)),
        );
        labelled(
            &mut out,
            "svclb_bpf_map_entries",
            "Entries in use in each BPF map",
            "gauge",
            "map",
            m.maps.iter().map(|(k, (n, _))| (k.clone(), *n as f64)),
        );
        if let Some(x) = &m.external {
            external_series(&mut out, x);
        }
        labelled(
            &mut out,
            "svclb_map_drift_total",
            "Differences between a BPF map and the desired state found by the periodic check (entries changed outside the agent), by map; each is repaired",
            "counter",
            "map",
            m.map_drift.iter().map(|(k, n)| (k.clone(), *n as f64)),
        );
        if let Some(n) = &m.sockets_destroyed {
            labelled(
                &mut out,
                "svclb_sockets_destroyed_total",
                "Connected UDP sockets failed (ECONNABORTED) because their backend left the frontend they connected to, by mechanism",
                "counter",
                "mechanism",
                [(
                    crate::dataplane::sockets::MECHANISM.to_string(),
                    n.load(Ordering::Relaxed) as f64,
                )]
                .into_iter(),
            );
        }
        labelled(
            &mut out,
            "svclb_sync_errors_total",
            "Failures to write a service (or delete stale entries) into the maps, by reason; each is retried",
            "counter",
            "reason",
            m.sync_errors.iter().map(|(k, n)| (k.clone(), *n as f64)),
        );
        if let Some(n) = m.retries_pending {
            single(
                &mut out,
                "svclb_sync_retries_pending",
                "Services (or stale entry deletions) that failed and wait for a retry",
                "gauge",
                n as f64,
            );
        }
        labelled(
            &mut out,
            "svclb_translation_errors_total",
            "Objects or parts of objects svclb could not translate (left out), by reason",
            "counter",
            "reason",
            m.translation_errors
                .iter()
                .map(|(k, n)| (k.clone(), *n as f64)),
        );
        out
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain counters: still meaningful after a panicking holder.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One more event of `reason` in a by-reason counter.
fn count(counts: &mut BTreeMap<String, u64>, reason: &str) {
    *counts.entry(reason.to_owned()).or_default() += 1;
}

/// The series kube-proxy exposes, with its names, help texts and buckets.
fn kube_proxy_series(out: &mut String, m: &Inner) {
    let alpha = |help: &str| format!("[ALPHA] {help}");

    m.network_programming.render(
        out,
        "kubeproxy_network_programming_duration_seconds",
        &alpha("In Cluster Network Programming Latency in seconds"),
    );
    labelled(
        out,
        "kubeproxy_proxy_healthz_total",
        &alpha("Cumulative proxy healthz HTTP status"),
        "counter",
        "code",
        m.healthz.iter().map(|(c, n)| (c.to_string(), *n as f64)),
    );
    labelled(
        out,
        "kubeproxy_proxy_livez_total",
        &alpha("Cumulative proxy livez HTTP status"),
        "counter",
        "code",
        m.livez.iter().map(|(c, n)| (c.to_string(), *n as f64)),
    );
    m.sync_duration.render(
        out,
        "kubeproxy_sync_proxy_rules_duration_seconds",
        &alpha("SyncProxyRules latency in seconds"),
    );
    single(
        out,
        "kubeproxy_sync_proxy_rules_endpoint_changes_total",
        &alpha("Cumulative proxy rules Endpoint changes"),
        "counter",
        m.endpoint_changes as f64,
    );
    single(
        out,
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        &alpha("The last time a sync of proxy rules was queued"),
        "gauge",
        m.last_queued,
    );
    single(
        out,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        &alpha("The last time proxy rules were successfully synced"),
        "gauge",
        m.last_sync,
    );
    single(
        out,
        "kubeproxy_sync_proxy_rules_service_changes_total",
        &alpha("Cumulative proxy rules Service changes"),
        "counter",
        m.service_changes as f64,
    );
}

/// The external path's conntrack and XDP counters.
fn external_series(out: &mut String, x: &crate::dataplane::ExternalStats) {
    use svclb_common::stats::*;
    single(
        out,
        "svclb_conntrack_entries",
        "Entries in the external path's conntrack maps, IPv4 and IPv6 (sampled)",
        "gauge",
        x.conntrack_entries as f64,
    );
    single(
        out,
        "svclb_conntrack_capacity",
        "Size of the external path's conntrack maps together (--conntrack-size each)",
        "gauge",
        x.conntrack_capacity as f64,
    );
    single(
        out,
        "svclb_conntrack_flows_created_total",
        "New external flows (each adds two conntrack entries)",
        "counter",
        x.counter(CT_CREATED) as f64,
    );
    single(
        out,
        "svclb_conntrack_evictions_total",
        "Conntrack entries evicted because the map was full (estimate: created minus present)",
        "counter",
        x.conntrack_evictions() as f64,
    );
    if let Some(c) = &x.conntrack {
        conntrack_series(out, c, x.counter(SNAT_RECLAIMED));
    }
    labelled(
        out,
        "svclb_xdp_packets_total",
        "Packets the external path translated, by where they went",
        "counter",
        "result",
        [
            ("forwarded", XDP_FORWARDED),
            ("passed", XDP_PASSED),
            ("icmp_translated", ICMP_TRANSLATED),
            ("unsupported", UNSUPPORTED),
        ]
        .into_iter()
        .map(|(k, i)| (k.to_string(), x.counter(i) as f64)),
    );
    labelled(
        out,
        "svclb_xdp_drops_total",
        "New external flows not served (dropped, or refused by the stack for a node port without endpoints), by reason",
        "counter",
        "reason",
        [
            ("no_backend", NO_BACKEND),
            ("source_range", SOURCE_RANGE_DENIED),
            ("snat_exhausted", SNAT_EXHAUSTED),
        ]
        .into_iter()
        .map(|(k, i)| (k.to_string(), x.counter(i) as f64)),
    );
}

/// What the conntrack sweeper reports: flows by state, expirations, SNAT
/// ports.
fn conntrack_series(
    out: &mut String,
    c: &crate::dataplane::conntrack::ConntrackStats,
    reclaimed: u64,
) {
    use svclb_common::ct_state::NAMES;
    labelled(
        out,
        "svclb_conntrack_expirations_total",
        "External flows whose conntrack entries the sweeper removed after their timeout, by the state they were in",
        "counter",
        "state",
        NAMES
            .iter()
            .zip(c.expired_total)
            .map(|(k, n)| (k.to_string(), n as f64)),
    );
    labelled(
        out,
        "svclb_conntrack_flows",
        "External flows tracked (pairs of conntrack entries) by state, at the last sweep",
        "gauge",
        "state",
        NAMES
            .iter()
            .zip(c.last.flows_by_state)
            .map(|(k, n)| (k.to_string(), n as f64)),
    );
    single(
        out,
        "svclb_conntrack_orphans_removed_total",
        "Conntrack entries the sweeper removed because the other entry of their flow was gone",
        "counter",
        c.orphans_removed_total as f64,
    );
    single(
        out,
        "svclb_conntrack_snat_ports_capacity",
        "SNAT ports toward each remote backend (--snat-ports)",
        "gauge",
        c.snat_ports_capacity as f64,
    );
    single(
        out,
        "svclb_conntrack_snat_ports_in_use",
        "SNAT ports held by tracked flows, all backends together, at the last sweep",
        "gauge",
        c.last.snat_ports_in_use as f64,
    );
    single(
        out,
        "svclb_conntrack_snat_ports_in_use_max",
        "SNAT ports held toward the backend with the most, at the last sweep (allocation is certain below 90% of the capacity)",
        "gauge",
        c.last.snat_ports_in_use_max as f64,
    );
    single(
        out,
        "svclb_conntrack_snat_ports_reclaimed_total",
        "SNAT ports a new flow took from a closed or expired flow (whose entries it removed)",
        "counter",
        reclaimed as f64,
    );
}

/// Where the metrics server serves the agent's desired state.
pub const DESIRED_PATH: &str = "/debug/svclb/desired";
const JSON: &str = "application/json";

/// Serve /metrics, /proxyMode and /healthz on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(), ServeError> {
    serve_on(Server::bind(addr).await?, metrics).await;
    Ok(())
}

/// Serve on an already bound server (bind first to fail early, or to use port 0).
pub async fn serve_on(server: Server, metrics: Arc<Metrics>) {
    serve_with_desired(server, metrics, Arc::default()).await
}

/// [`serve_on`], and the agent's desired state on /debug/svclb/desired
/// (for `svclb verify`).
pub async fn serve_with_desired(server: Server, metrics: Arc<Metrics>, desired: Arc<Published>) {
    tracing::info!(addr = %server.local_addr(), "serving /metrics and /proxyMode");
    server
        .run(move |path| match path {
            "/metrics" => Response::new(200, CONTENT_TYPE, metrics.scrape()),
            DESIRED_PATH => Response::new(200, JSON, desired.json()),
            crate::status::STATUS_PATH => Response::new(
                200,
                JSON,
                serde_json::to_string(&metrics.status()).unwrap_or_default(),
            ),
            "/proxyMode" => Response::new(200, TEXT, PROXY_MODE),
            // kube-proxy's metrics port has the apiserver's plain healthz too.
            "/healthz" => Response::new(200, TEXT, "ok"),
            _ => Response::not_found(),
        })
        .await
}

struct Histogram {
    /// Upper bounds, ascending; +Inf is implicit.
    bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); one more for +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: Vec<f64>) -> Self {
        let counts = vec![0; bounds.len() + 1];
        Histogram {
            bounds,
            counts,
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        // Buckets are "less than or equal": v lands in the first bound >= v.
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        let les = self
            .bounds
            .iter()
            .map(|b| number(*b))
            .chain(["+Inf".into()]);
        for (le, n) in les.zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}", number(self.sum));
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn single(out: &mut String, name: &str, help: &str, kind: &str, value: f64) {
    header(out, name, help, kind);
    let _ = writeln!(out, "{name} {}", number(value));
}

/// A family with one label. Like Go's client, nothing at all (no HELP/TYPE)
/// until some label value has been seen.
fn labelled(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    label: &str,
    values: impl Iterator<Item = (String, f64)>,
) {
    let mut values = values.peekable();
    if values.peek().is_none() {
        return;
    }
    header(out, name, help, kind);
    for (v, n) in values {
        let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {}", escape(&v), number(n));
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

/// A sample value: Rust's shortest round-trip decimal, which Prometheus
/// parses like Go's output; infinities and NaN as the format spells them.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        v.to_string()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed sample line.
    #[derive(Debug)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn parse_value(s: &str) -> f64 {
        match s {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            _ => s.parse().unwrap_or_else(|_| panic!("bad value {s:?}")),
        }
    }

    /// Parse the exposition text strictly: every line is `# HELP name text`,
    /// `# TYPE name kind` or `name{labels} value`, each sample belongs to the
    /// family last declared with TYPE. Returns (types, samples).
    fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
        assert!(text.ends_with('\n'), "no final newline");
        let mut types = BTreeMap::new();
        let mut samples = Vec::new();
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect(line);
                assert!(is_name(name) && !help.is_empty(), "{line}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect(line);
                assert!(is_name(name), "{line}");
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "{line}"
                );
                family = name.to_owned();
            } else {
                let (series, value) = line.rsplit_once(' ').expect(line);
                let (name, labels) = match series.split_once('{') {
                    None => (series, Vec::new()),
                    Some((name, rest)) => {
                        let inner = rest.strip_suffix('}').expect(line);
                        let labels = inner
                            .split(',')
                            .map(|kv| {
                                let (k, v) = kv.split_once('=').expect(line);
                                assert!(is_name(k), "{line}");
                                let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                                (k.to_owned(), v.expect(line).to_owned())
                            })
                            .collect();
                        (name, labels)
                    }
                };
                assert!(is_name(name), "{line}");
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .filter(|b| types.get(*b).is_some_and(|k| k == "histogram"))
                    .unwrap_or(name);
                assert_eq!(base, family, "sample outside its family: {line}");
                samples.push(Sample {
                    name: name.to_owned(),
                    labels,
                    value: parse_value(value),
                });
            }
        }
        (types, samples)
    }

    /// Checks a histogram's buckets are ascending, cumulative, end with
    /// +Inf == _count, and _sum is present. Returns (le, count) pairs.
    fn check_histogram(samples: &[Sample], name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let buckets: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.name == bucket)
            .map(|s| {
                assert_eq!(s.labels.len(), 1);
                assert_eq!(s.labels[0].0, "le");
                (parse_value(&s.labels[0].1), s.value)
            })
            .collect();
        assert!(!buckets.is_empty(), "{name}: no buckets");
        for w in buckets.windows(2) {
            assert!(w[0].0 < w[1].0, "{name}: le not ascending: {w:?}");
            assert!(w[0].1 <= w[1].1, "{name}: not cumulative: {w:?}");
        }
        let (last_le, last_count) = *buckets.last().unwrap();
        assert_eq!(last_le, f64::INFINITY, "{name}: no +Inf bucket");
        let get = |suffix: &str| {
            let n = format!("{name}{suffix}");
            let found: Vec<_> = samples.iter().filter(|s| s.name == n).collect();
            assert_eq!(found.len(), 1, "{n}");
            found[0].value
        };
        assert_eq!(get("_count"), last_count, "{name}: +Inf != _count");
        assert!(get("_sum") >= 0.0);
        buckets
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<_> = samples
            .iter()
            .filter(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}");
        found[0].value
    }

    /// Conntrack evictions: created flows make two entries each; what is
    /// not in the map any more was evicted. XDP counters by label.
    /// Families come sorted by name, as from Go's registry.
    fn assert_families_sorted(text: &str) {
        let order: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted);
    }

    #[test]
    fn external_path_counters() {
        use svclb_common::stats::*;
        let m = Metrics::new();
        assert!(
            !m.render().contains("svclb_conntrack"),
            "absent without devices"
        );
        let mut counters = vec![0; COUNT as usize];
        counters[CT_CREATED as usize] = 100;
        counters[SOURCE_RANGE_DENIED as usize] = 3;
        counters[XDP_FORWARDED as usize] = 7;
        m.set_external(crate::dataplane::ExternalStats {
            counters,
            conntrack_entries: 64,
            conntrack_capacity: 64,
            conntrack: None,
        });
        let (types, samples) = parse(&m.render());
        assert_eq!(types["svclb_conntrack_evictions_total"], "counter");
        assert_eq!(
            value(&samples, "svclb_conntrack_evictions_total", &[]),
            136.0
        );
        assert_eq!(value(&samples, "svclb_conntrack_entries", &[]), 64.0);
        assert_eq!(
            value(&samples, "svclb_conntrack_flows_created_total", &[]),
            100.0
        );
        assert_eq!(
            value(
                &samples,
                "svclb_xdp_drops_total",
                &[("reason", "source_range")]
            ),
            3.0
        );
        assert_eq!(
            value(
                &samples,
                "svclb_xdp_packets_total",
                &[("result", "forwarded")]
            ),
            7.0
        );
    }

    #[test]
    fn conntrack_sweeper_series() {
        use crate::dataplane::conntrack::{ConntrackStats, SweepReport};
        use svclb_common::ct_state::*;
        let m = Metrics::new();
        let mut report = SweepReport::default();
        report.flows_by_state[TCP_ESTABLISHED] = 5;
        report.expired[TCP_TIME_WAIT] = 3;
        report.snat_ports_in_use = 7;
        report.snat_ports_in_use_max = 4;
        let mut stats = ConntrackStats {
            snat_ports_capacity: 100,
            ..Default::default()
        };
        stats.add(report.clone());
        stats.add(report);
        m.set_conntrack(stats);
        // The periodic counters sample keeps the sweeper's figures.
        let mut counters = vec![0; svclb_common::stats::COUNT as usize];
        counters[svclb_common::stats::SNAT_RECLAIMED as usize] = 9;
        m.set_external(crate::dataplane::ExternalStats {
            counters,
            ..Default::default()
        });
        let (types, samples) = parse(&m.render());
        assert_eq!(types["svclb_conntrack_expirations_total"], "counter");
        let flows = |s| value(&samples, "svclb_conntrack_flows", &[("state", s)]);
        assert_eq!(flows("tcp_established"), 5.0);
        assert_eq!(flows("udp_replied"), 0.0);
        assert_eq!(
            value(
                &samples,
                "svclb_conntrack_expirations_total",
                &[("state", "tcp_time_wait")]
            ),
            6.0
        );
        assert_eq!(
            value(&samples, "svclb_conntrack_snat_ports_in_use", &[]),
            7.0
        );
        assert_eq!(
            value(&samples, "svclb_conntrack_snat_ports_in_use_max", &[]),
            4.0
        );
        assert_eq!(
            value(&samples, "svclb_conntrack_snat_ports_capacity", &[]),
            100.0
        );
        assert_eq!(
            value(&samples, "svclb_conntrack_snat_ports_reclaimed_total", &[]),
            9.0
        );
    }

    #[test]
    fn fresh_metrics_parse_with_zeroes() {
        let text = Metrics::new().render();
        let (types, samples) = parse(&text);
        assert_eq!(
            types.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "kubeproxy_network_programming_duration_seconds",
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "kubeproxy_sync_proxy_rules_service_changes_total",
            ]
        );
        assert!(samples.iter().all(|s| s.value == 0.0), "{text}");
        let sync = check_histogram(&samples, "kubeproxy_sync_proxy_rules_duration_seconds");
        assert_eq!(sync.len(), 16); // 15 buckets + +Inf
        assert_eq!(sync[0].0, 0.001);
        assert_eq!(sync[14].0, 16.384);
        let np = check_histogram(&samples, "kubeproxy_network_programming_duration_seconds");
        let les: Vec<f64> = np.iter().map(|b| b.0).collect();
        assert_eq!(les.len(), 1 + 2 + 59 + 12 + 7 + 1);
        assert_eq!(&les[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
        assert!(les.contains(&59.0) && les.contains(&115.0) && les.contains(&150.0));
        assert_eq!(les[les.len() - 2], 300.0);
    }

    #[test]
    fn observations_show_up() {
        let m = Metrics::new();
        m.observe_sync(Duration::from_millis(3)); // le=0.004
        m.observe_sync(Duration::from_millis(4)); // le=0.004 (inclusive)
        m.observe_sync(Duration::from_secs(20)); // only +Inf
        m.sync_queued();
        m.service_changes(3);
        m.service_changes(2);
        m.endpoint_changes(7);
        m.observe_network_programming(Duration::from_millis(300)); // le=0.5
        m.set_map_usage("services", 16, 262_144);
        m.set_map_usage("backends", 12, 131_072);
        m.set_map_usage("services", 20, 262_144); // replaces
        m.translation_error("invalid");
        m.translation_error("invalid");
        m.translation_error("maps_full");
        m.translation_error("odd \"label\"\\\n");
        m.healthz_response(200);
        m.livez_response(503);

        let text = m.render();
        let (types, samples) = parse(&text);
        assert_eq!(types["svclb_bpf_map_entries"], "gauge");
        assert_eq!(types["svclb_translation_errors_total"], "counter");
        assert_eq!(types["kubeproxy_proxy_healthz_total"], "counter");

        let sync = check_histogram(&samples, "kubeproxy_sync_proxy_rules_duration_seconds");
        let at = |buckets: &[(f64, f64)], le: f64| buckets.iter().find(|b| b.0 == le).unwrap().1;
        assert_eq!(at(&sync, 0.002), 0.0);
        assert_eq!(at(&sync, 0.004), 2.0);
        assert_eq!(at(&sync, 16.384), 2.0);
        assert_eq!(at(&sync, f64::INFINITY), 3.0);
        let sum = value(
            &samples,
            "kubeproxy_sync_proxy_rules_duration_seconds_sum",
            &[],
        );
        assert!((sum - 20.007).abs() < 1e-9, "{sum}");

        let np = check_histogram(&samples, "kubeproxy_network_programming_duration_seconds");
        assert_eq!(at(&np, 0.25), 0.0);
        assert_eq!(at(&np, 0.5), 1.0);

        let now = unix_now();
        for name in [
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        ] {
            let t = value(&samples, name, &[]);
            assert!(t > now - 60.0 && t <= now, "{name} {t}");
        }
        assert_eq!(
            value(
                &samples,
                "kubeproxy_sync_proxy_rules_service_changes_total",
                &[]
            ),
            5.0
        );
        assert_eq!(
            value(
                &samples,
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                &[]
            ),
            7.0
        );
        assert_eq!(
            value(&samples, "svclb_bpf_map_entries", &[("map", "services")]),
            20.0
        );
        assert_eq!(
            value(&samples, "svclb_bpf_map_entries", &[("map", "backends")]),
            12.0
        );
        assert_eq!(
            value(&samples, "svclb_bpf_map_capacity", &[("map", "services")]),
            262_144.0
        );
        assert_eq!(
            value(
                &samples,
                "svclb_translation_errors_total",
                &[("reason", "invalid")]
            ),
            2.0
        );
        assert!(text.contains(r#"svclb_translation_errors_total{reason="odd \"label\"\\\n"} 1"#));
        assert_eq!(
            value(
                &samples,
                "kubeproxy_proxy_healthz_total",
                &[("code", "200")]
            ),
            1.0
        );
        assert_eq!(
            value(&samples, "kubeproxy_proxy_livez_total", &[("code", "503")]),
            1.0
        );

        assert_families_sorted(&text);
    }

    /// Like kube-proxy: a failed sync counts in the duration histogram
    /// but leaves the last sync timestamp at the last success; errors by
    /// reason and the retries waiting show up.
    #[test]
    fn destroyed_sockets_are_counted_by_mechanism() {
        let m = Metrics::new();
        let counter = Arc::new(AtomicU64::new(0));
        m.watch_sockets_destroyed(counter.clone());
        counter.fetch_add(3, Ordering::Relaxed);
        let (types, samples) = parse(&m.render());
        assert_eq!(types["svclb_sockets_destroyed_total"], "counter");
        let n = value(
            &samples,
            "svclb_sockets_destroyed_total",
            &[("mechanism", "sock_diag")],
        );
        assert_eq!(n, 3.0);
    }

    #[test]
    fn failed_syncs_and_retries() {
        let m = Metrics::new();
        m.observe_failed_sync(Duration::from_millis(3));
        m.sync_error("maps_full");
        m.sync_error("maps_full");
        m.sync_error("flush");
        m.set_sync_retries_pending(2);
        let (types, samples) = parse(&m.render());
        let last = "kubeproxy_sync_proxy_rules_last_timestamp_seconds";
        assert_eq!(value(&samples, last, &[]), 0.0, "no success yet");
        let sync = check_histogram(&samples, "kubeproxy_sync_proxy_rules_duration_seconds");
        assert_eq!(sync.last().unwrap().1, 1.0);
        assert_eq!(types["svclb_sync_errors_total"], "counter");
        assert_eq!(types["svclb_sync_retries_pending"], "gauge");
        let errors = |reason| value(&samples, "svclb_sync_errors_total", &[("reason", reason)]);
        assert_eq!((errors("maps_full"), errors("flush")), (2.0, 1.0));
        assert_eq!(value(&samples, "svclb_sync_retries_pending", &[]), 2.0);

        m.observe_sync(Duration::from_millis(3));
        m.set_sync_retries_pending(0);
        let (_, samples) = parse(&m.render());
        let t = value(&samples, last, &[]);
        assert!(t > unix_now() - 60.0, "{t}");
        assert_eq!(value(&samples, "svclb_sync_retries_pending", &[]), 0.0);
        assert_eq!(
            value(
                &samples,
                "svclb_sync_errors_total",
                &[("reason", "maps_full")]
            ),
            2.0,
            "a counter"
        );
    }

    #[test]
    fn kube_proxy_help_texts() {
        let text = Metrics::new().render();
        assert!(text.contains(
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds [ALPHA] SyncProxyRules latency in seconds\n\
             # TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n\
             kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"} 0\n"
        ));
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0\"} 0\n")
        );
        assert!(
            text.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"1\"} 0\n")
        );
        assert!(
            text.contains("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"} 0\n")
        );
    }

    /// Go's process collector's series, with values this process can have.
    #[test]
    fn process_series() {
        let text = Metrics::new().scrape();
        let (types, samples) = parse(&text);
        let get = |name: &str| value(&samples, name, &[]);
        assert_eq!(types["process_cpu_seconds_total"], "counter");
        assert!(get("process_cpu_seconds_total") >= 0.0);
        let (open, max) = (get("process_open_fds"), get("process_max_fds"));
        assert!(open >= 3.0 && open <= max, "{open} of {max}");
        let (resident, virtual_) = (
            get("process_resident_memory_bytes"),
            get("process_virtual_memory_bytes"),
        );
        assert!(
            resident > 1e5 && resident <= virtual_,
            "{resident} {virtual_}"
        );
        assert!(get("process_virtual_memory_max_bytes") >= virtual_);
        let (start, now) = (get("process_start_time_seconds"), unix_now());
        assert!(
            start > now - 86_400.0 && start <= now + 1.0,
            "{start} {now}"
        );
        assert!(text.contains(
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n\
             # TYPE process_start_time_seconds gauge\n"
        ));

        assert_families_sorted(&text);
    }

    #[tokio::test]
    async fn serves_over_tcp() {
        let metrics = Arc::new(Metrics::new());
        metrics.service_changes(4);
        let server = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = server.local_addr();
        tokio::spawn(serve_on(server, metrics.clone()));

        let (status, headers, body) = crate::serve::get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(headers.contains(&("content-type".into(), CONTENT_TYPE.into())));
        let (_, samples) = parse(&body);
        assert_eq!(
            value(
                &samples,
                "kubeproxy_sync_proxy_rules_service_changes_total",
                &[]
            ),
            4.0
        );
        assert!(value(&samples, "process_open_fds", &[]) > 0.0);

        let (status, headers, body) = crate::serve::get(addr, "/proxyMode").await;
        assert_eq!((status, body.as_str()), (200, "ebpf"));
        assert!(headers.contains(&("content-type".into(), TEXT.into())));
        assert_eq!(crate::serve::get(addr, "/healthz").await.2, "ok");
        assert_eq!(crate::serve::get(addr, "/livez").await.0, 404);

        // Later changes show on the next scrape.
        metrics.set_map_usage("backends", 3, 10);
        let (_, _, body) = crate::serve::get(addr, "/metrics").await;
        let (_, samples) = parse(&body);
        assert_eq!(
            value(&samples, "svclb_bpf_map_entries", &[("map", "backends")]),
            3.0
        );
    }
}
