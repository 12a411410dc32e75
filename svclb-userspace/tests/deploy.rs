//! The manifests under deploy/ (deploy/examples aside, those are Services for
//! the agent to proxy): every document is a known Kubernetes kind that
//! parses into k8s-openapi types without losing a field, the DaemonSet runs
//! the agent unprivileged with what it needs, and RBAC grants exactly what
//! the agent uses.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Deserialize;
use svclb_userspace::cli::{Cli, Command};

enum Manifest {
    DaemonSet(Box<DaemonSet>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    ConfigMap(Box<ConfigMap>),
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path != deploy_dir().join("examples") {
                yaml_files(&path, out);
            }
        } else if path
            .extension()
            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        {
            out.push(path);
        }
    }
}

/// Parse `doc` as `T`, and check that serializing it back gives the same
/// document: k8s-openapi ignores unknown fields, so a misspelt field (say
/// `mountPropagaton`) would otherwise vanish without a trace.
fn typed<T>(doc: &serde_yaml::Value, at: &str) -> Box<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let value: T = serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
    let original = serde_json::to_value(doc).unwrap();
    let back = serde_json::to_value(&value).unwrap();
    assert_eq!(back, original, "{at}: fields lost or changed in parsing");
    Box::new(value)
}

/// Every document under deploy/, with "file#index" for messages.
fn manifests() -> Vec<(String, Manifest)> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    assert!(!files.is_empty(), "no manifests under deploy/");
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let at = format!("{}#{i}", file.display());
            let doc = serde_yaml::Value::deserialize(de).unwrap_or_else(|e| panic!("{at}: {e}"));
            if doc.is_null() {
                continue; // an empty document, e.g. after a trailing ---
            }
            let field = |k: &str| doc.get(k).and_then(|v| v.as_str()).unwrap_or_default();
            let manifest = match (field("apiVersion"), field("kind")) {
                ("apps/v1", "DaemonSet") => Manifest::DaemonSet(typed(&doc, &at)),
                ("v1", "ServiceAccount") => Manifest::ServiceAccount(typed(&doc, &at)),
                ("v1", "ConfigMap") => Manifest::ConfigMap(typed(&doc, &at)),
                ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                    Manifest::ClusterRole(typed(&doc, &at))
                }
                ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                    Manifest::ClusterRoleBinding(typed(&doc, &at))
                }
                (api, kind) => panic!("{at}: unexpected kind {api}/{kind}"),
            };
            out.push((at, manifest));
        }
    }
    out
}

/// The one object of a kind.
macro_rules! only {
    ($manifests:expr, $kind:ident) => {{
        let found: Vec<_> = $manifests
            .iter()
            .filter_map(|(_, m)| match m {
                Manifest::$kind(o) => Some(o.as_ref()),
                _ => None,
            })
            .collect();
        assert_eq!(found.len(), 1, concat!("exactly one ", stringify!($kind)));
        found[0]
    }};
}

fn pod(ds: &DaemonSet) -> &PodSpec {
    ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
}

fn agent(ds: &DaemonSet) -> &Container {
    let containers = &pod(ds).containers;
    assert_eq!(containers.len(), 1);
    &containers[0]
}

/// The container's args as the kubelet passes them: $(VAR) replaced by the
/// variable's value (fieldRefs and configMapKeyRefs get a stand-in).
fn expanded_args(c: &Container) -> Vec<String> {
    let vars: Vec<(String, String)> = c
        .env
        .iter()
        .flatten()
        .map(|e| {
            (
                e.name.clone(),
                e.value.clone().unwrap_or_else(|| "from-ref".into()),
            )
        })
        .collect();
    let mut args = c.command.clone().unwrap_or_default();
    args.extend(c.args.iter().flatten().cloned());
    args.into_iter()
        .map(|mut a| {
            for (name, value) in &vars {
                a = a.replace(&format!("$({name})"), value);
            }
            a
        })
        .collect()
}

/// The value of `--flag=value` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> &'a str {
    let prefix = format!("--{name}=");
    let found: Vec<&str> = args
        .iter()
        .filter_map(|a| a.strip_prefix(&prefix))
        .collect();
    assert_eq!(found.len(), 1, "--{name} given once as --{name}=VALUE");
    found[0]
}

#[test]
fn every_manifest_is_a_known_kind_and_parses_losslessly() {
    let manifests = manifests();
    only!(manifests, DaemonSet);
    only!(manifests, ServiceAccount);
    only!(manifests, ClusterRole);
    only!(manifests, ClusterRoleBinding);
    only!(manifests, ConfigMap);
}

