//! Run the live XDP program on one synthetic packet (BPF_PROG_RUN), for
//! `svclb explain --external`: the verdict and the rewritten headers real
//! traffic from that tuple would get now.
//!
//! Without state real traffic could see: the program writes the conntrack
//! maps (two entries per new flow; a SNAT port allocation may remove a
//! closed flow's entries) and counts in the stats map. A dry-run flag read
//! by the program would put a branch on every packet's path and must be
//! right at every write site, now and in every later change; instead this
//! loads a second copy of the object in which only the maps the program
//! reads and never writes are the agent's pinned ones (`SHARED`), and every
//! other map (both conntrack maps, stats, scratch, and any map added later)
//! is private, empty and gone when the run returns. The program itself is
//! the same bytecode the agent runs. What it cannot show: the entry of an
//! established flow (the private conntrack map is empty, so the run is a
//! new flow; `explain` reports a live entry separately) and the real SNAT
//! port (chosen at random, as for a new flow).
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::EbpfLoader;
use serde::Serialize;
use svclb_common::maps;

use super::Request;
use crate::dataplane::loader::{OBJECT, XDP_PROGRAM};
use crate::dataplane::map_path;
use crate::model::Protocol;

/// The maps the XDP program only reads: the agent's, shared by pin. The
/// program writes none of them (`svclb-ebpf/src/{xdp,external,conntrack,
/// stats}.rs`); the tests check that a run leaves the agent's conntrack and
/// stats as they were.
const SHARED: [&str; 7] = [
    maps::SERVICES,
    maps::BACKENDS,
    maps::MAGLEV,
    maps::SOURCE_RANGES,
    maps::XDP_CONFIG,
    maps::TX_DEVICES,
    maps::BACKENDS_EPOCH,
];

/// Entries of the private conntrack maps: one flow needs two.
const PRIVATE_CONNTRACK_SIZE: u32 = 64;

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

