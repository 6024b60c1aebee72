//! What berthd knows about itself: its config, its store, the host's cgroup
//! mode, and the runtime-wide answers behind Version, Status and
//! RuntimeConfig. The CRI layer only translates these.

use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::{Event, EventHub};
use crate::host::{Host, RealHost};
use crate::image::Images;
use crate::layout::Layout;
use crate::locks::{ContainerGuard, ObjectLocks, SandboxGuard, SandboxShared};
use crate::metrics::Metrics;
use crate::names::Names;
use crate::network::{self, Network};
use crate::store::{ContainerRecord, SandboxRecord, Store};
use berth_cgroup::Cgroups;

pub const RUNTIME_NAME: &str = "berth";
pub const RUNTIME_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const CRI_API_VERSION: &str = "v1";

const POD_CIDR_SETTING: &str = "pod_cidr";

pub struct Daemon {
    pub config: Config,
    /// Every path of the on-disk layout.
    pub layout: Layout,
    pub store: Arc<Store>,
    pub images: Images,
    /// The kernel and process boundary of the lifecycle code.
    pub host: Arc<dyn Host>,
    pub cgroups: Arc<Cgroups>,
    /// Previous CPU samples, for ContainerStats' nanocores.
    pub cpu_samples: crate::container::stats::CpuSamples,
    /// Writable layer usage, measured at most every few seconds.
    pub layer_usage: crate::container::stats::LayerUsage,
    /// Sandbox and container names in use (kubelet's uniqueness rules).
    pub names: Names,
    /// One owner per object: the lock a mutating call holds.
    pub locks: ObjectLocks,
    pub events: EventHub,
    /// Serializes transitions with their events, so every subscriber sees
    /// a container's events in commit order.
    transitions: Mutex<()>,
    /// Containers whose exit is being watched (exit records, dead shims).
    pub exits: crate::container::exits::ExitWatcher,
    /// Removed containers' remains being deleted after RemoveContainer.
    pub cleanups: crate::container::cleanup::Cleanups,
    /// What `/metrics` serves; recorded into from every module.
    pub metrics: Arc<Metrics>,
    /// Pods may have user namespaces: the root dir's filesystem takes
    /// idmapped mounts (probed at start).
    pub user_namespaces: bool,
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
    /// The daemon on this host. Must be called inside the tokio runtime.
    pub fn open(mut config: Config) -> Result<Arc<Daemon>> {
        let cgroups = Arc::new(Cgroups::detect(std::path::Path::new(
            berth_cgroup::DEFAULT_ROOT,
        )));
        // The plugin search path is settled once: berthd's own dir (where
        // Berth's plugins are built) first when asked for.
        let exe = std::env::current_exe().ok();
        config.cni.bin_dirs = config.cni_bin_dirs(exe.as_deref().and_then(|e| e.parent()));
        if config.cni.write_default_conflist
            && let Some(path) = network::write_default_conflist(&config)?
        {
            tracing::info!(path = %path.display(), "wrote the default CNI network config");
        }
        let metrics = Arc::new(Metrics::new());
        let host = RealHost {
            cgroups: cgroups.clone(),
            network: Arc::new(Network::new(&config, metrics.clone())),
            rt: tokio::runtime::Handle::current(),
        };
        Self::with_host_and_metrics(config, cgroups, Arc::new(host), metrics)
    }

    /// The daemon over `host` (a recording fake in unit tests).
    pub fn with_host(
        config: Config,
        cgroups: Arc<Cgroups>,
        host: Arc<dyn Host>,
    ) -> Result<Arc<Daemon>> {
        Self::with_host_and_metrics(config, cgroups, host, Arc::new(Metrics::new()))
    }

