//! One Service plus its EndpointSlices -> frontends and backend sets, with
//! kube-proxy's semantics (pkg/proxy: ShouldSkipService, EndpointSliceCache,
//! CategorizeEndpoints).
//!
//! Bad parts of the input never fail the whole Service: each becomes a
//! [`ModelError`] warning and only that part is left out, so one typo in a
//! manifest (or one odd object from the API) cannot take a working Service
//! down.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use svclb_common::MAX_BACKENDS_PER_FRONTEND;

use super::{
    Backend, Cidr, Frontend, FrontendKey, FrontendKind, ModelError, NodeContext, Protocol, Scope,
    Translation, WhenEmpty,
};

/// Values of [`Translation::skipped`]: why a Service is deliberately not proxied.
pub mod skip {
    pub const EXTERNAL_NAME: &str = "type ExternalName";
    pub const HEADLESS: &str = "headless (no cluster IP)";
    pub const PROXY_NAME_LABEL: &str = "labelled service.kubernetes.io/service-proxy-name";
    pub const HEADLESS_LABEL: &str = "labelled service.kubernetes.io/headless";
}

/// Services with this label belong to another proxy (kube-proxy filters them
/// out in its informer); the value does not matter.
pub const LABEL_SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
/// kube-proxy's informers ignore objects carrying this label, whatever its value.
pub const LABEL_HEADLESS: &str = "service.kubernetes.io/headless";

/// The label selector for Service and EndpointSlice watches: the API server
/// leaves out what the model would ignore anyway, as kube-proxy's informers
/// ask. An object that gains one of the labels arrives as deleted.
pub fn proxied_label_selector() -> String {
    format!("!{LABEL_SERVICE_PROXY_NAME},!{LABEL_HEADLESS}")
}

const SERVICE: &str = "Service";
const ENDPOINT_SLICE: &str = "EndpointSlice";

