//! The sync loop: source events go into the object store, and each
//! [`SyncLoop::flush`] makes the dataplane, the health check servers,
//! /healthz and the metrics follow the store.
//!
//! What fails to reach the maps is retried with backoff until it does
//! ([`RetrySet`]), and every `--sync-period` all services are applied again
//! (the writer rewrites only what differs). /healthz turns healthy only
//! after a pass in which everything reached the maps.
//!
//! Each periodic pass first compares the maps with what the last applies
//! wanted (drift: entries changed or deleted behind the agent's back),
//! counts the differences, and repairs them in the same pass. After every
//! pass the desired state is published for `svclb verify`.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use svclb_common::maps::{BACKENDS_MAX_ENTRIES, SERVICES_MAX_ENTRIES};

use crate::dataplane::drift::{Difference, Published};
use crate::dataplane::{Dataplane, DataplaneError};
use crate::model::{self, ModelError, NodeContext, Object, ObjectStore, ServiceId};
use crate::serve::health_check_ports::HealthCheckServers;
use crate::serve::healthz::ProxyHealth;
use crate::serve::metrics::Metrics;
use crate::source::SourceEvent;

use super::events::{EventSink, Warning};
use super::retry::RetrySet;

/// Work that failed and is retried.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Work {
    /// Applying one service.
    Service(ServiceId),
    /// Deleting stale entries after a batch ([`Dataplane::flush`]).
    StaleEntries,
    /// Removing what no service claimed in the initial sync
    /// ([`Dataplane::finish_initial_sync`]).
    UnclaimedFrontends,
}

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
    /// Failed work: the dataplane lags the store until it succeeds.
    retries: RetrySet<Work>,
    /// Services that want a frontend another service owns (the model
    /// leaves it out) or still holds in the maps (the writer refuses it).
    /// The store hands a frontend over as soon as its owner lets go; these
    /// are retried as well, as a safety net. They leave /healthz alone: the
    /// input is wrong, not the agent, and a Service anyone can create must
    /// not turn every node unhealthy for the load balancers.
    conflicts: RetrySet<ServiceId>,
    sync_period: Duration,
    next_resync: Instant,
    /// Where /debug/svclb/desired finds the last desired state.
    published: Arc<Published>,
    last_published: Option<Arc<crate::dataplane::drift::Wanted>>,
    /// The SNAT sources must be chosen again (at start, when the Node
    /// changed, every sync period: routes and addresses change unseen).
    snat_due: bool,
    /// Warning events on Services (conflicts, maps full).
    events: EventSink,
}

impl SyncLoop {
    pub fn new(
        node_name: &str,
        dataplane: Dataplane,
        health: Arc<ProxyHealth>,
        metrics: Arc<Metrics>,
        health_checks: HealthCheckServers,
        sync_period: Duration,
        published: Arc<Published>,
    ) -> Self {
        let node = NodeContext::from_node(node_name, None);
        let mut store = ObjectStore::new();
        store.set_node(&node);
        SyncLoop {
            node_name: node_name.to_string(),
            node,
            store,
            dataplane,
            health,
            metrics,
            health_checks,
            synced: false,
            pending: BTreeSet::new(),
            started: SystemTime::now(),
            triggers: Vec::new(),
            retries: RetrySet::new(),
            conflicts: RetrySet::new(),
            sync_period,
            next_resync: Instant::now() + sync_period,
            published,
            last_published: None,
            snat_due: true,
            events: EventSink::none(),
        }
    }

    pub fn with_events(mut self, events: EventSink) -> Self {
        self.events = events;
        self
    }

