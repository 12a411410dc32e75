//! The manifests under deploy/ (deploy/examples aside, those are Services for
//! the agent to proxy) and the Helm chart deploy/helm/svclb rendered with
//! several sets of values: every document is a known Kubernetes kind that
//! parses into k8s-openapi types without losing a field, the DaemonSet runs
//! the agent unprivileged with what it needs, and RBAC grants exactly what
//! the agent uses. deploy/svclb.yaml is the chart rendered
//! (`cargo xtask deploy-yaml`).
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::Parser;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use svclb_userspace::cli::{Cli, Command, RunArgs};

mod chart;

enum Manifest {
    DaemonSet(Box<DaemonSet>),
    ServiceAccount(Box<ServiceAccount>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    ConfigMap(Box<ConfigMap>),
    Service(Box<Service>),
    /// The Prometheus Operator's; k8s-openapi has no type for it.
    ServiceMonitor(Box<serde_json::Value>),
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // The chart's templates are not YAML until rendered.
            if path != deploy_dir().join("examples") && path != deploy_dir().join("helm") {
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
fn typed<T>(doc: &serde_json::Value, at: &str) -> Box<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let value: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{at}: {e}"));
    let back = serde_json::to_value(&value).unwrap();
    assert_eq!(&back, doc, "{at}: fields lost or changed in parsing");
    Box::new(value)
}

/// The documents of one YAML text, with "name#index" for messages.
fn parse(name: &str, text: &str) -> Vec<(String, Manifest)> {
    let docs: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let at = format!("{name}#{i}");
        if doc.is_null() {
            continue; // an empty document, e.g. after a trailing ---
        }
        let field = |k: &str| doc.get(k).and_then(|v| v.as_str()).unwrap_or_default();
        let manifest = match (field("apiVersion"), field("kind")) {
            ("apps/v1", "DaemonSet") => Manifest::DaemonSet(typed(&doc, &at)),
            ("v1", "ServiceAccount") => Manifest::ServiceAccount(typed(&doc, &at)),
            ("v1", "ConfigMap") => Manifest::ConfigMap(typed(&doc, &at)),
            ("v1", "Service") => Manifest::Service(typed(&doc, &at)),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                Manifest::ClusterRole(typed(&doc, &at))
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                Manifest::ClusterRoleBinding(typed(&doc, &at))
            }
            ("monitoring.coreos.com/v1", "ServiceMonitor") => {
                Manifest::ServiceMonitor(Box::new(doc.clone()))
            }
            (api, kind) => panic!("{at}: unexpected kind {api}/{kind}"),
        };
        out.push((at, manifest));
    }
    out
}