/// Translates one Service. `slices` must all belong to it (the caller indexes
/// them by the `kubernetes.io/service-name` label); their order does not
/// matter. Deterministic: the same input gives the same output.
pub fn translate(svc: &Service, slices: &[&EndpointSlice], node: &NodeContext) -> Translation {
    let mut out = Translation::default();
    let namespace = non_empty(svc.metadata.namespace.as_deref()).unwrap_or("default");
    let Some(name) = non_empty(svc.metadata.name.as_deref()) else {
        out.warnings.push(invalid(
            SERVICE,
            format!("{namespace}/<unnamed>"),
            "metadata.name is missing; not proxied",
        ));
        return out;
    };
    let object = format!("{namespace}/{name}");
    let spec = svc.spec.as_ref();

    if let Some(reason) = skip_reason(svc) {
        out.skipped = Some(reason);
        return out;
    }
    match spec.and_then(|s| s.type_.as_deref()) {
        None | Some("ClusterIP" | "NodePort" | "LoadBalancer") => {}
        Some(other) => {
            let reason = format!("unknown type {other:?}; not proxied");
            out.warnings.push(invalid(SERVICE, object, reason));
            return out;
        }
    }

    let warn = &mut out.warnings;
    let ips = service_ips(spec, &object, warn);
    let ports = service_ports(spec, &object, warn);
    let slices: Vec<ParsedSlice> = slices
        .iter()
        .filter_map(|s| parse_slice(s, namespace, node, warn))
        .collect();
    let policy = Policy::of(svc, node);
    let affinity_timeout = session_affinity(spec, &object, warn);
    let external_ips = external_ips(svc, &ips, &object, warn);
    let source_ranges = source_ranges(spec, &object, warn);

    // XDP passes SCTP untouched (it parses TCP and UDP only), so SCTP ports
    // get socket frontends only; the Service is warned about once.
    for port in &ports {
        let mut push = |addr: IpAddr, kind: FrontendKind, scope: Scope| {
            if scope == Scope::External && port.protocol == Protocol::Sctp {
                return;
            }
            let key = FrontendKey {
                addr,
                port: if kind == FrontendKind::NodePort {
                    port.node_port.expect("only asked for with a node port")
                } else {
                    port.port
                },
                protocol: port.protocol,
                scope,
            };
            let sets = EndpointSets::of(is_v4(&addr), port, &slices, &policy);
            let (mut backends, when_empty) = match scope {
                Scope::Socket => sets.for_kind(kind, &policy),
                Scope::External => sets.external(&policy),
            };
            // kube-proxy filters load-balancer IP traffic by source; the
            // node port and external IPs stay open.
            let source_ranges = match (scope, kind) {
                (Scope::External, FrontendKind::LoadBalancer) => source_ranges
                    .iter()
                    .filter(|c| is_v4(&c.addr) == is_v4(&addr))
                    .copied()
                    .collect(),
                _ => Vec::new(),
            };
            if backends.len() > usize::from(MAX_BACKENDS_PER_FRONTEND) {
                let reason = format!(
                    "frontend {key} has {} backends; only the first {MAX_BACKENDS_PER_FRONTEND} are used",
                    backends.len()
                );
                warn.push(invalid(SERVICE, object.clone(), reason));
                backends.truncate(usize::from(MAX_BACKENDS_PER_FRONTEND));
            }
            // Established external flows stay on any endpoint that still
            // serves, and so do UDP sockets connected to one through a
            // socket frontend (kube-proxy keeps UDP conntrack to serving
            // endpoints); a connected TCP socket needs nothing.
            let draining = match scope {
                Scope::Socket if key.protocol != Protocol::Udp => Vec::new(),
                _ => sets.draining(&backends),
            };
            out.frontends.push(Frontend {
                key,
                kind,
                backends,
                when_empty,
                affinity_timeout,
                source_ranges,
                draining,
                port_name: port.name.to_string(),
            });
        };
        for &addr in &ips {
            push(addr, FrontendKind::ClusterIp, Scope::Socket);
        }
        if port.node_port.is_some() {
            for addr in node_port_addresses(&ips, node) {
                push(addr, FrontendKind::NodePort, Scope::Socket);
                // Loopback never arrives from outside.
                if !addr.is_loopback() {
                    push(addr, FrontendKind::NodePort, Scope::External);
                }
            }
        }
        for &(addr, kind) in &external_ips {
            push(addr, kind, Scope::Socket);
            push(addr, kind, Scope::External);
        }
    }
    if ports.iter().any(|p| p.protocol == Protocol::Sctp) {
        // Said once per Service, whatever its types of address.
        let reason = "SCTP ports get socket frontends only, which take effect where the kernel \
                      runs the cgroup connect hook for SCTP (Linux 5.10 to 6.12 do not: connects \
                      stay untranslated); SCTP arriving from outside at a node port, external IP \
                      or load-balancer IP is never translated";
        out.warnings.push(invalid(SERVICE, object.clone(), reason));
    }
    // The same address can be both an external IP and a load-balancer IP;
    // keep one frontend per key (the first, after sorting by kind).
    out.frontends.sort_by_key(|f| (f.key, f.kind));
    out.frontends.dedup_by_key(|f| f.key);
    // Slice warnings come in slice order; sorting makes the output independent
    // of it, and de-duplication drops repeats from identical slices.
    out.warnings.sort();
    out.warnings.dedup();
    out
}

/// The frontends a Service claims on this node, whatever its endpoints:
/// what two Services can conflict over.
pub(super) fn frontend_keys(svc: &Service, node: &NodeContext) -> BTreeSet<FrontendKey> {
    let frontends = translate(svc, &[], node).frontends;
    frontends.into_iter().map(|f| f.key).collect()
}

/// kube-proxy's ShouldSkipService plus its informer label selector.
pub(super) fn skip_reason(svc: &Service) -> Option<&'static str> {
    let labels = svc.metadata.labels.as_ref();
    if labels.is_some_and(|l| l.contains_key(LABEL_SERVICE_PROXY_NAME)) {
        return Some(skip::PROXY_NAME_LABEL);
    }
    if labels.is_some_and(|l| l.contains_key(LABEL_HEADLESS)) {
        return Some(skip::HEADLESS_LABEL);
    }
    let spec = svc.spec.as_ref();
    if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
        return Some(skip::EXTERNAL_NAME);
    }
    let primary = cluster_ips(spec).first().copied();
    if primary.is_none_or(|ip| ip.is_empty() || ip == "None") {
        return Some(skip::HEADLESS);
    }
    None
}

