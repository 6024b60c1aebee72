//! Pod networking through CNI: which network config is in force (what
//! `Status` reports as NetworkReady), and setting a pod's network up and
//! down.

pub mod cni;

use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_cri::v1::PodSandboxConfig;

use crate::config::Config;
use crate::error::{Error, Result};
use cni::{Cni, NetworkList, PodNetwork, PortMapping};

/// The file name of Berth's default conflist in the conf dir.
pub const DEFAULT_CONFLIST: &str = "10-berth.conflist";

pub struct Network {
    conf_dir: PathBuf,
    allow_loopback_only: bool,
    cni: Cni,
}

/// The pod's interface the CNI plugins are asked to make (`CNI_IFNAME`).
pub const POD_INTERFACE: &str = "eth0";

impl Network {
    /// `config.cni.bin_dirs` must already hold every dir to search (see
    /// [`Config::cni_bin_dirs`]).
    pub fn new(config: &Config, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Network {
        Network {
            conf_dir: config.cni.conf_dir.clone(),
            allow_loopback_only: config.cni.allow_loopback_only,
            cni: Cni {
                bin_dirs: config.cni.bin_dirs.clone(),
                cache_dir: config.state_dir.join("cni"),
                timeout: Duration::from_secs(config.cni.plugin_timeout_secs.max(1)),
                ifname: POD_INTERFACE.into(),
                in_process: config.cni.in_process,
                metrics,
            },
        }
    }

    /// Runs the network list for a pod; returns its IPs. Without a usable
    /// network config (none in the conf dir, or a plugin it names in no
    /// bin dir) the pod is refused with FailedPrecondition naming what is
    /// missing, before any plugin runs; only `cni.allow_loopback_only`
    /// lets a pod without any config through with loopback alone.
    pub async fn setup(
        &self,
        sandbox_id: &str,
        netns: &Path,
        config: &PodSandboxConfig,
    ) -> Result<Vec<String>> {
        let source = match find_network_config(&self.conf_dir) {
            Ok(p) => p,
            Err(why) if self.allow_loopback_only => {
                tracing::warn!(pod_id = sandbox_id, reason = %why, "no CNI network: pod gets loopback only (cni.allow_loopback_only)");
                return Ok(Vec::new());
            }
            Err(why) => {
                return Err(Error::FailedPrecondition(format!(
                    "the pod network is not ready: {why} (cni.conf_dir); \
                     use a host-network pod, or set cni.allow_loopback_only for pods with loopback only"
                )));
            }
        };
        let network = NetworkList::load(&source)?;
        if let Some(missing) = missing_plugin(&network, &self.cni.bin_dirs) {
            return Err(Error::FailedPrecondition(format!(
                "the pod network is not ready: {missing}"
            )));
        }
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

/// What RunPodSandbox's port mappings must be before CNI sees them: ports
/// in range, a known protocol, a host IP that is an IP.
pub fn check_port_mappings(mappings: &[berth_cri::v1::PortMapping]) -> Result<()> {
    for m in mappings {
        let what = format!(
            "port mapping {}:{} -> {}",
            m.host_ip, m.host_port, m.container_port
        );
        if !(0..=65535).contains(&m.host_port) {
            return Err(Error::InvalidArgument(format!(
                "{what}: host_port must be 0 to 65535"
            )));
        }
        if m.host_port > 0 && !(1..=65535).contains(&m.container_port) {
            return Err(Error::InvalidArgument(format!(
                "{what}: container_port must be 1 to 65535"
            )));
        }
        if berth_cri::v1::Protocol::try_from(m.protocol).is_err() {
            return Err(Error::InvalidArgument(format!(
                "{what}: unknown protocol {}",
                m.protocol
            )));
        }
        if !m.host_ip.is_empty() && m.host_ip.parse::<std::net::IpAddr>().is_err() {
            return Err(Error::InvalidArgument(format!(
                "{what}: host_ip {:?} is not an IP address",
                m.host_ip
            )));
        }
    }
    Ok(())
}

/// Whether pods can get a network: a valid config exists and every plugin
/// it names is in a bin dir. The error says what is missing.
pub fn readiness(conf_dir: &Path, bin_dirs: &[PathBuf]) -> std::result::Result<PathBuf, String> {
    let path = find_network_config(conf_dir)?;
    let list = NetworkList::load(&path).map_err(|e| e.to_string())?;
    match missing_plugin(&list, bin_dirs) {
        Some(missing) => Err(missing),
        None => Ok(path),
    }
}

/// The first plugin of `list` (a plugin's `type`, or the `ipam.type` it
/// delegates to) that is in none of `bin_dirs`, described with the dirs
/// searched.
fn missing_plugin(list: &NetworkList, bin_dirs: &[PathBuf]) -> Option<String> {
    let kinds = list.plugins.iter().flat_map(|plugin| {
        [&plugin["type"], &plugin["ipam"]["type"]]
            .into_iter()
            .filter_map(|t| t.as_str())
    });
    for kind in kinds {
        // An invalid type is refused as such when the plugin runs.
        if kind.is_empty()
            || kind.contains('/')
            || kind.starts_with('.')
            || bin_dirs.iter().any(|d| d.join(kind).is_file())
        {
            continue;
        }
        let dirs = if bin_dirs.is_empty() {
            "no bin dir (cni.bin_dirs is empty)".to_string()
        } else {
            bin_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        };
        return Some(format!(
            "CNI plugin {kind:?} named by {} is not in {dirs} (cni.bin_dirs)",
            list.source.display()
        ));
    }
    None
}

/// Berth's default network list: bridge `bridge` with the subnet's first
/// address on the host (`isGateway`, so the host reaches its pods),
/// host-local IPAM on `subnet` keeping its allocations in `ipam_dir`, a
/// default route through the bridge, portmap, loopback. No masquerade:
/// egress NAT is the operator's choice.
pub fn default_conflist(bridge: &str, subnet: &str, ipam_dir: &Path) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "berth",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": if subnet.contains(':') { "::/0" } else { "0.0.0.0/0" }}],
                    "dataDir": ipam_dir.display().to_string()
                }
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    })
}

