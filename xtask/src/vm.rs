//! `cargo xtask vm-test`: the integration tests on the kernels users run,
//! each booted with QEMU from Debian's cloud kernel package and an
//! initramfs holding the test binaries, `svclb`, `svclb-probe`, busybox,
//! iproute2's `ip` and the kernel's network (and socket diagnostics) modules.
//!
//! The guest's /init (vm/init.sh) runs every test binary with libtest's JSON
//! output on the serial console; this side streams it, attributes every
//! result to its test and prints one row per kernel.
mod initramfs;
mod kernel;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{cargo, setup, target_dir, workspace_root};
use initramfs::Initramfs;
use kernel::Kernel;

/// Modules the tests need beyond what the cloud kernels build in (their
/// dependencies, e.g. stp and llc for bridge, come along).
const MODULES: &[&str] = &[
    "veth",
    "bridge",
    // tc egress on kernels before TCX (6.6): the clsact qdisc and cls_bpf.
    "sch_ingress",
    "cls_bpf",
    // sock_diag for UDP: svclb destroys connected UDP sockets of removed
    // backends with SOCK_DESTROY (inet_diag comes along).
    "udp_diag",
    // SCTP Services (tests/tests/udp_flows.rs); the host kernel may lack it.
    "sctp",
];
/// Every test spawns agents, servers and probes: give them room.
const MEMORY: &str = "3G";
/// Matches this machine's cores: more vCPUs than host cores only slows TCG down.
const CPUS: usize = 2;
/// Generous: software emulation is 10-50x slower than the host.
const RUN_TIMEOUT: Duration = Duration::from_secs(40 * 60);
/// A working KVM boots the probe kernel in about a second.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(15);
/// A test that skips itself prints a line starting with this, then the reason.
const SKIP_MARKER: &str = "skipped:";

pub fn run(versions: &[String], args: &[String]) -> Result<()> {
    setup::apt_packages(setup::VM_APT)?;
    let versions: Vec<String> = if versions.is_empty() {
        kernel::KERNELS.iter().map(|(v, _)| v.to_string()).collect()
    } else {
        versions.to_vec()
    };
    // Kernels first: a typo or an unreachable mirror fails before the build.
    let kernels = versions
        .iter()
        .map(|v| kernel::get(v))
        .collect::<Result<Vec<_>>>()?;
    let bins = build()?;
    let work = target_dir().join("vm");
    fs::create_dir_all(&work)?;
    let accel = detect_accel(&kernels[0], &work)?;

    let mut runs = Vec::new();
    for k in &kernels {
        let initrd = work.join(format!("initramfs-{}.cpio", k.version));
        test_initramfs(k, &bins, &accel, args)?.write(&initrd)?;
        eprintln!(
            "vm-test: booting {} ({}, from {}) with {}",
            k.version, k.release, k.package, accel.name
        );
        runs.push(run_kernel(k, &initrd, &accel)?);
    }
    print_matrix(&runs);
    print_summary(&runs);
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.version.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on kernel {}", failed.join(", "));
    }
    Ok(())
}

/// The packages whose tests run in the VMs: the integration tests and the
/// agent's own tests (some of them use the kernel too).
const TEST_PACKAGES: &[&str] = &["svclb-tests", "svclb-userspace"];

struct Binaries {
    svclb: PathBuf,
    probe: PathBuf,
    /// Every binary cargo built (tests may run any of them, e.g. through
    /// CARGO_BIN_EXE_<name>, which is a path compiled in).
    all: Vec<PathBuf>,
    /// (test executable, its package directory: cargo runs tests there)
    tests: Vec<(PathBuf, PathBuf)>,
}

