//! `svclb conntrack list`: the external path's tracked flows, read from the
//! pinned conntrack maps (while the agent runs or not), with the Service
//! each belongs to.
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use crate::cli::{FlowFilter, Output, ProtoFilter};
use crate::dataplane::conntrack::{list_flows, TrackedFlow};
use crate::dataplane::names;

#[derive(Debug, Serialize)]
pub struct FlowRow {
    pub protocol: &'static str,
    pub client: String,
    pub frontend: String,
    /// The Service (namespace/name:port-name) when the agent recorded it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub backend: String,
    pub backend_id: u32,
    /// The source the backend sees: the client's, or this node's SNAT
    /// address and port (remote backends).
    pub source: String,
    pub state: &'static str,
    pub idle_seconds: u64,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        svclb_common::PROTO_TCP => "TCP",
        svclb_common::PROTO_UDP => "UDP",
        _ => "other",
    }
}

/// Whether `filter` selects `f`.
pub fn matches(f: &TrackedFlow, filter: &FlowFilter) -> bool {
    let proto = filter.proto.is_none_or(|p| {
        f.proto
            == match p {
                ProtoFilter::Tcp => svclb_common::PROTO_TCP,
                ProtoFilter::Udp => svclb_common::PROTO_UDP,
            }
    });
    proto
        && filter.frontend.is_none_or(|a| a.matches(f.frontend))
        && filter.backend.is_none_or(|a| a.matches(f.backend))
        && filter.client.is_none_or(|a| a.matches(f.client))
        && filter.state.as_deref().is_none_or(|s| s == f.state_name())
}

/// The flows `filter` selects, sorted by frontend, client.
pub fn rows(
    flows: &[TrackedFlow],
    names: &std::collections::HashMap<u32, names::FrontendName>,
    filter: &FlowFilter,
) -> Vec<FlowRow> {
    let mut selected: Vec<&TrackedFlow> = flows.iter().filter(|f| matches(f, filter)).collect();
    selected.sort_by_key(|f| (f.frontend, f.proto, f.client));
    selected
        .into_iter()
        .map(|f| FlowRow {
            protocol: proto_name(f.proto),
            client: f.client.to_string(),
            frontend: f.frontend.to_string(),
            service: names
                .get(&f.rev_nat_id)
                .map(|n| match n.port_name.as_str() {
                    "" => n.service.clone(),
                    port => format!("{}:{port}", n.service),
                }),
            backend: f.backend.to_string(),
            backend_id: f.backend_id,
            source: f.source.to_string(),
            state: f.state_name(),
            idle_seconds: f.idle().as_secs(),
        })
        .collect()
}

pub fn table(rows: &[FlowRow]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let line = |out: &mut String, cells: [&str; 8]| {
        let _ = writeln!(
            out,
            "{:<5} {:<28} {:<28} {:<28} {:<28} {:<28} {:<16} {}",
            cells[0], cells[1], cells[2], cells[3], cells[4], cells[5], cells[6], cells[7]
        );
    };
    line(
        &mut out,
        [
            "PROTO", "CLIENT", "FRONTEND", "SERVICE", "BACKEND", "SOURCE", "STATE", "IDLE",
        ],
    );
    for r in rows {
        let idle = format!("{}s", r.idle_seconds);
        line(
            &mut out,
            [
                r.protocol,
                &r.client,
                &r.frontend,
                r.service.as_deref().unwrap_or(""),
                &r.backend,
                &r.source,
                r.state,
                &idle,
            ],
        );
    }
    let _ = writeln!(out, "{} flows", rows.len());
    out
}

