//! The agent's main loop: source -> model -> dataplane.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context};
use svclb_common::maps::{BACKENDS_MAX_ENTRIES, SERVICES_MAX_ENTRIES};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cli::RunArgs;
use crate::dataplane::{Dataplane, DataplaneConfig, DataplaneError};
use crate::health::{self, ProxyHealth};
use crate::healthcheck::HealthCheckServers;
use crate::metrics::{self, Metrics};
use crate::model::{ModelError, NodeContext, Object, ObjectStore, ServiceId};
use crate::source::{kube, Source, SourceEvent};

pub async fn run(mut args: RunArgs) -> anyhow::Result<()> {
    // `--devices=` (an empty ConfigMap value) means none.
    args.devices.retain(|d| !d.is_empty());
    let source = match args.manifests.clone() {
        Some(dir) => Source::Manifests(dir),
        None => Source::Kube(
            kube::client(args.kubeconfig.as_deref())
                .await
                .context("configuring the Kubernetes API client")?,
        ),
    };
    let cgroup = match args.cgroup.clone() {
        Some(c) => c,
        None => cgroup2_root().context("finding the cgroup2 mount (pass --cgroup)")?,
    };
    // Filled in from this node's Node object once the source has sent it.
    let mut node = NodeContext::from_node(&args.node_name, None);
    // Bound before the programs load, so a taken port fails the start-up.
    let metrics = Arc::new(Metrics::new());
    let health =
        Arc::new(ProxyHealth::new(health::DEFAULT_HEALTH_TIMEOUT).with_metrics(metrics.clone()));
    let healthz_server = crate::http::Server::bind(args.healthz_bind_address)
        .await
        .context("--healthz-bind-address")?;
    let metrics_server = crate::http::Server::bind(args.metrics_bind_address)
        .await
        .context("--metrics-bind-address")?;
    tokio::spawn(health::serve_on(healthz_server, health.clone()));
    tokio::spawn(metrics::serve_on(metrics_server, metrics.clone()));
    raise_memlock_rlimit();
    let mut dataplane = Dataplane::start(&DataplaneConfig {
        bpffs: args.bpffs.clone(),
        cgroup: cgroup.clone(),
        devices: args.devices.clone(),
        xdp_mode: args.xdp_mode,
        maglev_table_size: args.maglev_table_size,
        conntrack_size: args.conntrack_size,
        snat_ports: args.snat_ports,
    })
    .context("starting the dataplane")?;
    tracing::info!(cgroup = %cgroup.display(), bpffs = %args.bpffs.display(), node = %node.name, "programs attached");
    if !args.devices.is_empty() {
        spawn_external_stats(args.bpffs.clone(), metrics.clone());
    }

    let (tx, mut rx) = mpsc::channel(1024);
    tokio::spawn(source.run(node.name.clone(), tx));
    let mut store = ObjectStore::new();
    let mut health_checks = HealthCheckServers::new(health.clone());
    let mut synced = false;
    let mut pending: BTreeSet<ServiceId> = BTreeSet::new();
    let started = SystemTime::now();
    // When the EndpointSlice changes waiting for the next sync began.
    let mut triggers: Vec<SystemTime> = Vec::new();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        let event = tokio::select! {
            event = rx.recv() => event,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        };
        let Some(event) = event else {
            bail!("the object source stopped");
        };
        if synced {
            // Like kube-proxy, a change counts as queued only after the first
            // sync: a slow initial list is not a stale agent.
            health.queued_update();
            metrics.sync_queued();
        }
        observe_event(&event, &metrics, started, &mut triggers);
        apply_event(&mut store, event, &mut pending, &mut synced, &metrics);
        // Take whatever else is queued so a burst becomes one update per service.
        while let Ok(event) = rx.try_recv() {
            observe_event(&event, &metrics, started, &mut triggers);
            apply_event(&mut store, event, &mut pending, &mut synced, &metrics);
        }
        // No Node object (manifests without one): eligible, as kube-proxy.
        health.set_node_eligible(
            store
                .node(&args.node_name)
                .is_none_or(health::node_eligible),
        );
        // Until the source has sent everything, a service may lack slices
        // that exist: writing it would refuse connections that work now.
        if !synced {
            continue;
        }
        // Zone and addresses decide backends and NodePort frontends of every
        // service: when this node's object changes, resync them all.
        let current = NodeContext::from_node(&args.node_name, store.node(&args.node_name));
        if current != node {
            tracing::info!(zone = ?current.zone, addresses = ?current.addresses, "node changed");
            if let Err(e) = dataplane.set_node_addresses(&current.addresses) {
                tracing::error!(error = %e, "setting the node's SNAT addresses");
            }
            node = current;
            pending.extend(store.service_ids().cloned());
        }
        let pass = Instant::now();
        for id in std::mem::take(&mut pending) {
            sync_service(&store, &mut dataplane, &id, &node, &metrics);
        }
        // One RCU grace period per batch, after the changes are visible.
        if let Err(e) = dataplane.writer.flush() {
            tracing::error!(error = %e, "removing stale map entries");
        }
        let (checks, warnings) = store.health_checks(&node);
        health_checks.sync(checks, warnings);
        if !dataplane.initial_sync_done() {
            // Only now can entries left by an earlier agent for services that
            // no longer exist be told apart from ones not yet synced.
            if let Err(e) = dataplane.finish_initial_sync() {
                tracing::error!(error = %e, "removing stale frontends");
            }
            let (entries, backends) = dataplane.writer.usage();
            tracing::info!(
                services = store.service_ids().count(),
                map_entries = entries,
                backends,
                "initial sync complete"
            );
        }
        // Per-service failures are logged and counted in
        // svclb_translation_errors_total; the pass itself completed.
        metrics.observe_sync(pass.elapsed());
        health.updated();
        let now = SystemTime::now();
        for t in triggers.drain(..) {
            metrics.observe_network_programming(now.duration_since(t).unwrap_or_default());
        }
        let (entries, backends) = dataplane.writer.usage();
        metrics.set_map_usage("services", entries, SERVICES_MAX_ENTRIES as usize);
        metrics.set_map_usage("backends", backends, BACKENDS_MAX_ENTRIES as usize);
    }
    // The links and maps stay pinned: traffic keeps flowing until the next agent.
    tracing::info!("exiting; programs stay attached");
    Ok(())
}

