//! The baseline svclb's external datapath is compared with: the nat table
//! kube-proxy's iptables mode programs for NodePort services, as one
//! `iptables-restore` input.
//!
//! Shape (per service port; names hashed as kube-proxy does, though with
//! another hash):
//!
//! ```text
//! PREROUTING, OUTPUT -> KUBE-SERVICES
//!   one "-d CLUSTER_IP --dport PORT -j KUBE-SVC-x" rule per service port,
//!   then the last rule: "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
//! KUBE-NODEPORTS: "--dport NODE_PORT -j KUBE-EXT-x" per service port
//! KUBE-EXT-x: -j KUBE-MARK-MASQ (externalTrafficPolicy: Cluster), -j KUBE-SVC-x
//! KUBE-SVC-x: masquerade off-cluster ClusterIP clients, then one rule per
//!   endpoint i of E: "-m statistic --mode random --probability 1/(E-i)
//!   -j KUBE-SEP-y" (the last one unconditional)
//! KUBE-SEP-y: masquerade hairpin traffic, then "-j DNAT --to-destination IP:PORT"
//! POSTROUTING -> KUBE-POSTROUTING: MASQUERADE what KUBE-MARK-MASQ marked
//! ```
//!
//! So the first packet of every connection to a NodePort walks every
//! ClusterIP rule, then the NodePort rules up to its own: the cost grows
//! with the number of services. Later packets only hit conntrack.

use std::fmt::Write;
use std::net::Ipv4Addr;

use crate::manifests::Proto;

/// kube-proxy's masquerade mark (--iptables-masquerade-bit 14).
pub const MASQ_MARK: &str = "0x4000";

/// One port of a NodePort service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub proto: Proto,
    pub port: u16,
    pub node_port: u16,
    pub target_port: u16,
}

/// A NodePort service (externalTrafficPolicy: Cluster) and its ready
/// endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePortService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Ipv4Addr>,
}

/// `count` TCP NodePort services with `endpoints` endpoints each that only
/// make the rule lists long: service i is default/filler-i, ClusterIP
/// 198.19.(i/256).(i%256) port 80, node port 20000+i (more than the
/// default 30000-32767 range holds: a cluster with this many NodePorts has
/// a wider --service-node-port-range), endpoints from 198.18.128.0/17
/// (never contacted) port 8080.
pub fn filler_services(count: usize, endpoints: usize) -> Vec<NodePortService> {
    assert!(count <= 10_000, "node ports 20000..30000");
    (0..count)
        .map(|i| NodePortService {
            namespace: "default".into(),
            name: format!("filler-{i}"),
            cluster_ip: Ipv4Addr::new(198, 19, (i / 256) as u8, (i % 256) as u8),
            ports: vec![ServicePort {
                name: "http".into(),
                proto: Proto::Tcp,
                port: 80,
                node_port: 20_000 + i as u16,
                target_port: 8080,
            }],
            endpoints: (0..endpoints)
                .map(|j| {
                    let n = (i * endpoints + j) % (128 * 256);
                    Ipv4Addr::new(198, 18, 128 + (n / 256) as u8, (n % 256) as u8)
                })
                .collect(),
        })
        .collect()
}

/// A chain name like kube-proxy's: PREFIX plus 16 characters of a hash of
/// `key` (kube-proxy: base32 of SHA-256; here hex of FNV-1a, which is as
/// good for unique names and needs no crypto crate). At most 25 bytes,
/// under iptables' 28.
fn chain(prefix: &str, key: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{prefix}{h:016X}")
}