/// The agent, the probe and the test executables, as cargo reports them
/// (test binaries' names carry hashes). Release builds: under emulation
/// every process start and every debug-build loop costs 20-50 times more
/// than on the host, and the tests have deadlines.
fn build() -> Result<Binaries> {
    let packages: Vec<&str> = TEST_PACKAGES.iter().flat_map(|p| ["-p", p]).collect();
    let mut artifacts =
        cargo_artifacts(&[&["build", "--release", "--bins"], &packages[..]].concat())?;
    artifacts.extend(cargo_artifacts(
        &[&["test", "--release", "--no-run"], &packages[..]].concat(),
    )?);
    let find = |name: &str| {
        artifacts
            .iter()
            .find(|a| a.name == name && !a.test)
            .map(|a| a.executable.clone())
            .with_context(|| format!("cargo built no {name} binary"))
    };
    let svclb = find("svclb")?;
    let probe = find("svclb-probe")?;
    let mut all: Vec<PathBuf> = artifacts.iter().map(|a| a.executable.clone()).collect();
    all.sort();
    all.dedup();
    let mut tests: Vec<_> = artifacts
        .into_iter()
        .filter(|a| a.test)
        .map(|a| (a.executable, a.package_dir))
        .collect();
    // Same order every run (cargo reports them as they finish).
    tests.sort();
    tests.dedup();
    Ok(Binaries {
        svclb,
        probe,
        all,
        tests,
    })
}

struct Artifact {
    name: String,
    test: bool,
    executable: PathBuf,
    package_dir: PathBuf,
}

/// Run cargo with JSON messages and collect the executables it produced.
fn cargo_artifacts(args: &[&str]) -> Result<Vec<Artifact>> {
    let mut cmd = cargo();
    cmd.args(args)
        .arg("--message-format=json-render-diagnostics")
        .stderr(Stdio::inherit());
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", out.status);
    }
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(exe) = msg["executable"].as_str() else {
            continue;
        };
        let manifest = PathBuf::from(msg["manifest_path"].as_str().unwrap_or("/"));
        found.push(Artifact {
            name: msg["target"]["name"].as_str().unwrap_or("").to_owned(),
            test: msg["profile"]["test"].as_bool().unwrap_or(false),
            executable: PathBuf::from(exe),
            package_dir: manifest.parent().unwrap_or(Path::new("/")).to_owned(),
        });
    }
    Ok(found)
}

struct Accel {
    name: &'static str,
    args: &'static [&'static str],
}

const KVM: Accel = Accel {
    name: "kvm",
    args: &["-accel", "kvm", "-cpu", "host"],
};
const TCG: Accel = Accel {
    name: "tcg",
    args: &["-accel", "tcg,thread=multi", "-cpu", "max"],
};

/// KVM when a guest really boots with it: on nested hosts /dev/kvm can
/// exist while guests hang, so boot a tiny initramfs with a short timeout.
fn detect_accel(kernel: &Kernel, work: &Path) -> Result<Accel> {
    if File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        eprintln!("vm-test: /dev/kvm is not usable; using software emulation (TCG)");
        return Ok(TCG);
    }
    let mut image = Initramfs::default();
    image.binary_at("/bin/busybox", &which("busybox")?)?;
    image.char_dev("/dev/console", 5, 1);
    image.file(
        "/init",
        b"#!/bin/busybox sh\n/bin/busybox echo svclb-vm: kvm works\n/bin/busybox poweroff -f\n"
            .to_vec(),
        0o755,
    );
    let initrd = work.join("initramfs-kvm-probe.cpio");
    image.write(&initrd)?;
    let mut works = false;
    let started = Instant::now();
    boot(kernel, &initrd, &KVM, KVM_PROBE_TIMEOUT, |line| {
        works |= line == "svclb-vm: kvm works"
    })?;
    if works {
        eprintln!(
            "vm-test: KVM works (probe boot took {:.1}s)",
            started.elapsed().as_secs_f64()
        );
        Ok(KVM)
    } else {
        eprintln!(
            "vm-test: a KVM guest did not boot within {KVM_PROBE_TIMEOUT:?}; using software emulation (TCG)"
        );
        Ok(TCG)
    }
}

fn which(name: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found in PATH"))
}

