//! Command-line interface.
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "svclb",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SVCLB_GIT_COMMIT"), ")"),
    about = "eBPF load balancer for Kubernetes Services (kube-proxy replacement)"
)]
pub struct Cli {
    /// Log lines as text or as one JSON object each (on stderr).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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
    /// Remove what svclb attached and changed on this node (run in the
    /// node's network namespace, with the agent stopped): program links,
    /// XDP programs, tc filters and the clsact qdiscs it added, the sysctls
    /// it changed, its pins. Prints what it removed; running it again
    /// finds nothing. Exit status 1 when something could not be removed.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/svclb")]
        bpffs: PathBuf,
        /// Also remove kube-proxy's iptables chains, nftables tables and
        /// IPVS state, as `kube-proxy --cleanup` does (needs the iptables
        /// and nft commands).
        #[arg(long)]
        kube_proxy: bool,
        /// Remove only kube-proxy's state, leaving svclb's alone: for
        /// migrating a node while the agent runs.
        #[arg(long, conflicts_with = "kube_proxy")]
        kube_proxy_only: bool,
    },
    /// What the agent on this node runs: version, kernel features and
    /// fallbacks, devices and XDP modes, last sync, map usage.
    Status {
        #[arg(long, default_value = "/sys/fs/bpf/svclb")]
        bpffs: PathBuf,
        /// The agent's --metrics-bind-address.
        #[arg(long, default_value = "http://127.0.0.1:10249")]
        agent: String,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Inspect the external path's connection tracking.
    Conntrack {
        #[command(subcommand)]
        command: ConntrackCommand,
    },
    /// What happens to a connection on this node, and why: the frontend it
    /// matches, its Service, the backends and what a new connection gets,
    /// affinity, source ranges; with --external also the live XDP program's
    /// verdict and rewritten headers for a synthetic packet (run with
    /// BPF_PROG_RUN on private conntrack maps: nothing is recorded).
    Explain(ExplainArgs),
    /// Print the version and git commit.
    Version,
    /// Print a shell completion script, e.g.
    /// `svclb completions bash > /etc/bash_completion.d/svclb`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, clap::Args)]
pub struct ExplainArgs {
    #[arg(long, default_value = "/sys/fs/bpf/svclb")]
    pub bpffs: PathBuf,
    /// The client: ADDR or ADDR:PORT ([IPV6]:PORT).
    #[arg(long, value_parser = parse_addr_port)]
    pub from: AddrPort,
    /// The destination: ADDR:PORT/PROTO, e.g. 10.96.0.10:53/UDP.
    #[arg(long, value_parser = parse_target)]
    pub to: (std::net::SocketAddr, crate::model::Protocol),
    /// Traffic arriving from outside the node (the XDP path) instead of a
    /// connection made on it (the socket hooks).
    #[arg(long)]
    pub external: bool,
    /// The device the packet arrives on (for the XDP run's route lookup;
    /// run in the node's network namespace).
    #[arg(long, requires = "external")]
    pub device: Option<String>,
    /// Do not run the XDP program: computed answers only.
    #[arg(long, requires = "external")]
    pub no_run: bool,
    /// The client's network namespace (e.g. /proc/PID/ns/net of a process
    /// in the pod): session affinity at the socket hooks is remembered per
    /// namespace, which an address does not name.
    #[arg(long, conflicts_with = "external")]
    pub client_netns: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// ADDR:PORT/PROTO (TCP, UDP or SCTP, any case).
fn parse_target(s: &str) -> Result<(std::net::SocketAddr, crate::model::Protocol), String> {
    use crate::model::Protocol;
    let (at, proto) = s
        .rsplit_once('/')
        .ok_or("expected ADDR:PORT/PROTO, e.g. 10.96.0.10:53/UDP")?;
    let at = at
        .parse()
        .map_err(|_| "expected ADDR:PORT or [IPV6]:PORT before /PROTO".to_string())?;
    let proto = match proto.to_ascii_uppercase().as_str() {
        "TCP" => Protocol::Tcp,
        "UDP" => Protocol::Udp,
        "SCTP" => Protocol::Sctp,
        _ => return Err("protocol must be TCP, UDP or SCTP".into()),
    };
    Ok((at, proto))
}

#[derive(Debug, Subcommand)]
pub enum ConntrackCommand {
    /// Print the tracked external (XDP) flows, read from the pinned maps.
    List {
        #[arg(long, default_value = "/sys/fs/bpf/svclb")]
        bpffs: PathBuf,
        #[command(flatten)]
        filter: FlowFilter,
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Which flows `svclb conntrack list` prints (all given must match).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FlowFilter {
    /// The address the client sent to: ADDR or ADDR:PORT ([V6]:PORT).
    #[arg(long, value_parser = parse_addr_port)]
    pub frontend: Option<AddrPort>,
    /// The backend: ADDR or ADDR:PORT.
    #[arg(long, value_parser = parse_addr_port)]
    pub backend: Option<AddrPort>,
    /// The client: ADDR or ADDR:PORT.
    #[arg(long, value_parser = parse_addr_port)]
    pub client: Option<AddrPort>,
    #[arg(long, value_enum)]
    pub proto: Option<ProtoFilter>,
    /// A state as `svclb_conntrack_flows` names it, e.g. tcp_established,
    /// udp_replied, or orphan (its reply entry is gone).
    #[arg(long, value_parser = parse_ct_state)]
    pub state: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtoFilter {
    Tcp,
    Udp,
}

/// Which frontends `svclb maps dump` prints (all given must match).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct FrontendFilter {
    /// The frontends of this Service: NAMESPACE/NAME.
    #[arg(long, value_parser = parse_service)]
    pub service: Option<crate::model::ServiceId>,
    /// The frontend address: ADDR or ADDR:PORT ([V6]:PORT).
    #[arg(long, value_parser = parse_addr_port)]
    pub frontend: Option<AddrPort>,
    #[arg(long, value_enum)]
    pub scope: Option<ScopeFilter>,
}

/// Where a frontend is served (the scopes of `svclb maps dump`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ScopeFilter {
    /// Connections made on this node (the socket hooks).
    Socket,
    /// Packets arriving at --devices (XDP).
    External,
}

impl ScopeFilter {
    pub fn name(self) -> &'static str {
        match self {
            ScopeFilter::Socket => "socket",
            ScopeFilter::External => "external",
        }
    }
}

/// An address with or without a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrPort {
    pub addr: std::net::IpAddr,
    pub port: Option<u16>,
}

impl AddrPort {
    pub fn matches(&self, at: std::net::SocketAddr) -> bool {
        self.addr == at.ip() && self.port.is_none_or(|p| p == at.port())
    }
}

fn parse_addr_port(s: &str) -> Result<AddrPort, String> {
    if let Ok(at) = s.parse::<std::net::SocketAddr>() {
        return Ok(AddrPort {
            addr: at.ip(),
            port: Some(at.port()),
        });
    }
    let bare = s.trim_start_matches('[').trim_end_matches(']');
    match bare.parse() {
        Ok(addr) => Ok(AddrPort { addr, port: None }),
        Err(_) => Err("expected ADDR, ADDR:PORT or [IPV6]:PORT".into()),
    }
}

fn parse_service(s: &str) -> Result<crate::model::ServiceId, String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(crate::model::ServiceId {
                namespace: ns.into(),
                name: name.into(),
            })
        }
        _ => Err("expected NAMESPACE/NAME".into()),
    }
}