#[test]
fn daemonset_runs_unprivileged_with_what_svclb_needs() {
    let manifests = manifests();
    let ds = only!(manifests, DaemonSet);
    let pod = pod(ds);
    let c = agent(ds);

    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    assert_ne!(pod.host_ipc, Some(true), "hostIPC is not needed");
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerates_all =
        pod.tolerations.iter().flatten().any(|t| {
            t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()
        });
    assert!(tolerates_all, "must tolerate every taint");

    let sc = c.security_context.as_ref().expect("securityContext");
    assert_ne!(sc.privileged, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"]),
        "capabilities changed: update deploy/README.md and this test together"
    );

    // A versioned image (what `cargo xtask image` tags), never `latest`.
    let image = c.image.as_deref().expect("image");
    let (_, tag) = image.rsplit_once(':').expect("image with a tag");
    assert_eq!(
        tag,
        env!("CARGO_PKG_VERSION"),
        "the image tag is svclb's version"
    );

    // NODE_NAME from the downward API.
    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME env");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref());
    assert_eq!(field.map(|f| f.field_path.as_str()), Some("spec.nodeName"));

    // The mounts: host paths, where they appear, propagation.
    let mount = |host: &str| {
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.host_path.as_ref().is_some_and(|h| h.path == host))
            .unwrap_or_else(|| panic!("no hostPath volume {host}"));
        c.volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == volume.name)
            .unwrap_or_else(|| panic!("volume {} not mounted", volume.name))
    };
    let bpffs = mount("/sys/fs/bpf");
    let cgroup = mount("/sys/fs/cgroup");
    // HostToContainer: a bpffs the host mounts later is seen. Bidirectional
    // would need a privileged container.
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_ne!(bpffs.read_only, Some(true), "pins are written to bpffs");
    assert_eq!(cgroup.mount_propagation.as_deref(), Some("HostToContainer"));
    // Pods' network namespaces, where the agent looks for them (pods
    // started later appear through the propagation).
    let netns = mount("/run/netns");
    assert_eq!(netns.mount_path, "/run/netns");
    assert_eq!(netns.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(netns.read_only, Some(true));

    // The agent is pointed at those mounts, and its flags exist.
    let args = expanded_args(c);
    assert_eq!(flag(&args, "cgroup"), cgroup.mount_path);
    assert!(Path::new(flag(&args, "bpffs")).starts_with(&bpffs.mount_path));
    assert_eq!(flag(&args, "node-name"), "from-ref");
    let cli = Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("not `svclb run`: {args:?}");
    };
    assert_eq!(run.cgroup.as_deref(), Some(Path::new(&cgroup.mount_path)));

    // Probes on the health port: /livez restarts, /healthz gates start-up
    // and readiness.
    let healthz: std::net::SocketAddr = flag(&args, "healthz-bind-address").parse().unwrap();
    assert!(
        healthz.ip().is_unspecified(),
        "probes come to the node address"
    );
    let probe = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        let get = p.and_then(|p| p.http_get.as_ref()).expect("httpGet probe");
        (get.path.clone().unwrap_or_default(), get.port.clone())
    };
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let port = IntOrString::Int(healthz.port().into());
    assert_eq!(
        probe(c.liveness_probe.as_ref()),
        ("/livez".into(), port.clone())
    );
    assert_eq!(
        probe(c.startup_probe.as_ref()),
        ("/healthz".into(), port.clone())
    );
    assert_eq!(probe(c.readiness_probe.as_ref()), ("/healthz".into(), port));

    // Every ConfigMap key the DaemonSet reads exists.
    let config = only!(manifests, ConfigMap);
    for e in c.env.iter().flatten() {
        if let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|v| v.config_map_key_ref.as_ref())
        {
            assert_eq!(r.name, config.metadata.name.clone().unwrap());
            let data = config.data.as_ref().expect("ConfigMap data");
            assert!(data.contains_key(&r.key), "ConfigMap has no key {}", r.key);
        }
    }
}

#[test]
fn rbac_grants_exactly_what_svclb_uses() {
    let manifests = manifests();
    let role = only!(manifests, ClusterRole);
    let mut granted = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    granted.insert((group.as_str(), resource.as_str(), verb.as_str()));
                }
            }
        }
    }
    let mut wanted = BTreeSet::new();
    // The watchers: read only.
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        for verb in ["get", "list", "watch"] {
            wanted.insert((group, resource, verb));
        }
    }
    // Events: kube-rs's Recorder creates, then patches repeats.
    for group in ["", "events.k8s.io"] {
        for verb in ["create", "patch"] {
            wanted.insert((group, "events", verb));
        }
    }
    assert_eq!(granted, wanted);

    // Bound to the DaemonSet's ServiceAccount, nothing else.
    let binding = only!(manifests, ClusterRoleBinding);
    let account = only!(manifests, ServiceAccount);
    let ds = only!(manifests, DaemonSet);
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, account.metadata.namespace);
    assert_eq!(pod(ds).service_account_name, account.metadata.name);
    assert_eq!(ds.metadata.namespace, account.metadata.namespace);
}