fn test_initramfs(
    k: &Kernel,
    bins: &Binaries,
    accel: &Accel,
    args: &[String],
) -> Result<Initramfs> {
    let mut image = Initramfs::default();
    image.file("/init", include_bytes!("vm/init.sh").to_vec(), 0o755);
    // The kernel opens it for /init's stdio before devtmpfs is mounted.
    image.char_dev("/dev/console", 5, 1);
    for d in ["/proc", "/sys", "/run", "/tmp", "/root"] {
        image.dir(d);
    }
    image.symlink("/var/run", "../run");
    // What every node has and clients expect: a CA bundle (the kube
    // client's TLS setup loads the system roots) and localhost.
    let ca = Path::new("/etc/ssl/certs/ca-certificates.crt");
    if ca.exists() {
        image.host_file(ca, ca)?;
    }
    image.file(
        "/etc/hosts",
        b"127.0.0.1 localhost\n::1 localhost\n".to_vec(),
        0o644,
    );
    image.binary_at("/bin/busybox", &which("busybox")?)?;
    image.binary_at("/usr/sbin/ip", &which("ip")?)?;

    for (i, (name, data)) in k.module_closure(MODULES)?.into_iter().enumerate() {
        image.file(format!("/modules/{i:02}-{name}.ko"), data, 0o644);
    }

    // Everything keeps its host path, so however the harness looks for
    // svclb and svclb-probe (the variables below, the target dir, next to
    // the test executable, or a path cargo compiled in) it finds them, and
    // tests that read files of the workspace (CARGO_MANIFEST_DIR) find those.
    for exe in &bins.all {
        image.binary(exe)?;
    }
    add_sources(&mut image, &workspace_root())?;
    let env = [
        ("SVCLB_BIN", bins.svclb.display().to_string()),
        ("SVCLB_PROBE", bins.probe.display().to_string()),
        ("CARGO_TARGET_DIR", target_dir().display().to_string()),
        // libtest's JSON output is unstable; stable test binaries allow it with this.
        ("RUSTC_BOOTSTRAP", "1".into()),
        // "tcg" or "kvm": lets a test with wall-clock deadlines skip (with
        // that reason) or stretch them under software emulation.
        ("SVCLB_VM_ACCEL", accel.name.into()),
        ("NO_COLOR", "1".into()),
    ];
    let env: String = env
        .iter()
        .map(|(k, v)| format!("export {k}={}\n", sh_quote(v)))
        .collect();
    image.file("/etc/svclb/env", env.into_bytes(), 0o644);

    let mut test_args = args.to_vec();
    if !args.iter().any(|a| a.starts_with("--test-threads")) {
        test_args.push(format!("--test-threads={CPUS}"));
    }
    let mut script = String::new();
    for (exe, dir) in &bins.tests {
        let words: Vec<String> = [dir.display().to_string(), exe.display().to_string()]
            .into_iter()
            .chain(test_args.iter().cloned())
            .map(|w| sh_quote(&w))
            .collect();
        script.push_str(&format!("run {}\n", words.join(" ")));
    }
    image.file("/etc/svclb/tests.sh", script.into_bytes(), 0o644);
    Ok(image)
}

