//! Removing what kube-proxy leaves on a node, as `kube-proxy --cleanup`
//! does: its iptables chains (nat, filter, mangle; IPv4 and IPv6; the
//! legacy and the nf_tables backend) and the rules elsewhere that jump to
//! them, its nftables tables, and its IPVS state. Through the same
//! command-line tools kube-proxy uses, in the calling process's network
//! namespace.
//!
//! kubelet's chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY, KUBE-MARK-DROP)
//! are kubelet's and stay.
use std::path::Path;
use std::process::{Command, Stdio};

use super::Outcome;

/// Chains kube-proxy creates by these names (iptables and IPVS modes).
const CHAINS: [&str; 14] = [
    "KUBE-SERVICES",
    "KUBE-EXTERNAL-SERVICES",
    "KUBE-NODEPORTS",
    "KUBE-POSTROUTING",
    "KUBE-MARK-MASQ",
    "KUBE-FORWARD",
    "KUBE-PROXY-FIREWALL",
    "KUBE-PROXY-CANARY",
    "KUBE-LOAD-BALANCER",
    "KUBE-NODE-PORT",
    "KUBE-LOOP-BACK",
    "KUBE-IPVS-FILTER",
    "KUBE-IPVS-OUT-FILTER",
    "KUBE-SOURCE-RANGES-FIREWALL",
];
/// Per service (port) and endpoint chains: prefix + hash.
const CHAIN_PREFIXES: [&str; 6] = [
    "KUBE-SVC-",
    "KUBE-SVL-",
    "KUBE-SEP-",
    "KUBE-FW-",
    "KUBE-EXT-",
    "KUBE-XLB-",
];
const TABLES: [&str; 3] = ["nat", "filter", "mangle"];
/// kube-proxy's nftables mode: one table per family.
const NFT_TABLE: &str = "kube-proxy";
/// The dummy device IPVS mode binds service addresses to.
const IPVS_DEVICE: &str = "kube-ipvs0";

