//! The cAdvisor-named metrics of ListMetricDescriptors and
//! ListPodSandboxMetrics, which kubelet serves at `/metrics/cadvisor` when it
//! takes them from the CRI: its `criMetricsCollector` makes one Prometheus
//! descriptor per `MetricDescriptor` (its label keys variable labels) and
//! drops a metric whose name has no descriptor or whose label values do not
//! match the keys in number. So every sample here comes from [`DESCRIPTORS`]
//! and carries one value per key, in order.
//!
//! Followed: cAdvisor's metric names, help and types; CRI-O's label keys
//! `id`, `name`, `image` (plus `cpu` on the CPU usage, `interface` on the
//! network metrics) and its pod-level network metrics named as container
//! `POD`; and, after them, the `container`, `pod`, `namespace` keys kubelet
//! adds to cAdvisor's own metrics, which dashboards select by.
//!
//! Values are built from the very readings the stats RPCs convert
//! ([`crate::pod::PodStats`]), so the two agree. The CRI carries a metric as
//! a `UInt64Value`: seconds are whole seconds, as CRI-O sends them.

use crate::container::stats::Stats;
use crate::pod::PodStats;
use crate::sandbox::namespaces::InterfaceCounters;
use crate::sandbox::stats::NetworkUsage;
use crate::store::{ContainerRecord, SandboxRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// The label keys a metric has after [`BASE_LABEL_KEYS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    Base,
    /// `cpu`: always `total` (no per-CPU split).
    Cpu,
    /// `interface`: the network interface.
    Interface,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    pub extra: Extra,
}

impl Descriptor {
    pub fn label_keys(&self) -> Vec<&'static str> {
        let mut keys = BASE_LABEL_KEYS.to_vec();
        match self.extra {
            Extra::Base => {}
            Extra::Cpu => keys.push("cpu"),
            Extra::Interface => keys.push("interface"),
        }
        keys
    }
}

/// Every metric's first label keys: the container's id, name and image
/// (CRI-O's), then its container name, pod and namespace (kubelet's).
pub const BASE_LABEL_KEYS: [&str; 6] = ["id", "name", "image", "container", "pod", "namespace"];

/// The name cAdvisor and CRI-O give the pod's own (infra) container.
pub const POD_CONTAINER: &str = "POD";

const fn d(name: &'static str, help: &'static str, kind: Kind, extra: Extra) -> Descriptor {
    Descriptor {
        name,
        help,
        kind,
        extra,
    }
}

use Extra::{Base, Cpu, Interface};
use Kind::{Counter, Gauge};

