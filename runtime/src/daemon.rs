//! What berthd knows about itself: its config, its store, the host's cgroup
//! mode, and the runtime-wide answers behind Version, Status and
//! RuntimeConfig. The CRI layer only translates these.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::cgroups::CgroupMode;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::image::Images;
use crate::network::{self, Network};
use crate::store::{ContainerRecord, SandboxRecord, Store};

pub fn sandbox_name_key(s: &SandboxRecord) -> String {
    format!("sandbox/{}/{}/{}/{}", s.namespace, s.name, s.uid, s.attempt)
}

pub fn container_name_key(sandbox_id: &str, name: &str, attempt: u32) -> String {
    format!("container/{sandbox_id}/{name}/{attempt}")
}

pub const RUNTIME_NAME: &str = "berth";
pub const RUNTIME_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const CRI_API_VERSION: &str = "v1";

const POD_CIDR_SETTING: &str = "pod_cidr";

pub struct Daemon {
    pub config: Config,
    pub store: Arc<Store>,
    pub images: Images,
    pub network: Network,
    pub cgroup_mode: CgroupMode,
    /// Previous CPU samples, for ContainerStats' nanocores.
    pub cpu_samples: crate::container::stats::CpuSamples,
    /// Sandbox and container names in use (kubelet's uniqueness rules),
    /// name → id.
    names: Mutex<HashMap<String, String>>,
}

/// A name held for an object being created; released on drop unless kept.
pub struct NameReservation<'a> {
    daemon: &'a Daemon,
    key: String,
    kept: bool,
}

impl NameReservation<'_> {
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for NameReservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.daemon.names.lock().unwrap().remove(&self.key);
        }
    }
}

/// One readiness condition as `Status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub kind: &'static str,
    pub ready: bool,
    pub reason: String,
    pub message: String,
}

impl Condition {
    fn ready(kind: &'static str) -> Self {
        Condition {
            kind,
            ready: true,
            reason: String::new(),
            message: String::new(),
        }
    }
}

impl Daemon {
    pub fn open(config: Config) -> Result<Arc<Daemon>> {
        let store = Arc::new(Store::open(&config.store_path())?);
        let images = Images::open(&config.root_dir, &config.registry, store.clone())?;
        let cgroup_mode = CgroupMode::detect(std::path::Path::new("/sys/fs/cgroup"));
        let mut names = HashMap::new();
        for s in store.list::<SandboxRecord>()? {
            names.insert(sandbox_name_key(&s), s.id.clone());
        }
        for c in store.list::<ContainerRecord>()? {
            names.insert(
                container_name_key(&c.sandbox_id, &c.name, c.attempt),
                c.id.clone(),
            );
        }
        if config.cni.write_default_conflist
            && let Some(path) =
                network::write_default_conflist(&config.cni.conf_dir, &config.cni.default_subnet)?
        {
            tracing::info!(path = %path.display(), "wrote the default CNI network config");
        }
        let network = Network::new(&config);
        Ok(Arc::new(Daemon {
            config,
            store,
            images,
            network,
            cgroup_mode,
            cpu_samples: Default::default(),
            names: Mutex::new(names),
        }))
    }

    /// Reserves a unique name for `id`; AlreadyExists when taken.
    pub fn reserve_name(&self, key: &str, id: &str) -> Result<NameReservation<'_>> {
        let mut names = self.names.lock().unwrap();
        if let Some(owner) = names.get(key) {
            return Err(Error::AlreadyExists(format!(
                "name {key} is already in use by {owner}"
            )));
        }
        names.insert(key.to_string(), id.to_string());
        Ok(NameReservation {
            daemon: self,
            key: key.to_string(),
            kept: false,
        })
    }

    /// Frees every name held by `id`.
    pub fn release_name(&self, id: &str) {
        self.names.lock().unwrap().retain(|_, owner| owner != id);
    }

    /// RuntimeReady and NetworkReady, in that order.
    pub fn conditions(&self) -> Vec<Condition> {
        let runtime = Condition::ready("RuntimeReady");
        let network = match network::readiness(&self.config.cni.conf_dir, &self.config.cni.bin_dirs)
        {
            Ok(_) => Condition::ready("NetworkReady"),
            Err(message) => Condition {
                kind: "NetworkReady",
                ready: false,
                reason: "NetworkPluginNotReady".into(),
                message,
            },
        };
        vec![runtime, network]
    }

    /// Debug information for verbose `Status`, as JSON values by key.
    pub fn status_info(&self) -> Vec<(String, String)> {
        let config = serde_json::to_string(&self.config).unwrap_or_default();
        let cni_config = network::find_network_config(&self.config.cni.conf_dir)
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        vec![
            ("config".into(), config),
            (
                "cgroup".into(),
                serde_json::json!({"version": self.cgroup_mode.version(), "driver": "cgroupfs"})
                    .to_string(),
            ),
            (
                "cniConfig".into(),
                serde_json::Value::String(cni_config).to_string(),
            ),
            (
                "podCIDR".into(),
                serde_json::Value::String(self.pod_cidr().unwrap_or_default()).to_string(),
            ),
        ]
    }

    /// Stores the pod CIDR kubelet hands over in UpdateRuntimeConfig. An empty
    /// value means "unchanged", as kubelet sends it on every sync.
    pub fn set_pod_cidr(&self, cidr: &str) -> Result<()> {
        if cidr.is_empty() {
            return Ok(());
        }
        validate_cidr(cidr)?;
        tracing::info!(pod_cidr = cidr, "pod CIDR updated");
        self.store.set_setting(POD_CIDR_SETTING, cidr)
    }

    pub fn pod_cidr(&self) -> Result<String> {
        Ok(self.store.setting(POD_CIDR_SETTING)?.unwrap_or_default())
    }
}

/// Accepts `a.b.c.d/n` and IPv6 `x::/n`, possibly comma-separated for
/// dual-stack, as kubelet sends it.
fn validate_cidr(cidr: &str) -> Result<()> {
    for part in cidr.split(',') {
        let (addr, len) = part.split_once('/').ok_or_else(|| {
            Error::InvalidArgument(format!("pod CIDR {part:?} has no prefix length"))
        })?;
        let addr: std::net::IpAddr = addr.parse().map_err(|_| {
            Error::InvalidArgument(format!("pod CIDR {part:?} has an invalid address"))
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        match len.parse::<u8>() {
            Ok(n) if n <= max => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "pod CIDR {part:?} has an invalid prefix length"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        assert!(validate_cidr("10.88.0.0/16").is_ok());
        assert!(validate_cidr("10.88.0.0/16,fd00::/64").is_ok());
        assert!(validate_cidr("10.88.0.0").is_err());
        assert!(validate_cidr("10.88.0.0/33").is_err());
        assert!(validate_cidr("banana/8").is_err());
    }
}
