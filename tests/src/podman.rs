//! The agent in its image under podman, run as deploy/svclb.yaml's
//! DaemonSet runs it: the flags come from the DaemonSet itself (its
//! securityContext, seccomp and AppArmor settings, hostPath mounts,
//! command and args), so a change there is what the container tests run.
//!
//! What stands in for the node: the host's network becomes the simulated
//! node's netns (`--network ns:`), the host's cgroup2 root becomes the
//! node's cgroup, the pin directory is the node's, and the objects come
//! from the cluster's manifests directory (bind-mounted read-only) instead
//! of the API server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, PodSpec, SecurityContext, Volume};

use crate::mounts;

/// The image the harness runs agents from when set (see
/// [`crate::AgentRuntime::from_env`]); `cargo xtask test` sets it to the
/// image it just built.
pub const IMAGE_ENV: &str = "SVCLB_AGENT_IMAGE";

/// The DaemonSet file the flags come from.
pub fn daemonset_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/svclb.yaml")
}

/// `podman` with the runtime that works on this machine kind (crun
/// refuses hybrid cgroup layouts; runc is what `cargo xtask setup` installs).
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

/// Whether podman runs at all (the container tests are skipped without it).
pub fn available() -> bool {
    Command::new("podman")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether `image` is in podman's local storage.
pub fn image_exists(image: &str) -> bool {
    podman()
        .args(["image", "exists", image])
        .status()
        .is_ok_and(|s| s.success())
}

/// What the DaemonSet's pod and agent container say about how it runs.
#[derive(Clone, Debug)]
pub struct DaemonSetRun {
    pod: PodSpec,
    container: Container,
    /// The ConfigMaps of the same file: name -> (key -> text).
    config_maps: BTreeMap<String, BTreeMap<String, String>>,
}

/// The DaemonSet of deploy/svclb.yaml (parsed once).
pub fn daemonset() -> Result<&'static DaemonSetRun> {
    static DS: OnceLock<DaemonSetRun> = OnceLock::new();
    if let Some(d) = DS.get() {
        return Ok(d);
    }
    let path = daemonset_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)?;
    let mut config_maps = BTreeMap::new();
    for doc in &docs {
        if doc.get("kind").and_then(|k| k.as_str()) == Some("ConfigMap") {
            let cm: ConfigMap = serde_json::from_value(doc.clone())?;
            let name = cm.metadata.name.unwrap_or_default();
            config_maps.insert(name, cm.data.unwrap_or_default());
        }
    }
    for doc in docs {
        if doc.get("kind").and_then(|k| k.as_str()) != Some("DaemonSet") {
            continue;
        }
        let ds: DaemonSet = serde_json::from_value(doc)?;
        let pod = ds
            .spec
            .and_then(|s| s.template.spec)
            .ok_or_else(|| anyhow!("DaemonSet without a pod spec"))?;
        let [container] = &pod.containers[..] else {
            bail!("the DaemonSet should have one container");
        };
        let run = DaemonSetRun {
            container: container.clone(),
            pod: pod.clone(),
            config_maps,
        };
        return Ok(DS.get_or_init(|| run));
    }
    bail!("no DaemonSet in {}", path.display())
}

/// One simulated node's agent, as [`DaemonSetRun::podman_run`] starts it.
pub struct NodeAgent<'a> {
    /// Also the container's name: unique per start.
    pub container_name: &'a str,
    pub node_name: &'a str,
    pub netns: &'a Path,
    pub cgroup: &'a Path,
    pub bpffs: &'a Path,
    pub manifests: &'a Path,
    pub devices: &'a [String],
    pub extra_args: &'a [String],
}

impl DaemonSetRun {
    pub fn security_context(&self) -> SecurityContext {
        self.container.security_context.clone().unwrap_or_default()
    }

    /// The image it runs.
    pub fn image(&self) -> Option<String> {
        self.container.image.clone()
    }

    /// The capabilities the container adds (after dropping ALL).
    pub fn capabilities(&self) -> Vec<String> {
        let sc = self.security_context();
        let caps = sc.capabilities.unwrap_or_default();
        caps.add.unwrap_or_default()
    }

