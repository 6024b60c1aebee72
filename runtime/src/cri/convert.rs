//! Records → CRI messages, and CRI filters.

use std::collections::HashMap;

use berth_cri::v1 as cri;

use crate::container::stats::CgroupUsage;
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

/// A ListPodSandboxStats filter: id by prefix, labels.
pub fn pod_stats_matches(r: &SandboxRecord, filter: Option<&cri::PodSandboxStatsFilter>) -> bool {
    filter.is_none_or(|f| r.id.starts_with(&f.id) && labels_match(&r.labels, &f.label_selector))
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
        mounts: config.map(|c| mounts_status(r, c)).unwrap_or_default(),
        log_path: r.log_path.clone(),
        resources: config
            .and_then(|c| c.linux.as_ref())
            .and_then(|l| l.resources.clone())
            .map(|linux| cri::ContainerResources {
                linux: Some(linux),
                ..Default::default()
            }),
        image_id: r.image_id.clone(),
        stop_signal: if r.stop_signal > 0 {
            crate::container::signal::to_cri(r.stop_signal).into()
        } else {
            cri::Signal::RuntimeDefault.into()
        },
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

/// The mounts as requested, each image volume's `image_ref` set to the id
/// of the image it mounts (CRI 1.36: kubelet reports it in the pod status).
fn mounts_status(r: &ContainerRecord, config: &cri::ContainerConfig) -> Vec<cri::Mount> {
    let mut mounts = config.mounts.clone();
    for m in &mut mounts {
        let Some(image) = m.image.as_mut() else {
            continue;
        };
        if let Some(v) = r
            .image_volumes
            .iter()
            .find(|v| v.container_path == m.container_path)
        {
            image.image_ref = v.image_id.clone();
        }
    }
    mounts
}

/// A container's status with the config stored in its record.
pub fn container_status_of(r: &ContainerRecord) -> cri::ContainerStatus {
    let config: Option<cri::ContainerConfig> = serde_json::from_str(&r.config_json).ok();
    container_status(r, config.as_ref())
}

fn u64_value(v: Option<u64>) -> Option<cri::UInt64Value> {
    v.map(|value| cri::UInt64Value { value })
}

/// Pressure stall information as CRI carries it: total in ns, averages in
/// percent.
fn psi(p: Option<berth_cgroup::Pressure>) -> Option<cri::PsiStats> {
    let data = |l: berth_cgroup::PressureLine| cri::PsiData {
        total: l.total_us.saturating_mul(1000),
        avg10: f64::from(l.avg10_centi) / 100.0,
        avg60: f64::from(l.avg60_centi) / 100.0,
        avg300: f64::from(l.avg300_centi) / 100.0,
    };
    p.map(|p| cri::PsiStats {
        full: p.full.map(data),
        some: Some(data(p.some)),
    })
}

pub fn cpu_usage(u: &CgroupUsage) -> cri::CpuUsage {
    cri::CpuUsage {
        timestamp: u.timestamp_ns,
        usage_core_nano_seconds: u64_value(u.counters.cpu_usage_ns),
        usage_nano_cores: u64_value(u.cpu_nano_cores),
        psi: psi(u.counters.cpu_pressure),
    }
}

fn io_usage(u: &CgroupUsage) -> Option<cri::IoUsage> {
    u.counters.io_pressure.map(|p| cri::IoUsage {
        timestamp: u.timestamp_ns,
        psi: psi(Some(p)),
    })
}

pub fn memory_usage(u: &CgroupUsage) -> cri::MemoryUsage {
    let c = &u.counters;
    cri::MemoryUsage {
        timestamp: u.timestamp_ns,
        working_set_bytes: u64_value(c.memory_working_set),
        available_bytes: u64_value(c.memory_available()),
        usage_bytes: u64_value(c.memory_usage),
        rss_bytes: u64_value(c.memory_rss),
        page_faults: u64_value(c.page_faults),
        major_page_faults: u64_value(c.major_page_faults),
        psi: psi(c.memory_pressure),
    }
}

pub fn container_stats(
    r: &ContainerRecord,
    s: &crate::container::stats::Stats,
) -> cri::ContainerStats {
    let u = &s.usage;
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: r.id.clone(),
            metadata: Some(container_metadata(r)),
            labels: map(&r.labels),
            annotations: map(&r.annotations),
        }),
        cpu: Some(cpu_usage(u)),
        memory: Some(memory_usage(u)),
        writable_layer: Some(cri::FilesystemUsage {
            timestamp: u.timestamp_ns,
            fs_id: Some(cri::FilesystemIdentifier {
                mountpoint: s.writable_layer_path.display().to_string(),
            }),
            used_bytes: u64_value(Some(s.writable_layer.bytes)),
            inodes_used: u64_value(Some(s.writable_layer.inodes)),
        }),
        swap: u.counters.swap_usage.map(|used| cri::SwapUsage {
            timestamp: u.timestamp_ns,
            swap_available_bytes: u64_value(u.counters.swap_available()),
            swap_usage_bytes: u64_value(Some(used)),
        }),
        io: io_usage(u),
    }
}