    /// When [`Self::flush`] must run even without events: the next retry
    /// or the next periodic resync.
    pub fn next_wakeup(&self) -> Instant {
        [self.retries.next_deadline(), self.conflicts.next_deadline()]
            .into_iter()
            .flatten()
            .fold(self.next_resync, Instant::min)
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
    /// addresses changed or the sync period is over), the retries that are
    /// due, then the health check servers, /healthz and the metrics. Until
    /// the source has sent everything, only the node's eligibility is
    /// updated: a service may lack slices that exist, and writing it would
    /// refuse connections that work now.
    pub fn flush(&mut self) {
        // No Node object (manifests without one): eligible, as kube-proxy.
        let node = self.store.node(&self.node_name);
        self.health
            .set_node_eligible(node.is_none_or(model::node_eligible));
        let pass = Instant::now();
        let resync = pass >= self.next_resync;
        if resync {
            self.next_resync = pass + self.sync_period;
        }
        if !self.synced {
            return;
        }
        self.follow_node();
        let mut repair = false;
        if resync {
            repair = self.check_drift();
            self.pending.extend(self.store.service_ids().cloned());
            self.snat_due = true;
        }
        let mut prune_due = false;
        for work in self.retries.due(pass) {
            match work {
                Work::Service(id) => {
                    self.pending.insert(id);
                }
                // The dataplane flush below runs every pass.
                Work::StaleEntries => {}
                Work::UnclaimedFrontends => prune_due = true,
            }
        }
        self.pending.extend(self.conflicts.due(pass));
        let mut refused = Vec::new();
        for id in std::mem::take(&mut self.pending) {
            if self.sync_service(&id, pass) == Applied::Refused {
                refused.push(id);
            }
        }
        // A frontend handed over in this pass may have been refused because
        // its old owner, later in the pass, still held it: once more.
        for id in refused {
            self.sync_service(&id, pass);
        }
        // One RCU grace period per batch, after the changes are visible.
        match self.dataplane.flush() {
            Ok(_) => self.retries.succeed(&Work::StaleEntries),
            Err(e) => {
                self.retries.fail(&Work::StaleEntries, pass);
                self.metrics.sync_error("flush");
                tracing::error!(error = %e, "removing stale map entries; will retry");
            }
        }
        if self.snat_due {
            self.update_snat_sources();
        }
        let (checks, warnings) = self.store.health_checks(&self.node);
        self.health_checks.sync(checks, warnings);
        // After a repair too: frontends added behind the agent's back have
        // no owner.
        if !self.dataplane.initial_sync_done() || prune_due || repair {
            self.remove_unclaimed(pass);
        }
        self.publish();
        self.record_sync(pass.elapsed());
    }

    /// Compare the maps with the desired state, when the agent believes
    /// they match (nothing waits for a retry); count and log what differs.
    /// Returns whether anything must be repaired (then every service is
    /// applied in this pass anyway).
    fn check_drift(&mut self) -> bool {
        if !self.retries.is_empty() || !self.dataplane.initial_sync_done() {
            return false;
        }
        let differences = match self.dataplane.check_drift() {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading the maps to check for drift");
                return false;
            }
        };
        log_drift(&differences, &self.metrics);
        !differences.is_empty()
    }

    /// Make the desired state of this pass what /debug/svclb/desired serves.
    fn publish(&mut self) {
        let wanted = self.dataplane.wanted();
        if self
            .last_published
            .as_ref()
            .is_some_and(|last| Arc::ptr_eq(last, &wanted))
        {
            return;
        }
        self.published.set(wanted.clone());
        self.last_published = Some(wanted);
    }

    /// Zone and addresses decide backends and NodePort frontends of every
    /// service: when this node's object changes, resync them all.
    fn follow_node(&mut self) {
        let current = NodeContext::from_node(&self.node_name, self.store.node(&self.node_name));
        if current == self.node {
            return;
        }
        tracing::info!(zone = ?current.zone, addresses = ?current.addresses, "node changed");
        self.snat_due = true;
        self.store.set_node(&current);
        self.node = current;
        self.pending.extend(self.store.service_ids().cloned());
    }

    /// Choose the SNAT sources from the routes toward the remote backends
    /// now in the maps; logged when they change. Tried again next pass if
    /// the routing table could not be read.
    fn update_snat_sources(&mut self) {
        match self.dataplane.update_snat_sources(&self.node.addresses) {
            Ok(changed) => {
                self.snat_due = false;
                if let Some(choice) = changed {
                    tracing::info!(ipv4 = ?choice.v4, ipv6 = ?choice.v6, "SNAT sources for remote backends");
                    for w in &choice.warnings {
                        tracing::warn!("SNAT source: {w}");
                    }
                }
            }
            Err(e) => {
                self.metrics.sync_error("snat");
                tracing::error!(error = %e, "choosing the SNAT sources; will retry");
            }
        }
    }

