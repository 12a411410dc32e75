//! The pure translation from Kubernetes objects to what the dataplane must
//! hold: for each Service, its frontends and their backend sets.
//!
//! kube-proxy's Service semantics live here and nowhere else. No I/O, no
//! clocks, no BPF: everything is a function of the objects given, so it is
//! table- and property-tested.

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

mod store;
#[cfg(test)]
mod tests;
mod translate;

pub use store::ObjectStore;
pub use store::LABEL_SERVICE_NAME;
pub use translate::translate;
pub use translate::{skip, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};

/// A Kubernetes object svclb consumes, from either source (API or manifests).
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Box<Service>),
    EndpointSlice(Box<EndpointSlice>),
    Node(Box<Node>),
}

impl Object {
    /// The Kubernetes kind, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::EndpointSlice(_) => "EndpointSlice",
            Object::Node(_) => "Node",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
        }
    }
}

/// namespace/name of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// What a client addresses: a service IP, port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol),
        }
    }
}

/// One endpoint a frontend balances over. Same address family and protocol
/// as its frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// Serving but terminating: only used because no endpoint is ready.
    pub terminating: bool,
}

/// A frontend and the backends it load-balances over, in a canonical
/// (sorted, de-duplicated) order. An empty list means "refuse connections".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub backends: Vec<Backend>,
}

/// What this node needs to know about itself (zone, addresses: later issues).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
}

/// The result of translating one Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    /// Sorted by key. Empty for skipped services.
    pub frontends: Vec<Frontend>,
    /// Set when the Service is deliberately not proxied (headless, ExternalName, ...).
    pub skipped: Option<&'static str>,
    /// Problems with parts of the objects that were skipped; the rest was translated.
    pub warnings: Vec<ModelError>,
}

/// A problem with an input object. Always names the object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    #[error("{kind} {object}: {reason}")]
    Invalid {
        kind: &'static str,
        /// namespace/name
        object: String,
        reason: String,
    },
}
