//! Records → CRI messages, and CRI filters.

use std::collections::HashMap;

use k8s_cri::v1 as cri;

use crate::sandbox::NamespaceOptionsView;
use crate::store::{ContainerRecord, ContainerState, KeyValue, SandboxRecord, SandboxState};

pub fn map(pairs: &[KeyValue]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone()))
        .collect()
}

pub fn labels_match(labels: &[KeyValue], selector: &HashMap<String, String>) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.iter().any(|kv| &kv.key == k && &kv.value == v))
}

/// The id, sandbox id (both by prefix) and label parts of a container filter.
pub fn container_matches(
    r: &ContainerRecord,
    id: &str,
    sandbox_id: &str,
    selector: &HashMap<String, String>,
) -> bool {
    r.id.starts_with(id)
        && r.sandbox_id.starts_with(sandbox_id)
        && labels_match(&r.labels, selector)
}

pub fn sandbox_state(s: SandboxState) -> cri::PodSandboxState {
    match s {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady,
        SandboxState::NotReady => cri::PodSandboxState::SandboxNotready,
    }
}

pub fn container_state(s: ContainerState) -> cri::ContainerState {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated,
        ContainerState::Running => cri::ContainerState::ContainerRunning,
        ContainerState::Exited => cri::ContainerState::ContainerExited,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown,
    }
}

pub fn sandbox_metadata(r: &SandboxRecord) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: r.name.clone(),
        uid: r.uid.clone(),
        namespace: r.namespace.clone(),
        attempt: r.attempt,
    }
}

pub fn pod_sandbox(r: &SandboxRecord) -> cri::PodSandbox {
    cri::PodSandbox {
        id: r.id.clone(),
        metadata: Some(sandbox_metadata(r)),
        state: sandbox_state(r.state).into(),
        created_at: r.created_at_ns,
        labels: map(&r.labels),
        annotations: map(&r.annotations),
        runtime_handler: r.runtime_handler.clone(),
    }
}

pub fn pod_sandbox_status(
    r: &SandboxRecord,
    config: &cri::PodSandboxConfig,
) -> cri::PodSandboxStatus {
    let ns = NamespaceOptionsView::of(config);
    let network = if ns.network == cri::NamespaceMode::Node {
        None
    } else {
        Some(cri::PodSandboxNetworkStatus {
            ip: r.pod_ips.first().cloned().unwrap_or_default(),
            additional_ips: r
                .pod_ips
                .iter()
                .skip(1)
                .map(|ip| cri::PodIp { ip: ip.clone() })
                .collect(),
        })
    };
    cri::PodSandboxStatus {
        id: r.id.clone(),
        metadata: Some(sandbox_metadata(r)),
        state: sandbox_state(r.state).into(),
        created_at: r.created_at_ns,
        network,
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: ns.network.into(),
                    pid: ns.pid.into(),
                    ipc: ns.ipc.into(),
                    ..Default::default()
                }),
            }),
        }),
        labels: map(&r.labels),
        annotations: map(&r.annotations),
        runtime_handler: r.runtime_handler.clone(),
    }
}

pub fn container_metadata(r: &ContainerRecord) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: r.name.clone(),
        attempt: r.attempt,
    }
}

pub fn container(r: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: r.id.clone(),
        pod_sandbox_id: r.sandbox_id.clone(),
        metadata: Some(container_metadata(r)),
        image: Some(cri::ImageSpec {
            image: r.image_ref.clone(),
            ..Default::default()
        }),
        image_ref: r.image_id.clone(),
        state: container_state(r.state).into(),
        created_at: r.created_at_ns,
        labels: map(&r.labels),
        annotations: map(&r.annotations),
        image_id: r.image_id.clone(),
    }
}

pub fn container_status(
    r: &ContainerRecord,
    config: Option<&cri::ContainerConfig>,
) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: r.id.clone(),
        metadata: Some(container_metadata(r)),
        state: container_state(r.state).into(),
        created_at: r.created_at_ns,
        started_at: r.started_at_ns,
        finished_at: r.finished_at_ns,
        exit_code: r.exit_code,
        image: Some(cri::ImageSpec {
            image: r.image_ref.clone(),
            ..Default::default()
        }),
        image_ref: r.image_id.clone(),
        reason: r.reason.clone(),
        message: r.message.clone(),
        labels: map(&r.labels),
        annotations: map(&r.annotations),
        mounts: config.map(|c| c.mounts.clone()).unwrap_or_default(),
        log_path: r.log_path.clone(),
        resources: config
            .and_then(|c| c.linux.as_ref())
            .and_then(|l| l.resources.clone())
            .map(|linux| cri::ContainerResources {
                linux: Some(linux),
                ..Default::default()
            }),
        image_id: r.image_id.clone(),
        user: r.user.as_ref().map(|u| cri::ContainerUser {
            linux: Some(cri::LinuxContainerUser {
                uid: u.uid.into(),
                gid: u.gid.into(),
                supplemental_groups: u
                    .supplemental_groups
                    .iter()
                    .map(|g| i64::from(*g))
                    .collect(),
            }),
        }),
    }
}

/// A container's status with the config stored in its record.
pub fn container_status_of(r: &ContainerRecord) -> cri::ContainerStatus {
    let config: Option<cri::ContainerConfig> = serde_json::from_str(&r.config_json).ok();
    container_status(r, config.as_ref())
}

fn u64_value(v: Option<u64>) -> Option<cri::UInt64Value> {
    v.map(|value| cri::UInt64Value { value })
}

pub fn container_stats(
    r: &ContainerRecord,
    s: &crate::container::stats::Stats,
) -> cri::ContainerStats {
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(container_metadata(r)),
            labels: map(&r.labels),
            annotations: map(&r.annotations),
        }),
        cpu: Some(cri::CpuUsage {
            timestamp: s.timestamp_ns,
            usage_core_nano_seconds: u64_value(s.cpu_usage_ns),
            usage_nano_cores: u64_value(s.cpu_nano_cores),
        }),
        memory: Some(cri::MemoryUsage {
            timestamp: s.timestamp_ns,
            working_set_bytes: u64_value(s.memory_working_set),
            available_bytes: u64_value(s.memory_available),
            usage_bytes: u64_value(s.memory_usage),
            rss_bytes: u64_value(s.memory_rss),
            page_faults: u64_value(s.page_faults),
            major_page_faults: u64_value(s.major_page_faults),
        }),
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: s.timestamp_ns,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: s.writable_layer_path.display().to_string(),
            }),
            used_bytes: u64_value(Some(s.writable_layer.bytes)),
            inodes_used: u64_value(Some(s.writable_layer.inodes)),
        }),
        swap: s.swap_usage.map(|used| cri::SwapUsage {
            timestamp: s.timestamp_ns,
            swap_available_bytes: u64_value(s.swap_available),
            swap_usage_bytes: u64_value(Some(used)),
        }),
    }
}