/// The nat table for `services` as `iptables-restore` input (it replaces
/// the whole nat table). `cluster_cidr` is the pod CIDR (kube-proxy's
/// --cluster-cidr): ClusterIP traffic from outside it is masqueraded.
pub fn ruleset(services: &[NodePortService], cluster_cidr: &str) -> String {
    const LAST_RULE: &str =
        "kubernetes service nodeports; NOTE: this must be the last rule in this chain";
    let mut chains = vec![
        ":PREROUTING ACCEPT [0:0]".to_string(),
        ":INPUT ACCEPT [0:0]".into(),
        ":OUTPUT ACCEPT [0:0]".into(),
        ":POSTROUTING ACCEPT [0:0]".into(),
        ":KUBE-SERVICES - [0:0]".into(),
        ":KUBE-NODEPORTS - [0:0]".into(),
        ":KUBE-POSTROUTING - [0:0]".into(),
        ":KUBE-MARK-MASQ - [0:0]".into(),
    ];
    let mut rules = vec![
        r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.to_string(),
        r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.into(),
        r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#.into(),
        format!("-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"),
        // Clear the mark so a re-routed packet is not masqueraded twice.
        format!("-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"),
        r#"-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully"#.into(),
        format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"),
    ];
    // KUBE-SERVICES and KUBE-NODEPORTS rules, in service order.
    let mut services_rules = Vec::new();
    let mut nodeport_rules = Vec::new();
    for svc in services {
        for port in &svc.ports {
            let name = format!("{}/{}:{}", svc.namespace, svc.name, port.name);
            let p = port.proto.probe();
            let key = format!("{name}{}", port.proto.k8s());
            let (svc_chain, ext_chain) = (chain("KUBE-SVC-", &key), chain("KUBE-EXT-", &key));
            chains.push(format!(":{svc_chain} - [0:0]"));
            chains.push(format!(":{ext_chain} - [0:0]"));
            let cluster_ip_match = format!(
                r#"-m comment --comment "{name} cluster IP" -m {p} -p {p} -d {}/32 --dport {}"#,
                svc.cluster_ip, port.port
            );
            services_rules.push(format!(
                "-A KUBE-SERVICES {cluster_ip_match} -j {svc_chain}"
            ));
            nodeport_rules.push(format!(
                "-A KUBE-NODEPORTS -m comment --comment {name} -m {p} -p {p} --dport {} -j {ext_chain}",
                port.node_port
            ));
            rules.push(format!(
                r#"-A {ext_chain} -m comment --comment "masquerade traffic for {name} external destinations" -j KUBE-MARK-MASQ"#
            ));
            rules.push(format!("-A {ext_chain} -j {svc_chain}"));
            rules.push(format!(
                "-A {svc_chain} {cluster_ip_match} ! -s {cluster_cidr} -j KUBE-MARK-MASQ"
            ));
            let n = svc.endpoints.len();
            for (i, ep) in svc.endpoints.iter().enumerate() {
                let dest = format!("{ep}:{}", port.target_port);
                let sep_chain = chain("KUBE-SEP-", &format!("{key}{dest}"));
                chains.push(format!(":{sep_chain} - [0:0]"));
                let mut r = format!(r#"-A {svc_chain} -m comment --comment "{name} -> {dest}""#);
                // Endpoint i is taken with probability 1/(n-i) among those
                // left, so each one gets 1/n overall.
                if i + 1 < n {
                    write!(
                        r,
                        " -m statistic --mode random --probability {:.10}",
                        1.0 / (n - i) as f64
                    )
                    .expect("writing to a String");
                }
                write!(r, " -j {sep_chain}").expect("writing to a String");
                rules.push(r);
                // Hairpin: an endpoint reaching itself through the service.
                rules.push(format!(
                    "-A {sep_chain} -m comment --comment {name} -s {ep}/32 -j KUBE-MARK-MASQ"
                ));
                rules.push(format!(
                    "-A {sep_chain} -m comment --comment {name} -m {p} -p {p} -j DNAT --to-destination {dest}"
                ));
            }
        }
    }
    services_rules.push(format!(
        r#"-A KUBE-SERVICES -m comment --comment "{LAST_RULE}" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"#
    ));
    let mut out = String::from("*nat\n");
    for line in chains
        .iter()
        .chain(&rules)
        .chain(&services_rules)
        .chain(&nodeport_rules)
    {
        out.push_str(line);
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> NodePortService {
        NodePortService {
            namespace: "default".into(),
            name: "web".into(),
            cluster_ip: Ipv4Addr::new(198, 19, 0, 10),
            ports: vec![ServicePort {
                name: "http".into(),
                proto: Proto::Tcp,
                port: 80,
                node_port: 30080,
                target_port: 8080,
            }],
            endpoints: (2..5).map(|h| Ipv4Addr::new(198, 18, 1, h)).collect(),
        }
    }

    fn lines_of<'a>(text: &'a str, chain: &str) -> Vec<&'a str> {
        let prefix = format!("-A {chain} ");
        text.lines().filter(|l| l.starts_with(&prefix)).collect()
    }

    /// The chain a rule jumps to.
    fn target(rule: &str) -> &str {
        rule.rsplit_once(" -j ")
            .unwrap()
            .1
            .split(' ')
            .next()
            .unwrap()
    }

    #[test]
    fn nodeport_path_reaches_every_endpoint_with_fair_probabilities() {
        let text = ruleset(&[web()], "198.18.0.0/16");
        assert!(text.starts_with("*nat\n") && text.ends_with("COMMIT\n"));
        for hook in ["PREROUTING", "OUTPUT"] {
            assert_eq!(target(lines_of(&text, hook)[0]), "KUBE-SERVICES");
        }
        // KUBE-SERVICES: the ClusterIP rule, then the NodePort catch-all last.
        let services = lines_of(&text, "KUBE-SERVICES");
        assert_eq!(services.len(), 2);
        assert!(services[0].contains("-m tcp -p tcp -d 198.19.0.10/32 --dport 80 -j KUBE-SVC-"));
        assert!(services[1].ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"));
        // KUBE-NODEPORTS -> KUBE-EXT: mark for masquerade, then KUBE-SVC.
        let nodeports = lines_of(&text, "KUBE-NODEPORTS");
        assert_eq!(nodeports.len(), 1);
        assert!(nodeports[0].contains("-m tcp -p tcp --dport 30080 -j KUBE-EXT-"));
        let ext = lines_of(&text, target(nodeports[0]));
        assert_eq!(target(ext[0]), "KUBE-MARK-MASQ");
        assert_eq!(target(ext[1]), target(services[0]));
        // KUBE-SVC: masquerade off-cluster sources, then 1/3, 1/2, rest.
        let svc = lines_of(&text, target(services[0]));
        assert_eq!(svc.len(), 4);
        assert!(svc[0].contains("! -s 198.18.0.0/16 -j KUBE-MARK-MASQ"));
        assert!(svc[1].contains("--mode random --probability 0.3333333333 -j KUBE-SEP-"));
        assert!(svc[2].contains("--mode random --probability 0.5000000000 -j KUBE-SEP-"));
        assert!(!svc[3].contains("statistic"));
        // Each KUBE-SEP DNATs to its own endpoint.
        for (rule, host) in svc[1..].iter().zip(2..) {
            let sep = lines_of(&text, target(rule));
            assert_eq!(sep.len(), 2);
            assert!(sep[0].contains(&format!("-s 198.18.1.{host}/32 -j KUBE-MARK-MASQ")));
            assert!(sep[1].ends_with(&format!(
                "-m tcp -p tcp -j DNAT --to-destination 198.18.1.{host}:8080"
            )));
        }
        // Marked traffic is masqueraded on the way out, once.
        let post = lines_of(&text, "KUBE-POSTROUTING");
        assert!(post[0].contains("! --mark 0x4000/0x4000 -j RETURN"));
        assert!(post[2].contains("-j MASQUERADE"));
        assert_eq!(
            lines_of(&text, "KUBE-MARK-MASQ"),
            ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
        );
    }

    #[test]
    fn every_chain_is_declared_once_and_every_jump_has_a_target() {
        let mut services = filler_services(50, 10);
        services.push(web());
        let text = ruleset(&services, "198.18.0.0/16");
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(':'))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let unique: std::collections::BTreeSet<&str> = declared.iter().copied().collect();
        assert_eq!(unique.len(), declared.len(), "duplicate chain");
        // 4 built-in + 4 kube chains + per service SVC, EXT and 10 or 3 SEPs.
        assert_eq!(declared.len(), 8 + 50 * 12 + 5);
        assert!(
            declared.iter().all(|c| c.len() <= 28),
            "chain name too long"
        );
        let builtin = ["DNAT", "MARK", "MASQUERADE", "RETURN"];
        for rule in text.lines().filter(|l| l.starts_with("-A ")) {
            let t = target(rule);
            assert!(builtin.contains(&t) || unique.contains(t), "{rule}");
        }
        // The catch-all stays the last KUBE-SERVICES rule.
        let services_rules = lines_of(&text, "KUBE-SERVICES");
        assert_eq!(services_rules.len(), 52);
        assert!(services_rules[51].contains("KUBE-NODEPORTS"));
        assert_eq!(lines_of(&text, "KUBE-NODEPORTS").len(), 51);
    }

    #[test]
    fn filler_services_do_not_collide() {
        let f = filler_services(10_000, 10);
        let ips: std::collections::BTreeSet<Ipv4Addr> = f.iter().map(|s| s.cluster_ip).collect();
        let ports: std::collections::BTreeSet<u16> =
            f.iter().map(|s| s.ports[0].node_port).collect();
        assert_eq!((ips.len(), ports.len()), (10_000, 10_000));
        assert!(f.iter().all(|s| s.endpoints.len() == 10));
        assert!(f
            .iter()
            .flat_map(|s| &s.endpoints)
            .all(|e| e.octets()[..2] == [198, 18] && e.octets()[2] >= 128));
    }
}
