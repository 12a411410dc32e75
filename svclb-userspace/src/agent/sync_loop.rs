//! The sync loop: source events go into the object store, and each
//! [`SyncLoop::flush`] makes the dataplane, the health check servers,
//! /healthz and the metrics follow the store.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use svclb_common::maps::{BACKENDS_MAX_ENTRIES, SERVICES_MAX_ENTRIES};

use crate::dataplane::{Dataplane, DataplaneError};
use crate::model::{self, ModelError, NodeContext, Object, ObjectStore, ServiceId};
use crate::serve::health_check_ports::HealthCheckServers;
use crate::serve::healthz::ProxyHealth;
use crate::serve::metrics::Metrics;
use crate::source::SourceEvent;

pub struct SyncLoop {
    node_name: String,
    /// This node as the dataplane has it; filled in from the Node object
    /// once the source has sent it.
    node: NodeContext,
    store: ObjectStore,
    dataplane: Dataplane,
    health: Arc<ProxyHealth>,
    metrics: Arc<Metrics>,
    health_checks: HealthCheckServers,
    /// The source has sent every object once.
    synced: bool,
    /// Services to translate and apply at the next flush.
    pending: BTreeSet<ServiceId>,
    started: SystemTime,
    /// When the EndpointSlice changes waiting for the next flush began.
    triggers: Vec<SystemTime>,
}

impl SyncLoop {
    pub fn new(
        node_name: &str,
        dataplane: Dataplane,
        health: Arc<ProxyHealth>,
        metrics: Arc<Metrics>,
        health_checks: HealthCheckServers,
    ) -> Self {
        SyncLoop {
            node_name: node_name.to_string(),
            node: NodeContext::from_node(node_name, None),
            store: ObjectStore::new(),
            dataplane,
            health,
            metrics,
            health_checks,
            synced: false,
            pending: BTreeSet::new(),
            started: SystemTime::now(),
            triggers: Vec::new(),
        }
    }

    /// Fold one source event into the store; the services it affects are
    /// synced at the next [`Self::flush`].
    pub fn handle(&mut self, event: SourceEvent) {
        if self.synced {
            // Like kube-proxy, a change counts as queued only after the first
            // sync: a slow initial list is not a stale agent.
            self.health.queued_update();
            self.metrics.sync_queued();
        }
        self.observe(&event);
        let (affected, warnings) = match event {
            SourceEvent::Snapshot(objects) => self.store.replace_all(objects),
            SourceEvent::Replace { kind, objects } => self.store.replace_kind(kind, objects),
            SourceEvent::Applied(object) => self.store.upsert(object),
            SourceEvent::Deleted(object) => (self.store.delete(&object), Vec::new()),
            SourceEvent::Synced => {
                self.synced = true;
                (self.store.service_ids().cloned().collect(), Vec::new())
            }
        };
        log_model_errors(&warnings, &self.metrics);
        self.pending.extend(affected);
    }

    /// Apply the pending services (all of them when this node's zone or
    /// addresses changed), then the health check servers, /healthz and the
    /// metrics. Until the source has sent everything, only the node's
    /// eligibility is updated: a service may lack slices that exist, and
    /// writing it would refuse connections that work now.
    pub fn flush(&mut self) {
        // No Node object (manifests without one): eligible, as kube-proxy.
        let node = self.store.node(&self.node_name);
        self.health
            .set_node_eligible(node.is_none_or(model::node_eligible));
        if !self.synced {
            return;
        }
        self.follow_node();
        let pass = Instant::now();
        for id in std::mem::take(&mut self.pending) {
            self.sync_service(&id);
        }
        // One RCU grace period per batch, after the changes are visible.
        if let Err(e) = self.dataplane.flush() {
            tracing::error!(error = %e, "removing stale map entries");
        }
        let (checks, warnings) = self.store.health_checks(&self.node);
        self.health_checks.sync(checks, warnings);
        if !self.dataplane.initial_sync_done() {
            self.finish_initial_sync();
        }
        self.record_sync(pass.elapsed());
    }