/// What ListMetricDescriptors answers; nothing else is ever sent.
pub static DESCRIPTORS: &[Descriptor] = &[
    d(
        "container_cpu_usage_seconds_total",
        "Cumulative cpu time consumed in seconds.",
        Counter,
        Cpu,
    ),
    d(
        "container_cpu_user_seconds_total",
        "Cumulative user cpu time consumed in seconds.",
        Counter,
        Base,
    ),
    d(
        "container_cpu_system_seconds_total",
        "Cumulative system cpu time consumed in seconds.",
        Counter,
        Base,
    ),
    d(
        "container_cpu_cfs_periods_total",
        "Number of elapsed enforcement period intervals.",
        Counter,
        Base,
    ),
    d(
        "container_cpu_cfs_throttled_periods_total",
        "Number of throttled period intervals.",
        Counter,
        Base,
    ),
    d(
        "container_cpu_cfs_throttled_seconds_total",
        "Total time duration the container has been throttled.",
        Counter,
        Base,
    ),
    d(
        "container_memory_usage_bytes",
        "Current memory usage in bytes, including all memory regardless of when it was accessed.",
        Gauge,
        Base,
    ),
    d(
        "container_memory_working_set_bytes",
        "Current working set in bytes.",
        Gauge,
        Base,
    ),
    d("container_memory_rss", "Size of RSS in bytes.", Gauge, Base),
    d(
        "container_memory_cache",
        "Number of bytes of page cache memory.",
        Gauge,
        Base,
    ),
    d(
        "container_memory_swap",
        "Container swap usage in bytes.",
        Gauge,
        Base,
    ),
    d(
        "container_memory_failcnt",
        "Number of memory usage hits limits.",
        Counter,
        Base,
    ),
    d(
        "container_memory_max_usage_bytes",
        "Maximum memory usage recorded in bytes.",
        Gauge,
        Base,
    ),
    d(
        "container_oom_events_total",
        "Count of out of memory events observed for the container.",
        Counter,
        Base,
    ),
    d(
        "container_spec_memory_limit_bytes",
        "Memory limit for the container in bytes (0: none).",
        Gauge,
        Base,
    ),
    d(
        "container_processes",
        "Number of processes running inside the container.",
        Gauge,
        Base,
    ),
    d(
        "container_fs_usage_bytes",
        "Number of bytes consumed by the container's writable layer.",
        Gauge,
        Base,
    ),
    d(
        "container_last_seen",
        "Last time a container was seen by the exporter.",
        Gauge,
        Base,
    ),
    d(
        "container_start_time_seconds",
        "Start time of the container since unix epoch in seconds.",
        Gauge,
        Base,
    ),
    d(
        "container_network_receive_bytes_total",
        "Cumulative count of bytes received.",
        Counter,
        Interface,
    ),
    d(
        "container_network_receive_packets_total",
        "Cumulative count of packets received.",
        Counter,
        Interface,
    ),
    d(
        "container_network_receive_packets_dropped_total",
        "Cumulative count of packets dropped while receiving.",
        Counter,
        Interface,
    ),
    d(
        "container_network_receive_errors_total",
        "Cumulative count of errors encountered while receiving.",
        Counter,
        Interface,
    ),
    d(
        "container_network_transmit_bytes_total",
        "Cumulative count of bytes transmitted.",
        Counter,
        Interface,
    ),
    d(
        "container_network_transmit_packets_total",
        "Cumulative count of packets transmitted.",
        Counter,
        Interface,
    ),
    d(
        "container_network_transmit_packets_dropped_total",
        "Cumulative count of packets dropped while transmitting.",
        Counter,
        Interface,
    ),
    d(
        "container_network_transmit_errors_total",
        "Cumulative count of errors encountered while transmitting.",
        Counter,
        Interface,
    ),
];

pub fn descriptor(name: &str) -> Option<&'static Descriptor> {
    DESCRIPTORS.iter().find(|d| d.name == name)
}

/// One metric value with its label values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub descriptor: &'static Descriptor,
    pub label_values: Vec<String>,
    pub value: u64,
    pub timestamp_ns: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSamples {
    pub container_id: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSamples {
    pub sandbox_id: String,
    /// The pod's own: its network interfaces.
    pub samples: Vec<Sample>,
    pub containers: Vec<ContainerSamples>,
}

/// Collects samples sharing base label values and a timestamp.
struct Builder<'a> {
    base: &'a [String],
    timestamp_ns: i64,
    out: Vec<Sample>,
}

impl Builder<'_> {
    /// Adds `name` if the kernel gave a value. A name missing from
    /// [`DESCRIPTORS`] is never sent (the unit tests keep them in step).
    fn add(&mut self, name: &str, extra: Option<&str>, value: Option<u64>) {
        let (Some(descriptor), Some(value)) = (descriptor(name), value) else {
            return;
        };
        let mut label_values = self.base.to_vec();
        label_values.extend(extra.map(str::to_string));
        self.out.push(Sample {
            descriptor,
            label_values,
            value,
            timestamp_ns: self.timestamp_ns,
        });
    }
}

const NS_PER_S: u64 = 1_000_000_000;

fn seconds(ns: Option<u64>) -> Option<u64> {
    ns.map(|ns| ns / NS_PER_S)
}

/// The base label values of a container of pod `pod`.
pub fn container_labels(pod: &SandboxRecord, c: &ContainerRecord) -> Vec<String> {
    vec![
        c.id.clone(),
        c.name.clone(),
        c.image_ref.clone(),
        c.name.clone(),
        pod.name.clone(),
        pod.namespace.clone(),
    ]
}

