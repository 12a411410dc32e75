//! Builds svclb-ebpf for the BPF target (nightly, bpf-linker) and leaves the
//! object in OUT_DIR/svclb, which the dataplane embeds.
use std::path::Path;

fn main() -> anyhow::Result<()> {
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
