//! Command-line interface.
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "svclb",
    version,
    about = "eBPF load balancer for Kubernetes Services (kube-proxy replacement)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: keep this node's BPF maps in sync with the cluster's Services.
    Run(Box<RunArgs>),
    /// Inspect the pinned BPF maps.
    Maps {
        #[command(subcommand)]
        command: MapsCommand,
    },
    /// Compare the pinned maps with the running agent's desired state:
    /// prints every difference; exit status 0 when none, 1 when any, 2 on
    /// errors.
    Verify {
        #[arg(long, default_value = "/sys/fs/bpf/svclb")]
        bpffs: PathBuf,
        /// The agent's --metrics-bind-address, where it serves its desired state.
        #[arg(long, default_value = "http://127.0.0.1:10249")]
        agent: String,
        /// Compare with a desired state saved earlier from the agent's
        /// /debug/svclb/desired instead (e.g. while the agent is down).
        #[arg(long, conflicts_with = "agent")]
        desired: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Read Service, EndpointSlice and Node objects from YAML/JSON files in
    /// this directory (and watch it) instead of the Kubernetes API.
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// kubeconfig file for the Kubernetes API (default: $KUBECONFIG,
    /// ~/.kube/config, then the in-cluster service account).
    #[arg(long, conflicts_with = "manifests")]
    pub kubeconfig: Option<PathBuf>,
    /// This node's name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// cgroup v2 directory the socket programs attach to (default: the cgroup2 mount root).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for this agent's pinned maps and links (one per agent).
    #[arg(long, default_value = "/sys/fs/bpf/svclb")]
    pub bpffs: PathBuf,
    /// Serve kube-proxy compatible /healthz and /livez on this address.
    #[arg(long, default_value = crate::serve::healthz::DEFAULT_HEALTHZ_BIND_ADDRESS)]
    pub healthz_bind_address: std::net::SocketAddr,
    /// Serve Prometheus /metrics and /proxyMode on this address.
    #[arg(long, default_value = crate::serve::metrics::DEFAULT_METRICS_BIND_ADDRESS)]
    pub metrics_bind_address: std::net::SocketAddr,
    /// The node's external devices (comma-separated): NodePort, LoadBalancer
    /// and ExternalIP traffic from outside is handled there by XDP, and
    /// replies by tc egress. None (or empty): only traffic from this node
    /// is served.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// XDP attach mode on --devices.
    #[arg(long, value_enum, default_value_t = crate::dataplane::XdpModeChoice::Auto)]
    pub xdp_mode: crate::dataplane::XdpModeChoice,
    /// The largest Maglev table (a prime); each external frontend's table
    /// is sized from its backend count up to this (see maglev::size_for).
    #[arg(long, default_value_t = crate::dataplane::maglev::DEFAULT_TABLE_SIZE, value_parser = parse_maglev_size)]
    pub maglev_table_size: u32,
    /// Conntrack entries for external traffic, per IP family (LRU: the
    /// oldest flows are evicted when full; see
    /// svclb_conntrack_evictions_total).
    #[arg(long, default_value_t = svclb_common::maps::CONNTRACK_MAX_ENTRIES)]
    pub conntrack_size: u32,
    /// How long an unconnected UDP socket's datagrams to a service keep
    /// going to the same backend after the last one, until a reply is
    /// received (kube-proxy's conntrack.udpTimeout; netfilter's default).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub udp_timeout: std::time::Duration,
    /// The same once a reply was received (conntrack.udpStreamTimeout).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub udp_stream_timeout: std::time::Duration,
    /// Source ports for SNAT to remote backends, MIN-MAX. Keep it outside
    /// net.ipv4.ip_local_port_range (32768-60999 by default).
    #[arg(long, default_value = "61000-65535", value_parser = parse_port_range)]
    pub snat_ports: (u16, u16),
    /// Conntrack lifetimes of external flows: how long a flow may be idle
    /// in each state before its entries are removed and its SNAT port
    /// freed (netfilter's states and defaults, kube-proxy's for
    /// established and close wait). TCP before any reply:
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub ct_tcp_syn_sent: std::time::Duration,
    /// TCP answered (kube-proxy's --conntrack-tcp-timeout-established).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ct_tcp_established: std::time::Duration,
    /// TCP after a FIN one way (kube-proxy's --conntrack-tcp-timeout-close-wait).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ct_tcp_close_wait: std::time::Duration,
    /// TCP after FINs both ways. Its SNAT port may go to a new flow at once.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub ct_tcp_time_wait: std::time::Duration,
    /// TCP after a RST. Its SNAT port may go to a new flow at once.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub ct_tcp_close: std::time::Duration,
    /// UDP before any reply.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ct_udp: std::time::Duration,
    /// UDP once answered (kube-proxy's --conntrack-udp-timeout-stream).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub ct_udp_replied: std::time::Duration,
    /// How often the agent removes expired conntrack entries (with --devices).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub ct_sweep_interval: std::time::Duration,
    /// How often every service is applied again even without changes (the
    /// maps are rewritten only where they differ), e.g. 30s, 1m. /healthz
    /// turns unhealthy when changes wait longer than twice this.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub sync_period: std::time::Duration,
    /// How long each watch of the Kubernetes API may last before the API
    /// server ends it (it is then resumed). A watch that brings nothing,
    /// not even a bookmark, for 5 s more than this is taken as stalled and
    /// started again. At least 1s.
    #[arg(long, default_value = "290s", value_parser = parse_duration)]
    pub watch_timeout: std::time::Duration,
    /// Testing only: make each BPF map write or delete fail with this
    /// probability (0..1), to exercise the retries.
    #[arg(long, hide = true, default_value_t = 0.0, value_parser = parse_fault_rate)]
    pub inject_map_faults: f64,
}