/// spec.clusterIPs (primary first), or spec.clusterIP when clusterIPs is
/// unset, as hand-written manifests often only have the latter.
fn cluster_ips(spec: Option<&ServiceSpec>) -> Vec<&str> {
    let Some(spec) = spec else { return Vec::new() };
    match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        _ => spec.cluster_ip.as_deref().into_iter().collect(),
    }
}

fn service_ips(
    spec: Option<&ServiceSpec>,
    object: &str,
    warn: &mut Vec<ModelError>,
) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for text in cluster_ips(spec) {
        match text.parse::<IpAddr>() {
            Ok(ip) if ips.contains(&ip) => {
                let reason = format!("clusterIP {ip} is listed twice");
                warn.push(invalid(SERVICE, object, reason));
            }
            Ok(ip) => ips.push(ip),
            Err(_) => {
                let reason = format!("clusterIP {text:?} is not an IP address; skipped");
                warn.push(invalid(SERVICE, object, reason));
            }
        }
    }
    ips
}

/// A valid Service port.
struct SvcPort<'a> {
    /// "" when unnamed; matched against the slice port names.
    name: &'a str,
    port: u16,
    protocol: Protocol,
    /// Only for NodePort and LoadBalancer services that have one.
    node_port: Option<u16>,
}

fn service_ports<'a>(
    spec: Option<&'a ServiceSpec>,
    object: &str,
    warn: &mut Vec<ModelError>,
) -> Vec<SvcPort<'a>> {
    let mut ports: Vec<SvcPort> = Vec::new();
    let all = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
    let node_ports = matches!(
        spec.and_then(|s| s.type_.as_deref()),
        Some("NodePort" | "LoadBalancer")
    );
    for p in all {
        let name = p.name.as_deref().unwrap_or("");
        let mut skip = |problem: String| {
            let reason = format!("port {} ({name:?}): {problem}; port skipped", p.port);
            warn.push(invalid(SERVICE, object, reason));
        };
        let protocol = match parse_protocol(p.protocol.as_deref()) {
            Ok(protocol) => protocol,
            Err(problem) => {
                skip(problem);
                continue;
            }
        };
        let Some(port) = valid_port(p.port) else {
            skip("port must be 1-65535".to_string());
            continue;
        };
        if ports
            .iter()
            .any(|q| q.port == port && q.protocol == protocol)
        {
            skip(format!("duplicate of an earlier {protocol} port"));
            continue;
        }
        let node_port = match (node_ports, p.node_port) {
            (true, Some(n)) => match valid_port(n) {
                Some(n) => Some(n),
                None => {
                    let reason =
                        format!("port {port}: nodePort {n} must be 1-65535; nodePort skipped");
                    warn.push(invalid(SERVICE, object, reason));
                    None
                }
            },
            _ => None,
        };
        ports.push(SvcPort {
            name,
            port,
            protocol,
            node_port,
        });
    }
    ports
}

/// Service and slice ports default to TCP, as the API server does.
fn parse_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Ok(Protocol::Sctp),
        Some(other) => Err(format!("unknown protocol {other:?}")),
    }
}

