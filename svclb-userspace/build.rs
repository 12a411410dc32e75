//! Builds svclb-ebpf for the BPF target (nightly, bpf-linker) and leaves the
//! object in OUT_DIR/svclb, which the dataplane embeds.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    git_commit();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../svclb-ebpf");
    let root = root.to_str().expect("utf-8 path");
    println!("cargo:rerun-if-changed=../svclb-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "svclb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    // With AYA_BUILD_SKIP=1 nothing is built: leave an empty object so the
    // userspace crate still compiles (loading then fails with a clear error).
    let obj = Path::new(&std::env::var("OUT_DIR")?).join("svclb");
    if !obj.exists() {
        std::fs::write(&obj, b"")?;
    }
    Ok(())
}

/// SVCLB_GIT_COMMIT for `svclb version`: $SVCLB_GIT_COMMIT when set (image
/// builds without .git), else `git rev-parse --short HEAD`, else "unknown".
fn git_commit() {
    println!("cargo:rerun-if-env-changed=SVCLB_GIT_COMMIT");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let commit = std::env::var("SVCLB_GIT_COMMIT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=SVCLB_GIT_COMMIT={commit}");
    // A new commit (HEAD moves, or the branch it names does) changes it.
    for path in ["HEAD", "packed-refs"] {
        if let Some(p) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        if let Some(p) = git(&["rev-parse", "--git-path", &branch]) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