fn interface_usage(
    c: &crate::sandbox::namespaces::InterfaceCounters,
) -> cri::NetworkInterfaceUsage {
    cri::NetworkInterfaceUsage {
        name: c.name.clone(),
        rx_bytes: u64_value(Some(c.rx_bytes)),
        rx_errors: u64_value(Some(c.rx_errors)),
        tx_bytes: u64_value(Some(c.tx_bytes)),
        tx_errors: u64_value(Some(c.tx_errors)),
    }
}

pub fn pod_sandbox_stats(p: &crate::pod::PodStats) -> cri::PodSandboxStats {
    let r = &p.record;
    let u = &p.usage.cgroup;
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: r.id.clone(),
            metadata: Some(sandbox_metadata(r)),
            labels: map(&r.labels),
            annotations: map(&r.annotations),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: Some(cpu_usage(u)),
            memory: Some(memory_usage(u)),
            network: p.usage.network.as_ref().map(|n| cri::NetworkUsage {
                timestamp: n.timestamp_ns,
                default_interface: n.default_interface.as_ref().map(interface_usage),
                interfaces: n.interfaces.iter().map(interface_usage).collect(),
            }),
            process: Some(cri::ProcessUsage {
                timestamp: u.timestamp_ns,
                process_count: u64_value(u.counters.pids),
            }),
            containers: p
                .containers
                .iter()
                .map(|(c, s)| container_stats(c, s))
                .collect(),
            io: io_usage(u),
        }),
        windows: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_stats_filter_by_id_prefix_and_labels() {
        let r = SandboxRecord {
            id: "abcdef".into(),
            labels: KeyValue::sorted(&HashMap::from([
                ("app".to_string(), "web".to_string()),
                ("tier".to_string(), "front".to_string()),
            ])),
            ..Default::default()
        };
        let f = |id: &str, labels: &[(&str, &str)]| cri::PodSandboxStatsFilter {
            id: id.into(),
            label_selector: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert!(pod_stats_matches(&r, None));
        assert!(pod_stats_matches(&r, Some(&f("", &[]))));
        assert!(pod_stats_matches(&r, Some(&f("abc", &[("app", "web")]))));
        assert!(!pod_stats_matches(&r, Some(&f("abd", &[]))));
        assert!(!pod_stats_matches(&r, Some(&f("", &[("app", "db")]))));
        assert!(!pod_stats_matches(&r, Some(&f("", &[("zone", "a")]))));
    }

    #[test]
    fn an_image_volume_reports_the_id_of_its_image() {
        let record = ContainerRecord {
            image_volumes: vec![crate::store::ImageVolume {
                container_path: "/iv".into(),
                image_id: "sha256:feed".into(),
                chain_ids: vec![],
            }],
            ..Default::default()
        };
        let config = cri::ContainerConfig {
            mounts: vec![
                cri::Mount {
                    container_path: "/data".into(),
                    host_path: "/srv/data".into(),
                    ..Default::default()
                },
                cri::Mount {
                    container_path: "/iv".into(),
                    image: Some(cri::ImageSpec {
                        image: "example.com/data:1".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let mounts = container_status(&record, Some(&config)).mounts;
        assert_eq!(mounts[0], config.mounts[0]);
        let image = mounts[1].image.as_ref().unwrap();
        assert_eq!(
            (image.image.as_str(), image.image_ref.as_str()),
            ("example.com/data:1", "sha256:feed")
        );
    }
}
