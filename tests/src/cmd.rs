//! Running helper commands (`ip`, the probe, svclb) with errors that say
//! what was run and what it printed, and spawning processes inside a netns
//! and/or cgroup without touching the mount namespace.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Render a command for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run to completion; fail on a non-zero exit with stderr in the message.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning `{}`", describe(cmd)))?;
    check(cmd, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check(cmd: &Command, out: &Output) -> Result<()> {
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(())
}

/// `ip -n NETNS ARGS...` (or in the current netns when `netns` is None).
/// `ip -n` switches namespaces inside the `ip` process only.
pub fn ip<S: AsRef<OsStr>>(netns: Option<&str>, args: &[S]) -> Result<String> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    cmd.args(args);
    run(&mut cmd)
}

/// `ip -n NETNS -batch -`: several commands with one process (setup speed
/// matters: tests run in parallel on small machines). ip stops at the first
/// failing line and names it in stderr.
pub fn ip_batch(netns: &str, lines: &[String]) -> Result<()> {
    use std::io::Write;
    let mut cmd = Command::new("ip");
    cmd.args(["-n", netns, "-batch", "-"]);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{}`", describe(&cmd)))?;
    let script = lines.join("\n") + "\n";
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .context("writing ip batch")?;
    let out = child.wait_with_output()?;
    check(&cmd, &out).with_context(|| format!("ip batch in {netns}:\n{script}"))
}

/// Where a spawned process must live. Only the network namespace is
/// changed (never the mount namespace, so cgroup2 and bpffs stay visible).
#[derive(Default)]
pub struct Placement<'a> {
    /// A netns file, e.g. /run/netns/NAME.
    pub netns: Option<&'a Path>,
    /// A cgroup v2 directory; the child joins it before exec so that every
    /// socket it creates belongs to that cgroup.
    pub cgroup: Option<&'a Path>,
}

/// Spawn `cmd` placed as requested. The files are opened here (before
/// fork) so the child only does async-signal-safe syscalls.
pub fn spawn_placed(cmd: &mut Command, place: &Placement) -> Result<Child> {
    let netns = place
        .netns
        .map(|p| File::open(p).with_context(|| format!("opening netns {}", p.display())))
        .transpose()?;
    let procs = place
        .cgroup
        .map(|cg| {
            let p = cg.join("cgroup.procs");
            File::options()
                .write(true)
                .open(&p)
                .with_context(|| format!("opening {}", p.display()))
        })
        .transpose()?;
    let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: the closure runs between fork and exec and only calls
    // write(2) and setns(2) on descriptors opened above (they are O_CLOEXEC,
    // so they are not leaked into the new program).
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = procs_fd {
                // "0" means the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning `{}`", describe(cmd)))?;
    Ok(child)
}

/// Wait for a child whose stdout and stderr are piped, killing it after
/// `timeout`. Returns its output; fails on timeout or non-zero exit.
pub fn wait_output(cmd: &Command, mut child: Child, timeout: Duration) -> Result<Output> {
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let out = Output {
        status: status.unwrap_or_default(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if status.is_none() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last: Vec<&str> = stdout.lines().rev().take(3).collect();
        bail!(
            "`{}` did not finish within {timeout:?} (killed); {} stdout lines, last {last:?}; stderr: {}",
            describe(cmd),
            stdout.lines().count(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    check(cmd, &out)?;
    Ok(out)
}

/// A long-running child that the cluster kills on cleanup. Shared between
/// the handle given to the test and the cluster's registry; all reaping
/// goes through the mutex, so a signal never hits a recycled pid.
pub struct Proc {
    pub label: String,
    child: Mutex<Child>,
    /// Run by [`Proc::kill`] before killing the child: a `podman run`
    /// client's container outlives a SIGKILL of the client.
    on_kill: Option<Box<dyn Fn() + Send + Sync>>,
}

impl Proc {
    pub fn new(label: impl Into<String>, child: Child) -> Self {
        Proc {
            label: label.into(),
            child: Mutex::new(child),
            on_kill: None,
        }
    }

    /// [`Proc::new`] with `on_kill` run whenever the process is killed.
    pub fn with_on_kill(
        label: impl Into<String>,
        child: Child,
        on_kill: impl Fn() + Send + Sync + 'static,
    ) -> Self {
        Proc {
            on_kill: Some(Box::new(on_kill)),
            ..Proc::new(label, child)
        }
    }

    pub fn pid(&self) -> u32 {
        self.lock().id()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Exit status if it has exited (reaps it).
    pub fn try_wait(&self) -> Option<std::process::ExitStatus> {
        self.lock().try_wait().ok().flatten()
    }

    /// Send `sig` unless the process is already gone. Returns whether sent.
    pub fn signal(&self, sig: libc::c_int) -> bool {
        let mut child = self.lock();
        if matches!(child.try_wait(), Ok(Some(_))) {
            return false;
        }
        // SAFETY: plain kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, sig) == 0 }
    }

    /// Wait up to `timeout` for exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL and reap. Idempotent.
    pub fn kill(&self) {
        if let Some(on_kill) = &self.on_kill {
            on_kill();
        }
        let mut child = self.lock();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn terminate(&self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        if let Some(s) = self.wait_timeout(grace) {
            return Some(s);
        }
        self.kill();
        None
    }

    /// Take the piped stdin/stdout out of the child.
    pub fn with_child<T>(&self, f: impl FnOnce(&mut Child) -> T) -> T {
        f(&mut self.lock())
    }
}