/// The base label values of the pod's own metrics, as container `POD`.
pub fn pod_labels(pod: &SandboxRecord) -> Vec<String> {
    vec![
        pod.id.clone(),
        POD_CONTAINER.into(),
        String::new(),
        POD_CONTAINER.into(),
        pod.name.clone(),
        pod.namespace.clone(),
    ]
}

/// A container's samples, from the stats ContainerStats reports.
pub fn container_samples(pod: &SandboxRecord, c: &ContainerRecord, s: &Stats) -> Vec<Sample> {
    let base = container_labels(pod, c);
    let u = &s.usage;
    let k = &u.counters;
    let mut b = Builder {
        base: &base,
        timestamp_ns: u.timestamp_ns,
        out: Vec::new(),
    };
    b.add(
        "container_cpu_usage_seconds_total",
        Some("total"),
        seconds(k.cpu_usage_ns),
    );
    b.add(
        "container_cpu_user_seconds_total",
        None,
        seconds(k.cpu_user_ns),
    );
    b.add(
        "container_cpu_system_seconds_total",
        None,
        seconds(k.cpu_system_ns),
    );
    b.add("container_cpu_cfs_periods_total", None, k.cpu_periods);
    b.add(
        "container_cpu_cfs_throttled_periods_total",
        None,
        k.cpu_throttled_periods,
    );
    b.add(
        "container_cpu_cfs_throttled_seconds_total",
        None,
        seconds(k.cpu_throttled_ns),
    );
    b.add("container_memory_usage_bytes", None, k.memory_usage);
    b.add(
        "container_memory_working_set_bytes",
        None,
        k.memory_working_set,
    );
    b.add("container_memory_rss", None, k.memory_rss);
    b.add("container_memory_cache", None, k.memory_cache);
    b.add("container_memory_swap", None, k.swap_usage);
    b.add("container_memory_failcnt", None, k.memory_failcnt);
    b.add("container_memory_max_usage_bytes", None, k.memory_max_usage);
    b.add("container_oom_events_total", None, k.oom_kills);
    // cAdvisor's 0 for no limit; only while the memory cgroup is readable.
    b.add(
        "container_spec_memory_limit_bytes",
        None,
        k.memory_usage.map(|_| k.memory_limit.unwrap_or(0)),
    );
    b.add("container_processes", None, k.pids);
    b.add(
        "container_fs_usage_bytes",
        None,
        Some(s.writable_layer.bytes),
    );
    b.add(
        "container_last_seen",
        None,
        u64::try_from(u.timestamp_ns).ok().map(|ns| ns / NS_PER_S),
    );
    b.add(
        "container_start_time_seconds",
        None,
        u64::try_from(c.started_at_ns)
            .ok()
            .filter(|ns| *ns > 0)
            .map(|ns| ns / NS_PER_S),
    );
    b.out
}

/// The pod's network samples, one set per interface (default first).
pub fn network_samples(base: &[String], n: &NetworkUsage) -> Vec<Sample> {
    let mut b = Builder {
        base,
        timestamp_ns: n.timestamp_ns,
        out: Vec::new(),
    };
    let interfaces: Vec<&InterfaceCounters> =
        n.default_interface.iter().chain(&n.interfaces).collect();
    for i in interfaces {
        let name = Some(i.name.as_str());
        b.add(
            "container_network_receive_bytes_total",
            name,
            Some(i.rx_bytes),
        );
        b.add(
            "container_network_receive_packets_total",
            name,
            Some(i.rx_packets),
        );
        b.add(
            "container_network_receive_packets_dropped_total",
            name,
            Some(i.rx_dropped),
        );
        b.add(
            "container_network_receive_errors_total",
            name,
            Some(i.rx_errors),
        );
        b.add(
            "container_network_transmit_bytes_total",
            name,
            Some(i.tx_bytes),
        );
        b.add(
            "container_network_transmit_packets_total",
            name,
            Some(i.tx_packets),
        );
        b.add(
            "container_network_transmit_packets_dropped_total",
            name,
            Some(i.tx_dropped),
        );
        b.add(
            "container_network_transmit_errors_total",
            name,
            Some(i.tx_errors),
        );
    }
    b.out
}