/// The workspace's files without build output and VCS data (a few MB).
fn add_sources(image: &mut Initramfs, dir: &Path) -> Result<()> {
    // Target dirs carry a CACHEDIR.TAG; custom ones may live anywhere.
    if dir.join("CACHEDIR.TAG").exists() {
        return Ok(());
    }
    image.dir(dir);
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if entry.file_name() == ".git" || entry.file_name() == "target" {
            continue;
        } else if kind.is_dir() {
            add_sources(image, &path)?;
        } else if kind.is_file() {
            image.host_file(&path, &path)?;
        }
    }
    Ok(())
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Boot `kernel` with `initrd`, passing every console line to `on_line`
/// until QEMU exits (the guest powered off) or `timeout` passes (then QEMU
/// is killed). Returns whether the guest ended by itself.
fn boot(
    kernel: &Kernel,
    initrd: &Path,
    accel: &Accel,
    timeout: Duration,
    mut on_line: impl FnMut(&str),
) -> Result<bool> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(accel.args)
        .args(["-m", MEMORY, "-smp", &CPUS.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-nic", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        // quiet: only kernel errors reach the console, so they rarely cut
        // into a JSON line; panic=-1 turns a panic into a reboot, which
        // -no-reboot turns into QEMU exiting.
        .args(["-append", "console=ttyS0 quiet panic=-1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    if tx.send(line.trim_end().to_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let deadline = Instant::now() + timeout;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => on_line(&line),
            Err(RecvTimeoutError::Disconnected) => {
                child.wait()?;
                return Ok(true);
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                child.wait()?;
                return Ok(false);
            }
        }
    }
}

enum Outcome {
    Passed,
    Failed,
    Skipped(String),
}

/// What one kernel's VM reported.
struct KernelRun {
    version: String,
    release: String,
    accel: &'static str,
    /// "binary::test" -> outcome, in the order they finished.
    results: Vec<(String, Outcome)>,
    /// Anything that makes the run fail besides a failed test.
    problems: Vec<String>,
    /// From QEMU's start to /init's first line, and to QEMU's exit.
    boot_time: Option<Duration>,
    total_time: Duration,
    done: bool,
    /// The test binary running now (name without cargo's hash).
    binary: String,
    binary_failures: usize,
    /// Tests started and not finished: what was running when a VM hung.
    running: BTreeSet<String>,
}

impl KernelRun {
    fn passed(&self) -> bool {
        self.problems.is_empty()
            && !self
                .results
                .iter()
                .any(|(_, o)| matches!(o, Outcome::Failed))
    }

    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.results.iter().filter(|(_, o)| f(o)).count()
    }

    fn line(&mut self, line: &str, started: Instant) {
        let tag = format!("[{}]", self.version);
        if line.starts_with("svclb-vm: kernel ") && self.boot_time.is_none() {
            self.boot_time = Some(started.elapsed());
        }
        if let Some(exe) = line.strip_prefix("svclb-vm: run ") {
            self.binary = short_name(exe);
            self.binary_failures = 0;
            println!("{tag} running {}", self.binary);
        } else if let Some(rest) = line.strip_prefix("svclb-vm: exit ") {
            let code = rest.rsplit(' ').next().unwrap_or("");
            // libtest exits 101 when a test failed; anything else non-zero
            // (or 101 without a failed test) means the binary itself broke.
            if code != "0" && !(code == "101" && self.binary_failures > 0) {
                self.problems
                    .push(format!("{} exited with status {code}", self.binary));
            }
        } else if line == "svclb-vm: done" {
            self.done = true;
        } else if let Some(event) = line
            .strip_prefix('{')
            .and_then(|_| serde_json::from_str::<Value>(line).ok())
        {
            self.event(&event, &tag);
        } else {
            println!("{tag} {line}");
        }
    }

    /// One libtest JSON event.
    fn event(&mut self, e: &Value, tag: &str) {
        if e["type"] != "test" {
            return;
        }
        let name = format!("{}::{}", self.binary, e["name"].as_str().unwrap_or("?"));
        let time = e["exec_time"]
            .as_f64()
            .map(|t| format!(" ({t:.1}s)"))
            .unwrap_or_default();
        let stdout = e["stdout"].as_str().unwrap_or("");
        if e["event"] == "started" {
            self.running.insert(name);
            return;
        }
        self.running.remove(&name);
        let outcome = match e["event"].as_str() {
            Some("ok") => match skip_reason(stdout) {
                Some(reason) => Outcome::Skipped(reason),
                None => Outcome::Passed,
            },
            Some("ignored") => Outcome::Skipped(match e["message"].as_str() {
                Some(m) => format!("#[ignore] {m}"),
                None => "#[ignore]".into(),
            }),
            Some("failed") => {
                self.binary_failures += 1;
                Outcome::Failed
            }
            _ => return,
        };
        match &outcome {
            Outcome::Passed => println!("{tag} {name} ... ok{time}"),
            Outcome::Skipped(reason) => println!("{tag} {name} ... skipped{time}: {reason}"),
            Outcome::Failed => {
                println!("{tag} {name} ... FAILED{time}");
                for l in stdout.lines().chain(e["message"].as_str()) {
                    println!("{tag}     {l}");
                }
            }
        }
        self.results.push((name, outcome));
    }
}

fn skip_reason(stdout: &str) -> Option<String> {
    stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(SKIP_MARKER))
        .map(|r| r.trim().to_owned())
}

/// ".../deps/clusterip-7a9938f47626c4c5" -> "clusterip".
fn short_name(exe: &str) -> String {
    let file = exe.rsplit('/').next().unwrap_or(exe);
    match file.rsplit_once('-') {
        Some((name, hash)) if hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit()) => {
            name.to_owned()
        }
        _ => file.to_owned(),
    }
}

