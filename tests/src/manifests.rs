//! The cluster's "API server": a directory of Service and EndpointSlice
//! YAML files that agents watch (`svclb run --manifests DIR`).

use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// Kubernetes spelling.
    pub fn k8s(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }

    /// svclb-probe spelling.
    pub fn probe(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.k8s())
    }
}

/// A named port: a Service port (with its target port) or an EndpointSlice
/// port (where `port` is the endpoint's port and `target_port` is unused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub name: String,
    pub port: u16,
    pub protocol: Proto,
    pub target_port: Option<u16>,
}

impl PortSpec {
    pub fn tcp(name: &str, port: u16) -> Self {
        Self::new(name, port, Proto::Tcp)
    }

    pub fn udp(name: &str, port: u16) -> Self {
        Self::new(name, port, Proto::Udp)
    }

    pub fn sctp(name: &str, port: u16) -> Self {
        Self::new(name, port, Proto::Sctp)
    }

    pub fn new(name: &str, port: u16, protocol: Proto) -> Self {
        PortSpec {
            name: name.to_string(),
            port,
            protocol,
            target_port: None,
        }
    }

    pub fn target(mut self, target_port: u16) -> Self {
        self.target_port = Some(target_port);
        self
    }

    fn to_json(&self, service: bool) -> Value {
        let mut v =
            json!({ "name": self.name, "port": self.port, "protocol": self.protocol.k8s() });
        if service {
            v["targetPort"] = json!(self.target_port.unwrap_or(self.port));
        }
        v
    }
}

/// A ClusterIP Service. `cluster_ips` lists one address per family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<PortSpec>,
    /// Merged into `spec` as is (sessionAffinity, type, ...).
    pub extra_spec: Option<Value>,
}

impl ServiceSpec {
    pub fn new(name: &str, cluster_ips: &[IpAddr], ports: Vec<PortSpec>) -> Self {
        ServiceSpec {
            namespace: "default".into(),
            name: name.into(),
            cluster_ips: cluster_ips.to_vec(),
            ports,
            extra_spec: None,
        }
    }

    /// Sets one `spec` field (merged over the generated ones).
    pub fn with_spec(mut self, field: &str, value: Value) -> Self {
        let extra = self.extra_spec.get_or_insert_with(|| json!({}));
        extra[field] = value;
        self
    }

    /// type LoadBalancer with the given externalTrafficPolicy and, when
    /// set, healthCheckNodePort.
    pub fn load_balancer(
        self,
        external_traffic_policy: &str,
        health_check_port: Option<u16>,
    ) -> Self {
        let svc = self
            .with_spec("type", json!("LoadBalancer"))
            .with_spec("externalTrafficPolicy", json!(external_traffic_policy));
        match health_check_port {
            Some(port) => svc.with_spec("healthCheckNodePort", json!(port)),
            None => svc,
        }
    }

    pub fn to_json(&self) -> Value {
        let families: Vec<&str> = self.cluster_ips.iter().map(|ip| family(*ip)).collect();
        let mut spec = json!({
            "type": "ClusterIP",
            "clusterIP": self.cluster_ips.first().map(|ip| ip.to_string()),
            "clusterIPs": self.cluster_ips.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(),
            "ipFamilies": families,
            "ipFamilyPolicy": if self.cluster_ips.len() > 1 { "RequireDualStack" } else { "SingleStack" },
            "ports": self.ports.iter().map(|p| p.to_json(true)).collect::<Vec<_>>(),
        });
        if let Some(Value::Object(extra)) = &self.extra_spec {
            for (k, v) in extra {
                spec[k] = v.clone();
            }
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "namespace": self.namespace, "name": self.name },
            "spec": spec,
        })
    }

    pub fn to_yaml(&self) -> String {
        to_yaml(&self.to_json())
    }

    pub fn file_name(&self) -> String {
        format!("svc-{}-{}.yaml", self.namespace, self.name)
    }
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// One endpoint of a slice. `None` conditions are left out of the YAML
/// (Kubernetes then means "unknown", which consumers treat as ready/serving).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: IpAddr,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub node_name: Option<String>,
}

impl EndpointSpec {
    /// ready, serving, not terminating.
    pub fn ready(addr: IpAddr) -> Self {
        Self::with(addr, true, true, false)
    }

    /// Terminating but still serving (kube-proxy's fallback set).
    pub fn terminating(addr: IpAddr) -> Self {
        Self::with(addr, false, true, true)
    }

    /// Neither ready nor serving.
    pub fn not_ready(addr: IpAddr) -> Self {
        Self::with(addr, false, false, false)
    }

    pub fn with(addr: IpAddr, ready: bool, serving: bool, terminating: bool) -> Self {
        EndpointSpec {
            addr,
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
            node_name: None,
        }
    }

    fn to_json(&self) -> Value {
        let mut conditions = serde_json::Map::new();
        for (k, v) in [
            ("ready", self.ready),
            ("serving", self.serving),
            ("terminating", self.terminating),
        ] {
            if let Some(v) = v {
                conditions.insert(k.into(), json!(v));
            }
        }
        let mut v = json!({ "addresses": [self.addr.to_string()], "conditions": conditions });
        if let Some(n) = &self.node_name {
            v["nodeName"] = json!(n);
        }
        v
    }
}