pub fn run(bpffs: &Path, filter: &FlowFilter, output: Output) -> anyhow::Result<()> {
    let flows = list_flows(bpffs).with_context(|| {
        format!(
            "reading the conntrack maps in {} (is an agent with --devices using it?)",
            bpffs.display()
        )
    })?;
    let rows = rows(&flows, &names::read(bpffs), filter);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Table => print!("{}", table(&rows)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::AddrPort;

    fn flow(
        client: &str,
        frontend: &str,
        backend: &str,
        proto: u8,
        state: Option<usize>,
    ) -> TrackedFlow {
        TrackedFlow {
            proto,
            client: client.parse().unwrap(),
            frontend: frontend.parse().unwrap(),
            backend: backend.parse().unwrap(),
            source: client.parse().unwrap(),
            backend_id: 4,
            rev_nat_id: 9,
            state,
            idle_ticks: 3,
        }
    }

    fn flows() -> Vec<TrackedFlow> {
        use svclb_common::ct_state::*;
        use svclb_common::{PROTO_TCP, PROTO_UDP};
        vec![
            flow(
                "198.18.9.1:40000",
                "198.18.0.20:30080",
                "198.18.1.5:8080",
                PROTO_TCP,
                Some(TCP_ESTABLISHED),
            ),
            flow(
                "198.18.9.2:40001",
                "198.18.0.20:30080",
                "198.18.1.6:8080",
                PROTO_TCP,
                Some(TCP_TIME_WAIT),
            ),
            flow(
                "198.18.9.1:5353",
                "198.18.0.20:30053",
                "198.18.1.7:53",
                PROTO_UDP,
                Some(UDP_REPLIED),
            ),
            flow(
                "[fd00::9]:40000",
                "[fd00::20]:30080",
                "[fd00::1:5]:8080",
                PROTO_TCP,
                None,
            ),
        ]
    }

    fn shown(filter: &FlowFilter) -> Vec<String> {
        rows(&flows(), &Default::default(), filter)
            .into_iter()
            .map(|r| r.client)
            .collect()
    }

    fn at(s: &str) -> Option<AddrPort> {
        Some(match s.parse::<std::net::SocketAddr>() {
            Ok(a) => AddrPort {
                addr: a.ip(),
                port: Some(a.port()),
            },
            Err(_) => AddrPort {
                addr: s.parse().unwrap(),
                port: None,
            },
        })
    }

    #[test]
    fn filters_select_flows() {
        assert_eq!(shown(&FlowFilter::default()).len(), 4);
        let udp = FlowFilter {
            proto: Some(ProtoFilter::Udp),
            ..Default::default()
        };
        assert_eq!(shown(&udp), ["198.18.9.1:5353"]);
        let client = FlowFilter {
            client: at("198.18.9.1"),
            ..Default::default()
        };
        assert_eq!(shown(&client).len(), 2);
        let frontend = FlowFilter {
            frontend: at("198.18.0.20:30080"),
            ..Default::default()
        };
        assert_eq!(shown(&frontend), ["198.18.9.1:40000", "198.18.9.2:40001"]);
        let backend = FlowFilter {
            backend: at("198.18.1.6"),
            ..Default::default()
        };
        assert_eq!(shown(&backend), ["198.18.9.2:40001"]);
        let established = FlowFilter {
            state: Some("tcp_established".into()),
            ..Default::default()
        };
        assert_eq!(shown(&established), ["198.18.9.1:40000"]);
        let orphan = FlowFilter {
            state: Some("orphan".into()),
            ..Default::default()
        };
        assert_eq!(shown(&orphan), ["[fd00::9]:40000"]);
        let none = FlowFilter {
            state: Some("tcp_established".into()),
            proto: Some(ProtoFilter::Udp),
            ..Default::default()
        };
        assert!(shown(&none).is_empty());
    }

    #[test]
    fn rows_name_the_service_and_idle_time() {
        let names = [(
            9,
            names::FrontendName {
                service: "default/web".into(),
                port_name: "http".into(),
            },
        )]
        .into_iter()
        .collect();
        let rows = rows(&flows(), &names, &FlowFilter::default());
        assert_eq!(rows[0].service.as_deref(), Some("default/web:http"));
        // 3 ticks of 2^30 ns.
        assert_eq!(rows[0].idle_seconds, 3);
        let text = table(&rows);
        assert!(text.lines().next().unwrap().starts_with("PROTO"), "{text}");
        assert!(text.contains("tcp_established"), "{text}");
        assert!(text.contains("[fd00::9]:40000"), "{text}");
        assert!(text.ends_with("4 flows\n"), "{text}");
    }
}
