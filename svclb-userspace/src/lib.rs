//! svclb: a kube-proxy replacement built on eBPF socket hooks.
//!
//! Data flows source -> model -> dataplane -> kernel:
//! - [`source`] reads Kubernetes objects (the API server, or a manifests
//!   directory);
//! - [`model`] turns them into desired frontends and backend sets (pure);
//! - [`dataplane`] diffs desired against applied state and writes BPF maps;
//! - the programs in svclb-ebpf read those maps per connection.
//!
//! [`agent`] starts everything and runs that loop; [`serve`] answers
//! kube-proxy's HTTP endpoints (health, metrics, health check node ports);
//! [`dump`] shows what the maps hold; [`verify`] compares them with the
//! agent's desired state; [`config`] reads `svclb run --config FILE`;
//! [`conntrack_list`] lists the external flows; [`status`] reports
//! versions, kernel features, devices, syncs and map usage; [`cleanup`]
//! removes svclb (and kube-proxy) from a node.

pub mod agent;
pub mod cleanup;
pub mod cli;
pub mod config;
pub mod conntrack_list;
pub mod dataplane;
pub mod dump;
pub mod explain;
pub mod model;
pub mod serve;
pub mod source;
pub mod status;
pub mod verify;
