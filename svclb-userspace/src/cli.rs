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
    Run(RunArgs),
    /// Inspect the pinned BPF maps.
    Maps {
        #[command(subcommand)]
        command: MapsCommand,
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
    #[arg(long, default_value = crate::health::DEFAULT_HEALTHZ_BIND_ADDRESS)]
    pub healthz_bind_address: std::net::SocketAddr,
    /// Serve Prometheus /metrics and /proxyMode on this address.
    #[arg(long, default_value = crate::metrics::DEFAULT_METRICS_BIND_ADDRESS)]
    pub metrics_bind_address: std::net::SocketAddr,
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
