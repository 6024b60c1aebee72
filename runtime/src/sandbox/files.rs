//! The files a pod's containers get bind-mounted: /etc/hostname,
//! /etc/hosts and /etc/resolv.conf.

use std::path::Path;

use berth_cri::v1::DnsConfig;

use crate::error::{IoContext, Result};

const HOSTS_BASE: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n";

/// `/etc/hosts` for a pod with its own network: localhost entries, then the
/// pod's own addresses under its hostname. A pod without an address (no
/// CNI network) still resolves its hostname, to loopback.
pub fn hosts(hostname: &str, pod_ips: &[String]) -> String {
    let mut text = String::from(HOSTS_BASE);
    for ip in pod_ips {
        text.push_str(&format!("{ip}\t{hostname}\n"));
    }
    if pod_ips.is_empty() && !hostname.is_empty() {
        text.push_str(&format!("127.0.0.1\t{hostname}\n"));
    }
    text
}

/// `/etc/resolv.conf` from the pod's DNS config; `None` when the pod gave
/// none (the host's file is used then).
pub fn resolv_conf(dns: Option<&DnsConfig>) -> Option<String> {
    let dns = dns?;
    if dns.servers.is_empty() && dns.searches.is_empty() && dns.options.is_empty() {
        return None;
    }
    let mut text = String::new();
    if !dns.searches.is_empty() {
        text.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for server in &dns.servers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    if !dns.options.is_empty() {
        text.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    Some(text)
}

pub fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .context(|| format!("chmod {}", path.display()))
}

pub fn copy_host(host_file: &str, dest: &Path) -> Result<()> {
    let text = std::fs::read_to_string(host_file).unwrap_or_default();
    write(dest, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_from_dns_config() {
        assert_eq!(resolv_conf(None), None);
        let dns = DnsConfig {
            servers: vec!["10.96.0.10".into(), "10.96.0.11".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(Some(&dns)).unwrap(),
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver 10.96.0.11\noptions ndots:5\n"
        );
    }

    #[test]
    fn hosts_has_localhost_and_pod_ip() {
        let h = hosts("web-0", &["10.88.0.5".into()]);
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("10.88.0.5\tweb-0\n"));
        assert!(!h.contains("127.0.0.1\tweb-0"));
        let h = hosts("web-0", &[]);
        assert!(h.starts_with("127.0.0.1\tlocalhost\n"));
        assert!(h.ends_with("127.0.0.1\tweb-0\n"));
    }
}