/// Fold one source event into the store, collecting the services to sync.
fn apply_event(
    store: &mut ObjectStore,
    event: SourceEvent,
    pending: &mut BTreeSet<ServiceId>,
    synced: &mut bool,
    metrics: &Metrics,
) {
    let (affected, warnings) = match event {
        SourceEvent::Snapshot(objects) => store.replace_all(objects),
        SourceEvent::Replace { kind, objects } => store.replace_kind(kind, objects),
        SourceEvent::Applied(object) => store.upsert(object),
        SourceEvent::Deleted(object) => (store.delete(&object), Vec::new()),
        SourceEvent::Synced => {
            *synced = true;
            (store.service_ids().cloned().collect(), Vec::new())
        }
    };
    log_model_errors(&warnings, metrics);
    pending.extend(affected);
}

/// Translate one service and make the maps match. Problems are logged with
/// the service's name; other services are unaffected.
fn sync_service(
    store: &ObjectStore,
    dataplane: &mut Dataplane,
    id: &ServiceId,
    node: &NodeContext,
    metrics: &Metrics,
) {
    let frontends = match store.translate(id, node) {
        None => Vec::new(),
        Some(t) => {
            log_model_errors(&t.warnings, metrics);
            if let Some(reason) = t.skipped {
                tracing::debug!(service = %id, reason, "not proxied");
            }
            t.frontends
        }
    };
    match dataplane.apply(id, &frontends) {
        Ok(stats) if stats.writes + stats.deletes > 0 => {
            tracing::info!(service = %id, frontends = frontends.len(), writes = stats.writes, deletes = stats.deletes, "applied");
        }
        Ok(_) => {}
        Err(e) => {
            metrics.translation_error(match e {
                DataplaneError::Full { .. } => "maps_full",
                _ => "map_update",
            });
            tracing::warn!(service = %id, "{e}");
        }
    }
}

fn log_model_errors(errors: &[ModelError], metrics: &Metrics) {
    for e in errors {
        metrics.translation_error("invalid_object");
        tracing::warn!("{e}");
    }
}

/// Count Service and EndpointSlice changes, and note when each EndpointSlice
/// change began (for kubeproxy_network_programming_duration_seconds).
/// Snapshots and relists are not changes.
fn observe_event(
    event: &SourceEvent,
    metrics: &Metrics,
    started: SystemTime,
    triggers: &mut Vec<SystemTime>,
) {
    let (SourceEvent::Applied(object) | SourceEvent::Deleted(object)) = event else {
        return;
    };
    match object {
        Object::Service(_) => metrics.service_changes(1),
        Object::EndpointSlice(slice) => {
            metrics.endpoint_changes(1);
            // Like kube-proxy: not for deletions (the annotation is then the
            // last update's), not for changes older than this agent.
            let trigger = metrics::last_change_trigger_time(slice);
            if let (SourceEvent::Applied(_), Some(t)) = (event, trigger) {
                if t > started {
                    triggers.push(t);
                }
            }
        }
        Object::Node(_) => {}
    }
}

/// Sample the external path's counters and conntrack usage for /metrics,
/// on a thread of its own: counting conntrack entries takes a syscall each.
fn spawn_external_stats(bpffs: PathBuf, metrics: Arc<Metrics>) {
    std::thread::spawn(move || loop {
        match crate::dataplane::read_external_stats(&bpffs) {
            Ok(stats) => metrics.set_external(stats),
            Err(e) => tracing::debug!(error = %e, "reading external path statistics"),
        }
        std::thread::sleep(std::time::Duration::from_secs(10));
    });
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the
/// memory cgroup). Raising it needs CAP_SYS_RESOURCE; on newer kernels a
/// failure is harmless, on older ones map creation reports it.
fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "raising RLIMIT_MEMLOCK");
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo (it is /sys/fs/cgroup
/// on a normal node, elsewhere on hybrid layouts).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    crate::dataplane::mounts::read()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.point)
        .filter(|p: &PathBuf| Path::new(p).is_dir())
        .context("no cgroup2 mount in /proc/self/mountinfo")
}
