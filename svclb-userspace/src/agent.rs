//! The agent: start-up (source, HTTP endpoints, dataplane), then the
//! [`SyncLoop`] fed with the source's events until a signal stops it.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::cli::RunArgs;
use crate::dataplane::drift::Published;
use crate::dataplane::{Dataplane, DataplaneConfig};
use crate::serve::health_check_ports::HealthCheckServers;
use crate::serve::healthz::{self, ProxyHealth};
use crate::serve::metrics::{self, Metrics};
use crate::serve::Server;
use crate::source::{kube, Source, SourceEvent};

mod events;
mod retry;
mod sync_loop;

pub use events::EventSink;

pub use sync_loop::SyncLoop;

pub async fn run(mut args: RunArgs) -> anyhow::Result<()> {
    // `--devices=` (an empty ConfigMap value) means none.
    args.devices.retain(|d| !d.is_empty());
    let source = match args.manifests.clone() {
        Some(dir) => Source::Manifests(dir),
        None => Source::Kube {
            client: kube::client(args.kubeconfig.as_deref())
                .await
                .context("configuring the Kubernetes API client")?,
            watch_timeout: args.watch_timeout,
        },
    };
    let cgroup = match args.cgroup.clone() {
        Some(c) => c,
        None => cgroup2_root().context("finding the cgroup2 mount (pass --cgroup)")?,
    };
    let metrics = Arc::new(Metrics::new());
    // kube-proxy's health timeout: two sync periods.
    let health = Arc::new(ProxyHealth::new(2 * args.sync_period).with_metrics(metrics.clone()));
    let desired = Arc::new(Published::default());
    // Before the programs load, so a taken port fails the start-up.
    serve_endpoints(&args, &health, &metrics, &desired).await?;
    raise_memlock_rlimit();
    if args.inject_map_faults > 0.0 {
        tracing::warn!(
            rate = args.inject_map_faults,
            "injecting BPF map write faults (--inject-map-faults): for tests only"
        );
    }
    let dataplane = Dataplane::start(&DataplaneConfig {
        bpffs: args.bpffs.clone(),
        cgroup: cgroup.clone(),
        devices: args.devices.clone(),
        xdp_mode: args.xdp_mode,
        maglev_table_size: args.maglev_table_size,
        conntrack_size: args.conntrack_size,
        udp_timeouts: crate::dataplane::loader::UdpTimeouts {
            idle: args.udp_timeout,
            stream: args.udp_stream_timeout,
        },
        snat_ports: args.snat_ports,
        inject_map_faults: args.inject_map_faults,
    })
    .context("starting the dataplane")?;
    tracing::info!(cgroup = %cgroup.display(), bpffs = %args.bpffs.display(), node = %args.node_name, "programs attached");
    metrics.watch_sockets_destroyed(dataplane.sockets_destroyed());
    metrics.set_info(crate::status::AgentInfo {
        version: crate::status::VERSION.into(),
        commit: crate::status::COMMIT.into(),
        node: args.node_name.clone(),
        bpffs: args.bpffs.display().to_string(),
        features: Some(crate::dataplane::loader::probe_features()),
        devices: (dataplane.xdp_modes().iter())
            .map(|(device, mode)| crate::status::DeviceMode {
                device: device.clone(),
                xdp_mode: mode.to_string(),
            })
            .collect(),
    });
    if !args.devices.is_empty() {
        let capacity = (args.snat_ports.1 - args.snat_ports.0) as u64 + 1;
        spawn_external_stats(args.bpffs.clone(), metrics.clone());
        spawn_conntrack_sweeper(&args, capacity, metrics.clone())?;
    }

    let events = match &source {
        Source::Kube { client, .. } => EventSink::to_api(client.clone(), &args.node_name),
        Source::Manifests(_) => EventSink::none(),
    };
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(source.run(args.node_name.clone(), tx));
    let health_checks = HealthCheckServers::new(health.clone());
    let sync = SyncLoop::new(
        &args.node_name,
        dataplane,
        health,
        metrics,
        health_checks,
        args.sync_period,
        desired,
    )
    .with_events(events);
    sync_until_signal(sync, rx).await?;
    // The links and maps stay pinned: traffic keeps flowing until the next agent.
    tracing::info!("exiting; programs stay attached");
    Ok(())
}

