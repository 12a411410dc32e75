//! The svclb agent of one simulated node: `svclb run` in the node's netns,
//! attached to the node's cgroup, pinning under the node's bpffs dir.

use std::env;
use std::ffi::OsString;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, Placement, Proc};
use crate::podman;

/// Printed by the agent once the initial manifests are in the maps.
pub const SYNC_MARKER: &str = "initial sync complete";
const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// SVCLB_BIN, else the first existing debug build in
/// $CARGO_TARGET_DIR or <workspace>/target.
pub fn svclb_bin() -> Result<PathBuf> {
    if let Some(p) = env::var_os("SVCLB_BIN") {
        return Ok(PathBuf::from(p));
    }
    let tried: Vec<PathBuf> = crate::target_dirs()
        .into_iter()
        .map(|t| t.join("debug/svclb"))
        .collect();
    if let Some(p) = tried.iter().find(|p| p.is_file()) {
        return Ok(p.clone());
    }
    bail!("svclb binary not found (set SVCLB_BIN); tried {tried:?}")
}

/// Where an agent gets its objects from.
#[derive(Clone, Debug)]
pub enum AgentSource {
    /// `--manifests DIR`.
    Manifests(PathBuf),
    /// `--kubeconfig FILE`, e.g. of a [`crate::mock_api::MockApi`].
    Api(PathBuf),
}

impl AgentSource {
    fn args(&self) -> [OsString; 2] {
        match self {
            AgentSource::Manifests(dir) => ["--manifests".into(), dir.into()],
            AgentSource::Api(kubeconfig) => ["--kubeconfig".into(), kubeconfig.into()],
        }
    }
}

/// How agents are started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AgentRuntime {
    /// The svclb binary ([`svclb_bin`]) in the node's netns.
    #[default]
    Host,
    /// The image under podman, as deploy/svclb.yaml's DaemonSet runs it
    /// (see [`crate::podman`]); manifests sources only.
    Podman { image: String },
}

impl AgentRuntime {
    /// Podman with the image named by $SVCLB_AGENT_IMAGE when set, else
    /// the host: any test can be run against the image that way.
    pub fn from_env() -> AgentRuntime {
        match env::var(podman::IMAGE_ENV) {
            Ok(image) if !image.is_empty() => AgentRuntime::Podman { image },
            _ => AgentRuntime::Host,
        }
    }
}

/// Everything `svclb run` needs to act as one node's agent.
pub struct AgentConfig<'a> {
    pub node_name: &'a str,
    pub netns: &'a Path,
    pub cgroup: &'a Path,
    pub bpffs: &'a Path,
    pub source: AgentSource,
    /// External interfaces (`--devices`, comma-joined); none: no flag.
    pub devices: Vec<String>,
    /// More `svclb run` flags, e.g. `--sync-period 2s`.
    pub extra_args: Vec<String>,
    pub log: PathBuf,
    pub runtime: &'a AgentRuntime,
    /// Names the container (with podman): unique per start.
    pub instance: &'a str,
}

/// A running (or stopped) agent. Cloning shares the process.
#[derive(Clone)]
pub struct Agent {
    proc: Arc<Proc>,
    log: PathBuf,
    source: AgentSource,
    devices: Vec<String>,
    extra_args: Vec<String>,
    /// Its container's name, when it runs in one.
    container: Option<String>,
}

