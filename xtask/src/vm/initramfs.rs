//! The guest's initramfs: a newc cpio archive (the format the kernel
//! unpacks), written directly so that files can be placed at any guest
//! path without staging copies of the (large, debug) test binaries.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

enum Entry {
    Dir,
    /// Contents and permission bits.
    File(Vec<u8>, u32),
    Symlink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
}

/// Guest path (absolute) -> entry. Paths order component-wise, so parents
/// come before their children, as the kernel's unpacker needs.
#[derive(Default)]
pub struct Initramfs {
    entries: BTreeMap<PathBuf, Entry>,
}

impl Initramfs {
    pub fn dir(&mut self, path: impl AsRef<Path>) {
        let path = path.as_ref();
        for p in path.ancestors().filter(|p| *p != Path::new("/")) {
            self.entries.entry(p.to_owned()).or_insert(Entry::Dir);
        }
    }

    fn add(&mut self, path: &Path, entry: Entry) {
        if let Some(parent) = path.parent() {
            self.dir(parent);
        }
        self.entries.insert(path.to_owned(), entry);
    }

    pub fn file(&mut self, path: impl AsRef<Path>, data: Vec<u8>, mode: u32) {
        self.add(path.as_ref(), Entry::File(data, mode));
    }

    pub fn symlink(&mut self, path: impl AsRef<Path>, target: &str) {
        self.add(path.as_ref(), Entry::Symlink(target.to_owned()));
    }

    pub fn char_dev(&mut self, path: impl AsRef<Path>, major: u32, minor: u32) {
        self.add(path.as_ref(), Entry::CharDev(major, minor));
    }

    /// A host file at guest path `path` (symlinks followed).
    pub fn host_file(&mut self, path: impl AsRef<Path>, host: &Path) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        let mode = fs::metadata(host)?.permissions().mode() & 0o7777;
        self.file(path, data, mode);
        Ok(())
    }

    /// A host executable at the same path in the guest, with the shared
    /// libraries and the dynamic loader it needs (its ldd closure).
    pub fn binary(&mut self, host: &Path) -> Result<()> {
        self.binary_at(host, host)
    }

    /// A host executable at guest path `path`; its libraries keep their paths.
    pub fn binary_at(&mut self, path: impl AsRef<Path>, host: &Path) -> Result<()> {
        self.host_file(path, host)?;
        for lib in shared_libs(host)? {
            if !self.entries.contains_key(&lib) {
                self.host_file(&lib, &lib)?;
            }
        }
        Ok(())
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        let mut w = BufWriter::new(
            File::create(out).with_context(|| format!("creating {}", out.display()))?,
        );
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let name = path.strip_prefix("/").unwrap_or(path).to_string_lossy();
            let (mode, data, rdev) = match entry {
                Entry::Dir => (0o040755, &[][..], (0, 0)),
                Entry::File(data, perm) => (0o100000 | perm, &data[..], (0, 0)),
                Entry::Symlink(target) => (0o120777, target.as_bytes(), (0, 0)),
                Entry::CharDev(major, minor) => (0o020600, &[][..], (*major, *minor)),
            };
            write_entry(&mut w, ino as u32 + 1, &name, mode, data, rdev)?;
        }
        write_entry(&mut w, 0, "TRAILER!!!", 0, &[], (0, 0))?;
        w.flush()?;
        Ok(())
    }
}

/// One newc record: header, NUL-terminated name and data, each padded to 4 bytes.
fn write_entry(
    w: &mut impl Write,
    ino: u32,
    name: &str,
    mode: u32,
    data: &[u8],
    rdev: (u32, u32),
) -> Result<()> {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        u32::try_from(data.len()).context("file too large for cpio")?,
        0, // dev major, minor
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    let mut header = String::from("070701");
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    pad(w, header.len() + name.len() + 1)?;
    w.write_all(data)?;
    pad(w, data.len())?;
    Ok(())
}

fn pad(w: &mut impl Write, len: usize) -> Result<()> {
    w.write_all(&[0; 3][..(4 - len % 4) % 4])?;
    Ok(())
}

/// The shared libraries (and loader) `ldd` resolves for `bin`; none for a
/// static binary.
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    // ldd fails with "not a dynamic executable" for static binaries.
    if !out.status.success() {
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
        // "/lib64/ld-linux-x86-64.so.2 (0x...)" or "linux-vdso.so.1 (0x...)".
        let resolved = line.split_once("=>").map_or(line, |(_, r)| r).trim();
        if resolved.starts_with("not found") {
            bail!("{}: {}", bin.display(), line.trim());
        }
        let path = resolved.split(" (").next().unwrap_or("");
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_records_are_padded() {
        let mut buf = Vec::new();
        write_entry(&mut buf, 1, "init", 0o100755, b"#!", (0, 0)).unwrap();
        // 110-byte header + "init\0" = 115 -> 116; 2 data bytes -> 4.
        assert_eq!(buf.len(), 116 + 4);
        assert!(buf.starts_with(b"070701"));
    }

    #[test]
    fn parents_come_first() {
        let mut image = Initramfs::default();
        image.file("/a/b/c", vec![], 0o644);
        image.symlink("/a-b", "a");
        let order: Vec<_> = image
            .entries
            .keys()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(order, ["/a", "/a/b", "/a/b/c", "/a-b"]);
    }
}
