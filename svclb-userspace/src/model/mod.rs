//! The pure translation from Kubernetes objects to what the dataplane must
//! hold: for each Service, its frontends and their backend sets.
//!
//! kube-proxy's Service semantics live here and nowhere else. No I/O, no
//! clocks, no BPF: everything is a function of the objects given, so it is
//! table- and property-tested.

use std::fmt;
use std::net::IpAddr;
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};

mod health_check_ports;
mod store;
#[cfg(test)]
mod tests;
mod translate;

pub use health_check_ports::{health_check, HealthCheck};
pub use store::ObjectStore;
pub use store::LABEL_SERVICE_NAME;
pub use translate::translate;
pub use translate::{proxied_label_selector, skip, LABEL_HEADLESS, LABEL_SERVICE_PROXY_NAME};

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

    pub fn object_kind(&self) -> ObjectKind {
        match self {
            Object::Service(_) => ObjectKind::Service,
            Object::EndpointSlice(_) => ObjectKind::EndpointSlice,
            Object::Node(_) => ObjectKind::Node,
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

/// The kinds of [`Object`], for operations on all objects of one kind
/// (a watch's relist replaces one kind only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Service,
    EndpointSlice,
    Node,
}

impl fmt::Display for ObjectKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Node => "Node",
        })
    }
}

/// namespace/name of a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceId {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    /// Socket frontends only: XDP does not translate SCTP.
    Sctp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

/// Which traffic a frontend serves.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Connections made on this node (pods, host processes): the socket hooks.
    #[default]
    Socket,
    /// Packets arriving at the node's external devices (XDP): NodePort,
    /// LoadBalancer and ExternalIP traffic from outside the cluster.
    External,
}

/// What a client addresses: a service IP, port and protocol, and from where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl FrontendKey {
    /// A socket-scope key.
    pub fn new(addr: IpAddr, port: u16, protocol: Protocol) -> Self {
        FrontendKey {
            addr,
            port,
            protocol,
            scope: Scope::Socket,
        }
    }
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol)?,
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol)?,
        }
        if self.scope == Scope::External {
            f.write_str(" (external)")?;
        }
        Ok(())
    }
}

/// An address prefix (loadBalancerSourceRanges).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One endpoint a frontend balances over. Same address family and protocol
/// as its frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Backend {
    pub addr: IpAddr,
    pub port: u16,
    /// Serving but terminating: only used because no endpoint is ready.
    pub terminating: bool,
    /// Runs on this node: external traffic reaches it without SNAT.
    pub local: bool,
}

/// Which kind of Service address a frontend is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrontendKind {
    ClusterIp,
    /// A nodePort on one of this node's addresses (or loopback).
    NodePort,
    /// One of spec.externalIPs.
    ExternalIp,
    /// A status.loadBalancer.ingress IP (ipMode VIP or unset).
    LoadBalancer,
}

/// What a frontend with no backends does to new connections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WhenEmpty {
    /// The service has no endpoints: refuse (kube-proxy REJECTs).
    #[default]
    Refuse,
    /// The service has endpoints, none usable under its Local traffic policy:
    /// drop (kube-proxy DROPs).
    Drop,
}

/// A frontend and the backends it load-balances over, in a canonical
/// (sorted, de-duplicated) order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub key: FrontendKey,
    pub kind: FrontendKind,
    pub backends: Vec<Backend>,
    pub when_empty: WhenEmpty,
    /// ClientIP session affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// External load-balancer frontends only: the clients allowed in
    /// (loadBalancerSourceRanges); empty allows everyone.
    pub source_ranges: Vec<Cidr>,
    /// External frontends only: serving endpoints that new flows do not use
    /// (terminating while others are ready, or left out by a traffic policy
    /// or topology) but established flows keep, as kube-proxy's conntrack
    /// keeps them (graceful termination). Sorted, none in `backends`.
    pub draining: Vec<Backend>,
    /// The Service port's name ("" when unnamed), for `svclb maps dump`.
    pub port_name: String,
}

impl Frontend {
    /// A ClusterIP frontend without affinity that refuses when empty.
    pub fn cluster_ip(key: FrontendKey, backends: Vec<Backend>) -> Self {
        Frontend {
            key,
            kind: FrontendKind::ClusterIp,
            backends,
            when_empty: WhenEmpty::Refuse,
            affinity_timeout: None,
            source_ranges: Vec::new(),
            draining: Vec::new(),
            port_name: String::new(),
        }
    }
}

/// What translation needs to know about the node it runs for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    pub name: String,
    /// topology.kubernetes.io/zone, for topology-aware routing.
    pub zone: Option<String>,
    /// The node's InternalIP and ExternalIP addresses (NodePort frontends).
    pub addresses: Vec<IpAddr>,
}

impl NodeContext {
    /// This node as its Node object describes it (name only when unknown).
    pub fn from_node(name: &str, node: Option<&Node>) -> Self {
        let zone = node
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get("topology.kubernetes.io/zone"))
            .filter(|z| !z.is_empty())
            .cloned();
        let mut addresses: Vec<IpAddr> = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        addresses.sort();
        addresses.dedup();
        NodeContext {
            name: name.to_string(),
            zone,
            addresses,
        }
    }
}

/// The taint Cluster Autoscaler puts on a node it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Whether load balancers should keep sending traffic to this node (what
/// /healthz reports as nodeEligible): not when it is being deleted or
/// Cluster Autoscaler has marked it for deletion.
pub fn node_eligible(node: &Node) -> bool {
    let deleting = node.metadata.deletion_timestamp.is_some();
    let marked = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    !deleting && !marked
}

/// The annotation the EndpointSlice controller sets to when the change it
/// reflects happened (a Pod became ready, say).
pub const LAST_CHANGE_TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// When the change an EndpointSlice reflects began, for
/// kubeproxy_network_programming_duration_seconds: observe `now - t` once
/// the change is in the maps. None without a readable annotation. Like
/// kube-proxy, callers skip times before the agent started (a restart would
/// report the age of the cluster) and deletions (the annotation is then the
/// time of the last update).
pub fn last_change_trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let value = slice
        .metadata
        .annotations
        .as_ref()?
        .get(LAST_CHANGE_TRIGGER_TIME)?;
    let t: k8s_openapi::jiff::Timestamp = value.parse().ok()?;
    Some(t.into())
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
///
/// Ordered (derived, field by field) so that warnings can be sorted into an
/// order that does not depend on the order of the input.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum ModelError {
    #[error("{kind} {object}: {reason}")]
    Invalid {
        kind: &'static str,
        /// namespace/name
        object: String,
        reason: String,
    },
    /// Two Services claim one frontend: `owner`, the oldest (then first by
    /// namespace/name), has it and `service` goes without it.
    #[error("Service {service}: frontend {frontend} already belongs to service {owner} (older, or first by namespace/name); left out")]
    FrontendConflict {
        service: ServiceId,
        frontend: FrontendKey,
        owner: ServiceId,
    },
}

impl ModelError {
    /// The kind and namespace/name of the object the problem is with.
    pub fn object(&self) -> (&'static str, String) {
        match self {
            ModelError::Invalid { kind, object, .. } => (kind, object.clone()),
            ModelError::FrontendConflict { service, .. } => ("Service", service.to_string()),
        }
    }

    /// The `reason` label of svclb_translation_errors_total.
    pub fn reason(&self) -> &'static str {
        match self {
            ModelError::Invalid { .. } => "invalid_object",
            ModelError::FrontendConflict { .. } => "frontend_conflict",
        }
    }
}