/// Every document under deploy/ (the chart aside), with "file#index" for
/// messages.
fn manifests() -> Vec<(String, Manifest)> {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    files.sort();
    assert!(!files.is_empty(), "no manifests under deploy/");
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        out.extend(parse(&file.display().to_string(), &text));
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

fn chart_dir() -> PathBuf {
    deploy_dir().join("helm/svclb")
}

/// What deploy/svclb.yaml is rendered with: the chart's defaults, and a
/// stand-in for the one value without a default.
const PLAIN_VALUES: &str = "apiServer:\n  host: api-server.example.invalid\n";

/// Every value the chart has, set away from its default.
const ALL_VALUES: &str = r#"
image:
  repository: registry.example/svclb
  tag: 0.1.0-abc1234
  pullPolicy: Always
apiServer:
  host: 198.18.0.1
  port: 8443
config:
  devices: [eth1, eth2]
  xdpMode: native
  maglevTableSize: 65537
  conntrackSize: 1048576
  ctTcpEstablished: 2h
  ctUdp: 1m
healthz:
  port: 10266
metrics:
  bindAddress: 0.0.0.0
  port: 10259
  serviceMonitor:
    enabled: true
    labels: {release: prometheus}
    interval: 15s
resources:
  requests: {cpu: 200m, memory: 256Mi}
  limits: {memory: 512Mi}
tolerations:
  - operator: Exists
  - {key: example.com/special, operator: Exists, effect: NoSchedule}
nodeSelector: {kubernetes.io/os: linux, example.com/pool: edge}
priorityClassName: svclb-critical
updateStrategy:
  type: RollingUpdate
  rollingUpdate: {maxUnavailable: 2}
"#;

fn render(values: &str) -> Result<Vec<(String, String)>, String> {
    let release = chart::Release {
        name: "svclb",
        namespace: "kube-system",
    };
    chart::render(&chart_dir(), &release, values)
}

/// The chart rendered with `values`, parsed.
fn rendered(values: &str) -> Vec<(String, Manifest)> {
    let mut out = Vec::new();
    for (name, text) in render(values).unwrap_or_else(|e| panic!("{e}")) {
        out.extend(parse(&format!("templates/{name}"), &text));
    }
    out
}

/// deploy/svclb.yaml as rendered from the chart: the objects in the order
/// `kubectl apply` should create them.
fn plain_yaml() -> String {
    const ORDER: &[&str] = &[
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Service",
        "DaemonSet",
    ];
    let mut docs: Vec<String> = render(PLAIN_VALUES)
        .unwrap()
        .into_iter()
        .map(|(_, text)| text.trim().to_string() + "\n")
        .collect();
    let rank = |doc: &String| {
        let kind = doc.lines().find_map(|l| l.strip_prefix("kind: "));
        ORDER.iter().position(|k| Some(*k) == kind)
    };
    docs.sort_by_key(rank);
    let header = "\
# Generated from the Helm chart deploy/helm/svclb with its default values
# (release svclb in kube-system) by `cargo xtask deploy-yaml`: change the
# chart, then run that. Read deploy/README.md first: set
# KUBERNETES_SERVICE_HOST (the API server's address) and the image below.
";
    header.to_string() + &docs.join("---\n")
}

/// The agent's command line with the config file it mounts, as the agent
/// reads them, and the file's text.
fn agent_args(manifests: &[(String, Manifest)]) -> (RunArgs, String) {
    let ds = only!(manifests, DaemonSet);
    let pod = pod(ds);
    let c = agent(ds);
    let mut args = expanded_args(c);

    // --config names a file of a ConfigMap volume, mounted read-only.
    let path = PathBuf::from(flag(&args, "config"));
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.parent() == Some(Path::new(&m.mount_path)))
        .expect("--config's directory is a mount");
    assert_eq!(mount.read_only, Some(true));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let source = volume.config_map.as_ref().expect("a ConfigMap volume");
    let config = only!(manifests, ConfigMap);
    assert_eq!(Some(&source.name), config.metadata.name.as_ref());
    let key = path.file_name().unwrap().to_str().unwrap();
    let text = config
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("ConfigMap has no {key}"))
        .clone();

    // The agent reads that text from a file of its own here.
    let file = std::env::temp_dir().join(format!("svclb-deploy-test-{}", std::process::id()));
    let file = file.with_extension(format!("{:?}.yaml", std::thread::current().id()));
    std::fs::write(&file, &text).unwrap();
    for a in &mut args {
        if a.starts_with("--config=") {
            *a = format!("--config={}", file.display());
        }
    }
    let cli = svclb_userspace::config::parse_from(&args);
    std::fs::remove_file(&file).unwrap();
    let cli = cli.unwrap_or_else(|e| panic!("{args:?} with {text}: {e}"));
    let Command::Run(run) = cli.command else {
        panic!("not `svclb run`: {args:?}");
    };
    (*run, text)
}

fn check_kinds(manifests: &[(String, Manifest)]) {
    only!(manifests, DaemonSet);
    only!(manifests, ServiceAccount);
    only!(manifests, ClusterRole);
    only!(manifests, ClusterRoleBinding);
    only!(manifests, ConfigMap);
}

#[test]
fn every_manifest_is_a_known_kind_and_parses_losslessly() {
    check_kinds(&manifests());
    check_kinds(&rendered(PLAIN_VALUES));
    check_kinds(&rendered(ALL_VALUES));
}

#[test]
fn daemonset_runs_unprivileged_with_what_svclb_needs() {
    check_daemonset(&manifests());
    check_daemonset(&rendered(PLAIN_VALUES));
    check_daemonset(&rendered(ALL_VALUES));
}

#[test]
fn rbac_grants_exactly_what_svclb_uses() {
    check_rbac(&manifests());
    check_rbac(&rendered(PLAIN_VALUES));
    check_rbac(&rendered(ALL_VALUES));
}