/// An EndpointSlice of `service`. The address type follows the first
/// endpoint (IPv4 when there is none) unless `address_type` is set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceSpec {
    pub namespace: String,
    pub name: String,
    pub service: String,
    /// "IPv4" or "IPv6"; None = derived from the endpoints.
    pub address_type: Option<String>,
    pub ports: Vec<PortSpec>,
    pub endpoints: Vec<EndpointSpec>,
}

impl SliceSpec {
    pub fn new(
        name: &str,
        service: &str,
        ports: Vec<PortSpec>,
        endpoints: Vec<EndpointSpec>,
    ) -> Self {
        SliceSpec {
            namespace: "default".into(),
            name: name.into(),
            service: service.into(),
            address_type: None,
            ports,
            endpoints,
        }
    }

    pub fn to_json(&self) -> Value {
        let address_type = self.address_type.clone().unwrap_or_else(|| {
            family(
                self.endpoints
                    .first()
                    .map_or(IpAddr::from([0, 0, 0, 0]), |e| e.addr),
            )
            .to_string()
        });
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": self.namespace,
                "name": self.name,
                "labels": { "kubernetes.io/service-name": self.service },
            },
            "addressType": address_type,
            "ports": self.ports.iter().map(|p| p.to_json(false)).collect::<Vec<_>>(),
            "endpoints": self.endpoints.iter().map(EndpointSpec::to_json).collect::<Vec<_>>(),
        })
    }

    pub fn to_yaml(&self) -> String {
        to_yaml(&self.to_json())
    }

    pub fn file_name(&self) -> String {
        format!("eps-{}-{}.yaml", self.namespace, self.name)
    }
}

pub fn to_yaml(v: &Value) -> String {
    serde_saphyr::to_string(v).expect("JSON values always serialise to YAML")
}

/// The watched directory. Writes are atomic (write a staging file on the
/// same filesystem, then rename into place) so an agent never reads a
/// half-written file, nor sees the staging file at all.
#[derive(Clone, Debug)]
pub struct Manifests {
    dir: PathBuf,
    staging: PathBuf,
}

impl Manifests {
    /// `root` must not be watched itself; the files go to `root/manifests`.
    pub fn create(root: &Path) -> Result<Self> {
        let m = Manifests {
            dir: root.join("manifests"),
            staging: root.join("manifests.staging"),
        };
        for d in [&m.dir, &m.staging] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(m)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn write(&self, file_name: &str, yaml: &str) -> Result<()> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let tmp = self.staging.join(format!(
            "{file_name}.{}",
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&tmp, yaml).with_context(|| format!("writing {}", tmp.display()))?;
        let dst = self.dir.join(file_name);
        fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))
    }

    pub fn remove(&self, file_name: &str) -> Result<()> {
        let p = self.dir.join(file_name);
        fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))
    }

    /// Writes `svc-NS-NAME.yaml`; returns the file name.
    pub fn write_service(&self, svc: &ServiceSpec) -> Result<String> {
        let f = svc.file_name();
        self.write(&f, &svc.to_yaml())?;
        Ok(f)
    }

    /// Writes `eps-NS-NAME.yaml`; returns the file name.
    pub fn write_slice(&self, slice: &SliceSpec) -> Result<String> {
        let f = slice.file_name();
        self.write(&f, &slice.to_yaml())?;
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_yaml_shape() {
        let svc = ServiceSpec::new(
            "web",
            &[
                "198.19.0.10".parse().unwrap(),
                "fd00:5::10".parse().unwrap(),
            ],
            vec![PortSpec::tcp("http", 80).target(8080)],
        );
        let v: Value = serde_saphyr::from_str(&svc.to_yaml()).unwrap();
        assert_eq!(v["kind"], "Service");
        assert_eq!(v["spec"]["clusterIP"], "198.19.0.10");
        assert_eq!(v["spec"]["clusterIPs"][1], "fd00:5::10");
        assert_eq!(v["spec"]["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(v["spec"]["ipFamilyPolicy"], "RequireDualStack");
        assert_eq!(v["spec"]["ports"][0]["targetPort"], 8080);
        assert_eq!(v["spec"]["ports"][0]["protocol"], "TCP");

        let lb = svc.load_balancer("Local", Some(32100));
        let v: Value = serde_saphyr::from_str(&lb.to_yaml()).unwrap();
        assert_eq!(v["spec"]["type"], "LoadBalancer");
        assert_eq!(v["spec"]["externalTrafficPolicy"], "Local");
        assert_eq!(v["spec"]["healthCheckNodePort"], 32100);
    }

    #[test]
    fn slice_yaml_shape() {
        let slice = SliceSpec::new(
            "web-v6",
            "web",
            vec![PortSpec::udp("dns", 5353)],
            vec![
                EndpointSpec::ready("fd00:0:0:1::2".parse().unwrap()),
                EndpointSpec {
                    ready: None,
                    ..EndpointSpec::terminating("fd00:0:0:1::3".parse().unwrap())
                },
            ],
        );
        let v: Value = serde_saphyr::from_str(&slice.to_yaml()).unwrap();
        assert_eq!(v["apiVersion"], "discovery.k8s.io/v1");
        assert_eq!(v["addressType"], "IPv6");
        assert_eq!(v["metadata"]["labels"]["kubernetes.io/service-name"], "web");
        assert_eq!(
            v["ports"][0],
            json!({"name": "dns", "port": 5353, "protocol": "UDP"})
        );
        assert_eq!(v["endpoints"][0]["conditions"]["ready"], true);
        assert_eq!(
            v["endpoints"][1]["conditions"],
            json!({"serving": true, "terminating": true})
        );
    }
}
