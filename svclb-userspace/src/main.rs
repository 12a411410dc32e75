use std::io::IsTerminal;

use svclb_userspace::cli::{Command, MapsCommand};

/// Without RUST_LOG. kube-rs reports a stalled watch it restarts only at
/// debug level (with its other debug lines: failures the agent also logs).
const DEFAULT_LOG_FILTER: &str = "info,kube_runtime::watcher=debug";

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match svclb_userspace::config::parse().command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(svclb_userspace::agent::run(*args)),
        Command::Maps {
            command: MapsCommand::Dump { bpffs, output },
        } => svclb_userspace::dump::run(&bpffs, output),
        Command::Cleanup {
            bpffs,
            kube_proxy,
            kube_proxy_only,
        } => {
            let svclb = (!kube_proxy_only).then_some(bpffs.as_path());
            let out = svclb_userspace::cleanup::run(svclb, kube_proxy || kube_proxy_only);
            if out.removed.is_empty() {
                println!("nothing to remove");
            }
            for line in &out.removed {
                println!("removed: {line}");
            }
            for line in &out.notes {
                eprintln!("note: {line}");
            }
            for line in &out.errors {
                eprintln!("error: {line}");
            }
            if !out.errors.is_empty() {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Verify {
            bpffs,
            agent,
            desired,
            output,
        } => {
            let from = match desired {
                Some(file) => svclb_userspace::verify::Desired::File(file),
                None => svclb_userspace::verify::Desired::Agent(agent),
            };
            match svclb_userspace::verify::run(&bpffs, &from, output) {
                Ok(0) => Ok(()),
                Ok(_) => std::process::exit(1),
                Err(e) => {
                    eprintln!("Error: {e:?}");
                    std::process::exit(2);
                }
            }
        }
    }
}