fn check_daemonset(manifests: &[(String, Manifest)]) {
    let ds = only!(manifests, DaemonSet);
    let pod = pod(ds);
    let c = agent(ds);

    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.host_pid, Some(true), "hostPID is not needed");
    assert_ne!(pod.host_ipc, Some(true), "hostIPC is not needed");
    assert!(pod.priority_class_name.is_some(), "a priority class");
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
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        tag == version || tag.starts_with(&format!("{version}-")),
        "the image tag {tag} is not svclb's version {version} (or VERSION-COMMIT)"
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

    // The agent is pointed at those mounts, and its flags and config file
    // parse.
    let args = expanded_args(c);
    assert_eq!(flag(&args, "node-name"), "from-ref");
    let (run, _) = agent_args(manifests);
    assert_eq!(run.cgroup.as_deref(), Some(Path::new(&cgroup.mount_path)));
    assert!(run.bpffs.starts_with(&bpffs.mount_path));

    // Probes on the health port: /livez restarts, /healthz gates start-up
    // and readiness.
    let healthz = run.healthz_bind_address;
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

    // A ServiceMonitor finds the agents' metrics through a Service whose
    // port is the container's metrics port, on an address Prometheus
    // reaches.
    let monitors: Vec<&serde_json::Value> = manifests
        .iter()
        .filter_map(|(_, m)| match m {
            Manifest::ServiceMonitor(v) => Some(v.as_ref()),
            _ => None,
        })
        .collect();
    for monitor in monitors {
        let service = only!(manifests, Service);
        let metrics = run.metrics_bind_address;
        assert!(
            !metrics.ip().is_loopback(),
            "Prometheus cannot scrape {metrics}"
        );
        let container_port = c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some("metrics"))
            .expect("a container port named metrics");
        assert_eq!(container_port.container_port, i32::from(metrics.port()));
        let spec = service.spec.as_ref().unwrap();
        let pod_labels = ds.spec.as_ref().unwrap().template.metadata.as_ref();
        let pod_labels = pod_labels.and_then(|m| m.labels.clone()).unwrap();
        for (k, v) in spec.selector.iter().flatten() {
            assert_eq!(pod_labels.get(k), Some(v), "Service selects the agents");
        }
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!(port.name.as_deref(), Some("metrics"));
        assert_eq!(
            port.target_port,
            Some(IntOrString::String("metrics".into()))
        );
        let service_labels = service.metadata.labels.clone().unwrap();
        let selector = monitor["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("ServiceMonitor selector");
        for (k, v) in selector {
            assert_eq!(service_labels.get(k).map(|s| s.as_str()), v.as_str());
        }
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
        assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    }
}

