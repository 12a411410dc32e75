//! kube-proxy's nftables mode's shape, as one `nft -f` input: a table
//! `kube-proxy` per family with its base chains hooked into nat
//! prerouting/output/postrouting, a verdict map from (address, protocol,
//! port) to per-service chains, and per-endpoint chains that DNAT.
//! For tests of `svclb cleanup --kube-proxy` (which must delete exactly
//! these tables) and as a baseline.

use std::fmt::Write;

use crate::kubeproxy_iptables::{NodePortService, MASQ_MARK};

/// The `ip kube-proxy` table for `services` (ClusterIP rules only, which
/// is all a cleanup test needs) and an `ip6 kube-proxy` table with the
/// same chains and no services. `cluster_cidr`: pod CIDR (IPv4).
pub fn ruleset(services: &[NodePortService], cluster_cidr: &str) -> String {
    let mut ip = String::new();
    let mut elements = Vec::new();
    for svc in services {
        for port in &svc.ports {
            let p = port.proto.probe();
            let name = format!("{}/{}/{p}/{}", svc.namespace, svc.name, port.name);
            let chain = format!("service-{name}");
            elements.push(format!(
                "{} . {p} . {} : goto {chain}",
                svc.cluster_ip, port.port
            ));
            let mut endpoint_chains = Vec::new();
            for ep in &svc.endpoints {
                let ep_chain = format!("endpoint-{name}__{ep}/{}", port.target_port);
                writeln!(
                    ip,
                    "  chain {ep_chain} {{\n    ip saddr {ep} jump mark-for-masquerade\n    meta l4proto {p} dnat to {ep}:{}\n  }}",
                    port.target_port
                )
                .expect("writing to a String");
                endpoint_chains.push(ep_chain);
            }
            let vmap: Vec<String> = endpoint_chains
                .iter()
                .enumerate()
                .map(|(i, c)| format!("{i} : goto {c}"))
                .collect();
            writeln!(
                ip,
                "  chain {chain} {{\n    ip daddr {} {p} dport {} ip saddr != {cluster_cidr} jump mark-for-masquerade\n    numgen random mod {} vmap {{ {} }}\n  }}",
                svc.cluster_ip,
                port.port,
                endpoint_chains.len(),
                vmap.join(", ")
            )
            .expect("writing to a String");
        }
    }
    let mut out = String::new();
    for (family, addr_type, elements) in [
        ("ip", "ipv4_addr", elements),
        ("ip6", "ipv6_addr", Vec::new()),
    ] {
        let daddr = if family == "ip" { "ip" } else { "ip6" };
        writeln!(
            out,
            "table {family} kube-proxy {{\n  comment \"rules for kube-proxy\"\n  \
             chain mark-for-masquerade {{\n    meta mark set meta mark or {MASQ_MARK}\n  }}\n  \
             chain masquerading {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             meta mark & {MASQ_MARK} == 0 return\n    meta mark set meta mark xor {MASQ_MARK}\n    masquerade fully-random\n  }}"
        )
        .expect("writing to a String");
        // Chains before the map and the map before the chain using it:
        // nft resolves references in order.
        if family == "ip" {
            out.push_str(&ip);
        }
        writeln!(
            out,
            "  map service-ips {{\n    type {addr_type} . inet_proto . inet_service : verdict\n{}  }}\n  \
             chain services {{\n    {daddr} daddr . meta l4proto . th dport vmap @service-ips\n  }}\n  \
             chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n  \
             chain nat-output {{\n    type nat hook output priority -100; policy accept;\n    jump services\n  }}",
            if elements.is_empty() {
                String::new()
            } else {
                format!("    elements = {{ {} }}\n", elements.join(", "))
            }
        )
        .expect("writing to a String");
        out.push_str("}\n");
    }
    out
}