    fn with_host_and_metrics(
        config: Config,
        cgroups: Arc<Cgroups>,
        host: Arc<dyn Host>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Daemon>> {
        let layout = Layout::new(&config.root_dir, &config.state_dir);
        let store = Arc::new(Store::open_with_metrics(
            &layout.store(),
            Some(metrics.clone()),
        )?);
        let images = Images::open(
            &config.root_dir,
            &config.registry,
            store.clone(),
            metrics.clone(),
        )?;
        let names = Names::of_records(
            &store.list::<SandboxRecord>()?,
            &store.list::<ContainerRecord>()?,
        );
        let user_namespaces = host.supports_idmapped_mounts(&config.root_dir);
        if !user_namespaces {
            tracing::warn!(root_dir = %config.root_dir.display(), "the root dir's filesystem does not take idmapped mounts: pods with a user namespace are refused");
        }
        Ok(Arc::new(Daemon {
            user_namespaces,
            config,
            layout,
            store,
            images,
            host,
            cgroups,
            cpu_samples: Default::default(),
            layer_usage: Default::default(),
            names,
            locks: ObjectLocks::default(),
            events: EventHub::new(metrics.clone()),
            transitions: Mutex::new(()),
            exits: crate::container::exits::ExitWatcher::new()?,
            cleanups: Default::default(),
            metrics,
        }))
    }

    /// The one crossing point from the async gRPC layer into the
    /// synchronous domain code: `op` runs on a blocking thread, so kernel
    /// and disk work never stalls the async workers, and it runs to its end
    /// (commit or full undo) even when the caller goes away meanwhile.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        op: impl FnOnce(&Daemon) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let daemon = self.clone();
        let span = tracing::Span::current();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let result = op(&daemon);
            if let Err(unanswered) = tx.send(result) {
                match unanswered {
                    Ok(_) => tracing::info!("operation finished after its caller went away"),
                    Err(e) => {
                        tracing::warn!(error = %crate::error::chain(&e), "operation failed after its caller went away")
                    }
                }
            }
        });
        rx.await
            .map_err(|_| Error::Internal("operation panicked".into()))?
    }

    /// Deletes the blobs and snapshots nothing uses any more, in the
    /// background (after RemoveImage answered). What a crash leaves undone
    /// the collection at start-up finishes.
    pub fn collect_garbage_soon(self: &Arc<Self>) {
        if !self.images.queue_garbage_collection() {
            return;
        }
        let daemon = self.clone();
        // On a blocking thread: it deletes files.
        tokio::task::spawn_blocking(move || {
            let collected =
                tokio::runtime::Handle::current().block_on(daemon.images.collect_garbage());
            if let Err(e) = collected {
                tracing::warn!(error = %crate::error::chain(&e), "image garbage collection failed; the next one retries");
            }
        });
    }

    /// Runs `op` on container `id` (full id or unique prefix) while holding
    /// the container's lock and its sandbox's shared lock.
    pub async fn on_container<T: Send + 'static>(
        self: &Arc<Self>,
        id: &str,
        op: impl FnOnce(&Daemon, &ContainerGuard) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.on_container_if_exists(id, op)
            .await?
            .ok_or_else(|| Error::Missing {
                kind: "container",
                id: id.to_string(),
            })
    }

    /// [`Daemon::on_container`], `None` when no such container exists.
    pub async fn on_container_if_exists<T: Send + 'static>(
        self: &Arc<Self>,
        id: &str,
        op: impl FnOnce(&Daemon, &ContainerGuard) -> Result<T> + Send + 'static,
    ) -> Result<Option<T>> {
        let id = id.to_string();
        let Some(record) = self.run(move |d| crate::container::lookup(d, &id)).await? else {
            return Ok(None);
        };
        let guard = self.locks.container(&record.sandbox_id, &record.id).await;
        self.run(move |d| op(d, &guard)).await.map(Some)
    }

    /// Runs `op` in sandbox `id` (full id or unique prefix) while holding
    /// the sandbox shared: it cannot be stopped or removed meanwhile.
    pub async fn in_sandbox<T: Send + 'static>(
        self: &Arc<Self>,
        id: &str,
        op: impl FnOnce(&Daemon, &SandboxShared) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let id = id.to_string();
        let record = self.run(move |d| crate::sandbox::find(d, &id)).await?;
        let guard = self.locks.sandbox_shared(&record.id).await;
        self.run(move |d| op(d, &guard)).await
    }

    /// Runs `op` on sandbox `id` (full id or unique prefix) while holding
    /// it exclusively; `None` when no such sandbox exists.
    pub async fn on_sandbox<T: Send + 'static>(
        self: &Arc<Self>,
        id: &str,
        op: impl FnOnce(&Daemon, &SandboxGuard) -> Result<T> + Send + 'static,
    ) -> Result<Option<T>> {
        let id = id.to_string();
        let Some(record) = self.run(move |d| crate::sandbox::lookup(d, &id)).await? else {
            return Ok(None);
        };
        let guard = self.locks.sandbox(&record.id).await;
        self.run(move |d| op(d, &guard)).await.map(Some)
    }

    /// Makes a change and publishes its events in one step, in commit order.
    pub fn publish_with<T>(&self, change: impl FnOnce() -> Result<(T, Vec<Event>)>) -> Result<T> {
        let _order = self.transitions.lock().unwrap();
        let (value, events) = change()?;
        for event in events {
            self.events.publish(event);
        }
        Ok(value)
    }

    /// RuntimeReady and NetworkReady, in that order. The runtime is not
    /// ready while its store cannot be written (a full disk): nothing could
    /// be created.
    pub fn conditions(&self) -> Vec<Condition> {
        let runtime = if self.store.is_writable() {
            Condition::ready("RuntimeReady")
        } else {
            Condition {
                kind: "RuntimeReady",
                ready: false,
                reason: "MetadataStoreNotWritable".into(),
                message: format!(
                    "the metadata store {} cannot be written (is its disk full?)",
                    self.layout.store().display()
                ),
            }
        };
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
                serde_json::json!({"version": self.cgroups.version().name(), "driver": "cgroupfs"})
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
            (
                // The address bound (port 0 resolved); "" while metrics are off.
                "metricsAddress".into(),
                serde_json::Value::String(
                    self.metrics
                        .address()
                        .map(|a| a.to_string())
                        .unwrap_or_default(),
                )
                .to_string(),
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
