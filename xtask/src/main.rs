//! `cargo xtask`: set-up, build, test, demo and benchmarks for svclb.
//!
//! Every command runs `setup` first, so a fresh machine needs nothing but
//! `cargo xtask demo` or `cargo xtask test`.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod setup;
mod vm;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly rust-src, bpf-linker, apt packages.
    Setup,
    /// Build the agent (with its embedded eBPF object) and the test tools and benchmarks.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// The container image (Containerfile's final stage, offline): a static
    /// svclb built here, tagged localhost/svclb:VERSION-COMMIT and
    /// localhost/svclb:VERSION.
    Image,
    /// Build, then run every test (unit, property and the netns integration
    /// tests, and the `container` tests against the image it builds).
    Test {
        /// Passed to the test binaries (a name filter, --nocapture, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The integration tests in QEMU VMs on other kernels (Debian cloud kernels).
    VmTest {
        /// Kernel version to test: 5.10, 6.1 or 6.12; repeatable.
        #[arg(long = "kernel", value_name = "VERSION")]
        kernels: Vec<String>,
        /// Every kernel of the matrix (also the default without --kernel).
        #[arg(long, conflicts_with = "kernels")]
        all: bool,
        /// After `--`: passed to the test binaries (a name filter, --test-threads=N, ...).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The demo: a simulated cluster in namespaces, traffic to a ClusterIP, maps dump, scaling.
    Demo,
    /// The soak: 1,000 services under endpoint churn, agent SIGKILLs and
    /// injected map faults while a client connects; ends with
    /// `soak: N connections, F failed, D verify differences` and fails
    /// unless F and D are 0. About 10 minutes.
    Soak {
        /// The CI form: fewer services, kills and seconds (under 3 minutes).
        #[arg(long)]
        short: bool,
        /// Passed to svclb-soak (--duration-secs, --kills, --seed, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Benchmarks; prints rates and ratios against a baseline measured in the same run.
    Bench {
        /// Which benchmark: sock, control-plane, xdp
        which: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Write deploy/svclb.yaml: the Helm chart deploy/helm/svclb rendered
    /// with its default values (a test checks the two agree).
    DeployYaml,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build { release } => {
            setup::run()?;
            build(release)
        }
        Cmd::Image => {
            setup::run()?;
            image().map(drop)
        }
        Cmd::Test { args } => {
            setup::run()?;
            build(false)?;
            let image = image()?;
            test(&args, &image)
        }
        Cmd::VmTest { kernels, all, args } => {
            setup::run()?;
            vm::run(if all { &[] } else { &kernels }, &args)
        }
        Cmd::Demo => {
            setup::run()?;
            build(true)?;
            run_tool("svclb-demo", &[])
        }
        Cmd::Soak { short, args } => {
            setup::run()?;
            // The debug build `test` makes: CI runs the soak right after it.
            build(false)?;
            let mut all: Vec<String> = if short {
                SOAK_SHORT.iter().map(|s| s.to_string()).collect()
            } else {
                Vec::new()
            };
            all.extend(args);
            run_tool_from(false, "svclb-soak", &all)
        }
        Cmd::Bench { which, args } => {
            setup::run()?;
            build(true)?;
            match which.as_str() {
                "sock" => run_tool("svclb-bench-sock", &args),
                "control-plane" => run_tool("svclb-bench-control-plane", &args),
                "xdp" => bench_xdp(&args),
                other => bail!("unknown benchmark {other:?}; available: sock, control-plane, xdp"),
            }
        }
        Cmd::DeployYaml => {
            setup::run()?;
            // The test renders the chart and, asked so, writes the file.
            status(
                cargo()
                    .args(["test", "-p", "svclb-userspace", "--test", "deploy"])
                    .args(["--", "--exact", "plain_manifest_is_the_chart_rendered"])
                    .env("SVCLB_UPDATE_DEPLOY_YAML", "1"),
            )
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_owned()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn profile_dir(release: bool) -> PathBuf {
    target_dir().join(if release { "release" } else { "debug" })
}

pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed: {st}");
    }
    Ok(())
}

fn build(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--bins",
        "-p",
        "svclb-userspace",
        "-p",
        "svclb-tests",
    ]);
    if release {
        cmd.arg("--release");
    }
    status(&mut cmd)
}

fn test(args: &[String], image: &str) -> Result<()> {
    let svclb = profile_dir(false).join("svclb");
    let mut cmd = cargo();
    // Default members only: svclb-ebpf builds for the BPF target, not the host.
    cmd.args(["test"])
        .env("SVCLB_BIN", &svclb)
        .env("SVCLB_TEST_IMAGE", image);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    status(&mut cmd)?;
    // The ClusterIP and external suites once more with every agent in the
    // image, run as the DaemonSet runs it (tests/src/podman.rs). Without
    // -p: the same feature set as above, so nothing is built again.
    let mut cmd = cargo();
    cmd.args(["test", "--test", "clusterip", "--test", "external"])
        .env("SVCLB_BIN", &svclb)
        .env("SVCLB_AGENT_IMAGE", image);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    status(&mut cmd)
}

/// Build the image as the Containerfile's final stage, with the builder
/// stage replaced by a directory holding what it would produce (/out): a
/// static musl build of svclb made here. Returns the VERSION-COMMIT tag.
fn image() -> Result<String> {
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--target", setup::MUSL_TARGET])
        .args(["-p", "svclb-userspace", "--bin", "svclb"]);
    status(&mut cmd)?;
    let bin = target_dir().join(setup::MUSL_TARGET).join("release/svclb");

    let builder = target_dir().join("image/builder");
    let dest = builder.join("out/usr/local/bin");
    std::fs::create_dir_all(&dest)?;
    std::fs::copy(&bin, dest.join("svclb"))
        .with_context(|| format!("copying {}", bin.display()))?;

    let version = output(cargo().args(["pkgid", "-p", "svclb-userspace"]))?;
    let version = version
        .trim()
        .rsplit(['@', '#'])
        .next()
        .context("version in cargo pkgid")?
        .to_string();
    let mut commit = output(Command::new("git").args(["rev-parse", "--short=12", "HEAD"]))?
        .trim()
        .to_string();
    let dirty = !output(Command::new("git").args(["status", "--porcelain"]))?
        .trim()
        .is_empty();
    if dirty {
        commit.push_str("-dirty");
    }
    let tag = format!("{IMAGE}:{version}-{commit}");
    status(
        Command::new("podman")
            .args(["--runtime", "runc", "build", "--pull=never"])
            .arg("--build-context")
            .arg(format!("builder={}", builder.display()))
            .arg("--file")
            .arg(workspace_root().join("Containerfile"))
            .args(["--tag", &tag, "--tag", &format!("{IMAGE}:{version}")])
            .arg(&builder),
    )?;
    let size =
        output(Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", &tag]))?;
    eprintln!("image: {tag} and {IMAGE}:{version}, {} bytes", size.trim());
    Ok(tag)
}

/// The image's name; `cargo xtask image` tags it VERSION-COMMIT and VERSION.
const IMAGE: &str = "localhost/svclb";

/// Run to completion and return stdout; fail on a non-zero exit.
fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .current_dir(workspace_root())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The XDP program's per-packet cost by BPF_PROG_RUN, then the end-to-end
/// XDP benchmark (`args` go to the first only).
fn bench_xdp(args: &[String]) -> Result<()> {
    run_tool("svclb-bench-xdp", args)?;
    run_tool("svclb-bench-xdp-e2e", &[])
}

/// `svclb-soak` arguments of `cargo xtask soak --short` (later ones win).
const SOAK_SHORT: &[&str] = &[
    "--services",
    "400",
    "--duration-secs",
    "100",
    "--kills",
    "3",
];

/// Run a tool binary of the tests crate (demo, benchmarks) built in release.
fn run_tool(name: &str, args: &[String]) -> Result<()> {
    run_tool_from(true, name, args)
}

/// Run a tool binary of the tests crate from the release or debug build.
fn run_tool_from(release: bool, name: &str, args: &[String]) -> Result<()> {
    let dir = profile_dir(release);
    status(
        Command::new(dir.join(name))
            .args(args)
            .env("SVCLB_BIN", dir.join("svclb")),
    )
}
