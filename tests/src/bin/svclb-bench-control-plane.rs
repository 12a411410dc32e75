//! `cargo xtask bench control-plane`: the control plane at scale, through
//! the real translation and the real BPF maps (no API server: objects are
//! generated in memory, as a watcher would deliver them).
//!
//! Prints the time to the first complete sync, the latency from one
//! EndpointSlice change to its map update (p50/p99), and peak RSS, with the
//! targets beside them. Timings are printed, never asserted.
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use svclb_tests::mounts::cgroup2_root;
use svclb_userspace::dataplane::{Dataplane, DataplaneConfig};
use svclb_userspace::model::{NodeContext, Object, ObjectStore, ServiceId};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 10)]
    endpoints: usize,
    #[arg(long, default_value_t = 1_000)]
    changes: usize,
    /// The services' protocol: TCP or UDP (UDP socket frontends also list
    /// their backends in SVCLB_AFF_MATCH, for unconnected UDP flows).
    #[arg(long, default_value = "TCP")]
    protocol: String,
}

/// 198.18.0.0/15 holds 131,072 addresses: pods from the bottom, service IPs
/// and replacement endpoints from the top half.
fn addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + index as u32)
}

fn service(i: usize, protocol: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": addr(100_000 + i).to_string(),
                 "ports": [{"name": "http", "port": 80, "protocol": protocol}]},
    }))
    .expect("generated Service")
}

fn slice(i: usize, endpoints: &[Ipv4Addr], protocol: &str) -> EndpointSlice {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}-abc"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": protocol}],
        "endpoints": endpoints,
    }))
    .expect("generated EndpointSlice")
}

fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

/// What the kernel charges for the pinned map `name` (fdinfo's memlock:
/// entries, buckets and preallocated elements, from Linux 6.4 on).
fn map_memory(bpffs: &std::path::Path, name: &str) -> Option<u64> {
    use std::os::fd::{AsFd, AsRawFd};
    let map = aya::maps::MapData::from_pin(bpffs.join(name)).ok()?;
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// A bpffs directory and an empty cgroup of our own, removed on drop.
struct Scratch {
    bpffs: PathBuf,
    cgroup: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.bpffs);
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let name = format!("svclb-bench-cp-{}", std::process::id());
    let scratch = Scratch {
        bpffs: PathBuf::from("/sys/fs/bpf").join(&name),
        cgroup: cgroup2_root()?.join(&name),
    };
    std::fs::create_dir_all(&scratch.cgroup).context("creating the bench cgroup")?;
    let mut dataplane = Dataplane::start(&DataplaneConfig::socket_only(
        scratch.bpffs.clone(),
        scratch.cgroup.clone(),
    ))?;
    let node = NodeContext::from_node("bench-node", None);

    // Objects as a watcher's initial list would deliver them.
    let mut endpoints: Vec<Vec<Ipv4Addr>> = (0..args.services)
        .map(|i| {
            (0..args.endpoints)
                .map(|j| addr(i * args.endpoints + j))
                .collect()
        })
        .collect();
    let objects: Vec<Object> = (0..args.services)
        .flat_map(|i| {
            [
                Object::Service(Box::new(service(i, &args.protocol))),
                Object::EndpointSlice(Box::new(slice(i, &endpoints[i], &args.protocol))),
            ]
        })
        .collect();

    println!(
        "svclb control plane: {} {} services x {} endpoints, real translation and BPF maps",
        args.services, args.protocol, args.endpoints
    );
    let start = Instant::now();
    let mut store = ObjectStore::new();
    let (affected, warnings) = store.replace_all(objects);
    anyhow::ensure!(
        warnings.is_empty(),
        "generated objects are invalid: {warnings:?}"
    );
    let mut in_maps = Duration::ZERO;
    for id in &affected {
        let t = store.translate(id, &node).context("service vanished")?;
        let t0 = Instant::now();
        dataplane.apply(id, &t.frontends)?;
        in_maps += t0.elapsed();
    }
    dataplane.finish_initial_sync()?;
    let first_sync = start.elapsed();
    let (entries, backends) = dataplane.writer.usage();
    println!(
        "  first complete sync:      {:>9.3} s   (target <= 2 s; {:.3} s of it writing {entries} service-map entries and {backends} backends)",
        first_sync.as_secs_f64(),
        in_maps.as_secs_f64()
    );

    // One endpoint of one service replaced per change, spread over services.
    let mut visible = Vec::with_capacity(args.changes);
    let mut flushes = Vec::with_capacity(args.changes);
    let spare = 110_000 + args.services;
    for c in 0..args.changes {
        let i = (c * 7919) % args.services;
        endpoints[i][c % args.endpoints] = addr(spare + c % 20_000);
        let changed = Object::EndpointSlice(Box::new(slice(i, &endpoints[i], &args.protocol)));
        let t0 = Instant::now();
        let (affected, _) = store.upsert(changed);
        for id in &affected {
            let t = store.translate(id, &node).context("service vanished")?;
            dataplane.apply(id, &t.frontends)?;
        }
        visible.push(t0.elapsed());
        let t1 = Instant::now();
        dataplane.writer.flush()?;
        flushes.push(t1.elapsed());
        anyhow::ensure!(
            affected
                == [ServiceId {
                    namespace: "bench".into(),
                    name: format!("svc-{i}")
                }]
                .into(),
            "unexpected affected set {affected:?}"
        );
    }
    visible.sort();
    flushes.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  slice change -> maps:     p50 {:>7.3} ms  p99 {:>7.3} ms   (target p99 <= 5 ms; {} changes)",
        ms(percentile(&visible, 0.5)),
        ms(percentile(&visible, 0.99)),
        args.changes
    );
    println!(
        "  stale-entry cleanup:      p50 {:>7.3} ms  p99 {:>7.3} ms   (after the change is live: one RCU grace period)",
        ms(percentile(&flushes, 0.5)),
        ms(percentile(&flushes, 0.99))
    );
    println!(
        "  peak RSS:                 {:>9.1} MiB (target <= 200 MiB)",
        peak_rss_mib()
    );
    for map in [
        svclb_common::maps::SERVICES,
        svclb_common::maps::AFFINITY_MATCH,
        svclb_common::maps::UDP_FLOWS,
    ] {
        println!(
            "  kernel memory {map:<18} {:>7.1} MiB (the kernel's estimate, fdinfo memlock)",
            map_memory(&scratch.bpffs, map).unwrap_or(0) as f64 / (1 << 20) as f64
        );
    }
    // What the agent does once per --sync-period (30 s by default).
    let t0 = Instant::now();
    let drift = dataplane.check_drift()?;
    anyhow::ensure!(
        drift.is_empty(),
        "unexpected drift: {:?}",
        &drift[..drift.len().min(5)]
    );
    println!(
        "  drift check:              {:>9.3} s   (every map entry read and compared; once per sync period; peak RSS now {:.1} MiB)",
        t0.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    println!();
    println!("For comparison: kube-proxy's iptables mode rewrites its whole ruleset per sync, so its sync");
    println!(
        "time grows with the number of services and endpoints (seconds at tens of thousands of"
    );
    println!(
        "services); its nftables mode applies changes incrementally. See the Kubernetes blog post"
    );
    println!("'NFTables mode for kube-proxy' (2025-02-28) for their measured latencies.");
    Ok(())
}