fn run_kernel(k: &Kernel, initrd: &Path, accel: &Accel) -> Result<KernelRun> {
    let mut run = KernelRun {
        version: k.version.clone(),
        release: k.release.clone(),
        accel: accel.name,
        results: Vec::new(),
        problems: Vec::new(),
        boot_time: None,
        total_time: Duration::ZERO,
        done: false,
        binary: String::new(),
        binary_failures: 0,
        running: BTreeSet::new(),
    };
    let started = Instant::now();
    let exited = boot(k, initrd, accel, RUN_TIMEOUT, |line| {
        run.line(line, started)
    })?;
    run.total_time = started.elapsed();
    let running = format!("in {}, running {:?}", run.binary, run.running);
    if !exited {
        run.problems
            .push(format!("killed after {RUN_TIMEOUT:?} {running}"));
    } else if !run.done {
        run.problems.push(format!(
            "the VM stopped before the tests finished, {running}"
        ));
    }
    Ok(run)
}

/// Which test ran where: one row per test, one column per kernel.
fn print_matrix(runs: &[KernelRun]) {
    if runs.iter().all(|r| r.results.is_empty()) {
        return;
    }
    let mut rows: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (i, run) in runs.iter().enumerate() {
        for (name, outcome) in &run.results {
            let cells = rows.entry(name).or_insert_with(|| vec!["-"; runs.len()]);
            cells[i] = match outcome {
                Outcome::Passed => "ok",
                Outcome::Failed => "FAILED",
                Outcome::Skipped(_) => "skipped",
            };
        }
    }
    let width = rows.keys().map(|n| n.len()).max().unwrap_or(4).max(4);
    println!();
    print!("{:width$}", "test");
    for run in runs {
        print!("  {:>7}", run.version);
    }
    println!();
    for (name, cells) in &rows {
        print!("{name:width$}");
        for c in cells {
            print!("  {c:>7}");
        }
        println!();
    }
}

fn print_summary(runs: &[KernelRun]) {
    println!();
    println!(
        "{:7} {:28} {:5} {:>6} {:>6} {:>7} {:>6} {:>8}  result",
        "kernel", "release", "accel", "passed", "failed", "skipped", "boot", "total"
    );
    for r in runs {
        let boot = r.boot_time.map_or("-".into(), minutes);
        let total = minutes(r.total_time);
        println!(
            "{:7} {:28} {:5} {:>6} {:>6} {:>7} {:>6} {:>8}  {}",
            r.version,
            r.release,
            r.accel,
            r.count(|o| matches!(o, Outcome::Passed)),
            r.count(|o| matches!(o, Outcome::Failed)),
            r.count(|o| matches!(o, Outcome::Skipped(_))),
            boot,
            total,
            if r.passed() { "ok" } else { "FAILED" }
        );
    }
    for r in runs {
        for (name, outcome) in &r.results {
            match outcome {
                Outcome::Failed => println!("  {} FAILED  {name}", r.version),
                Outcome::Skipped(reason) => println!("  {} skipped {name}: {reason}", r.version),
                Outcome::Passed => {}
            }
        }
        for p in &r.problems {
            println!("  {} problem {p}", r.version);
        }
    }
}

fn minutes(d: Duration) -> String {
    format!("{}m{:02}s", d.as_secs() / 60, d.as_secs() % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_drop_the_hash() {
        assert_eq!(
            short_name("/t/debug/deps/clusterip-7a9938f47626c4c5"),
            "clusterip"
        );
        assert_eq!(
            short_name("/t/debug/deps/svclb_tests-e928444dec1c8483"),
            "svclb_tests"
        );
        assert_eq!(short_name("/t/debug/svclb-probe"), "svclb-probe");
    }

    #[test]
    fn skip_reasons_come_from_the_marker_line() {
        assert_eq!(
            skip_reason("setup\nskipped: needs bpf_set_retval (5.18+)\n").as_deref(),
            Some("needs bpf_set_retval (5.18+)")
        );
        assert_eq!(skip_reason("all good\n"), None);
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }
}
