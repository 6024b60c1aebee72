//! Pod networking through CNI: which network config is in force (what
//! `Status` reports as NetworkReady), and setting a pod's network up and
//! down.

pub mod cni;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1::PodSandboxConfig;

use crate::config::Config;
use crate::error::Result;
use cni::{Cni, NetworkList, PodNetwork, PortMapping};

pub struct Network {
    conf_dir: PathBuf,
    cni: Cni,
}

impl Network {
    pub fn new(config: &Config) -> Network {
        Network {
            conf_dir: config.cni.conf_dir.clone(),
            cni: Cni {
                bin_dirs: config.cni.bin_dirs.clone(),
                cache_dir: config.state_dir.join("cni"),
                timeout: Duration::from_secs(config.cni.plugin_timeout_secs.max(1)),
                ifname: "eth0".into(),
                in_process: config.cni.in_process,
                own_plugins: Default::default(),
            },
        }
    }

    /// Runs the network list for a pod; returns its IPs. Without any CNI
    /// config the pod keeps a loopback-only network (kubelet does not
    /// schedule such pods while NetworkReady is false).
    pub async fn setup(
        &self,
        sandbox_id: &str,
        netns: &Path,
        config: &PodSandboxConfig,
    ) -> Result<Vec<String>> {
        let source = match find_network_config(&self.conf_dir) {
            Ok(p) => p,
            Err(why) => {
                tracing::warn!(pod_id = sandbox_id, reason = %why, "no CNI network: pod gets loopback only");
                return Ok(Vec::new());
            }
        };
        let network = NetworkList::load(&source)?;
        let meta = config.metadata.clone().unwrap_or_default();
        let pod = PodNetwork {
            sandbox_id: sandbox_id.to_string(),
            netns: netns.to_path_buf(),
            pod_namespace: meta.namespace,
            pod_name: meta.name,
            pod_uid: meta.uid,
            port_mappings: config
                .port_mappings
                .iter()
                .filter(|m| m.host_port > 0)
                .map(|m| PortMapping {
                    host_port: m.host_port,
                    container_port: m.container_port,
                    protocol: match m.protocol {
                        1 => "udp".into(),
                        2 => "sctp".into(),
                        _ => "tcp".into(),
                    },
                    host_ip: m.host_ip.clone(),
                })
                .collect(),
            dns: config.dns_config.as_ref().map(|d| {
                serde_json::json!({"nameservers": d.servers, "search": d.searches, "options": d.options})
            }),
        };
        let result = self.cni.add(&network, &pod).await?;
        let ips = cni::result_ips(&result, &self.cni.ifname);
        tracing::info!(pod_id = sandbox_id, network = %network.name, ips = ?ips, "pod network added");
        Ok(ips)
    }

    /// What is wrong with a ready pod's network, if anything: its cached ADD
    /// is gone, a pod IP is no longer on an interface of its namespace, or
    /// (for host-local IPAM) the IP's allocation was released.
    pub fn check(&self, sandbox_id: &str, netns: &Path, pod_ips: &[String]) -> Option<String> {
        if pod_ips.is_empty() {
            // Loopback only: nothing was added.
            return None;
        }
        let Some(network) = self.cni.cached_network(sandbox_id) else {
            return Some("the pod's CNI result is gone".into());
        };
        let present = match crate::sandbox::namespaces::addresses(netns) {
            Ok(a) => a,
            Err(e) => return Some(format!("cannot read the pod's addresses: {e}")),
        };
        for ip in pod_ips {
            if !present.iter().any(|a| a == ip) {
                return Some(format!(
                    "pod IP {ip} is no longer on an interface of the pod's network namespace"
                ));
            }
        }
        for plugin in &network.plugins {
            let ipam = &plugin["ipam"];
            if ipam["type"].as_str() != Some("host-local") {
                continue;
            }
            let data_dir = ipam["dataDir"]
                .as_str()
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/cni/networks"));
            for ip in pod_ips {
                if !data_dir.join(&network.name).join(ip).exists() {
                    return Some(format!("the IPAM allocation of pod IP {ip} was released"));
                }
            }
        }
        None
    }