/// A pod's metrics: its network as container `POD`, then each running
/// container's.
pub fn pod_samples(p: &PodStats) -> PodSamples {
    PodSamples {
        sandbox_id: p.record.id.clone(),
        samples: p
            .usage
            .network
            .as_ref()
            .map(|n| network_samples(&pod_labels(&p.record), n))
            .unwrap_or_default(),
        containers: p
            .containers
            .iter()
            .map(|(c, s)| ContainerSamples {
                container_id: c.id.clone(),
                samples: container_samples(&p.record, c, s),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::stats::CgroupUsage;
    use crate::sandbox::stats::SandboxUsage;
    use std::collections::HashSet;

    fn full_stats() -> Stats {
        Stats {
            usage: CgroupUsage {
                timestamp_ns: 1_700_000_000_123_456_789,
                cpu_nano_cores: Some(5),
                counters: berth_cgroup::CgroupStats {
                    cpu_usage_ns: Some(3_500_000_000),
                    cpu_user_ns: Some(2_000_000_000),
                    cpu_system_ns: Some(1_500_000_000),
                    cpu_periods: Some(10),
                    cpu_throttled_periods: Some(4),
                    cpu_throttled_ns: Some(7_000_000_000),
                    memory_usage: Some(40 << 20),
                    memory_working_set: Some(33 << 20),
                    memory_rss: Some(1 << 20),
                    memory_cache: Some(32 << 20),
                    memory_max_usage: Some(41 << 20),
                    memory_failcnt: Some(2),
                    memory_limit: Some(64 << 20),
                    oom_kills: Some(1),
                    page_faults: Some(100),
                    major_page_faults: Some(1),
                    swap_usage: Some(0),
                    swap_limit: None,
                    pids: Some(3),
                    ..Default::default()
                },
            },
            writable_layer: crate::image::Usage {
                bytes: 4096,
                inodes: 2,
            },
            writable_layer_path: "/x/upper".into(),
        }
    }

    fn pod_stats() -> PodStats {
        let record = SandboxRecord {
            id: "pod1".into(),
            name: "web".into(),
            namespace: "ns".into(),
            ..Default::default()
        };
        let c = ContainerRecord {
            id: "c1".into(),
            sandbox_id: "pod1".into(),
            name: "app".into(),
            image_ref: "busybox:latest".into(),
            started_at_ns: 1_600_000_000_900_000_000,
            ..Default::default()
        };
        let network = NetworkUsage {
            timestamp_ns: 9,
            default_interface: Some(InterfaceCounters {
                name: "eth0".into(),
                rx_bytes: 100,
                rx_packets: 2,
                tx_bytes: 50,
                tx_packets: 1,
                ..Default::default()
            }),
            interfaces: vec![InterfaceCounters {
                name: "net1".into(),
                rx_bytes: 7,
                ..Default::default()
            }],
        };
        PodStats {
            record,
            usage: SandboxUsage {
                cgroup: CgroupUsage::default(),
                network: Some(network),
            },
            containers: vec![(c, full_stats())],
        }
    }

    fn all(p: &PodSamples) -> Vec<&Sample> {
        p.samples
            .iter()
            .chain(p.containers.iter().flat_map(|c| &c.samples))
            .collect()
    }

    fn value(samples: &[Sample], name: &str) -> Option<u64> {
        samples
            .iter()
            .find(|s| s.descriptor.name == name)
            .map(|s| s.value)
    }

    #[test]
    fn descriptors_are_unique_and_cadvisor_named() {
        let names: HashSet<_> = DESCRIPTORS.iter().map(|d| d.name).collect();
        assert_eq!(names.len(), DESCRIPTORS.len());
        for d in DESCRIPTORS {
            assert!(d.name.starts_with("container_"), "{}", d.name);
            // Prometheus: counters end in _total, gauges do not.
            let total = d.name.ends_with("_total") || d.name == "container_memory_failcnt";
            assert_eq!(total, d.kind == Kind::Counter, "{}", d.name);
            assert!(!d.help.is_empty());
        }
    }

    #[test]
    fn every_sample_has_its_descriptor_and_one_value_per_key() {
        let p = pod_samples(&pod_stats());
        let samples = all(&p);
        let mut seen = HashSet::new();
        for s in &samples {
            let d = descriptor(s.descriptor.name).expect("a descriptor");
            assert_eq!(d, s.descriptor);
            assert_eq!(s.label_values.len(), d.label_keys().len(), "{}", d.name);
            seen.insert(d.name);
        }
        // A full reading fills every descriptor: none is listed in vain.
        let listed: HashSet<_> = DESCRIPTORS.iter().map(|d| d.name).collect();
        assert_eq!(seen, listed);
    }

    #[test]
    fn container_values_come_from_its_stats() {
        let p = pod_samples(&pod_stats());
        assert_eq!(p.sandbox_id, "pod1");
        let c = &p.containers[0];
        assert_eq!(c.container_id, "c1");
        let s = &c.samples;
        let cpu = s
            .iter()
            .find(|s| s.descriptor.name == "container_cpu_usage_seconds_total")
            .unwrap();
        assert_eq!(cpu.value, 3, "whole seconds");
        assert_eq!(
            cpu.label_values,
            ["c1", "app", "busybox:latest", "app", "web", "ns", "total"]
        );
        assert_eq!(cpu.timestamp_ns, 1_700_000_000_123_456_789);
        assert_eq!(value(s, "container_cpu_user_seconds_total"), Some(2));
        assert_eq!(value(s, "container_cpu_system_seconds_total"), Some(1));
        assert_eq!(
            value(s, "container_cpu_cfs_throttled_seconds_total"),
            Some(7)
        );
        assert_eq!(
            value(s, "container_memory_working_set_bytes"),
            Some(33 << 20)
        );
        assert_eq!(value(s, "container_memory_usage_bytes"), Some(40 << 20));
        assert_eq!(value(s, "container_memory_rss"), Some(1 << 20));
        assert_eq!(value(s, "container_memory_cache"), Some(32 << 20));
        assert_eq!(
            value(s, "container_spec_memory_limit_bytes"),
            Some(64 << 20)
        );
        assert_eq!(value(s, "container_oom_events_total"), Some(1));
        assert_eq!(value(s, "container_processes"), Some(3));
        assert_eq!(value(s, "container_fs_usage_bytes"), Some(4096));
        assert_eq!(value(s, "container_last_seen"), Some(1_700_000_000));
        assert_eq!(
            value(s, "container_start_time_seconds"),
            Some(1_600_000_000)
        );
    }

    #[test]
    fn pod_network_per_interface_as_container_pod() {
        let p = pod_samples(&pod_stats());
        let rx: Vec<_> = p
            .samples
            .iter()
            .filter(|s| s.descriptor.name == "container_network_receive_bytes_total")
            .collect();
        assert_eq!(rx.len(), 2);
        assert_eq!(
            rx[0].label_values,
            ["pod1", "POD", "", "POD", "web", "ns", "eth0"]
        );
        assert_eq!((rx[0].value, rx[0].timestamp_ns), (100, 9));
        assert_eq!(rx[1].label_values[6], "net1");
        assert_eq!(rx[1].value, 7);
        assert!(
            p.samples
                .iter()
                .all(|s| s.descriptor.extra == Extra::Interface)
        );
    }

    #[test]
    fn what_the_kernel_does_not_give_is_left_out() {
        let mut stats = pod_stats();
        stats.usage.network = None;
        // A container whose cgroup is gone: no cgroup metric at all.
        stats.containers[0].1.usage.counters = Default::default();
        stats.containers[0].0.started_at_ns = 0;
        let p = pod_samples(&stats);
        assert!(p.samples.is_empty(), "host network: no pod metrics");
        let names: Vec<_> = p.containers[0]
            .samples
            .iter()
            .map(|s| s.descriptor.name)
            .collect();
        assert_eq!(names, ["container_fs_usage_bytes", "container_last_seen"]);
    }

    #[test]
    fn no_limit_is_zero_as_cadvisor() {
        let mut stats = full_stats();
        stats.usage.counters.memory_limit = None;
        let s = container_samples(
            &SandboxRecord::default(),
            &ContainerRecord::default(),
            &stats,
        );
        assert_eq!(value(&s, "container_spec_memory_limit_bytes"), Some(0));
    }
}
