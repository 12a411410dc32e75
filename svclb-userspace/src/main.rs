use std::io::{IsTerminal, Write};

use clap::CommandFactory;
use svclb_userspace::cli::{Cli, Command, ConntrackCommand, LogFormat, MapsCommand};

/// Without RUST_LOG. kube-rs reports a stalled watch it restarts only at
/// debug level (with its other debug lines: failures the agent also logs).
const DEFAULT_LOG_FILTER: &str = "info,kube_runtime::watcher=debug";

fn init_logging(format: LogFormat) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER)),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        // One JSON object per line, for log collectors.
        LogFormat::Json => builder.json().with_current_span(false).init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = svclb_userspace::config::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(svclb_userspace::agent::run(*args)),
        Command::Maps {
            command:
                MapsCommand::Dump {
                    bpffs,
                    filter,
                    output,
                },
        } => svclb_userspace::dump::run(&bpffs, &filter, output),
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
        Command::Status {
            bpffs,
            agent,
            output,
        } => svclb_userspace::status::run(&bpffs, &agent, output),
        Command::Conntrack {
            command:
                ConntrackCommand::List {
                    bpffs,
                    filter,
                    output,
                },
        } => svclb_userspace::conntrack_list::run(&bpffs, &filter, output),
        Command::Explain(args) => {
            let req = svclb_userspace::explain::Request {
                from: args.from,
                to: args.to.0,
                protocol: args.to.1,
                external: args.external,
                device: args.device,
                no_run: args.no_run,
                client_netns: args.client_netns,
            };
            svclb_userspace::explain::run(&args.bpffs, &req, args.output)
        }
        Command::Version => {
            println!("{}", svclb_userspace::status::version_line());
            Ok(())
        }
        Command::Completions { shell } => {
            // Into a buffer: clap_complete panics when it can't write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "svclb", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            }
        }
    }
}
