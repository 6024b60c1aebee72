//! The records kept in the store. Fields added later get `#[serde(default)]`
//! so older records still read; incompatible changes bump `VERSION`.

use serde::{Deserialize, Serialize};

use super::Record;
use crate::process::ProcessIdentity;

/// An ordered key/value pair (labels, annotations) that keeps JSON stable.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

impl KeyValue {
    /// A map as pairs sorted by key, so stored records are stable.
    pub fn sorted(map: &std::collections::HashMap<String, String>) -> Vec<KeyValue> {
        let mut v: Vec<KeyValue> = map.iter().map(|(k, v)| KeyValue::new(k, v)).collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    pub fn new(key: impl Into<String>, value: impl Into<String>) -> Self {
        KeyValue {
            key: key.into(),
            value: value.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    #[default]
    Ready,
    NotReady,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SandboxRecord {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub attempt: u32,
    pub state: SandboxState,
    pub created_at_ns: i64,
    pub runtime_handler: String,
    pub labels: Vec<KeyValue>,
    pub annotations: Vec<KeyValue>,
    pub log_directory: String,
    /// The CRI `PodSandboxConfig` as JSON, kept whole so status and later
    /// container creation see exactly what kubelet asked for.
    pub config_json: String,
    /// The pod's cgroup, parent of its containers' cgroups.
    pub cgroup_parent: String,
    /// Whether berthd created the pod cgroup (and so removes it).
    pub created_cgroup: bool,
    pub hostname: String,
    pub pod_ips: Vec<String>,
    /// The infra process holding a shared PID namespace (0: none).
    pub infra_pid: i32,
    /// The same process, identified so a recycled pid is never taken for it.
    pub infra: ProcessIdentity,
    /// Why the sandbox is not ready, when berthd found it broken.
    pub reason: String,
}

impl Record for SandboxRecord {
    const TABLE: &'static str = "sandboxes";
    const VERSION: u32 = 1;
    const KIND: &'static str = "pod sandbox";
    fn key(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContainerState {
    #[default]
    Created,
    Running,
    Exited,
    Unknown,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    pub name: String,
    pub attempt: u32,
    pub image_ref: String,
    pub image_id: String,
    pub state: ContainerState,
    pub created_at_ns: i64,
    pub started_at_ns: i64,
    pub finished_at_ns: i64,
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub log_path: String,
    pub labels: Vec<KeyValue>,
    pub annotations: Vec<KeyValue>,
    /// Snapshots the container's rootfs stands on; they outlive the image
    /// record while the container exists.
    pub snapshot_chain_ids: Vec<String>,
    /// The container's cgroup path, relative to the hierarchy roots.
    pub cgroups_path: String,
    /// The container's init as seen from the host, once started.
    pub pid: i32,
    /// The container's shim (monitor) process; none (pid 0) until
    /// StartContainer launches it.
    pub shim: ProcessIdentity,
    /// The CRI `ContainerConfig` as JSON.
    pub config_json: String,
    /// Who its process runs as (from its spec); `None` in records of
    /// containers created before it was kept.
    pub user: Option<ProcessUser>,
    /// The signal StopContainer sends first, resolved at create (config,
    /// image, SIGTERM); 0 in records made before it was kept.
    pub stop_signal: i32,
    /// The images mounted as volumes (CRI `Mount.image`); their snapshots
    /// outlive their image records while the container exists.
    #[serde(default)]
    pub image_volumes: Vec<ImageVolume>,
}

impl ContainerRecord {
    /// Whether its shim was launched (by StartContainer): until then the
    /// container has no process, cgroup or monitor to look at.
    pub fn has_shim(&self) -> bool {
        self.shim.pid > 0
    }
}

/// An image a container mounts as a volume, as resolved at create.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageVolume {
    /// The CRI mount's container_path, as asked.
    pub container_path: String,
    pub image_id: String,
    /// Chain ids of the image's snapshots, base first.
    pub chain_ids: Vec<String>,
}

/// A process's uid, primary gid and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ProcessUser {
    pub uid: u32,
    pub gid: u32,
    pub supplemental_groups: Vec<u32>,
}

impl Record for ContainerRecord {
    const TABLE: &'static str = "containers";
    const VERSION: u32 = 1;
    const KIND: &'static str = "container";
    fn key(&self) -> &str {
        &self.id
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageRecord {
    /// The config digest, `sha256:...`.
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub size: u64,
    pub pinned: bool,
    /// Layer digests (compressed, as in the manifest), base first.
    pub layers: Vec<String>,
    /// Chain ids of the unpacked snapshots, base first.
    pub chain_ids: Vec<String>,
    /// Digests of the uncompressed layers, base first.
    pub diff_ids: Vec<String>,
    /// The manifest and, for an index, the index: kept in the content store.
    pub manifest_digests: Vec<String>,
    /// The OCI image config as JSON.
    pub config_json: String,
}

impl Record for ImageRecord {
    const TABLE: &'static str = "images";
    const VERSION: u32 = 1;
    const KIND: &'static str = "image";
    fn key(&self) -> &str {
        &self.id
    }
}