/// Bind --healthz-bind-address and --metrics-bind-address, and serve them.
async fn serve_endpoints(
    args: &RunArgs,
    health: &Arc<ProxyHealth>,
    metrics: &Arc<Metrics>,
    desired: &Arc<Published>,
) -> anyhow::Result<()> {
    let healthz_server = Server::bind(args.healthz_bind_address)
        .await
        .context("--healthz-bind-address")?;
    let metrics_server = Server::bind(args.metrics_bind_address)
        .await
        .context("--metrics-bind-address")?;
    tokio::spawn(healthz::serve_on(healthz_server, health.clone()));
    tokio::spawn(metrics::serve_with_desired(
        metrics_server,
        metrics.clone(),
        desired.clone(),
    ));
    Ok(())
}

/// Feed the source's events to `sync`, and flush it after each burst and
/// whenever a retry or the periodic resync is due, until SIGTERM or
/// SIGINT; an error if the source stops.
async fn sync_until_signal(
    mut sync: SyncLoop,
    mut events: mpsc::Receiver<SourceEvent>,
) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    loop {
        let wakeup = tokio::time::Instant::from_std(sync.next_wakeup());
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else {
                    bail!("the object source stopped");
                };
                sync.handle(event);
                // Take whatever else is queued so a burst becomes one update per service.
                while let Ok(event) = events.try_recv() {
                    sync.handle(event);
                }
            }
            _ = tokio::time::sleep_until(wakeup) => {}
            _ = sigterm.recv() => return Ok(()),
            _ = sigint.recv() => return Ok(()),
        }
        sync.flush();
    }
}

/// Sample the external path's counters and conntrack usage for /metrics,
/// on a thread of its own: counting conntrack entries takes a syscall each.
fn spawn_external_stats(bpffs: PathBuf, metrics: Arc<Metrics>) {
    std::thread::spawn(move || loop {
        match crate::dataplane::read_external_stats(&bpffs) {
            Ok(stats) => metrics.set_external(stats),
            Err(e) => tracing::debug!(error = %e, "reading external path statistics"),
        }
        std::thread::sleep(std::time::Duration::from_secs(10));
    });
}

/// Remove expired external flows every --ct-sweep-interval, on a thread
/// of its own (see `dataplane::conntrack`), and report what it finds.
fn spawn_conntrack_sweeper(
    args: &RunArgs,
    snat_ports_capacity: u64,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    use crate::dataplane::conntrack::{ConntrackStats, Sweeper};
    let mut sweeper = Sweeper::open(&args.bpffs, &args.ct_timeouts())
        .context("opening the conntrack maps for the sweeper")?;
    let interval = args.ct_sweep_interval;
    std::thread::spawn(move || {
        let mut stats = ConntrackStats {
            snat_ports_capacity,
            ..Default::default()
        };
        loop {
            std::thread::sleep(interval);
            match sweeper.sweep() {
                Ok(report) => {
                    stats.add(report);
                    metrics.set_conntrack(stats.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "conntrack sweep failed; retried next interval")
                }
            }
        }
    });
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (later ones to the
/// memory cgroup). Raising it needs CAP_SYS_RESOURCE; on newer kernels a
/// failure is harmless, on older ones map creation reports it.
fn raise_memlock_rlimit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit only reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "raising RLIMIT_MEMLOCK");
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo (it is /sys/fs/cgroup
/// on a normal node, elsewhere on hybrid layouts).
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    crate::dataplane::mounts::read()?
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.point)
        .filter(|p: &PathBuf| Path::new(p).is_dir())
        .context("no cgroup2 mount in /proc/self/mountinfo")
}