fn check_rbac(manifests: &[(String, Manifest)]) {
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
    // Warning events on Services (conflicts, maps full): kube-rs's Recorder
    // creates them in events.k8s.io, then patches repeats.
    for verb in ["create", "patch"] {
        wanted.insert(("events.k8s.io", "events", verb));
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

#[test]
fn plain_manifest_is_the_chart_rendered() {
    let path = deploy_dir().join("svclb.yaml");
    let want = plain_yaml();
    if std::env::var_os("SVCLB_UPDATE_DEPLOY_YAML").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap();
    assert!(
        have == want,
        "deploy/svclb.yaml is not the chart rendered: run `cargo xtask deploy-yaml`"
    );
}

#[test]
fn chart_is_the_crate_version_and_its_image() {
    let meta: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(meta["version"], version);
    assert_eq!(meta["appVersion"], version);
    let image = |values: &str| {
        let manifests = rendered(values);
        let ds = only!(manifests, DaemonSet);
        agent(ds).image.clone().unwrap()
    };
    assert_eq!(image(PLAIN_VALUES), format!("localhost/svclb:{version}"));
    assert_eq!(image(ALL_VALUES), "registry.example/svclb:0.1.0-abc1234");
}

#[test]
fn chart_values_reach_the_agent() {
    let manifests = rendered(ALL_VALUES);
    let ds = only!(manifests, DaemonSet);
    let spec = pod(ds);
    let c = agent(ds);
    let (run, _) = agent_args(&manifests);
    assert_eq!(run.devices, ["eth1", "eth2"]);
    assert_eq!(
        run.xdp_mode,
        svclb_userspace::dataplane::XdpModeChoice::Native
    );
    assert_eq!(run.maglev_table_size, 65537);
    assert_eq!(run.conntrack_size, 1_048_576);
    assert_eq!(run.ct_tcp_established.as_secs(), 7200);
    assert_eq!(run.ct_udp.as_secs(), 60);
    assert_eq!(run.healthz_bind_address.to_string(), "0.0.0.0:10266");
    assert_eq!(run.metrics_bind_address.to_string(), "0.0.0.0:10259");

    let env = |name: &str| {
        let e = c.env.iter().flatten().find(|e| e.name == name);
        e.and_then(|e| e.value.clone())
    };
    assert_eq!(
        env("KUBERNETES_SERVICE_HOST").as_deref(),
        Some("198.18.0.1")
    );
    assert_eq!(env("KUBERNETES_SERVICE_PORT").as_deref(), Some("8443"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    let resources = c.resources.as_ref().unwrap();
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "512Mi");
    assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "200m");
    assert_eq!(spec.priority_class_name.as_deref(), Some("svclb-critical"));
    assert_eq!(spec.tolerations.as_ref().unwrap().len(), 2);
    assert_eq!(
        spec.node_selector.as_ref().unwrap()["example.com/pool"],
        "edge"
    );
    let strategy = ds.spec.as_ref().unwrap().update_strategy.as_ref().unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        strategy.rolling_update.as_ref().unwrap().max_unavailable,
        Some(IntOrString::Int(2))
    );
    let monitor = manifests
        .iter()
        .find_map(|(_, m)| match m {
            Manifest::ServiceMonitor(v) => Some(v),
            _ => None,
        })
        .expect("a ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["interval"], "15s");

    // The defaults: no ServiceMonitor, metrics on the node only, and the
    // kube-system defaults kube-proxy has.
    let manifests = rendered(PLAIN_VALUES);
    assert!(!manifests
        .iter()
        .any(|(_, m)| matches!(m, Manifest::ServiceMonitor(_) | Manifest::Service(_))));
    let (run, _) = agent_args(&manifests);
    assert!(run.metrics_bind_address.ip().is_loopback());
    assert_eq!(run.healthz_bind_address.to_string(), "0.0.0.0:10256");
    let ds = only!(manifests, DaemonSet);
    assert_eq!(
        pod(ds).priority_class_name.as_deref(),
        Some("system-node-critical")
    );

    // Hybrid cgroup hosts.
    let manifests = rendered(&format!(
        "{PLAIN_VALUES}cgroupHostPath: /sys/fs/cgroup/unified\n"
    ));
    let ds = only!(manifests, DaemonSet);
    let cgroup = pod(ds)
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "cgroup")
        .and_then(|v| v.host_path.as_ref())
        .unwrap();
    assert_eq!(cgroup.path, "/sys/fs/cgroup/unified");
}

/// The chart's config spells out svclb's own defaults (devices aside): a
/// default changed in the code shows up here, not as a silent override.
#[test]
fn chart_config_is_svclbs_defaults() {
    let (mut from_chart, _) = agent_args(&rendered(PLAIN_VALUES));
    let manifests = rendered(PLAIN_VALUES);
    let args = expanded_args(agent(only!(manifests, DaemonSet)));
    let without_config: Vec<&String> = args
        .iter()
        .filter(|a| !a.starts_with("--config="))
        .collect();
    let Command::Run(mut defaults) = Cli::try_parse_from(without_config).unwrap().command else {
        unreachable!();
    };
    assert_eq!(from_chart.devices, ["eth0"]);
    from_chart.devices.clear();
    from_chart.config = None;
    defaults.devices.clear();
    assert_eq!(format!("{from_chart:?}"), format!("{defaults:?}"));
}

#[test]
fn config_edits_roll_the_pods() {
    let checksum = |values: &str| {
        let manifests = rendered(values);
        let ds = only!(manifests, DaemonSet);
        let template = ds.spec.as_ref().unwrap().template.metadata.as_ref();
        let annotations = template.and_then(|m| m.annotations.clone()).unwrap();
        annotations["checksum/config"].clone()
    };
    let before = checksum(PLAIN_VALUES);
    assert_eq!(before.len(), 64, "a sha256: {before}");
    assert_eq!(checksum(PLAIN_VALUES), before);
    let edited = format!("{PLAIN_VALUES}config:\n  xdpMode: generic\n");
    assert_ne!(checksum(&edited), before);
    let (run, text) = agent_args(&rendered(&edited));
    assert_eq!(
        run.xdp_mode,
        svclb_userspace::dataplane::XdpModeChoice::Generic,
        "{text}"
    );
    // Values outside the config file change the pod spec itself.
    assert_eq!(
        checksum(&format!("{PLAIN_VALUES}resources: {{}}\n")),
        before
    );
}

#[test]
fn chart_refuses_what_cannot_work() {
    let e = render("").unwrap_err();
    assert!(e.contains("apiServer.host"), "{e}");
    let e = render(&format!(
        "{PLAIN_VALUES}metrics:\n  serviceMonitor:\n    enabled: true\n"
    ))
    .unwrap_err();
    assert!(e.contains("metrics.bindAddress"), "{e}");
}
