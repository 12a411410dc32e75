//! Where Kubernetes objects come from. Every source feeds the agent the same
//! stream of [`SourceEvent`]s, so the model and dataplane don't care whether
//! objects come from a manifests directory or the API server.

pub mod kube;
pub mod manifests;

use std::path::PathBuf;

use tokio::sync::mpsc;

use crate::model::{Object, ObjectKind};

#[derive(Debug)]
pub enum SourceEvent {
    /// Every object the source knows, replacing what it sent before
    /// (manifests mode sends one after each change of the directory).
    Snapshot(Vec<Object>),
    /// Every object of one kind, replacing what the source sent of that kind
    /// before (the API source sends one after each (re)list of a kind).
    Replace {
        kind: ObjectKind,
        objects: Vec<Object>,
    },
    /// An object was added or changed.
    Applied(Object),
    /// An object was removed (only its kind, namespace and name matter).
    Deleted(Object),
    /// Everything that existed when the source started has been sent: the
    /// agent can now write the maps and remove what no longer exists.
    Synced,
}

/// Where the agent's objects come from.
pub enum Source {
    /// A directory of manifests (`--manifests`).
    Manifests(PathBuf),
    /// The Kubernetes API server; `watch_timeout` as in [`kube::run`].
    Kube {
        client: ::kube::Client,
        watch_timeout: std::time::Duration,
    },
}

impl Source {
    /// Sends events until the receiver is gone. An error that stops the
    /// source is logged here; the agent sees the channel close.
    pub async fn run(self, node_name: String, events: mpsc::Sender<SourceEvent>) {
        match self {
            Source::Manifests(dir) => manifests::run(dir, events).await,
            Source::Kube {
                client,
                watch_timeout,
            } => {
                if let Err(e) = kube::run(client, node_name, watch_timeout, events).await {
                    tracing::error!("Kubernetes API source: {e}");
                }
            }
        }
    }
}