#[derive(Debug, Serialize)]
pub struct XdpRun {
    /// XDP_DROP, XDP_PASS (to the stack), XDP_TX, XDP_REDIRECT.
    pub verdict: &'static str,
    /// The device the packet was run as arriving on; None: ingress
    /// ifindex 0 (the route lookup then has no ingress device).
    pub device: Option<String>,
    pub packet_in: Headers,
    pub packet_out: Headers,
    /// The program changed the addresses or ports.
    pub rewritten: bool,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Headers {
    pub eth_dst: String,
    pub eth_src: String,
    pub src: String,
    pub dst: String,
}

/// Load the private copy and run the XDP program once on a SYN (TCP) or a
/// datagram (UDP) from `req.from` to `req.to`.
pub fn run(bpffs: &Path, req: &Request) -> anyhow::Result<XdpRun> {
    if OBJECT.is_empty() {
        bail!("this svclb was built without its eBPF object");
    }
    for name in SHARED {
        let path = map_path(bpffs, name);
        if !path.exists() {
            bail!("{} is missing (no agent's maps here?)", path.display());
        }
    }
    let sport = req.from.port.unwrap_or(40000);
    let packet = frame(SocketAddr::new(req.from.addr, sport), req.to, req.protocol)?;
    let ifindex = match &req.device {
        Some(dev) => Some(ifindex(dev)?),
        None => None,
    };
    let private = PrivateDir::new(bpffs)?;
    let mut loader = EbpfLoader::new();
    // Every map not named below is created here (private), and the
    // directory is removed as soon as the object is loaded.
    loader.default_map_pin_directory(&private.0);
    let shared: Vec<(&str, PathBuf)> = SHARED.iter().map(|n| (*n, map_path(bpffs, n))).collect();
    for (name, path) in &shared {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .map_max_entries(maps::CONNTRACK4, PRIVATE_CONNTRACK_SIZE)
        .map_max_entries(maps::CONNTRACK6, PRIVATE_CONNTRACK_SIZE);
    let mut ebpf = loader
        .load(OBJECT)
        .context("loading a private copy of the programs")?;
    drop(private);
    let prog: &mut Xdp = ebpf
        .program_mut(XDP_PROGRAM)
        .context("no XDP program in the object")?
        .try_into()?;
    prog.load().context("loading the XDP program")?;
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex,
    // rx_queue_index, egress_ifindex (data_end: the packet's length).
    let ctx: Vec<u8> = [0, packet.len() as u32, 0, ifindex.unwrap_or(0), 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect();
    let mut out = vec![0u8; packet.len() + 256];
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(&packet),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_RUN")?;
    out.truncate(result.data_size_out as usize);
    let packet_in = headers(&packet).context("parsing the synthetic packet")?;
    let packet_out = headers(&out).context("parsing the packet the program left")?;
    Ok(XdpRun {
        verdict: match result.return_value {
            XDP_ABORTED => "XDP_ABORTED",
            XDP_DROP => "XDP_DROP",
            XDP_PASS => "XDP_PASS",
            XDP_TX => "XDP_TX",
            XDP_REDIRECT => "XDP_REDIRECT",
            _ => "unknown",
        },
        device: req.device.clone(),
        rewritten: packet_in.src != packet_out.src || packet_in.dst != packet_out.dst,
        packet_in,
        packet_out,
    })
}

impl XdpRun {
    /// A note when the run and the computed verdict disagree (the maps
    /// changed in between, or a bug in one of them).
    pub fn disagrees(&self, computed: &str) -> Option<String> {
        let run = match (self.verdict, self.rewritten) {
            ("XDP_DROP" | "XDP_ABORTED", _) => "dropped",
            (_, true) => "translated",
            _ => "passed untouched",
        };
        let agree = match computed {
            "translated" => run == "translated",
            "dropped" => run == "dropped",
            // Refused external traffic is an empty NodePort passed to the
            // stack (which refuses it); "not a service" passes too.
            _ => run == "passed untouched",
        };
        (!agree).then(|| {
            format!("the XDP run ({run}) disagrees with the computed verdict ({computed})")
        })
    }

    pub fn text(&self) -> String {
        let device = match &self.device {
            Some(d) => d.clone(),
            None => "ifindex 0 (no --device)".into(),
        };
        let mut out = format!(
            "xdp run:   {} on {device} (live program, private conntrack: nothing recorded)\n",
            self.verdict
        );
        out.push_str(&format!(
            "  in:  {} -> {}  eth {} -> {}\n",
            self.packet_in.src, self.packet_in.dst, self.packet_in.eth_src, self.packet_in.eth_dst
        ));
        out.push_str(&format!(
            "  out: {} -> {}  eth {} -> {}{}\n",
            self.packet_out.src,
            self.packet_out.dst,
            self.packet_out.eth_src,
            self.packet_out.eth_dst,
            if self.rewritten { "" } else { " (unchanged)" }
        ));
        out
    }
}

/// A scratch directory for the private maps' pins while the object loads
/// (aya pins every map it creates by name), beside the agent's bpffs
/// directory (on the same bpffs; bpffs refuses names with a dot), or inside
/// it, removed as soon as the object is loaded.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn new(bpffs: &Path) -> anyhow::Result<Self> {
        let name = format!(
            "{}-explain-{}",
            bpffs
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("svclb"),
            std::process::id()
        );
        let beside = bpffs.with_file_name(name);
        if std::fs::create_dir(&beside).is_ok() {
            return Ok(PrivateDir(beside));
        }
        // --bpffs is a bpffs mount itself: inside it then (the agent's
        // loader removes only SVCLB_* pins it does not know).
        let inside = bpffs.join(format!("explain-{}", std::process::id()));
        std::fs::create_dir(&inside).with_context(|| format!("creating {}", inside.display()))?;
        Ok(PrivateDir(inside))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        // Unpins; the maps live on while the loaded object holds them.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ifindex(device: &str) -> anyhow::Result<u32> {
    let name = std::ffi::CString::new(device)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!(
            "no device {device} in this network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(index)
}

/// Synthetic MAC addresses: XDP does not check them; a forwarded packet
/// gets the route's.
const DST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const SRC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

/// An Ethernet frame: a TCP SYN or a UDP datagram with 4 bytes of payload,
/// checksums right.
pub fn frame(src: SocketAddr, dst: SocketAddr, protocol: Protocol) -> anyhow::Result<Vec<u8>> {
    let l4: Vec<u8> = match protocol {
        Protocol::Tcp => {
            let mut h = vec![0u8; 20];
            h[0..2].copy_from_slice(&src.port().to_be_bytes());
            h[2..4].copy_from_slice(&dst.port().to_be_bytes());
            h[4..8].copy_from_slice(&1u32.to_be_bytes());
            h[12] = 5 << 4;
            h[13] = 0x02; // SYN
            h[14..16].copy_from_slice(&64240u16.to_be_bytes());
            h
        }
        Protocol::Udp => {
            let mut h = vec![0u8; 12];
            h[0..2].copy_from_slice(&src.port().to_be_bytes());
            h[2..4].copy_from_slice(&dst.port().to_be_bytes());
            h[4..6].copy_from_slice(&12u16.to_be_bytes());
            h[8..12].copy_from_slice(b"svlb");
            h
        }
        Protocol::Sctp => bail!("XDP does not translate SCTP"),
    };
    let proto: u8 = match protocol {
        Protocol::Tcp => 6,
        _ => 17,
    };
    let csum_at = if proto == 6 { 16 } else { 6 };
    let mut frame = Vec::new();
    frame.extend_from_slice(&DST_MAC);
    frame.extend_from_slice(&SRC_MAC);
    let mut l4 = l4;
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = proto;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(&[&ip]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, proto]);
            pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            let c = checksum(&[&pseudo, &l4]);
            l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            ip[6] = proto;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, proto]);
            let c = checksum(&[&pseudo, &l4]);
            l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&ip);
        }
        _ => bail!("--from and --to must be of one IP family"),
    }
    frame.extend_from_slice(&l4);
    Ok(frame)
}

fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for pair in part.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    if c == 0 {
        0xffff
    } else {
        c
    }
}

/// The Ethernet addresses and the IP/port endpoints of a frame.
fn headers(frame: &[u8]) -> anyhow::Result<Headers> {
    let mac = |b: &[u8]| {
        b.iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let get = |from: usize, len: usize| frame.get(from..from + len).context("frame too short");
    let port = |at: usize| -> anyhow::Result<u16> {
        let b = get(at, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    };
    let (src, dst, l4) = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            let s: [u8; 4] = get(26, 4)?.try_into()?;
            let d: [u8; 4] = get(30, 4)?.try_into()?;
            (IpAddr::from(s), IpAddr::from(d), 34)
        }
        0x86dd => {
            let s: [u8; 16] = get(22, 16)?.try_into()?;
            let d: [u8; 16] = get(38, 16)?.try_into()?;
            (IpAddr::from(s), IpAddr::from(d), 54)
        }
        other => bail!("ethertype {other:#06x}"),
    };
    Ok(Headers {
        eth_dst: mac(get(0, 6)?),
        eth_src: mac(get(6, 6)?),
        src: SocketAddr::new(src, port(l4)?).to_string(),
        dst: SocketAddr::new(dst, port(l4 + 2)?).to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_back_and_checksum_to_zero() {
        let src: SocketAddr = "198.18.9.1:40001".parse().unwrap();
        let dst: SocketAddr = "198.18.0.10:80".parse().unwrap();
        let f = frame(src, dst, Protocol::Tcp).unwrap();
        let h = headers(&f).unwrap();
        assert_eq!(
            (h.src.as_str(), h.dst.as_str()),
            ("198.18.9.1:40001", "198.18.0.10:80")
        );
        // A header with its checksum sums to 0xffff (complement 0).
        assert_eq!(checksum(&[&f[14..34]]), 0xffff);
        let src6: SocketAddr = "[fd00::9]:5353".parse().unwrap();
        let dst6: SocketAddr = "[fd00::10]:53".parse().unwrap();
        let h6 = headers(&frame(src6, dst6, Protocol::Udp).unwrap()).unwrap();
        assert_eq!(h6.dst, "[fd00::10]:53");
        assert!(frame(src, dst6, Protocol::Tcp).is_err());
    }
}