fn valid_port(port: i32) -> Option<u16> {
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// What CategorizeEndpoints makes of an endpoint's conditions.
#[derive(Clone, Copy)]
enum Usable {
    Ready,
    /// Only used when no endpoint is ready (graceful termination).
    ServingTerminating,
}

/// The parts of a slice translation uses, already validated.
struct ParsedSlice {
    v4: bool,
    /// (name, protocol, port)
    ports: Vec<(String, Protocol, u16)>,
    endpoints: Vec<ParsedEndpoint>,
}

struct ParsedEndpoint {
    addr: IpAddr,
    usable: Usable,
    /// On this node (endpoint.nodeName).
    local: bool,
    /// hints.forZones; empty when the endpoint has no zone hints.
    zones: Vec<String>,
    /// hints.forNodes (trafficDistribution PreferSameNode); empty when none.
    nodes: Vec<String>,
}

/// None for slices that can never contribute (FQDN, unknown address type).
fn parse_slice(
    slice: &EndpointSlice,
    svc_namespace: &str,
    node: &NodeContext,
    warn: &mut Vec<ModelError>,
) -> Option<ParsedSlice> {
    let meta = &slice.metadata;
    let object = format!(
        "{}/{}",
        non_empty(meta.namespace.as_deref()).unwrap_or(svc_namespace),
        non_empty(meta.name.as_deref()).unwrap_or("<unnamed>")
    );
    let v4 = match slice.address_type.as_str() {
        "IPv4" => true,
        "IPv6" => false,
        // kube-proxy ignores FQDN slices: there is no address to translate to.
        "FQDN" => return None,
        other => {
            let reason = format!("unknown addressType {other:?}; slice ignored");
            warn.push(invalid(ENDPOINT_SLICE, object, reason));
            return None;
        }
    };
    let ports = slice.ports.as_deref().unwrap_or_default();
    let ports = ports
        .iter()
        .filter_map(|p| parse_slice_port(p, &object, warn))
        .collect();
    let endpoints = slice
        .endpoints
        .iter()
        .filter_map(|e| parse_endpoint(e, v4, node, &object, warn))
        .collect();
    Some(ParsedSlice {
        v4,
        ports,
        endpoints,
    })
}

fn parse_slice_port(
    p: &EndpointPort,
    object: &str,
    warn: &mut Vec<ModelError>,
) -> Option<(String, Protocol, u16)> {
    let name = p.name.clone().unwrap_or_default();
    // A protocol we don't proxy can't match any frontend; the Service side
    // already warns about such ports.
    let protocol = parse_protocol(p.protocol.as_deref()).ok()?;
    let Some(port) = p.port.and_then(valid_port) else {
        let number = p.port.map_or("unset".to_string(), |n| n.to_string());
        let reason = format!("port {name:?} is {number}, must be 1-65535; port skipped");
        warn.push(invalid(ENDPOINT_SLICE, object, reason));
        return None;
    };
    Some((name, protocol, port))
}

fn parse_endpoint(
    e: &Endpoint,
    v4: bool,
    node: &NodeContext,
    object: &str,
    warn: &mut Vec<ModelError>,
) -> Option<ParsedEndpoint> {
    // Conditions as kube-proxy reads them: ready and serving unless told
    // otherwise, terminating only when said so.
    let c = e.conditions.clone().unwrap_or_default();
    let ready = c.ready.unwrap_or(true);
    let serving = c.serving.unwrap_or(true);
    let terminating = c.terminating.unwrap_or(false);
    let usable = if ready {
        Usable::Ready
    } else if serving && terminating {
        Usable::ServingTerminating
    } else {
        return None;
    };
    // kube-proxy uses the first address only; the others are duplicates of
    // the same Pod by API definition.
    let mut problem = |reason: String| -> Option<ParsedEndpoint> {
        warn.push(invalid(
            ENDPOINT_SLICE,
            object,
            reason + "; endpoint skipped",
        ));
        None
    };
    let Some(text) = e.addresses.first() else {
        return problem("endpoint has no addresses".to_string());
    };
    match text.parse::<IpAddr>() {
        Ok(addr) if is_v4(&addr) == v4 => Some(ParsedEndpoint {
            addr,
            usable,
            local: !node.name.is_empty() && e.node_name.as_deref() == Some(node.name.as_str()),
            zones: e
                .hints
                .as_ref()
                .and_then(|h| h.for_zones.as_ref())
                .into_iter()
                .flatten()
                .map(|z| z.name.clone())
                .collect(),
            nodes: e
                .hints
                .as_ref()
                .and_then(|h| h.for_nodes.as_ref())
                .into_iter()
                .flatten()
                .map(|n| n.name.clone())
                .collect(),
        }),
        Ok(addr) => problem(format!(
            "endpoint address {addr} does not match the slice's addressType"
        )),
        Err(_) => problem(format!("endpoint address {text:?} is not an IP address")),
    }
}

/// A Service's traffic policies as they apply on this node.
struct Policy<'a> {
    internal_local: bool,
    external_local: bool,
    node: &'a str,
    zone: Option<&'a str>,
}