    /// Translate one service and make the maps match. Problems are logged
    /// with the service's name and the service is retried; other services
    /// are unaffected.
    fn sync_service(&mut self, id: &ServiceId, now: Instant) -> Applied {
        let mut lost_frontends = None;
        let frontends = match self.store.translate(id, &self.node) {
            None => Vec::new(),
            Some(t) => {
                log_model_errors(&t.warnings, &self.metrics);
                if let Some(reason) = t.skipped {
                    tracing::debug!(service = %id, reason, "not proxied");
                }
                lost_frontends = (t.warnings.iter())
                    .find(|w| matches!(w, ModelError::FrontendConflict { .. }))
                    .map(ToString::to_string);
                t.frontends
            }
        };
        let work = Work::Service(id.clone());
        match self.dataplane.apply(id, &frontends) {
            Ok(stats) => {
                self.retries.succeed(&work);
                if stats.writes + stats.deletes > 0 {
                    tracing::info!(service = %id, frontends = frontends.len(), writes = stats.writes, deletes = stats.deletes, "applied");
                }
                let Some(conflict) = lost_frontends else {
                    self.conflicts.succeed(id);
                    return Applied::Done;
                };
                // The rest of the service is in the maps; it waits for the
                // frontends it lost.
                self.warn_once(id, Warning::FrontendConflict, conflict);
                let delay = self.conflicts.fail(id, now);
                self.metrics.sync_error("conflict");
                tracing::warn!(service = %id, retry_in = ?delay, "frontends left out for older services");
                Applied::Done
            }
            Err(e @ DataplaneError::Conflict { .. }) => {
                self.retries.succeed(&work);
                self.warn_once(id, Warning::FrontendConflict, e.to_string());
                let delay = self.conflicts.fail(id, now);
                self.metrics.sync_error("conflict");
                tracing::warn!(service = %id, retry_in = ?delay, "{e}");
                Applied::Refused
            }
            Err(e) => {
                self.conflicts.succeed(id);
                if matches!(e, DataplaneError::Full { .. }) && !self.retries.contains(&work) {
                    self.events.warn(id, Warning::MapsFull, e.to_string());
                }
                let delay = self.retries.fail(&work, now);
                self.metrics.sync_error(match e {
                    DataplaneError::Full { .. } => "maps_full",
                    _ => "map_update",
                });
                tracing::warn!(service = %id, retry_in = ?delay, "{e}");
                Applied::Failed
            }
        }
    }

    /// An event for the first conflict in a row, not for every retry.
    fn warn_once(&self, id: &ServiceId, warning: Warning, note: String) {
        if !self.conflicts.contains(id) {
            self.events.warn(id, warning, note);
        }
    }

    /// Every service has been applied once (after start-up or a drift
    /// repair): only now can entries left by an earlier agent for services
    /// that no longer exist be told apart from ones not yet synced. Retried
    /// until it succeeds: a failure must not leave deleted services'
    /// frontends in the maps until the next restart.
    fn remove_unclaimed(&mut self, now: Instant) {
        let first = !self.dataplane.initial_sync_done();
        let pruned = if first {
            self.dataplane.finish_initial_sync()
        } else {
            self.dataplane.prune_unclaimed()
        };
        match pruned {
            Ok(_) => self.retries.succeed(&Work::UnclaimedFrontends),
            Err(e) => {
                let delay = self.retries.fail(&Work::UnclaimedFrontends, now);
                self.metrics.sync_error("prune");
                tracing::error!(error = %e, retry_in = ?delay, "removing stale frontends");
            }
        }
        if !first {
            return;
        }
        let (entries, backends) = self.dataplane.usage();
        tracing::info!(
            services = self.store.service_ids().count(),
            map_entries = entries,
            backends,
            "initial sync complete"
        );
    }

    /// A pass completed. Like kube-proxy's, it is a successful sync (the
    /// health's and kubeproxy_sync_proxy_rules_last_timestamp_seconds'
    /// "updated") only when the maps hold everything the store asks for:
    /// nothing waits for a retry (conflicts aside).
    fn record_sync(&mut self, duration: Duration) {
        let retries = self.retries.len() + self.conflicts.len();
        self.metrics.set_sync_retries_pending(retries);
        if self.retries.is_empty() {
            self.metrics.observe_sync(duration);
            self.health.updated();
            let now = SystemTime::now();
            for t in self.triggers.drain(..) {
                self.metrics
                    .observe_network_programming(now.duration_since(t).unwrap_or_default());
            }
        } else {
            self.metrics.observe_failed_sync(duration);
            // The maps lag the store from now on (if not since an earlier
            // change): failing longer than the health timeout is unhealthy.
            self.health.queued_update();
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

/// How [`SyncLoop::sync_service`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    /// In the maps (perhaps without frontends older services own).
    Done,
    /// The writer refused it: a frontend belongs to another service in the maps.
    Refused,
    /// A map operation failed.
    Failed,
}

/// At most this many differences are logged one by one per check.
const DRIFT_LOG_LINES: usize = 20;

fn log_drift(differences: &[Difference], metrics: &Metrics) {
    if differences.is_empty() {
        return;
    }
    for d in differences {
        metrics.map_drift(d.map);
    }
    for d in differences.iter().take(DRIFT_LOG_LINES) {
        tracing::warn!("map drift: {d}");
    }
    tracing::warn!(
        differences = differences.len(),
        "the BPF maps differ from the desired state (changed outside the agent); repairing"
    );
}

fn log_model_errors(errors: &[ModelError], metrics: &Metrics) {
    for e in errors {
        metrics.translation_error(e.reason());
        tracing::warn!("{e}");
    }
}
