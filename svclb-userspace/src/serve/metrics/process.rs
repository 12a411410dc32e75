//! The `process_*` series Go's process collector adds to every kube-proxy,
//! with its names and help texts, read from /proc/self as it does.
use std::fs;
use std::io;

use super::single;

/// One reading of this process's resource use.
pub(super) struct ProcessStats {
    cpu_seconds: f64,
    open_fds: f64,
    max_fds: f64,
    virtual_memory_bytes: f64,
    virtual_memory_max_bytes: f64,
    resident_memory_bytes: f64,
    start_time_seconds: f64,
}

impl ProcessStats {
    pub(super) fn read() -> io::Result<Self> {
        let stat = fs::read_to_string("/proc/self/stat")?;
        // The command name (field 2) may hold spaces and parentheses: the
        // numeric fields follow its last ')', starting with field 3.
        let (_, after_comm) = stat
            .rsplit_once(')')
            .ok_or_else(|| invalid("/proc/self/stat"))?;
        let fields: Vec<&str> = after_comm.split_whitespace().collect();
        let field = |n: usize| {
            fields
                .get(n - 3)
                .and_then(|v| v.parse::<u64>().ok())
                .map(|v| v as f64)
                .ok_or_else(|| invalid("/proc/self/stat"))
        };
        // SAFETY: sysconf only reads its argument.
        let (ticks, page_size) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK) as f64,
                libc::sysconf(libc::_SC_PAGESIZE) as f64,
            )
        };
        Ok(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) / ticks,
            open_fds: fs::read_dir("/proc/self/fd")?.count() as f64,
            max_fds: soft_limit(libc::RLIMIT_NOFILE)?,
            virtual_memory_bytes: field(23)?,
            virtual_memory_max_bytes: soft_limit(libc::RLIMIT_AS)?,
            resident_memory_bytes: field(24)? * page_size,
            start_time_seconds: boot_time()? + field(22)? / ticks,
        })
    }

    /// The series in name order, as they sort among the others.
    pub(super) fn render(&self, out: &mut String) {
        let series = [
            (
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
                "counter",
                self.cpu_seconds,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                "gauge",
                self.max_fds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                "gauge",
                self.open_fds,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                "gauge",
                self.resident_memory_bytes,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                "gauge",
                self.start_time_seconds,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                "gauge",
                self.virtual_memory_bytes,
            ),
            (
                "process_virtual_memory_max_bytes",
                "Maximum amount of virtual memory available in bytes.",
                "gauge",
                self.virtual_memory_max_bytes,
            ),
        ];
        for (name, help, kind, value) in series {
            single(out, name, help, kind, value);
        }
    }
}

/// getrlimit's resource argument: glibc has its own type, musl an int.
#[cfg(target_env = "gnu")]
type Resource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type Resource = libc::c_int;

/// A resource's soft limit; unlimited is u64::MAX, as Go reports it.
fn soft_limit(resource: Resource) -> io::Result<f64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct we pass.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit.rlim_cur as f64)
}

/// When the machine booted, in seconds since the epoch (/proc/stat btime):
/// /proc/self/stat counts the start time from boot.
fn boot_time() -> io::Result<f64> {
    let stat = fs::read_to_string("/proc/stat")?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        .map(|t| t as f64)
        .ok_or_else(|| invalid("/proc/stat"))
}

fn invalid(file: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("unexpected {file}"))
}