/// Keeps Berth's default conflist ([`DEFAULT_CONFLIST`]) in `conf_dir`
/// as `config` says, unless another network config in the dir comes
/// before it; returns its path when it was written (new or changed).
pub fn write_default_conflist(config: &Config) -> Result<Option<PathBuf>> {
    let conf_dir = &config.cni.conf_dir;
    let path = conf_dir.join(DEFAULT_CONFLIST);
    if let Ok(in_force) = find_network_config(conf_dir)
        && in_force != path
    {
        tracing::info!(config = %in_force.display(), "a CNI network config is there; not writing the default one");
        return Ok(None);
    }
    let conflist = default_conflist(
        &config.cni.default_bridge,
        &config.cni.default_subnet,
        &config.default_ipam_dir(),
    );
    let mut text = serde_json::to_vec_pretty(&conflist)
        .map_err(|e| Error::Internal(format!("default conflist: {e}")))?;
    text.push(b'\n');
    if std::fs::read(&path).is_ok_and(|old| old == text) {
        return Ok(None);
    }
    std::fs::create_dir_all(conf_dir)
        .map_err(|e| Error::io(format!("create {}", conf_dir.display()), e))?;
    // Written aside and renamed: a reader never sees half a file.
    let tmp = conf_dir.join(format!(".{DEFAULT_CONFLIST}.tmp"));
    std::fs::write(&tmp, &text).map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &path)
        .map_err(|e| Error::io(format!("rename {} to {}", tmp.display(), path.display()), e))?;
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
    fn port_mappings_are_checked_before_cni() {
        use berth_cri::v1::PortMapping as Cri;
        let ok = Cri {
            host_port: 8080,
            container_port: 80,
            host_ip: "127.0.0.1".into(),
            ..Default::default()
        };
        check_port_mappings(&[ok.clone(), Cri::default()]).unwrap();
        for bad in [
            Cri {
                host_port: 70000,
                ..ok.clone()
            },
            Cri {
                host_port: -1,
                ..ok.clone()
            },
            Cri {
                container_port: 0,
                ..ok.clone()
            },
            Cri {
                protocol: 9,
                ..ok.clone()
            },
            Cri {
                host_ip: "localhost".into(),
                ..ok.clone()
            },
        ] {
            let err = check_port_mappings(std::slice::from_ref(&bad)).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
        }
    }

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

    fn config_in(dir: &Path) -> Config {
        let mut c = Config {
            root_dir: dir.join("root"),
            state_dir: dir.join("state"),
            ..Config::default()
        };
        c.cni.conf_dir = dir.join("net.d");
        c.cni.bin_dirs = vec![dir.join("bin")];
        c
    }

    fn plugin(dir: &Path, name: &str) {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin").join(name), "#!/bin/sh\n").unwrap();
    }

    fn run_setup(network: &Network, netns: &Path) -> Result<Vec<String>> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(network.setup("sb1", netns, &PodSandboxConfig::default()))
    }

    #[test]
    fn no_config_refuses_the_pod_naming_the_conf_dir() {
        let dir = tempfile::tempdir().unwrap();
        let config = config_in(dir.path());
        let network = Network::new(&config, Default::default());
        let err = run_setup(&network, &dir.path().join("netns")).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains(&config.cni.conf_dir.display().to_string()),
            "{message}"
        );
        assert!(message.contains("cni.allow_loopback_only"), "{message}");
        // Nothing was made for the pod: not even the CNI cache dir.
        assert!(!config.state_dir.exists());

        std::fs::create_dir_all(&config.cni.conf_dir).unwrap();
        let err = run_setup(&network, &dir.path().join("netns")).unwrap_err();
        assert!(err.to_string().contains("no CNI network config"), "{err}");
    }

    #[test]
    fn loopback_only_when_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path());
        config.cni.allow_loopback_only = true;
        let network = Network::new(&config, Default::default());
        assert_eq!(
            run_setup(&network, &dir.path().join("netns")).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn missing_plugin_refuses_before_any_plugin_runs() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path());
        // Even with loopback allowed: a config that is there must work.
        config.cni.allow_loopback_only = true;
        std::fs::create_dir_all(&config.cni.conf_dir).unwrap();
        plugin(dir.path(), "bridge");
        plugin(dir.path(), "loopback");
        let conf = config.cni.conf_dir.join("10-n.conflist");
        std::fs::write(
            &conf,
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge","ipam":{"type":"host-local"}},{"type":"loopback"}]}"#,
        )
        .unwrap();
        let network = Network::new(&config, Default::default());
        let err = run_setup(&network, &dir.path().join("netns")).unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err:?}");
        let message = err.to_string();
        assert!(message.contains("\"host-local\""), "{message}");
        assert!(
            message.contains(&dir.path().join("bin").display().to_string()),
            "{message}"
        );
        assert!(
            !config.state_dir.join("cni").exists(),
            "a CNI cache was written"
        );
        let ready = readiness(&config.cni.conf_dir, &config.cni.bin_dirs).unwrap_err();
        assert!(ready.contains("host-local"), "{ready}");

        plugin(dir.path(), "host-local");
        assert_eq!(
            readiness(&config.cni.conf_dir, &config.cni.bin_dirs).unwrap(),
            conf
        );
        let err = readiness(&config.cni.conf_dir, &[]).unwrap_err();
        assert!(err.contains("cni.bin_dirs is empty"), "{err}");
    }

    #[test]
    fn default_conflist_follows_the_config_and_yields_to_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config_in(dir.path());
        config.cni.default_bridge = "bn42".into();
        config.cni.default_subnet = "10.223.42.0/24".into();
        let path = write_default_conflist(&config).unwrap().unwrap();
        assert_eq!(path, config.cni.conf_dir.join(DEFAULT_CONFLIST));
        assert_eq!(find_network_config(&config.cni.conf_dir).unwrap(), path);
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let bridge = &doc["plugins"][0];
        assert_eq!(bridge["bridge"], "bn42");
        assert_eq!(bridge["isGateway"], true);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.223.42.0/24");
        assert_eq!(
            bridge["ipam"]["dataDir"],
            config.state_dir.join("cni-ipam").display().to_string()
        );
        // Unchanged: not rewritten. Changed: rewritten.
        assert_eq!(write_default_conflist(&config).unwrap(), None);
        config.cni.default_subnet = "10.223.43.0/24".into();
        assert_eq!(write_default_conflist(&config).unwrap(), Some(path.clone()));
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("10.223.43.0/24")
        );
        // An operator's config that comes first is left in force.
        let theirs = config.cni.conf_dir.join("05-cluster.conflist");
        std::fs::write(
            &theirs,
            r#"{"cniVersion":"1.0.0","name":"c","plugins":[{"type":"flannel"}]}"#,
        )
        .unwrap();
        config.cni.default_subnet = "10.223.44.0/24".into();
        assert_eq!(write_default_conflist(&config).unwrap(), None);
        assert!(
            std::fs::read_to_string(&path)
                .unwrap()
                .contains("10.223.43.0/24")
        );
        let names: Vec<_> = std::fs::read_dir(&config.cni.conf_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
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
