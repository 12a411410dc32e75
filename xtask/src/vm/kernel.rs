//! Debian cloud kernels for the VM matrix: the `-unsigned` image of the
//! release that ships each version (its main suite, i.e. the last point
//! release: the security archive's pool is not always reachable from here),
//! fetched once with `apt-get download` and kept unpacked under
//! ~/.cache/svclb/kernels/<version>.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::status;

/// Kernel version -> the Debian release whose cloud kernel it is.
pub const KERNELS: &[(&str, &str)] = &[
    ("5.10", "bullseye"),
    ("6.1", "bookworm"),
    ("6.12", "trixie"),
];

const MIRROR: &str = "http://deb.debian.org/debian";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

pub struct Kernel {
    /// As asked for: "6.1".
    pub version: String,
    /// The .deb it came from (name_version_arch.deb).
    pub package: String,
    /// `uname -r` of the guest.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// lib/modules/<release> of the unpacked package.
    pub modules: PathBuf,
}

/// The cached kernel `version`, downloading it the first time.
pub fn get(version: &str) -> Result<Kernel> {
    let Some((_, suite)) = KERNELS.iter().find(|(v, _)| *v == version) else {
        let known: Vec<&str> = KERNELS.iter().map(|(v, _)| *v).collect();
        bail!("no kernel {version:?}; known: {}", known.join(", "));
    };
    let dir = cache_dir().join(version);
    let root = dir.join("root");
    if !root.is_dir() {
        download(suite, &dir, &root).with_context(|| format!("fetching kernel {version}"))?;
    }
    let package = fs::read_to_string(dir.join("package"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let boot = root.join("boot");
    let release = fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| n.strip_prefix("vmlinuz-").map(str::to_owned))
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    // Newer packages ship their modules under usr/ (merged /usr).
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|p| p.is_dir())
        .with_context(|| format!("no modules for {release} in {}", root.display()))?;
    Ok(Kernel {
        version: version.to_owned(),
        package,
        vmlinuz: boot.join(format!("vmlinuz-{release}")),
        release,
        modules,
    })
}

fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".cache/svclb/kernels")
}

/// apt-get/apt-cache on a private view of `suite` only: its own sources,
/// lists and caches, so neither the host's sources leak in nor the host's
/// apt state is touched.
fn apt(tool: &str, apt_dir: &Path) -> Command {
    let mut cmd = Command::new(tool);
    let opt = |name: &str, path: &str| format!("{name}={}", apt_dir.join(path).display());
    cmd.arg("-q")
        .args(["-o", &opt("Dir::Etc::SourceList", "sources.list")])
        .args(["-o", &opt("Dir::Etc::SourceParts", "sources.list.d")])
        .args(["-o", &opt("Dir::State::Lists", "lists")])
        .args(["-o", &opt("Dir::Cache", "cache")])
        // The _apt user cannot write below /root/.cache.
        .args(["-o", "APT::Sandbox::User=root"]);
    cmd
}

fn download(suite: &str, dir: &Path, root: &Path) -> Result<()> {
    let apt_dir = dir.join("apt");
    for d in ["lists/partial", "sources.list.d", "cache/archives/partial"] {
        fs::create_dir_all(apt_dir.join(d))?;
    }
    fs::write(
        apt_dir.join("sources.list"),
        format!("deb [signed-by={KEYRING}] {MIRROR} {suite} main\n"),
    )?;
    eprintln!("vm-test: fetching the {suite} cloud kernel");
    status(apt("apt-get", &apt_dir).arg("update"))?;
    // The metapackage depends on the current image, e.g.
    // linux-image-6.1.0-56-cloud-amd64; its -unsigned twin has the same
    // kernel and modules without the Secure Boot signature we do not need.
    let out = apt("apt-cache", &apt_dir)
        .args(["depends", "linux-image-cloud-amd64"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let image = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| {
            format!("no image in `apt-cache depends linux-image-cloud-amd64`: {text}")
        })?;
    let package = format!("{image}-unsigned");
    status(
        apt("apt-get", &apt_dir)
            .args(["download", &package])
            .current_dir(dir),
    )?;
    let deb = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        .with_context(|| format!("{package} was not downloaded into {}", dir.display()))?;
    // Unpack next to the final place and rename, so an interrupted run
    // never leaves a half-unpacked kernel that looks cached.
    let tmp = dir.join("root.tmp");
    let _ = fs::remove_dir_all(&tmp);
    status(
        Command::new("dpkg-deb")
            .arg("-x")
            .arg(dir.join(&deb))
            .arg(&tmp),
    )?;
    fs::write(dir.join("package"), format!("{deb}\n"))?;
    fs::rename(&tmp, root)?;
    fs::remove_file(dir.join(&deb))?;
    fs::remove_dir_all(&apt_dir)?;
    Ok(())
}

impl Kernel {
    /// The module files for `names` and everything they depend on,
    /// dependencies first (insmod order), with their decompressed contents.
    /// Names built into the kernel are skipped.
    ///
    /// The .deb has no modules.dep (its postinst runs depmod), so the
    /// dependencies come from each module's own `depends=` modinfo field.
    pub fn module_closure(&self, names: &[&str]) -> Result<Vec<(String, Vec<u8>)>> {
        let mut files = BTreeMap::new();
        index_modules(&self.modules.join("kernel"), &mut files)?;
        let builtin: BTreeSet<String> = fs::read_to_string(self.modules.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(module_name)
            .collect();
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut todo: Vec<(String, bool)> = names
            .iter()
            .rev()
            .map(|n| (n.replace('-', "_"), false))
            .collect();
        // Depth-first; (name, true) is pushed back under its dependencies
        // so that it is emitted after them.
        while let Some((name, deps_done)) = todo.pop() {
            if deps_done {
                let data = read_module(&files[&name])?;
                order.push((name, data));
                continue;
            }
            if builtin.contains(&name) || !seen.insert(name.clone()) {
                continue;
            }
            let path = files
                .get(&name)
                .with_context(|| format!("kernel {} has no module {name}", self.release))?;
            todo.push((name.clone(), true));
            for dep in depends(&read_module(path)?) {
                todo.push((dep, false));
            }
        }
        Ok(order)
    }
}

/// Module name -> file, for every *.ko* below `dir`.
fn index_modules(dir: &Path, out: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, out)?;
        } else if path.to_string_lossy().contains(".ko") {
            out.insert(module_name(&path.to_string_lossy()), path);
        }
    }
    Ok(())
}

/// A module file's contents, decompressed (busybox insmod wants plain ELF).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else {
        return fs::read(path).with_context(|| format!("reading {name}"));
    };
    let out = Command::new(tool).arg("-dc").arg(path).output()?;
    if !out.status.success() {
        bail!(
            "{tool} -dc {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

/// The "depends=a,b" string of a module's .modinfo section.
fn depends(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(start) = module.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &module[start + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// "kernel/net/802/stp.ko.xz" -> "stp"; the kernel treats - and _ alike.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(module_name("kernel/net/802/stp.ko.xz"), "stp");
        assert_eq!(module_name("kernel/drivers/net/veth.ko"), "veth");
        assert_eq!(module_name("kernel/net/sched/act-bpf.ko.zst"), "act_bpf");
    }

    #[test]
    fn depends_from_modinfo() {
        let m = b"\x7fELF...\0license=GPL\0depends=stp,llc\0intree=Y\0";
        assert_eq!(depends(m), ["stp", "llc"]);
        assert!(depends(b"\0depends=\0name=veth\0").is_empty());
    }
}