pub fn is_kube_proxy_chain(name: &str) -> bool {
    CHAINS.contains(&name) || CHAIN_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The `iptables-restore --noflush` input that removes kube-proxy's chains
/// from `table` as `save` (its `iptables-save -t TABLE` output) shows it:
/// the rules of other chains that jump to them, then the chains (flushed,
/// then deleted). None when there are none. Also returns the chains.
pub fn removal(table: &str, save: &str) -> Option<(String, Vec<String>)> {
    let chains: Vec<String> = save
        .lines()
        .filter_map(|l| l.strip_prefix(':')?.split_whitespace().next())
        .filter(|c| is_kube_proxy_chain(c))
        .map(String::from)
        .collect();
    if chains.is_empty() {
        return None;
    }
    let mut out = format!("*{table}\n");
    for c in &chains {
        out.push_str(&format!(":{c} - [0:0]\n"));
    }
    for rule in save.lines().filter_map(|l| l.strip_prefix("-A ")) {
        let chain = rule.split_whitespace().next().unwrap_or_default();
        if !is_kube_proxy_chain(chain) && jump_target(rule).is_some_and(is_kube_proxy_chain) {
            out.push_str(&format!("-D {rule}\n"));
        }
    }
    for c in &chains {
        out.push_str(&format!("-X {c}\n"));
    }
    out.push_str("COMMIT\n");
    Some((out, chains))
}

/// The chain a saved rule jumps or goes to (the last -j/-g: matches such
/// as comments come before the target in iptables-save's output).
fn jump_target(rule: &str) -> Option<&str> {
    let words: Vec<&str> = rule.split_whitespace().collect();
    let at = words.iter().rposition(|w| *w == "-j" || *w == "-g")?;
    words.get(at + 1).copied()
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Run `tool args` with `input` on stdin; its stdout, or an error naming
/// the command with its stderr.
fn run(tool: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    let describe = || format!("{tool} {}", args.join(" "));
    let mut child = Command::new(tool)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", describe()))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("{}: writing its input: {e}", describe()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{}: {e}", describe()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}): {}",
            describe(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The legacy tables loaded in this network namespace (reading them with
/// iptables-legacy would load the modules and create empty ones).
fn legacy_tables(family: &str) -> Vec<String> {
    let file = if family == "ip6" {
        "/proc/net/ip6_tables_names"
    } else {
        "/proc/net/ip_tables_names"
    };
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

fn iptables(out: &mut Outcome) {
    let mut any_tool = false;
    for (family, prefix) in [("ip", "iptables"), ("ip6", "ip6tables")] {
        let suffixed = ["legacy", "nft"].map(|b| (b, format!("{prefix}-{b}")));
        let mut tools: Vec<(&str, String)> = suffixed
            .into_iter()
            .filter(|(_, t)| have(&format!("{t}-save")) && have(&format!("{t}-restore")))
            .collect();
        if tools.is_empty() {
            // An iptables without the two backends' names (before 1.8):
            // read it as nft's, where a missing table is no error.
            tools.push(("nft", prefix.to_string()));
        }
        for (backend, tool) in tools {
            let (save, restore) = (format!("{tool}-save"), format!("{tool}-restore"));
            if !have(&save) || !have(&restore) {
                continue;
            }
            any_tool = true;
            let loaded = legacy_tables(family);
            for table in TABLES {
                if backend == "legacy" && !loaded.iter().any(|t| t == table) {
                    continue;
                }
                let text = match run(&save, &["-t", table], None) {
                    Ok(text) => text,
                    // nf_tables: the table does not exist (nothing to do).
                    Err(_) if backend == "nft" => continue,
                    Err(e) => {
                        out.errors.push(e);
                        continue;
                    }
                };
                let Some((input, chains)) = removal(table, &text) else {
                    continue;
                };
                match run(&restore, &["-w", "--noflush"], Some(&input)) {
                    Ok(_) => out.removed.push(format!(
                        "{tool} {table}: kube-proxy chains {} and the rules jumping to them",
                        chains.join(" ")
                    )),
                    Err(e) => out.errors.push(e),
                }
            }
        }
    }
    if !any_tool {
        // Asked for and not done: an error, not a note.
        out.errors.push(
            "no iptables-save/iptables-restore commands here: kube-proxy's iptables rules not checked"
                .into(),
        );
    }
}

fn nftables(out: &mut Outcome) {
    if !have("nft") {
        out.notes
            .push("no nft command: nftables tables not checked".into());
        return;
    }
    let tables = match run("nft", &["list", "tables"], None) {
        Ok(t) => t,
        Err(e) => return out.errors.push(e),
    };
    for family in ["ip", "ip6"] {
        let line = format!("table {family} {NFT_TABLE}");
        if !tables.lines().any(|l| l.trim() == line) {
            continue;
        }
        match run("nft", &["delete", "table", family, NFT_TABLE], None) {
            Ok(_) => out
                .removed
                .push(format!("nftables table {family} {NFT_TABLE}")),
            Err(e) => out.errors.push(e),
        }
    }
}

fn ipvs(out: &mut Outcome) {
    if Path::new("/proc/net/ip_vs").exists() {
        if have("ipvsadm") {
            match run("ipvsadm", &["--clear"], None) {
                Ok(_) => out
                    .removed
                    .push("IPVS virtual servers (ipvsadm --clear)".into()),
                Err(e) => out.errors.push(e),
            }
        } else {
            out.notes.push(
                "IPVS is loaded but ipvsadm is missing: virtual servers not cleared (ipvsadm --clear)"
                    .into(),
            );
        }
    } else {
        out.notes
            .push("no IPVS in this kernel (no /proc/net/ip_vs): IPVS skipped".into());
    }
    let Ok(mut rtnl) = super::rtnl::Rtnl::open() else {
        return;
    };
    let devices = rtnl.devices().unwrap_or_default();
    if let Some(dev) = devices.iter().find(|d| d.name == IPVS_DEVICE) {
        match rtnl.delete_device(dev.index) {
            Ok(()) => out.removed.push(format!("device {IPVS_DEVICE}")),
            Err(e) => out.errors.push(format!("deleting {IPVS_DEVICE}: {e}")),
        }
    }
    // IPVS mode's ipsets, once no rule uses them.
    if have("ipset") {
        let sets = run("ipset", &["list", "-n"], None).unwrap_or_default();
        for set in sets.lines().filter(|s| s.starts_with("KUBE-")) {
            match run("ipset", &["destroy", set], None) {
                Ok(_) => out.removed.push(format!("ipset {set}")),
                Err(e) => out.errors.push(e),
            }
        }
    }
}

/// Remove kube-proxy's state from this network namespace.
pub fn cleanup(out: &mut Outcome) {
    iptables(out);
    nftables(out);
    ipvs(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_kube_proxy_chains_and_jumps_only() {
        let save = "\
# Generated by iptables-save
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:KUBE-FIREWALL - [0:0]
:KUBE-FORWARD - [0:0]
:KUBE-SVC-ABC - [0:0]
:MINE - [0:0]
-A INPUT -j KUBE-FIREWALL
-A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD
-A FORWARD -j MINE
-A MINE -g KUBE-SVC-ABC
-A KUBE-FORWARD -j KUBE-SVC-ABC
-A KUBE-FORWARD -j ACCEPT
COMMIT
";
        let (input, chains) = removal("filter", save).expect("something to remove");
        assert_eq!(chains, ["KUBE-FORWARD", "KUBE-SVC-ABC"]);
        assert_eq!(
            input,
            "*filter\n\
             :KUBE-FORWARD - [0:0]\n\
             :KUBE-SVC-ABC - [0:0]\n\
             -D FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
             -D MINE -g KUBE-SVC-ABC\n\
             -X KUBE-FORWARD\n\
             -X KUBE-SVC-ABC\n\
             COMMIT\n"
        );
        assert_eq!(
            removal(
                "filter",
                "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j KUBE-FIREWALL\nCOMMIT\n"
            ),
            None
        );
    }
}