impl RunArgs {
    pub fn ct_timeouts(&self) -> crate::dataplane::conntrack::Timeouts {
        crate::dataplane::conntrack::Timeouts {
            tcp_syn_sent: self.ct_tcp_syn_sent,
            tcp_established: self.ct_tcp_established,
            tcp_close_wait: self.ct_tcp_close_wait,
            tcp_time_wait: self.ct_tcp_time_wait,
            tcp_close: self.ct_tcp_close,
            udp_unreplied: self.ct_udp,
            udp_replied: self.ct_udp_replied,
        }
    }
}

/// A positive duration such as 30s, 1m or 1h30m (Go's spelling, as
/// kube-proxy's flags take it).
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let d: k8s_openapi::jiff::SignedDuration = s.parse().map_err(|e| format!("{e}"))?;
    match std::time::Duration::try_from(d) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err("must be positive".into()),
    }
}

fn parse_fault_rate(s: &str) -> Result<f64, String> {
    let rate: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err("must be between 0 and 1".into());
    }
    Ok(rate)
}

fn parse_maglev_size(s: &str) -> Result<u32, String> {
    let m: u32 = s.parse().map_err(|e| format!("{e}"))?;
    crate::dataplane::maglev::validate_table_size(m)?;
    Ok(m)
}

fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected MIN-MAX")?;
    let a: u16 = a.trim().parse().map_err(|e| format!("{e}"))?;
    let b: u16 = b.trim().parse().map_err(|e| format!("{e}"))?;
    if a == 0 || a > b {
        return Err("need 1 <= MIN <= MAX".into());
    }
    Ok((a, b))
}

#[derive(Debug, Subcommand)]
pub enum MapsCommand {
    /// Print every frontend with its backends, as the kernel sees them.
    Dump {
        #[arg(long, default_value = "/sys/fs/bpf/svclb")]
        bpffs: PathBuf,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sync_period_takes_go_durations() {
        let parse = |args: &[&str]| {
            let argv = ["svclb", "run", "--node-name", "n1"].iter().chain(args);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Run(a)) => Ok(a.sync_period),
                Ok(_) => unreachable!(),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(parse(&[]), Ok(Duration::from_secs(30)));
        assert_eq!(parse(&["--sync-period", "1m"]), Ok(Duration::from_secs(60)));
        assert_eq!(
            parse(&["--sync-period=1h30m"]),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(
            parse(&["--sync-period", "250ms"]),
            Ok(Duration::from_millis(250))
        );
        for bad in ["0s", "-5s", "soon", "30"] {
            assert!(parse(&["--sync-period", bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn conntrack_timeouts_default_to_kube_proxy_and_netfilter() {
        let argv = [
            "svclb",
            "run",
            "--node-name",
            "n1",
            "--ct-tcp-time-wait",
            "2s",
        ];
        let Ok(Command::Run(a)) = Cli::try_parse_from(argv).map(|c| c.command) else {
            panic!("parses");
        };
        let t = a.ct_timeouts();
        assert_eq!(t.tcp_established, Duration::from_secs(86_400));
        assert_eq!(t.tcp_close_wait, Duration::from_secs(3_600));
        assert_eq!(t.tcp_time_wait, Duration::from_secs(2));
        assert_eq!(
            t,
            crate::dataplane::conntrack::Timeouts {
                tcp_time_wait: Duration::from_secs(2),
                ..Default::default()
            }
        );
    }

    #[test]
    fn inject_map_faults_is_hidden_and_a_probability() {
        let parse = |args: &[&str]| {
            let argv = ["svclb", "run", "--node-name", "n1"].iter().chain(args);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Run(a)) => Ok(a.inject_map_faults),
                Ok(_) => unreachable!(),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(parse(&[]), Ok(0.0));
        assert_eq!(parse(&["--inject-map-faults", "0.01"]), Ok(0.01));
        for bad in ["-0.1", "1.5", "often"] {
            assert!(parse(&["--inject-map-faults", bad]).is_err(), "{bad}");
        }
        let help = match Cli::try_parse_from(["svclb", "run", "--help"]) {
            Err(e) => e.to_string(),
            Ok(_) => unreachable!("--help exits"),
        };
        assert!(help.contains("--sync-period"), "{help}");
        assert!(!help.contains("inject"), "{help}");
    }
}
