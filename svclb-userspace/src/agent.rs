//! The agent's main loop: source -> model -> dataplane.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cli::RunArgs;
use crate::dataplane::{Dataplane, DataplaneConfig};
use crate::model::{ModelError, NodeContext, ObjectStore, ServiceId};
use crate::source::{manifests, SourceEvent};

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let Some(dir) = args.manifests.clone() else {
        bail!("the Kubernetes API source is not implemented yet: pass --manifests DIR");
    };
    let cgroup = match args.cgroup.clone() {
        Some(c) => c,
        None => cgroup2_root().context("finding the cgroup2 mount (pass --cgroup)")?,
    };
    let node = NodeContext {
        name: args.node_name.clone(),
    };
    let mut dataplane = Dataplane::start(&DataplaneConfig {
        bpffs: args.bpffs.clone(),
        cgroup: cgroup.clone(),
    })
    .context("starting the dataplane")?;
    tracing::info!(cgroup = %cgroup.display(), bpffs = %args.bpffs.display(), node = %node.name, "programs attached");

    let (tx, mut rx) = mpsc::channel(1024);
    tokio::spawn(manifests::run(dir, tx));
    let mut store = ObjectStore::new();
    let mut synced = false;
    let mut pending: BTreeSet<ServiceId> = BTreeSet::new();
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
        apply_event(&mut store, event, &mut pending, &mut synced);
        // Take whatever else is queued so a burst becomes one update per service.
        while let Ok(event) = rx.try_recv() {
            apply_event(&mut store, event, &mut pending, &mut synced);
        }
        // Until the source has sent everything, a service may lack slices
        // that exist: writing it would refuse connections that work now.
        if !synced {
            continue;
        }
        for id in std::mem::take(&mut pending) {
            sync_service(&store, &mut dataplane, &id, &node);
        }
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
) {
    let (affected, warnings) = match event {
        SourceEvent::Snapshot(objects) => store.replace_all(objects),
        SourceEvent::Applied(object) => store.upsert(object),
        SourceEvent::Deleted(object) => (store.delete(&object), Vec::new()),
        SourceEvent::Synced => {
            *synced = true;
            (store.service_ids().cloned().collect(), Vec::new())
        }
    };
    log_model_errors(&warnings);
    pending.extend(affected);
}

/// Translate one service and make the maps match. Problems are logged with
/// the service's name; other services are unaffected.
fn sync_service(
    store: &ObjectStore,
    dataplane: &mut Dataplane,
    id: &ServiceId,
    node: &NodeContext,
) {
    let frontends = match store.translate(id, node) {
        None => Vec::new(),
        Some(t) => {
            log_model_errors(&t.warnings);
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
        Err(e) => tracing::warn!(service = %id, "{e}"),
    }
}

fn log_model_errors(errors: &[ModelError]) {
    for e in errors {
        tracing::warn!("{e}");
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo (it is /sys/fs/cgroup
/// on a normal node, elsewhere on hybrid layouts).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .filter(|p: &PathBuf| Path::new(p).is_dir())
        .context("no cgroup2 mount in /proc/self/mountinfo")
}
