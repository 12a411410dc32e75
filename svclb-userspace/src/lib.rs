//! svclb: a kube-proxy replacement built on eBPF socket hooks.
//!
//! Data flows source -> model -> dataplane -> kernel:
//! - [`source`] reads Kubernetes objects (manifests directory, API server later);
//! - [`model`] turns them into desired frontends and backend sets (pure);
//! - [`dataplane`] diffs desired against applied state and writes BPF maps;
//! - the programs in svclb-ebpf read those maps per connection.
//!
//! [`agent`] runs that loop; [`dump`] shows what the maps hold.

pub mod agent;
pub mod cli;
pub mod dataplane;
pub mod dump;
pub mod health;
pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod model;
pub mod source;
