//! The Kubernetes API source (`svclb run` without `--manifests`): kube-rs
//! watchers for Services and EndpointSlices in all namespaces and for this
//! node's Node.
//!
//! A watcher lists, then watches from the list's resourceVersion; after a
//! break (or a stall: see [`run`]) it watches again from where it was, or
//! relists when the server answers 410 Gone. Every complete list becomes one
//! [`SourceEvent::Replace`] of its kind, so that objects deleted while the
//! connection was down disappear, and identical objects change nothing in
//! the store, so a relist does not make map entries flap. Errors are logged
//! and retried with the watcher's backoff; meanwhile the agent gets no
//! events and the dataplane stays as it is.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::runtime::utils::Backoff;
use kube::runtime::watcher::{self, watcher, DefaultBackoff, Event};
use kube::{Api, Client, Config, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, Notify};

use super::SourceEvent;
use crate::model::{self, Object, ObjectKind};

#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error("kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    #[error("no Kubernetes client configuration (KUBECONFIG, ~/.kube/config, in-cluster): {0}")]
    Infer(#[source] InferConfigError),
    #[error("creating the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("the watch streams ended")]
    Ended,
}

/// A client from `kubeconfig`, or else the usual kube-rs inference:
/// $KUBECONFIG, ~/.kube/config, then the in-cluster service account.
/// Nothing is sent to the server yet.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeSourceError> {
    let config = match kubeconfig {
        Some(path) => {
            let error = |source| KubeSourceError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            };
            let file = Kubeconfig::read_from(path).map_err(error)?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(error)?
        }
        None => Config::infer().await.map_err(KubeSourceError::Infer)?,
    };
    Client::try_from(config).map_err(KubeSourceError::Client)
}

/// Sends the cluster's Services, EndpointSlices and this node's Node as
/// events, and [`SourceEvent::Synced`] once each kind has been listed. Runs
/// until the receiver is gone (Ok) or, which does not happen, the watches end.
///
/// `watch_timeout` is asked of the API server for every watch (it ends the
/// watch then and the watcher resumes it); kube-rs takes a watch that brings
/// nothing, not even a bookmark, for 5 s longer as stalled and starts it again.
pub async fn run(
    client: Client,
    node_name: String,
    watch_timeout: Duration,
    events: mpsc::Sender<SourceEvent>,
) -> Result<(), KubeSourceError> {
    let secs = u32::try_from(watch_timeout.as_secs())
        .unwrap_or(u32::MAX)
        .max(1);
    let all = watcher::Config::default().timeout(secs);
    let this_node = all.clone().fields(&format!("metadata.name={node_name}"));
    let proxied = all.labels(&model::proxied_label_selector());
    let reachable = Arc::new(Notify::new());
    let mut watches = stream::select_all([
        watch(
            Api::<Service>::all(client.clone()),
            proxied.clone(),
            ObjectKind::Service,
            |o| Object::Service(Box::new(o)),
            reachable.clone(),
        ),
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            proxied,
            ObjectKind::EndpointSlice,
            |o| Object::EndpointSlice(Box::new(o)),
            reachable.clone(),
        ),
        watch(
            Api::<Node>::all(client),
            this_node,
            ObjectKind::Node,
            |o| Object::Node(Box::new(o)),
            reachable,
        ),
    ]);
    // Objects of a list in progress, per kind: sent whole at its end.
    let mut listing: BTreeMap<ObjectKind, Vec<Object>> = BTreeMap::new();
    let mut unlisted = BTreeSet::from([
        ObjectKind::Service,
        ObjectKind::EndpointSlice,
        ObjectKind::Node,
    ]);
    while let Some((kind, event)) = watches.next().await {
        let event = match event {
            Event::Init => {
                listing.insert(kind, Vec::new());
                continue;
            }
            Event::InitApply(obj) => {
                listing.entry(kind).or_default().push(obj);
                continue;
            }
            Event::InitDone => {
                let objects = listing.remove(&kind).unwrap_or_default();
                tracing::debug!(%kind, objects = objects.len(), "listed");
                SourceEvent::Replace { kind, objects }
            }
            Event::Apply(obj) => SourceEvent::Applied(obj),
            Event::Delete(obj) => SourceEvent::Deleted(obj),
        };
        let first_list = matches!(event, SourceEvent::Replace { .. }) && unlisted.remove(&kind);
        if events.send(event).await.is_err() {
            return Ok(());
        }
        if first_list && unlisted.is_empty() && events.send(SourceEvent::Synced).await.is_err() {
            return Ok(());
        }
    }
    Err(KubeSourceError::Ended)
}