    /// `podman run` for `node` with the DaemonSet's settings; stdout and
    /// stderr of the agent are podman's own (`--log-driver passthrough`).
    pub fn podman_run(&self, image: &str, node: &NodeAgent) -> Result<Command> {
        let mut c = podman();
        c.args([
            "run",
            "--rm",
            "--pull",
            "never",
            "--log-driver",
            "passthrough",
        ]);
        c.arg("--name").arg(node.container_name);
        // The sandbox's limits, not podman's defaults (which exceed them).
        // RLIMIT_NPROC does not apply to uid 0, but runc sets it and this
        // sandbox refuses large values.
        let nofile = hard_nofile();
        c.arg("--ulimit").arg(format!("nofile={nofile}:{nofile}"));
        c.args(["--ulimit", "nproc=1024:1024"]);

        // The pod: host network (here the node's netns), no host PID/IPC.
        if self.pod.host_network != Some(true) {
            bail!("the DaemonSet does not use hostNetwork: teach podman.rs its network");
        }
        c.arg("--network")
            .arg(format!("ns:{}", node.netns.display()));
        if self.pod.host_pid == Some(true) {
            c.args(["--pid", "host"]);
        }
        if self.pod.host_ipc == Some(true) {
            c.args(["--ipc", "host"]);
        }

        // The container's securityContext (the pod's as fallback).
        let sc = self.security_context();
        let pod_sc = self.pod.security_context.clone().unwrap_or_default();
        if sc.privileged == Some(true) {
            c.arg("--privileged");
        }
        let caps = sc.capabilities.clone().unwrap_or_default();
        for cap in caps.drop.iter().flatten() {
            c.arg(format!("--cap-drop={}", cap.to_lowercase()));
        }
        for cap in caps.add.iter().flatten() {
            c.arg(format!("--cap-add={cap}"));
        }
        if sc.allow_privilege_escalation == Some(false) {
            c.args(["--security-opt", "no-new-privileges"]);
        }
        if sc.read_only_root_filesystem == Some(true) {
            // Kubernetes adds no tmpfs; podman would on /run, /tmp, /var/tmp.
            c.args(["--read-only", "--read-only-tmpfs=false"]);
        }
        if let Some(uid) = sc.run_as_user.or(pod_sc.run_as_user) {
            c.arg("--user").arg(uid.to_string());
        }
        let seccomp = sc.seccomp_profile.or(pod_sc.seccomp_profile);
        match seccomp.as_ref().map(|s| s.type_.as_str()) {
            Some("Unconfined") => {
                c.args(["--security-opt", "seccomp=unconfined"]);
            }
            // The kubelet's default is RuntimeDefault, podman's too.
            None | Some("RuntimeDefault") => {}
            Some(other) => bail!("seccomp profile {other}: teach podman.rs"),
        }
        let apparmor = sc.app_armor_profile.or(pod_sc.app_armor_profile);
        match apparmor.as_ref().map(|s| s.type_.as_str()) {
            Some("Unconfined") => {
                c.args(["--security-opt", "apparmor=unconfined"]);
            }
            None | Some("RuntimeDefault") => {}
            Some(other) => bail!("AppArmor profile {other}: teach podman.rs"),
        }

        // hostPath volumes, each host path replaced by what stands for it;
        // ConfigMap volumes as files the node's scratch directory holds.
        let volumes: BTreeMap<&str, &Volume> = (self.pod.volumes.iter().flatten())
            .map(|v| (v.name.as_str(), v))
            .collect();
        for m in self.container.volume_mounts.iter().flatten() {
            let Some(volume) = volumes.get(m.name.as_str()) else {
                bail!("no volume {} in the pod", m.name);
            };
            if let Some(cm) = &volume.config_map {
                let dir = self.write_config_map(&cm.name, node)?;
                c.arg("--volume")
                    .arg(format!("{}:{}:ro", dir.display(), m.mount_path));
                continue;
            }
            let Some(host) = volume.host_path.as_ref().map(|h| h.path.as_str()) else {
                bail!(
                    "volume {} is neither hostPath nor configMap: teach podman.rs",
                    m.name
                );
            };
            let source = match host {
                "/sys/fs/bpf" => mounts::ensure_bpffs()?,
                "/sys/fs/cgroup" => node.cgroup.to_path_buf(),
                "/run/netns" => PathBuf::from("/run/netns"),
                other => bail!("hostPath {other}: teach podman.rs what stands for it"),
            };
            let mut opts = vec![if m.read_only == Some(true) {
                "ro"
            } else {
                "rw"
            }];
            opts.push(match m.mount_propagation.as_deref() {
                Some("HostToContainer") => "rslave",
                Some("Bidirectional") => "rshared",
                _ => "rprivate",
            });
            c.arg("--volume").arg(format!(
                "{}:{}:{}",
                source.display(),
                m.mount_path,
                opts.join(",")
            ));
        }
        // The API server's stand-in.
        c.arg("--volume")
            .arg(format!("{0}:{0}:ro", node.manifests.display()));

        c.args(["--env", "RUST_LOG=info", "--env", "NO_COLOR=1"]);
        if let Some(command) = &self.container.command {
            let [entrypoint] = &command[..] else {
                bail!("command {command:?}: expected the binary alone");
            };
            c.arg("--entrypoint").arg(entrypoint);
        }
        c.arg(image);
        c.args(self.args(node)?);
        Ok(c)
    }

