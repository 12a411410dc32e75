//! The agent's main loop: source -> model -> dataplane.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::RunArgs;
use crate::dataplane::{Dataplane, DataplaneConfig};
use crate::model::{ModelError, NodeContext, ObjectStore, ServiceId};
use crate::source::manifests::{load_dir, DirWatcher, ManifestError};

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

    let mut store = ObjectStore::new();
    let mut watcher = DirWatcher::new(&dir);
    let (objects, errors) = load_dir(&dir);
    log_manifest_errors(&errors);
    let (_, warnings) = store.replace_all(objects);
    log_model_errors(&warnings);
    let ids: Vec<ServiceId> = store.service_ids().cloned().collect();
    for id in &ids {
        sync_service(&store, &mut dataplane, id, &node);
    }
    // Only now can entries left by an earlier agent for services that no
    // longer exist be told apart from ones not yet synced.
    if let Err(e) = dataplane.writer.prune_unclaimed() {
        tracing::error!(error = %e, "removing stale frontends");
    }
    let (services, backends) = dataplane.writer.usage();
    tracing::info!(
        services = ids.len(),
        map_entries = services,
        backends,
        "initial sync complete"
    );

    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = watcher.changed() => {
                let (objects, errors) = load_dir(&dir);
                log_manifest_errors(&errors);
                let (affected, warnings) = store.replace_all(objects);
                log_model_errors(&warnings);
                for id in &affected {
                    sync_service(&store, &mut dataplane, id, &node);
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // The links and maps stay pinned: traffic keeps flowing until the next agent.
    tracing::info!("exiting; programs stay attached");
    Ok(())
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

fn log_manifest_errors(errors: &[ManifestError]) {
    for e in errors {
        tracing::warn!("skipped manifest: {e}");
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