impl<'a> Policy<'a> {
    fn of(svc: &Service, node: &'a NodeContext) -> Self {
        let spec = svc.spec.as_ref();
        Policy {
            internal_local: spec.and_then(|s| s.internal_traffic_policy.as_deref())
                == Some("Local"),
            external_local: spec.and_then(|s| s.external_traffic_policy.as_deref())
                == Some("Local"),
            node: &node.name,
            zone: node.zone.as_deref(),
        }
    }
}

/// Which hints narrow the cluster-wide endpoints (kube-proxy 1.33+: hints
/// are used whenever every ready endpoint has them, whatever the Service
/// asks for; the EndpointSlice controller sets them only when asked).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Topology {
    All,
    /// forNodes hints naming this node (trafficDistribution PreferSameNode).
    SameNode,
    /// forZones hints naming this node's zone.
    SameZone,
}

impl Topology {
    fn of(ready: &[&ParsedEndpoint], policy: &Policy) -> Self {
        let usable = |hints: fn(&ParsedEndpoint) -> &[String], mine: Option<&str>| {
            mine.is_some_and(|mine| {
                !ready.is_empty()
                    && ready.iter().all(|e| !hints(e).is_empty())
                    && ready.iter().any(|e| hints(e).iter().any(|h| h == mine))
            })
        };
        let node = Some(policy.node).filter(|n| !n.is_empty());
        if usable(|e| &e.nodes, node) {
            Topology::SameNode
        } else if usable(|e| &e.zones, policy.zone) {
            Topology::SameZone
        } else {
            Topology::All
        }
    }

    fn admits(self, e: &ParsedEndpoint, policy: &Policy) -> bool {
        match self {
            Topology::All => true,
            Topology::SameNode => e.nodes.iter().any(|n| n == policy.node),
            Topology::SameZone => e.zones.iter().any(|z| Some(z.as_str()) == policy.zone),
        }
    }
}

/// kube-proxy's CategorizeEndpoints for one port and address family.
struct EndpointSets {
    /// Ready endpoints (zone-filtered when topology applies), or else the
    /// serving-and-terminating ones.
    cluster: Vec<Backend>,
    /// This node's ready endpoints, or else its serving-and-terminating ones.
    local: Vec<Backend>,
    /// Some endpoint anywhere is usable: an empty set under a Local policy
    /// then drops instead of refusing.
    any: bool,
    /// Every serving endpoint (ready, or serving and terminating), whatever
    /// the policies and topology.
    serving: Vec<Backend>,
}

impl EndpointSets {
    fn of(v4: bool, port: &SvcPort, slices: &[ParsedSlice], policy: &Policy) -> Self {
        // One endpoint per (address, port): the first, unless a later
        // duplicate is on this node (kube-proxy favours a local one).
        let mut endpoints: Vec<(u16, &ParsedEndpoint)> = Vec::new();
        for slice in slices.iter().filter(|s| s.v4 == v4) {
            // An unnamed slice port matches only the unnamed service port.
            let matching = slice
                .ports
                .iter()
                .filter(|(name, protocol, _)| name == port.name && *protocol == port.protocol);
            for &(_, _, number) in matching {
                for e in &slice.endpoints {
                    match endpoints
                        .iter_mut()
                        .find(|(n, seen)| *n == number && seen.addr == e.addr)
                    {
                        None => endpoints.push((number, e)),
                        Some(seen) if e.local => seen.1 = e,
                        Some(_) => {}
                    }
                }
            }
        }
        let ready = |e: &ParsedEndpoint| matches!(e.usable, Usable::Ready);
        let terminating = |e: &ParsedEndpoint| matches!(e.usable, Usable::ServingTerminating);
        let ready_endpoints: Vec<&ParsedEndpoint> = endpoints
            .iter()
            .map(|(_, e)| *e)
            .filter(|e| ready(e))
            .collect();
        let topology = Topology::of(&ready_endpoints, policy);
        let in_zone = |e: &ParsedEndpoint| topology.admits(e, policy);
        let pick = |f: &dyn Fn(&ParsedEndpoint) -> bool, is_terminating: bool| -> Vec<Backend> {
            let mut set: Vec<Backend> = endpoints
                .iter()
                .filter(|(_, e)| f(e))
                .map(|(port, e)| Backend {
                    addr: e.addr,
                    port: *port,
                    terminating: is_terminating,
                    local: e.local,
                })
                .collect();
            set.sort();
            set
        };
        let mut cluster = pick(&|e| ready(e) && in_zone(e), false);
        if cluster.is_empty() {
            cluster = pick(&terminating, true);
        }
        let mut local = pick(&|e| ready(e) && e.local, false);
        if local.is_empty() {
            local = pick(&|e| terminating(e) && e.local, true);
        }
        let any = endpoints.iter().any(|(_, e)| ready(e) || terminating(e));
        let mut serving = pick(&ready, false);
        serving.extend(pick(&terminating, true));
        serving.sort();
        EndpointSets {
            cluster,
            local,
            any,
            serving,
        }
    }

