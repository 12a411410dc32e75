//! Mount points from /proc/self/mountinfo. The cgroup2 and bpf file
//! systems are mounted at different places on different machines
//! (/sys/fs/cgroup or /sys/fs/cgroup/unified), so they are looked up, never
//! assumed. The agent, its tests and the tests crate share this parser.
use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The directory of the file system mounted ("/" for a whole one).
    pub root: String,
    pub point: PathBuf,
    pub fstype: String,
}

impl Mount {
    /// The whole file system is mounted here, not a subdirectory of it.
    pub fn is_whole(&self) -> bool {
        self.root == "/"
    }
}

/// The mounts of mountinfo `text`, in its order; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mountpoint opts [optional...] - fstype source superopts
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let fstype = right.split(' ').next().filter(|t| !t.is_empty())?;
            Some(Mount {
                root: unescape(fields.get(3)?),
                point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

/// The calling process's mounts.
pub fn read() -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = |j: usize| b.get(j).is_some_and(|c| (b'0'..=b'7').contains(c));
        if b[i] == b'\\' && octal(i + 1) && octal(i + 2) && octal(i + 3) {
            let d = |j: usize| u32::from(b[j] - b'0');
            out.push((d(i + 1) * 64 + d(i + 2) * 8 + d(i + 3)) as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hybrid layout (cgroup v1 controllers and v2 at .../unified), a
    /// bpffs, a cgroup2 subtree bind-mounted elsewhere, a path with a space.
    const SAMPLE: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
30 26 0:28 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:13 - cgroup cgroup rw,cpu,cpuacct
41 22 0:36 / /sys/fs/bpf rw,relatime shared:20 - bpf bpf rw
50 1 0:25 /kubepods /mnt/pods\\040cg rw shared:30 - cgroup2 cgroup2 rw
malformed line without separator
";

    fn find<'a>(mounts: &'a [Mount], fstype: &str) -> Vec<&'a Mount> {
        mounts.iter().filter(|m| m.fstype == fstype).collect()
    }

    #[test]
    fn finds_cgroup2_and_bpffs() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 6);
        let cgroup2 = find(&mounts, "cgroup2");
        assert_eq!(cgroup2.len(), 2);
        assert_eq!(cgroup2[0].point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert!(cgroup2[0].is_whole());
        assert_eq!(cgroup2[1].root, "/kubepods");
        assert_eq!(cgroup2[1].point, PathBuf::from("/mnt/pods cg"));
        assert!(!cgroup2[1].is_whole());
        let bpf = find(&mounts, "bpf");
        assert_eq!(bpf.len(), 1);
        assert_eq!(bpf[0].point, PathBuf::from("/sys/fs/bpf"));
    }

    #[test]
    fn unescapes_octal() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape(r"\"), r"\");
    }
}