    /// The ConfigMap `name`'s files, written next to the node's manifests
    /// directory, as the kubelet projects them into the pod.
    fn write_config_map(&self, name: &str, node: &NodeAgent) -> Result<PathBuf> {
        let Some(data) = self.config_maps.get(name) else {
            bail!("ConfigMap {name} is not in {}", daemonset_path().display());
        };
        let dir = node
            .manifests
            .with_file_name(format!("configmap-{}-{name}", node.container_name));
        std::fs::create_dir_all(&dir)?;
        for (key, text) in data {
            std::fs::write(dir.join(key), text)?;
        }
        Ok(dir)
    }

    /// The DaemonSet's args with $(VAR)s expanded, `--bpffs` pointed at
    /// the node's pin dir, flags of `extra_args` replacing the DaemonSet's,
    /// and `--manifests` instead of the API server.
    pub fn args(&self, node: &NodeAgent) -> Result<Vec<String>> {
        let mut vars = BTreeMap::new();
        for e in self.container.env.iter().flatten() {
            let from = e.value_from.as_ref();
            let field = from.and_then(|f| f.field_ref.as_ref());
            let value = match field.map(|f| f.field_path.as_str()) {
                Some("spec.nodeName") => node.node_name.to_string(),
                _ => continue,
            };
            vars.insert(format!("$({})", e.name), value);
        }
        let overridden: Vec<String> = node
            .extra_args
            .iter()
            .filter(|a| a.starts_with("--"))
            .map(|a| flag_name(a).to_string())
            .chain(["--bpffs".to_string()])
            .collect();
        let mut out = Vec::new();
        for arg in self.container.args.iter().flatten() {
            if overridden.iter().any(|f| flag_name(arg) == f) {
                continue;
            }
            let mut arg = arg.clone();
            for (var, value) in &vars {
                arg = arg.replace(var, value);
            }
            if arg.contains("$(") {
                bail!("{arg}: teach podman.rs what this variable is in a test");
            }
            out.push(arg);
        }
        out.push(format!("--bpffs={}", node.bpffs.display()));
        // The node's devices, not the config file's example ones (a flag
        // wins over the file).
        if !overridden.iter().any(|f| f == "--devices") {
            out.push(format!("--devices={}", node.devices.join(",")));
        }
        out.push(format!("--manifests={}", node.manifests.display()));
        out.extend(node.extra_args.iter().cloned());
        Ok(out)
    }
}

/// "--flag" of "--flag=value" (or of "--flag").
fn flag_name(arg: &str) -> &str {
    arg.split_once('=').map_or(arg, |(name, _)| name)
}

/// This process's hard RLIMIT_NOFILE.
fn hard_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_max == libc::RLIM_INFINITY
    {
        return 1024;
    }
    lim.rlim_max
}

/// `podman rm -f -t 0 NAME` (kill and remove; quiet when it is gone).
pub fn remove(container: &str) {
    let _ = podman()
        .args(["rm", "--force", "--ignore", "--time", "0", container])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The host pid of the container's first process (the agent).
pub fn container_pid(container: &str) -> Result<u32> {
    let out = crate::cmd::run(podman().args(["inspect", "--format", "{{.State.Pid}}", container]))?;
    out.trim()
        .parse()
        .with_context(|| format!("pid of container {container}: {out:?}"))
}

/// Names of all containers, running or not.
pub fn containers() -> Vec<String> {
    crate::cmd::run(podman().args(["ps", "--all", "--format", "{{.Names}}"]))
        .map(|out| out.lines().map(str::to_string).collect())
        .unwrap_or_default()
}