    /// Zone and addresses decide backends and NodePort frontends of every
    /// service: when this node's object changes, resync them all.
    fn follow_node(&mut self) {
        let current = NodeContext::from_node(&self.node_name, self.store.node(&self.node_name));
        if current == self.node {
            return;
        }
        tracing::info!(zone = ?current.zone, addresses = ?current.addresses, "node changed");
        if let Err(e) = self.dataplane.set_node_addresses(&current.addresses) {
            tracing::error!(error = %e, "setting the node's SNAT addresses");
        }
        self.node = current;
        self.pending.extend(self.store.service_ids().cloned());
    }

    /// Translate one service and make the maps match. Problems are logged
    /// with the service's name; other services are unaffected.
    fn sync_service(&mut self, id: &ServiceId) {
        let frontends = match self.store.translate(id, &self.node) {
            None => Vec::new(),
            Some(t) => {
                log_model_errors(&t.warnings, &self.metrics);
                if let Some(reason) = t.skipped {
                    tracing::debug!(service = %id, reason, "not proxied");
                }
                t.frontends
            }
        };
        match self.dataplane.apply(id, &frontends) {
            Ok(stats) if stats.writes + stats.deletes > 0 => {
                tracing::info!(service = %id, frontends = frontends.len(), writes = stats.writes, deletes = stats.deletes, "applied");
            }
            Ok(_) => {}
            Err(e) => {
                self.metrics.translation_error(match e {
                    DataplaneError::Full { .. } => "maps_full",
                    _ => "map_update",
                });
                tracing::warn!(service = %id, "{e}");
            }
        }
    }

    /// Every service has been applied once: only now can entries left by
    /// an earlier agent for services that no longer exist be told apart
    /// from ones not yet synced.
    fn finish_initial_sync(&mut self) {
        if let Err(e) = self.dataplane.finish_initial_sync() {
            tracing::error!(error = %e, "removing stale frontends");
        }
        let (entries, backends) = self.dataplane.usage();
        tracing::info!(
            services = self.store.service_ids().count(),
            map_entries = entries,
            backends,
            "initial sync complete"
        );
    }

    /// A pass completed: per-service failures are logged and counted in
    /// svclb_translation_errors_total, the pass itself counts as a sync.
    fn record_sync(&mut self, duration: Duration) {
        self.metrics.observe_sync(duration);
        self.health.updated();
        let now = SystemTime::now();
        for t in self.triggers.drain(..) {
            self.metrics
                .observe_network_programming(now.duration_since(t).unwrap_or_default());
        }
        let (entries, backends) = self.dataplane.usage();
        let metrics = &self.metrics;
        metrics.set_map_usage("services", entries, SERVICES_MAX_ENTRIES as usize);
        metrics.set_map_usage("backends", backends, BACKENDS_MAX_ENTRIES as usize);
    }

    /// Count Service and EndpointSlice changes, and note when each
    /// EndpointSlice change began (for
    /// kubeproxy_network_programming_duration_seconds). Snapshots and
    /// relists are not changes.
    fn observe(&mut self, event: &SourceEvent) {
        let (SourceEvent::Applied(object) | SourceEvent::Deleted(object)) = event else {
            return;
        };
        match object {
            Object::Service(_) => self.metrics.service_changes(1),
            Object::EndpointSlice(slice) => {
                self.metrics.endpoint_changes(1);
                // Like kube-proxy: not for deletions (the annotation is then
                // the last update's), not for changes older than this agent.
                let trigger = model::last_change_trigger_time(slice);
                if let (SourceEvent::Applied(_), Some(t)) = (event, trigger) {
                    if t > self.started {
                        self.triggers.push(t);
                    }
                }
            }
            Object::Node(_) => {}
        }
    }
}

fn log_model_errors(errors: &[ModelError], metrics: &Metrics) {
    for e in errors {
        metrics.translation_error("invalid_object");
        tracing::warn!("{e}");
    }
}
