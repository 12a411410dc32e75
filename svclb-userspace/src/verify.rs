//! `svclb verify`: every difference between the pinned maps and what the
//! running agent's last sync wanted (served on its metrics address).
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;

use crate::cli::Output;
use crate::dataplane::drift::{self, DesiredState, Difference};
use crate::dataplane::names;
use crate::dataplane::open_pinned;
use crate::serve::metrics::DESIRED_PATH;

/// The agent writes while we read: a difference must show in this many
/// reads in a row to count (a sync pass takes milliseconds).
const ATTEMPTS: usize = 3;
const BETWEEN_ATTEMPTS: Duration = Duration::from_millis(300);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize)]
struct Report<'a> {
    frontends: usize,
    differences: &'a [Difference],
}

/// Where the desired state comes from.
pub enum Desired {
    /// The running agent's metrics address (http://HOST:PORT).
    Agent(String),
    /// A file saved from /debug/svclb/desired.
    File(PathBuf),
}

impl Desired {
    fn read(&self) -> anyhow::Result<DesiredState> {
        match self {
            Desired::Agent(url) => fetch_desired(url),
            Desired::File(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
            }
        }
    }
}

/// Print the differences; returns how many there are.
pub fn run(bpffs: &Path, desired: &Desired, output: Output) -> anyhow::Result<usize> {
    let (frontends, differences) = compare(bpffs, desired)?;
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&Report {
                frontends,
                differences: &differences,
            })?
        ),
        Output::Table => {
            for d in &differences {
                println!("{d}");
            }
            match differences.len() {
                0 => println!("no differences: the maps hold the agent's {frontends} frontends"),
                n => println!("{n} differences ({frontends} frontends wanted)"),
            }
        }
    }
    Ok(differences.len())
}

/// (frontends wanted, differences)
fn compare(bpffs: &Path, desired: &Desired) -> anyhow::Result<(usize, Vec<Difference>)> {
    let mut last = (0, Vec::new());
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(BETWEEN_ATTEMPTS);
        }
        let desired = desired.read()?;
        let maps = open_pinned(bpffs)
            .with_context(|| format!("opening the maps pinned in {}", bpffs.display()))?;
        let observed = drift::Observed::read(&maps)?;
        let mut differences = drift::differences(&desired.frontends, &observed);
        // Agents of versions without the names map: nothing to compare.
        if crate::dataplane::map_path(bpffs, names::FRONTEND_NAMES).exists() {
            let found = names::read(bpffs);
            differences.extend(names::differences(&desired.frontends, &observed, &found));
        }
        last = (desired.frontends.len(), differences);
        if last.1.is_empty() {
            break;
        }
    }
    Ok(last)
}

/// GET the desired state from the agent at `agent` (http://HOST:PORT).
pub fn fetch_desired(agent: &str) -> anyhow::Result<DesiredState> {
    let context = || {
        format!("asking the agent at {agent} (its --metrics-bind-address) for its desired state; is it running?")
    };
    let body = http_get(agent, DESIRED_PATH).with_context(context)?;
    serde_json::from_str(&body).with_context(context)
}

/// A plain HTTP/1.1 GET (the agent answers one request per connection).
pub fn http_get(base: &str, path: &str) -> anyhow::Result<String> {
    let Some(host) = base.strip_prefix("http://") else {
        bail!("--agent must be http://HOST:PORT");
    };
    let host = host.trim_end_matches('/');
    let addr = host
        .to_socket_addrs()?
        .next()
        .context("the address resolves to nothing")?;
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        bail!("{path} answered {status}");
    }
    Ok(body.to_string())
}