impl Agent {
    /// Spawn and wait for the initial sync. The agent is deliberately not in
    /// the node's cgroup: its own sockets must not be translated.
    pub(crate) fn start(cfg: &AgentConfig) -> Result<Agent> {
        let log =
            File::create(&cfg.log).with_context(|| format!("creating {}", cfg.log.display()))?;
        let label = format!("agent {}", cfg.node_name);
        let (proc, container) = match cfg.runtime {
            AgentRuntime::Host => (Proc::new(label, Self::spawn_host(cfg, log)?), None),
            AgentRuntime::Podman { image } => {
                let AgentSource::Manifests(manifests) = &cfg.source else {
                    bail!("agents in containers read manifests only");
                };
                let name = cfg.instance.to_string();
                let mut command = podman::daemonset()?.podman_run(
                    image,
                    &podman::NodeAgent {
                        container_name: &name,
                        node_name: cfg.node_name,
                        netns: cfg.netns,
                        cgroup: cfg.cgroup,
                        bpffs: cfg.bpffs,
                        manifests,
                        devices: &cfg.devices,
                        extra_args: &cfg.extra_args,
                    },
                )?;
                command
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log);
                // podman itself in the test's namespaces: the container
                // joins the node's netns.
                let child = cmd::spawn_placed(&mut command, &Placement::default())?;
                let on_kill = name.clone();
                let proc = Proc::with_on_kill(label, child, move || podman::remove(&on_kill));
                (proc, Some(name))
            }
        };
        let agent = Agent {
            proc: Arc::new(proc),
            log: cfg.log.clone(),
            source: cfg.source.clone(),
            devices: cfg.devices.clone(),
            extra_args: cfg.extra_args.clone(),
            container,
        };
        agent
            .wait_for_log(SYNC_MARKER, SYNC_TIMEOUT)
            .inspect_err(|_| agent.kill())?;
        Ok(agent)
    }

    /// `svclb run` in the node's netns.
    fn spawn_host(cfg: &AgentConfig, log: File) -> Result<std::process::Child> {
        let bin = svclb_bin()?;
        let mut command = Command::new(&bin);
        command
            .arg("run")
            .args(cfg.source.args())
            .arg("--node-name")
            .arg(cfg.node_name)
            .arg("--cgroup")
            .arg(cfg.cgroup)
            .arg("--bpffs")
            .arg(cfg.bpffs);
        if !cfg.devices.is_empty() {
            command.arg("--devices").arg(cfg.devices.join(","));
        }
        command.args(&cfg.extra_args);
        command
            .env("RUST_LOG", "info")
            // Plain text logs: tests grep them.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd::spawn_placed(
            &mut command,
            &Placement {
                netns: Some(cfg.netns),
                cgroup: None,
            },
        )
    }

    pub(crate) fn proc(&self) -> Arc<Proc> {
        self.proc.clone()
    }

    /// Its pid (with podman: the `podman run` client's).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its container's name, when it runs in one.
    pub fn container(&self) -> Option<&str> {
        self.container.as_deref()
    }

    /// Where it gets its objects from.
    pub fn source(&self) -> &AgentSource {
        &self.source
    }

    /// The `--devices` it was started with.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    /// The extra flags it was started with.
    pub fn extra_args(&self) -> &[String] {
        &self.extra_args
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the agent printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn is_running(&self) -> bool {
        self.proc.try_wait().is_none()
    }

    /// Wait until the log contains `needle`; fails early if the agent exits.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.proc.try_wait() {
                bail!(
                    "{} exited ({status}) before logging {needle:?}; log:\n{}",
                    self.proc.label,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.proc.label,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for a clean exit (status 0).
    pub fn stop(&self) -> Result<()> {
        match self.proc.terminate(Duration::from_secs(10)) {
            Some(s) if s.success() => Ok(()),
            Some(s) => bail!("{} exited with {s}; log:\n{}", self.proc.label, self.log()),
            None => bail!(
                "{} ignored SIGTERM for 10 s (killed); log:\n{}",
                self.proc.label,
                self.log()
            ),
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&self) {
        self.proc.kill();
    }
}

/// `svclb maps dump --bpffs DIR --output json`. Run outside any netns or
/// cgroup: it only reads pinned maps.
pub fn dump_json(bpffs: &Path) -> Result<serde_json::Value> {
    let mut c = Command::new(svclb_bin()?);
    c.args(["maps", "dump", "--bpffs"])
        .arg(bpffs)
        .args(["--output", "json"]);
    let out = cmd::run(&mut c)?;
    serde_json::from_str(&out)
        .with_context(|| format!("parsing `{}` output: {out}", cmd::describe(&c)))
}

/// The maps as [`dump_json`] reads them, one line per frontend, sorted:
/// "198.18.0.10:80/TCP -> 198.19.0.1:8080 198.19.0.2:8080(terminating)"
/// (backends sorted, a state other than active in parentheses).
pub fn frontends(bpffs: &Path) -> Result<Vec<String>> {
    let dump = dump_json(bpffs)?;
    let addr = |v: &serde_json::Value| {
        let a = v["address"].as_str().unwrap_or_default();
        let port = &v["port"];
        if a.contains(':') {
            format!("[{a}]:{port}")
        } else {
            format!("{a}:{port}")
        }
    };
    let none = Vec::new();
    let mut lines: Vec<String> = (dump["frontends"].as_array().unwrap_or(&none).iter())
        .map(|f| {
            let mut backends: Vec<String> = (f["backends"].as_array().unwrap_or(&none).iter())
                .map(|b| match b["state"].as_str().unwrap_or_default() {
                    "active" => addr(b),
                    state => format!("{}({state})", addr(b)),
                })
                .collect();
            backends.sort();
            let protocol = f["protocol"].as_str().unwrap_or_default();
            format!("{}/{protocol} -> {}", addr(f), backends.join(" "))
        })
        .collect();
    lines.sort();
    Ok(lines)
}