    /// The serving endpoints an external frontend with `backends` keeps
    /// for its established flows only. An endpoint is listed once whatever
    /// its state, so compared by address and port.
    fn draining(&self, backends: &[Backend]) -> Vec<Backend> {
        self.serving
            .iter()
            .filter(|s| {
                !backends
                    .iter()
                    .any(|b| (b.addr, b.port) == (s.addr, s.port))
            })
            .copied()
            .collect()
    }

    /// The backends for a frontend of `kind` reached through the socket hooks
    /// (traffic from this node), and what to do when there are none.
    fn for_kind(&self, kind: FrontendKind, policy: &Policy) -> (Vec<Backend>, WhenEmpty) {
        // From inside the node, kube-proxy sends traffic for external
        // addresses (node ports, external and load-balancer IPs) to the
        // cluster-wide endpoints whatever the policies ("short-circuit"; it
        // keeps cluster endpoints for externally reachable services even
        // with internalTrafficPolicy Local).
        self.pick(kind == FrontendKind::ClusterIp && policy.internal_local)
    }

    /// The backends for traffic from outside the node (XDP):
    /// externalTrafficPolicy Local keeps it on this node's endpoints.
    fn external(&self, policy: &Policy) -> (Vec<Backend>, WhenEmpty) {
        self.pick(policy.external_local)
    }

    fn pick(&self, local: bool) -> (Vec<Backend>, WhenEmpty) {
        if local {
            // Canonical: Drop only where it matters, on an empty set.
            let when_empty = if self.any && self.local.is_empty() {
                WhenEmpty::Drop
            } else {
                WhenEmpty::Refuse
            };
            (self.local.clone(), when_empty)
        } else {
            (self.cluster.clone(), WhenEmpty::Refuse)
        }
    }
}

/// spec.loadBalancerSourceRanges; entries that are not CIDRs are skipped
/// with a warning (kube-proxy ignores them too).
fn source_ranges(
    spec: Option<&ServiceSpec>,
    object: &str,
    warn: &mut Vec<ModelError>,
) -> Vec<Cidr> {
    let mut out = Vec::new();
    for text in spec
        .and_then(|s| s.load_balancer_source_ranges.as_deref())
        .unwrap_or_default()
    {
        match parse_cidr(text.trim()) {
            Some(c) => out.push(c),
            None => {
                let reason =
                    format!("loadBalancerSourceRanges entry {text:?} is not a CIDR; skipped");
                warn.push(invalid(SERVICE, object, reason));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// "a.b.c.d/n" or "x::/n", host bits cleared.
fn parse_cidr(text: &str) -> Option<Cidr> {
    let (addr, prefix) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let addr = match addr {
        IpAddr::V4(a) if prefix <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u32::from(a) & mask).to_be_bytes())
        }
        IpAddr::V6(a) if prefix <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::from((u128::from(a) & mask).to_be_bytes())
        }
        _ => return None,
    };
    Some(Cidr { addr, prefix })
}