fn parse_ct_state(s: &str) -> Result<String, String> {
    let names = svclb_common::ct_state::NAMES;
    if s == "orphan" || names.contains(&s) {
        return Ok(s.into());
    }
    Err(format!("one of {}, orphan", names.join(", ")))
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Read flags from a YAML file: each field is a flag's long name in
    /// camelCase (`xdpMode: native`, `devices: [eth0]`), except nodeName.
    /// Flags on the command line override the file.
    #[arg(long)]
    pub config: Option<PathBuf>,
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
        #[command(flatten)]
        filter: FrontendFilter,
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
    fn dump_filters_parse() {
        let parse = |args: &[&str]| {
            let argv = ["svclb", "maps", "dump"].iter().chain(args);
            match Cli::try_parse_from(argv).map(|c| c.command) {
                Ok(Command::Maps {
                    command: MapsCommand::Dump { filter, .. },
                }) => Ok(filter),
                Ok(_) => unreachable!(),
                Err(e) => Err(e.to_string()),
            }
        };
        let f = parse(&["--service", "kube-system/dns", "--scope", "external"]).unwrap();
        let service = f.service.unwrap();
        assert_eq!(service.to_string(), "kube-system/dns");
        assert_eq!(f.scope, Some(ScopeFilter::External));
        let at = |s: &str| parse(&["--frontend", s]).map(|f| f.frontend.unwrap());
        let v4: std::net::IpAddr = "198.18.0.10".parse().unwrap();
        assert_eq!(
            at("198.18.0.10").unwrap(),
            AddrPort {
                addr: v4,
                port: None
            }
        );
        assert_eq!(at("198.18.0.10:80").unwrap().port, Some(80));
        assert_eq!(at("[fd00::1]:53").unwrap().port, Some(53));
        assert_eq!(at("fd00::1").unwrap().port, None);
        assert!(at("198.18.0.10:http").is_err());
        for bad in ["dns", "/dns", "ns/", "a/b/c"] {
            assert!(parse(&["--service", bad]).is_err(), "{bad}");
        }
        assert!(parse(&["--scope", "cluster"]).is_err());
    }

    #[test]
    fn explain_targets_parse() {
        use crate::model::Protocol;
        assert_eq!(
            parse_target("10.96.0.10:53/udp"),
            Ok(("10.96.0.10:53".parse().unwrap(), Protocol::Udp))
        );
        assert_eq!(
            parse_target("[fd00::10]:80/TCP"),
            Ok(("[fd00::10]:80".parse().unwrap(), Protocol::Tcp))
        );
        assert!(parse_target("10.96.0.10:53").is_err());
        assert!(parse_target("10.96.0.10/TCP").is_err());
        assert!(parse_target("10.96.0.10:53/ICMP").is_err());
        assert!(Cli::try_parse_from([
            "svclb",
            "explain",
            "--from",
            "1.2.3.4",
            "--to",
            "5.6.7.8:80/TCP",
            "--device",
            "eth0"
        ])
        .is_err());
    }

    #[test]
    fn addr_port_matches_address_and_port_if_given() {
        let sa = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        let any_port = parse_addr_port("198.18.0.10").unwrap();
        assert!(any_port.matches(sa("198.18.0.10:80")));
        assert!(!any_port.matches(sa("198.18.0.11:80")));
        let port = parse_addr_port("198.18.0.10:80").unwrap();
        assert!(port.matches(sa("198.18.0.10:80")));
        assert!(!port.matches(sa("198.18.0.10:81")));
    }

    #[test]
    fn conntrack_states_are_the_metrics_names() {
        assert!(parse_ct_state("tcp_established").is_ok());
        assert!(parse_ct_state("orphan").is_ok());
        assert!(parse_ct_state("ESTABLISHED").is_err());
    }

    #[test]
    fn log_format_is_global() {
        let cli =
            Cli::try_parse_from(["svclb", "run", "--node-name", "n1", "--log-format", "json"])
                .unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        assert!(Cli::try_parse_from(["svclb", "--log-format", "xml", "version"]).is_err());
    }

    #[test]
    fn completions_cover_the_subcommands() {
        use clap::CommandFactory;
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "svclb", &mut script);
            let script = String::from_utf8(script).expect("utf-8");
            for word in ["conntrack", "status", "service", "log-format"] {
                assert!(script.contains(word), "{shell}: {word}");
            }
        }
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
