//! The svclb agent of one simulated node: `svclb run` in the node's netns,
//! attached to the node's cgroup, pinning under the node's bpffs dir.

use std::env;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, Placement, Proc};

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

/// Everything `svclb run` needs to act as one node's agent.
pub struct AgentConfig<'a> {
    pub node_name: &'a str,
    pub netns: &'a Path,
    pub cgroup: &'a Path,
    pub bpffs: &'a Path,
    pub manifests: &'a Path,
    /// External interfaces (`--devices`, comma-joined); none: no flag.
    pub devices: Vec<String>,
    /// More `svclb run` flags, e.g. `--sync-period 2s`.
    pub extra_args: Vec<String>,
    pub log: PathBuf,
}

/// A running (or stopped) agent. Cloning shares the process.
#[derive(Clone)]
pub struct Agent {
    proc: Arc<Proc>,
    log: PathBuf,
    manifests: PathBuf,
    devices: Vec<String>,
    extra_args: Vec<String>,
}

impl Agent {
    /// Spawn and wait for the initial sync. The agent is deliberately not in
    /// the node's cgroup: its own sockets must not be translated.
    pub(crate) fn start(cfg: &AgentConfig) -> Result<Agent> {
        let bin = svclb_bin()?;
        let log =
            File::create(&cfg.log).with_context(|| format!("creating {}", cfg.log.display()))?;
        let mut command = Command::new(&bin);
        command
            .arg("run")
            .arg("--manifests")
            .arg(cfg.manifests)
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
        let child = cmd::spawn_placed(
            &mut command,
            &Placement {
                netns: Some(cfg.netns),
                cgroup: None,
            },
        )?;
        let agent = Agent {
            proc: Arc::new(Proc::new(format!("agent {}", cfg.node_name), child)),
            log: cfg.log.clone(),
            manifests: cfg.manifests.to_path_buf(),
            devices: cfg.devices.clone(),
            extra_args: cfg.extra_args.clone(),
        };
        agent
            .wait_for_log(SYNC_MARKER, SYNC_TIMEOUT)
            .inspect_err(|_| agent.kill())?;
        Ok(agent)
    }

    pub(crate) fn proc(&self) -> Arc<Proc> {
        self.proc.clone()
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn manifests_dir(&self) -> &Path {
        &self.manifests
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