type KindEvents = BoxStream<'static, (ObjectKind, Event<Object>)>;

/// One kind's watcher, its events tagged with the kind so that the three
/// can be merged. Errors are logged and retried with kube-rs' default
/// backoff (client-go's: from 0.8 s doubling to 30 s, each plus up to as
/// much again of jitter, reset after 2 minutes without errors), except:
/// - 410 Gone on a watch relists at once: the server asks for it, and it
///   is the usual answer of a restarted API server (its watch cache starts
///   anew). A second 410 without a watch event in between backs off, so a
///   server that keeps answering 410 is not hammered.
/// - an answer from the API server to any kind's watch ends the others'
///   backoff (`reachable`), so that after an outage all kinds come back
///   together instead of each up to a minute apart.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: ObjectKind,
    wrap: fn(K) -> Object,
    reachable: Arc<Notify>,
) -> KindEvents
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    // kube-rs' own log lines (e.g. a stalled watch's idle timeout) name the kind.
    let span = tracing::info_span!("watch", %kind);
    let mut inner = watcher(api, config).boxed();
    let events = stream::poll_fn(move |cx| span.in_scope(|| inner.poll_next_unpin(cx)));
    let state = Retry {
        events: events.boxed(),
        backoff: DefaultBackoff::default(),
        failures: 0,
        gone_in_a_row: 0,
    };
    stream::unfold(state, move |mut s| {
        let reachable = reachable.clone();
        async move {
            loop {
                let error = match s.events.next().await? {
                    Ok(event) => {
                        if s.failures > 0 {
                            tracing::info!(%kind, failures = s.failures, "watch works again");
                            s.failures = 0;
                            s.backoff.reset();
                            reachable.notify_waiters();
                        }
                        if matches!(event, Event::Apply(_) | Event::Delete(_)) {
                            s.gone_in_a_row = 0;
                        }
                        let event = match event {
                            Event::Apply(o) => Event::Apply(wrap(o)),
                            Event::Delete(o) => Event::Delete(wrap(o)),
                            Event::Init => Event::Init,
                            Event::InitApply(o) => Event::InitApply(wrap(o)),
                            Event::InitDone => Event::InitDone,
                        };
                        return Some(((kind, event), s));
                    }
                    Err(e) => e,
                };
                if matches!(&error, watcher::Error::WatchError(status) if status.code == 410) {
                    // The server answered: whoever waits for it can stop.
                    reachable.notify_waiters();
                    s.gone_in_a_row += 1;
                    if s.gone_in_a_row == 1 {
                        tracing::info!(%kind, "watch expired (410 Gone); relisting");
                        continue;
                    }
                }
                s.failures += 1;
                let delay = s.backoff.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(%kind, retry_in = ?delay, "watch failed, retrying: {error}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = reachable.notified() => {
                        tracing::info!(%kind, "the API server answers another watch; retrying now");
                    }
                }
            }
        }
    })
    .boxed()
}

/// A kind's watcher with its retry state.
struct Retry<K> {
    events: BoxStream<'static, watcher::Result<Event<K>>>,
    backoff: DefaultBackoff,
    /// Errors since the last event.
    failures: u32,
    /// 410 Gone answers since the last watch event.
    gone_in_a_row: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Building a client sets up TLS (rustls with ring) without connecting:
    // this catches a TLS feature set that compiles but cannot start.
    #[tokio::test]
    async fn client_from_kubeconfig() {
        let dir = std::env::temp_dir().join(format!("svclb-kubeconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (i, server) in ["https://127.0.0.1:6443", "http://127.0.0.1:8080"]
            .iter()
            .enumerate()
        {
            let path = dir.join(i.to_string());
            let text = format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
                 clusters: [{{name: c, cluster: {{server: \"{server}\"}}}}]\n\
                 users: [{{name: u, user: {{token: t}}}}]\n\
                 contexts: [{{name: c, context: {{cluster: c, user: u}}}}]\n"
            );
            std::fs::write(&path, text).unwrap();
            let result = client(Some(&path)).await;
            assert!(result.is_ok(), "{server}: {:?}", result.err());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn missing_kubeconfig_names_the_file() {
        let Err(err) = client(Some(Path::new("/nonexistent/kubeconfig"))).await else {
            panic!("a client from a missing kubeconfig");
        };
        let message = err.to_string();
        assert!(
            message.starts_with("kubeconfig /nonexistent/kubeconfig: "),
            "{message}"
        );
    }
}