/// ClientIP affinity timeout: sessionAffinityConfig.clientIP.timeoutSeconds,
/// 10800 s by default, as the API server does.
fn session_affinity(
    spec: Option<&ServiceSpec>,
    object: &str,
    warn: &mut Vec<ModelError>,
) -> Option<u32> {
    let spec = spec?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds)
        .unwrap_or(DEFAULT_AFFINITY_TIMEOUT);
    match u32::try_from(timeout) {
        Ok(t) if (1..=MAX_AFFINITY_TIMEOUT).contains(&t) => Some(t),
        _ => {
            let reason = format!(
                "sessionAffinityConfig timeoutSeconds {timeout} must be 1-{MAX_AFFINITY_TIMEOUT}; using {DEFAULT_AFFINITY_TIMEOUT}"
            );
            warn.push(invalid(SERVICE, object, reason));
            Some(DEFAULT_AFFINITY_TIMEOUT as u32)
        }
    }
}

const DEFAULT_AFFINITY_TIMEOUT: i32 = 10_800;
const MAX_AFFINITY_TIMEOUT: u32 = 86_400;

/// spec.externalIPs and status.loadBalancer.ingress IPs (ipMode VIP or
/// unset; with Proxy the load balancer delivers to the node, not the VIP).
/// Addresses of a family the Service has no cluster IP of are ignored with
/// a warning, as kube-proxy does (it has no endpoints of that family).
fn external_ips(
    svc: &Service,
    cluster_ips: &[IpAddr],
    object: &str,
    warn: &mut Vec<ModelError>,
) -> Vec<(IpAddr, FrontendKind)> {
    let mut out = Vec::new();
    let mut add = |text: &str, kind: FrontendKind, what: &str| match text.parse::<IpAddr>() {
        Ok(ip) if cluster_ips.iter().any(|c| is_v4(c) == is_v4(&ip)) => out.push((ip, kind)),
        Ok(ip) => {
            let family = if is_v4(&ip) { "IPv4" } else { "IPv6" };
            let reason =
                format!("{what} {ip} is {family}, a family the Service does not have; ignored");
            warn.push(invalid(SERVICE, object, reason));
        }
        Err(_) => {
            let reason = format!("{what} {text:?} is not an IP address; skipped");
            warn.push(invalid(SERVICE, object, reason));
        }
    };
    let spec = svc.spec.as_ref();
    for ip in spec
        .and_then(|s| s.external_ips.as_deref())
        .unwrap_or_default()
    {
        add(ip, FrontendKind::ExternalIp, "externalIP");
    }
    if spec.and_then(|s| s.type_.as_deref()) == Some("LoadBalancer") {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_deref())
            .unwrap_or_default();
        for i in ingress
            .iter()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        {
            if let Some(ip) = i.ip.as_deref() {
                add(ip, FrontendKind::LoadBalancer, "load balancer ingress IP");
            }
        }
    }
    out
}

/// NodePort frontends: this node's addresses and loopback, in the
/// Service's IP families.
fn node_port_addresses(cluster_ips: &[IpAddr], node: &NodeContext) -> Vec<IpAddr> {
    let has_v4 = cluster_ips.iter().any(is_v4);
    let has_v6 = cluster_ips.iter().any(|ip| !is_v4(ip));
    let loopback = [
        has_v4.then_some(IpAddr::from([127, 0, 0, 1])),
        has_v6.then_some(IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
    ];
    let mut addrs: Vec<IpAddr> = node
        .addresses
        .iter()
        .copied()
        .filter(|ip| if is_v4(ip) { has_v4 } else { has_v6 })
        .chain(loopback.into_iter().flatten())
        .collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

fn is_v4(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V4(_))
}

fn non_empty(s: Option<&str>) -> Option<&str> {
    s.filter(|s| !s.is_empty())
}

fn invalid(kind: &'static str, object: impl Into<String>, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        kind,
        object: object.into(),
        reason: reason.into(),
    }
}