    /// Tears a pod's network down with what setup used. Idempotent.
    pub async fn teardown(&self, sandbox_id: &str) -> Result<()> {
        if self.cni.has_cache(sandbox_id) {
            self.cni.del(sandbox_id).await?;
            tracing::info!(pod_id = sandbox_id, "pod network removed");
        }
        Ok(())
    }
}

/// Whether pods can get a network: a valid config exists and every plugin
/// it names is in a bin dir. The error says what is missing.
pub fn readiness(conf_dir: &Path, bin_dirs: &[PathBuf]) -> std::result::Result<PathBuf, String> {
    let path = find_network_config(conf_dir)?;
    let list = NetworkList::load(&path).map_err(|e| e.to_string())?;
    for plugin in &list.plugins {
        let kind = plugin["type"].as_str().unwrap_or_default();
        if !bin_dirs.iter().any(|d| d.join(kind).is_file()) {
            return Err(format!(
                "CNI plugin {kind:?} named by {} is not in {}",
                path.display(),
                bin_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            ));
        }
    }
    Ok(path)
}

/// Writes Berth's default conflist into `conf_dir` unless a network config
/// is already there. No masquerade: egress NAT is the operator's choice.
pub fn write_default_conflist(conf_dir: &Path, subnet: &str) -> Result<Option<PathBuf>> {
    if find_network_config(conf_dir).is_ok() {
        return Ok(None);
    }
    std::fs::create_dir_all(conf_dir)
        .map_err(|e| crate::error::Error::io(format!("create {}", conf_dir.display()), e))?;
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "berth",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "berth0",
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    });
    let path = conf_dir.join("10-berth.conflist");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&conflist).unwrap_or_default(),
    )
    .map_err(|e| crate::error::Error::io(format!("write {}", path.display()), e))?;
    Ok(Some(path))
}

/// The CNI config berthd would use: the lexically first file in `conf_dir`
/// that parses as a network list (`.conflist`) or a single network
/// (`.conf`, `.json`).
pub fn find_network_config(conf_dir: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(conf_dir)
        .map_err(|e| format!("cannot read CNI config dir {}: {e}", conf_dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    files.sort();
    let mut problems = Vec::new();
    for file in files {
        match check_network_file(&file) {
            Ok(()) => return Ok(file),
            Err(e) => problems.push(format!("{}: {e}", file.display())),
        }
    }
    if problems.is_empty() {
        Err(format!(
            "no CNI network config found in {}",
            conf_dir.display()
        ))
    } else {
        Err(format!(
            "no valid CNI network config in {} ({})",
            conf_dir.display(),
            problems.join("; ")
        ))
    }
}

fn check_network_file(file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?;
    let is_list = file.extension().and_then(|e| e.to_str()) == Some("conflist");
    if doc
        .get("name")
        .and_then(|n| n.as_str())
        .is_none_or(str::is_empty)
    {
        return Err("missing \"name\"".into());
    }
    if is_list {
        let plugins = doc
            .get("plugins")
            .and_then(|p| p.as_array())
            .ok_or("missing \"plugins\" list")?;
        if plugins.is_empty() {
            return Err("empty \"plugins\" list".into());
        }
        if plugins
            .iter()
            .any(|p| p.get("type").and_then(|t| t.as_str()).is_none())
        {
            return Err("a plugin has no \"type\"".into());
        }
    } else if doc.get("type").and_then(|t| t.as_str()).is_none() {
        return Err("missing \"type\"".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_first_valid_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            find_network_config(dir.path())
                .unwrap_err()
                .contains("no CNI network config")
        );
        std::fs::write(dir.path().join("05-bad.conflist"), "{not json").unwrap();
        std::fs::write(
            dir.path().join("10-net.conflist"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("20-x.conf"),
            r#"{"name":"x","type":"loopback"}"#,
        )
        .unwrap();
        assert_eq!(
            find_network_config(dir.path()).unwrap(),
            dir.path().join("10-net.conflist")
        );
    }

    #[test]
    fn invalid_only_reports_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.conflist"),
            r#"{"name":"n","plugins":[]}"#,
        )
        .unwrap();
        let err = find_network_config(dir.path()).unwrap_err();
        assert!(err.contains("empty \"plugins\""), "{err}");
    }
}
