//! Where Kubernetes objects come from. Every source feeds the agent the same
//! stream of [`SourceEvent`]s, so the model and dataplane don't care whether
//! objects come from a manifests directory or the API server.

pub mod manifests;

use crate::model::Object;

#[derive(Debug)]
pub enum SourceEvent {
    /// Every object the source knows, replacing what it sent before
    /// (manifests mode sends one after each change of the directory).
    Snapshot(Vec<Object>),
    /// An object was added or changed.
    Applied(Object),
    /// An object was removed (only its kind, namespace and name matter).
    Deleted(Object),
    /// Everything that existed when the source started has been sent: the
    /// agent can now write the maps and remove what no longer exists.
    Synced,
}
