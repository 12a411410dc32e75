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

use super::{Backend, Frontend, FrontendKey, ModelError, NodeContext, Protocol, Translation};

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

const SERVICE: &str = "Service";
const ENDPOINT_SLICE: &str = "EndpointSlice";

/// Translates one Service. `slices` must all belong to it (the caller indexes
/// them by the `kubernetes.io/service-name` label); their order does not
/// matter. Deterministic: the same input gives the same output.
pub fn translate(svc: &Service, slices: &[&EndpointSlice], _node: &NodeContext) -> Translation {
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
        // NodePort and LoadBalancer services also have a cluster IP; their
        // extra frontends are not modelled yet.
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
        .filter_map(|s| parse_slice(s, namespace, warn))
        .collect();

    for &addr in &ips {
        for port in &ports {
            let key = FrontendKey {
                addr,
                port: port.port,
                protocol: port.protocol,
            };
            let mut backends = backends_for(is_v4(&addr), port, &slices);
            if backends.len() > usize::from(MAX_BACKENDS_PER_FRONTEND) {
                let reason = format!(
                    "frontend {key} has {} backends; only the first {MAX_BACKENDS_PER_FRONTEND} are used",
                    backends.len()
                );
                warn.push(invalid(SERVICE, object.clone(), reason));
                backends.truncate(usize::from(MAX_BACKENDS_PER_FRONTEND));
            }
            out.frontends.push(Frontend { key, backends });
        }
    }
    out.frontends.sort_by_key(|f| f.key);
    // Slice warnings come in slice order; sorting makes the output independent
    // of it, and de-duplication drops repeats from identical slices.
    out.warnings
        .sort_by(|a, b| warning_key(a).cmp(&warning_key(b)));
    out.warnings.dedup();
    out
}

/// kube-proxy's ShouldSkipService plus its informer label selector.
fn skip_reason(svc: &Service) -> Option<&'static str> {
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
}

fn service_ports<'a>(
    spec: Option<&'a ServiceSpec>,
    object: &str,
    warn: &mut Vec<ModelError>,
) -> Vec<SvcPort<'a>> {
    let mut ports: Vec<SvcPort> = Vec::new();
    let all = spec.and_then(|s| s.ports.as_deref()).unwrap_or_default();
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
        ports.push(SvcPort {
            name,
            port,
            protocol,
        });
    }
    ports
}

/// Service and slice ports default to TCP, as the API server does.
fn parse_protocol(protocol: Option<&str>) -> Result<Protocol, String> {
    match protocol {
        None | Some("TCP") => Ok(Protocol::Tcp),
        Some("UDP") => Ok(Protocol::Udp),
        Some("SCTP") => Err("protocol SCTP is not supported".to_string()),
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
    endpoints: Vec<(IpAddr, Usable)>,
}

/// None for slices that can never contribute (FQDN, unknown address type).
fn parse_slice(
    slice: &EndpointSlice,
    svc_namespace: &str,
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
        .filter_map(|e| parse_endpoint(e, v4, &object, warn))
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
    object: &str,
    warn: &mut Vec<ModelError>,
) -> Option<(IpAddr, Usable)> {
    // Conditions as kube-proxy reads them: ready unless told otherwise,
    // serving defaults to ready, terminating only when said so.
    let c = e.conditions.clone().unwrap_or_default();
    let ready = c.ready.unwrap_or(true);
    let serving = c.serving.unwrap_or(ready);
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
    let mut problem = |reason: String| -> Option<(IpAddr, Usable)> {
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
        Ok(addr) if is_v4(&addr) == v4 => Some((addr, usable)),
        Ok(addr) => problem(format!(
            "endpoint address {addr} does not match the slice's addressType"
        )),
        Err(_) => problem(format!("endpoint address {text:?} is not an IP address")),
    }
}

/// The backends of one frontend: slices of its family, ports matched by
/// name and protocol (this is how named targetPorts resolve), ready
/// endpoints or else serving-and-terminating ones. Sorted, de-duplicated.
fn backends_for(v4: bool, port: &SvcPort, slices: &[ParsedSlice]) -> Vec<Backend> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices.iter().filter(|s| s.v4 == v4) {
        let matching = slice
            .ports
            .iter()
            .filter(|(name, protocol, _)| name == port.name && *protocol == port.protocol);
        for &(_, _, number) in matching {
            for &(addr, usable) in &slice.endpoints {
                match usable {
                    Usable::Ready => ready.insert((addr, number)),
                    Usable::ServingTerminating => terminating.insert((addr, number)),
                };
            }
        }
    }
    let (set, is_terminating) = if ready.is_empty() {
        (terminating, true)
    } else {
        (ready, false)
    };
    // BTreeSet order is (addr, port), the same as Backend's order when the
    // terminating flag is the same for all.
    set.into_iter()
        .map(|(addr, port)| Backend {
            addr,
            port,
            terminating: is_terminating,
        })
        .collect()
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

fn warning_key(e: &ModelError) -> (&str, &str, &str) {
    match e {
        ModelError::Invalid {
            kind,
            object,
            reason,
        } => (kind, object, reason),
    }
}
