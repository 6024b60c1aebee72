//! berthd's Prometheus metrics: one registry, typed families, and the
//! methods the domain records through (`Daemon::metrics`).
//!
//! Counters and histograms are atomics, so recording never blocks a CRI
//! call. What is a state rather than an event (sandboxes and containers
//! per state, live shims, the process's own numbers) is computed at scrape
//! time from the store's read transactions (redb MVCC: they never wait for
//! a writer) and /proc, never under a lock a CRI call waits on.
//!
//! Every label value comes from a closed set or from the operator's
//! config (CNI plugin types found in the bin dirs): never from a request.

pub mod http;

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabels {
    plugin_type: String,
    command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriberLabel {
    subscriber: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<MethodLabel>,
    pulls: Family<ResultLabel, Counter>,
    pulled_bytes: Counter,
    pull_duration: Histogram,
    cni_duration: HistogramFamily<CniLabels>,
    store_write: Histogram,
    events_published: Counter,
    events_dropped: Family<SubscriberLabel, Counter>,
    /// The address the metrics server bound, once it has.
    address: OnceLock<SocketAddr>,
}

fn rpc_histogram() -> Histogram {
    // 0.5 ms .. 16 s: list calls take a millisecond, a pod start seconds.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

fn cni_histogram() -> Histogram {
    // 1 ms .. 8 s: in-process plugins take a millisecond, exec'd ones more.
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "berth_cri_requests",
            "CRI calls finished, by method and gRPC code",
            rpc_requests.clone(),
        );
        let rpc_duration = HistogramFamily::<MethodLabel>::new_with_constructor(rpc_histogram);
        registry.register(
            "berth_cri_request_duration_seconds",
            "Time to answer a CRI call (to the response headers for a stream), by method",
            rpc_duration.clone(),
        );
        let pulls = Family::<ResultLabel, Counter>::default();
        registry.register(
            "berth_image_pulls",
            "Image pulls finished, by result (success or failure)",
            pulls.clone(),
        );
        let pulled_bytes = Counter::default();
        registry.register(
            "berth_image_pulled_bytes",
            "Blob bytes downloaded from registries",
            pulled_bytes.clone(),
        );
        // 100 ms .. 7 min.
        let pull_duration = Histogram::new(exponential_buckets(0.1, 2.0, 13));
        registry.register(
            "berth_image_pull_duration_seconds",
            "Time a pull took, successful or not",
            pull_duration.clone(),
        );
        let cni_duration = HistogramFamily::<CniLabels>::new_with_constructor(cni_histogram);
        registry.register(
            "berth_cni_plugin_duration_seconds",
            "Time one CNI plugin call took, by plugin type and command",
            cni_duration.clone(),
        );
        // 100 us .. 1.6 s: a commit is an fsync.
        let store_write = Histogram::new(exponential_buckets(0.0001, 2.0, 15));
        registry.register(
            "berth_store_write_duration_seconds",
            "Time a metadata store write transaction took, commit included",
            store_write.clone(),
        );
        let events_published = Counter::default();
        registry.register(
            "berth_events_published",
            "Container lifecycle events published",
            events_published.clone(),
        );
        let events_dropped = Family::<SubscriberLabel, Counter>::default();
        registry.register(
            "berth_events_dropped",
            "Events a subscriber did not get because its buffer was full (it is then dropped), by subscriber kind",
            events_dropped.clone(),
        );
        Metrics {
            registry,
            rpc_requests,
            rpc_duration,
            pulls,
            pulled_bytes,
            pull_duration,
            cni_duration,
            store_write,
            events_published,
            events_dropped,
            address: OnceLock::new(),
        }
    }

    /// A CRI call on `path` (the gRPC URI path) ended with `code`.
    pub fn rpc_done(&self, path: &str, code: tonic::Code, duration: Duration) {
        let method = cri_method(path);
        self.rpc_requests
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
        self.rpc_duration
            .get_or_create(&MethodLabel { method })
            .observe(duration.as_secs_f64());
    }

    /// A pull ended, successfully or not.
    pub fn pull_done(&self, success: bool, duration: Duration) {
        let result = if success { "success" } else { "failure" };
        self.pulls.get_or_create(&ResultLabel { result }).inc();
        self.pull_duration.observe(duration.as_secs_f64());
    }

    /// `bytes` more of a blob arrived from a registry.
    pub fn pulled_bytes(&self, bytes: u64) {
        self.pulled_bytes.inc_by(bytes);
    }

    /// One CNI plugin call. `plugin_type` is a plugin of the operator's
    /// network config that was found in the bin dirs, so it is bounded.
    pub fn cni_call(&self, plugin_type: &str, command: &str, duration: Duration) {
        let command = match command {
            "ADD" => "ADD",
            "DEL" => "DEL",
            "CHECK" => "CHECK",
            "STATUS" => "STATUS",
            "GC" => "GC",
            _ => "other",
        };
        self.cni_duration
            .get_or_create(&CniLabels {
                plugin_type: plugin_type.to_string(),
                command,
            })
            .observe(duration.as_secs_f64());
    }

    pub fn store_write(&self, duration: Duration) {
        self.store_write.observe(duration.as_secs_f64());
    }

    pub fn event_published(&self) {
        self.events_published.inc();
    }

    /// A subscriber of `kind` missed an event. The label is the kind of
    /// subscriber (a constant of the code that subscribes), not the client:
    /// a dropped subscriber is gone, so a series per client would only
    /// ever count one and pile up for every client that ever connected.
    pub fn event_dropped(&self, kind: &'static str) {
        self.events_dropped
            .get_or_create(&SubscriberLabel { subscriber: kind })
            .inc();
    }

    /// Records the address the metrics server bound (once).
    pub fn set_address(&self, address: SocketAddr) {
        let _ = self.address.set(address);
    }

    /// The bound address, `None` while metrics are off.
    pub fn address(&self) -> Option<SocketAddr> {
        self.address.get().copied()
    }

    /// The whole exposition: the registry, then the scrape-time state.
    pub fn encode(&self, live: &Live) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &live.registry());
        out
    }
}

/// What is counted at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Live {
    /// Sandboxes per state, every state listed (zero included).
    pub sandboxes: Vec<(&'static str, i64)>,
    pub containers: Vec<(&'static str, i64)>,
    pub shims: i64,
    pub process: Option<ProcessStats>,
}

impl Live {
    fn registry(&self) -> Registry {
        let mut r = Registry::default();
        for (name, help, states) in [
            (
                "berth_sandboxes",
                "Pod sandboxes, by state",
                &self.sandboxes,
            ),
            ("berth_containers", "Containers, by state", &self.containers),
        ] {
            let family = Family::<StateLabel, Gauge>::default();
            for (state, n) in states {
                family.get_or_create(&StateLabel { state }).set(*n);
            }
            r.register(name, help, family);
        }
        let gauge = |v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            g
        };
        let fgauge = |v: f64| {
            let g = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            g.set(v);
            g
        };
        r.register("berth_shims", "Live container shims", gauge(self.shims));
        if let Some(p) = &self.process {
            // A counter for cpu: Prometheus' standard name ends in _total.
            let cpu = prometheus_client::metrics::counter::ConstCounter::new(p.cpu_seconds);
            r.register(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                cpu,
            );
            r.register(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                gauge(p.resident_bytes as i64),
            );
            r.register(
                "process_open_fds",
                "Number of open file descriptors",
                gauge(p.open_fds as i64),
            );
            r.register(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                fgauge(p.start_time_seconds),
            );
            r.register(
                "process_threads",
                "Number of OS threads in the process",
                gauge(p.threads as i64),
            );
        }
        r
    }
}

/// berthd's own process numbers, as Prometheus' client libraries name them.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
    pub open_fds: u64,
    pub start_time_seconds: f64,
    pub threads: u64,
}

/// This process's numbers from /proc/self (same on cgroup v1 and v2).
pub fn process_stats() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let mut stats = from_stat(
        crate::process::parse_stat(&stat)?,
        &boot,
        ticks.max(1) as f64,
        page.max(1) as u64,
    )?;
    // read_dir's own descriptor is among those it listed.
    stats.open_fds = open_fds.saturating_sub(1);
    Some(stats)
}

/// The numbers of a parsed /proc/PID/stat, with /proc/stat's boot time,
/// `ticks` clock ticks a second and `page` bytes a page.
fn from_stat(
    stat: crate::process::ProcStat,
    proc_stat: &str,
    ticks: f64,
    page: u64,
) -> Option<ProcessStats> {
    let btime: u64 = proc_stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(ProcessStats {
        cpu_seconds: stat.cpu_ticks as f64 / ticks,
        threads: stat.threads,
        start_time_seconds: btime as f64 + stat.start_time as f64 / ticks,
        resident_bytes: stat.rss_pages * page,
        open_fds: 0,
    })
}

/// The `method` labels: every CRI v1 method, as `Service/Method`.
const CRI_METHODS: &[&str] = &[
    "RuntimeService/Version",
    "RuntimeService/RunPodSandbox",
    "RuntimeService/StopPodSandbox",
    "RuntimeService/RemovePodSandbox",
    "RuntimeService/PodSandboxStatus",
    "RuntimeService/ListPodSandbox",
    "RuntimeService/CreateContainer",
    "RuntimeService/StartContainer",
    "RuntimeService/StopContainer",
    "RuntimeService/RemoveContainer",
    "RuntimeService/ListContainers",
    "RuntimeService/ContainerStatus",
    "RuntimeService/UpdateContainerResources",
    "RuntimeService/ReopenContainerLog",
    "RuntimeService/ExecSync",
    "RuntimeService/Exec",
    "RuntimeService/Attach",
    "RuntimeService/PortForward",
    "RuntimeService/ContainerStats",
    "RuntimeService/ListContainerStats",
    "RuntimeService/PodSandboxStats",
    "RuntimeService/ListPodSandboxStats",
    "RuntimeService/UpdateRuntimeConfig",
    "RuntimeService/Status",
    "RuntimeService/CheckpointContainer",
    "RuntimeService/GetContainerEvents",
    "RuntimeService/ListMetricDescriptors",
    "RuntimeService/ListPodSandboxMetrics",
    "RuntimeService/RuntimeConfig",
    "RuntimeService/UpdatePodSandboxResources",
    "RuntimeService/StreamPodSandboxes",
    "RuntimeService/StreamContainers",
    "RuntimeService/StreamContainerStats",
    "RuntimeService/StreamPodSandboxStats",
    "RuntimeService/StreamPodSandboxMetrics",
    "ImageService/ListImages",
    "ImageService/StreamImages",
    "ImageService/ImageStatus",
    "ImageService/PullImage",
    "ImageService/RemoveImage",
    "ImageService/ImageFsInfo",
];

/// The `method` label of a gRPC path: `Service/Method` for a CRI method,
/// "unknown" for anything else, so a client cannot mint series.
pub fn cri_method(path: &str) -> &'static str {
    path.strip_prefix("/runtime.v1.")
        .and_then(|m| CRI_METHODS.iter().find(|known| **known == m))
        .copied()
        .unwrap_or("unknown")
}

/// gRPC code names as grpc-go spells them in its metrics.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded() {
        assert_eq!(
            cri_method("/runtime.v1.RuntimeService/ListContainers"),
            "RuntimeService/ListContainers"
        );
        assert_eq!(
            cri_method("/runtime.v1.ImageService/PullImage"),
            "ImageService/PullImage"
        );
        for odd in [
            "/runtime.v1.RuntimeService/Nope",
            "/runtime.v1alpha2.RuntimeService/Version",
            "/grpc.health.v1.Health/Check",
            "/runtime.v1.RuntimeService/Version/extra",
            "",
            "/",
            "Version",
        ] {
            assert_eq!(cri_method(odd), "unknown", "{odd}");
        }
    }

    #[test]
    fn every_rpc_of_the_cri_definition_has_its_label() {
        let proto = include_str!("../../../proto/proto/cri/v1/api.proto");
        let mut service = "";
        let mut rpcs = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().unwrap();
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let name = rest.split('(').next().unwrap().trim();
                rpcs.push(format!("{service}/{name}"));
            }
        }
        assert_eq!(rpcs.len(), CRI_METHODS.len(), "{rpcs:?}");
        for rpc in &rpcs {
            assert_eq!(cri_method(&format!("/runtime.v1.{rpc}")), rpc, "{rpc}");
        }
    }

    #[test]
    fn encoding_has_every_family() {
        let m = Metrics::new();
        m.rpc_done(
            "/runtime.v1.RuntimeService/Version",
            tonic::Code::Ok,
            Duration::from_millis(1),
        );
        m.rpc_done(
            "/runtime.v1.RuntimeService/ContainerStatus",
            tonic::Code::NotFound,
            Duration::from_millis(1),
        );
        m.rpc_done("/evil/\"label\"", tonic::Code::Ok, Duration::ZERO);
        m.pull_done(true, Duration::from_secs(1));
        m.pulled_bytes(1234);
        m.cni_call("bridge", "ADD", Duration::from_millis(3));
        m.store_write(Duration::from_micros(300));
        m.event_published();
        m.event_dropped("GetContainerEvents");
        let live = Live {
            sandboxes: vec![("ready", 1), ("notready", 0)],
            containers: vec![("running", 2)],
            shims: 2,
            process: process_stats(),
        };
        let text = m.encode(&live);
        for line in [
            "berth_cri_requests_total{method=\"RuntimeService/Version\",code=\"OK\"} 1",
            "berth_cri_requests_total{method=\"RuntimeService/ContainerStatus\",code=\"NotFound\"} 1",
            "berth_cri_requests_total{method=\"unknown\",code=\"OK\"} 1",
            "berth_cri_request_duration_seconds_count{method=\"RuntimeService/Version\"} 1",
            "berth_image_pulls_total{result=\"success\"} 1",
            "berth_image_pulled_bytes_total 1234",
            "berth_image_pull_duration_seconds_count 1",
            "berth_cni_plugin_duration_seconds_count{plugin_type=\"bridge\",command=\"ADD\"} 1",
            "berth_store_write_duration_seconds_count 1",
            "berth_events_published_total 1",
            "berth_events_dropped_total{subscriber=\"GetContainerEvents\"} 1",
            "berth_sandboxes{state=\"ready\"} 1",
            "berth_sandboxes{state=\"notready\"} 0",
            "berth_containers{state=\"running\"} 2",
            "berth_shims 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
            "process_threads ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} missing in\n{text}"
            );
        }
        assert!(!text.contains("evil"));
    }

    #[test]
    fn process_stat_parses() {
        let stat = "4242 (berth d) (x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 3000 18446744073709551615";
        let parsed = crate::process::parse_stat(stat).unwrap();
        let s = from_stat(parsed, "cpu 1 2 3\nbtime 1700000000\n", 100.0, 4096).unwrap();
        assert_eq!(s.cpu_seconds, 3.0);
        assert_eq!(s.threads, 7);
        assert_eq!(s.start_time_seconds, 1_700_000_010.0);
        assert_eq!(s.resident_bytes, 3000 * 4096);
        assert!(crate::process::parse_stat("garbage").is_none());
        assert!(from_stat(parsed, "no boot time", 100.0, 4096).is_none());
        let own = process_stats().unwrap();
        assert!(own.resident_bytes > 0 && own.threads >= 1 && own.open_fds >= 3);
        assert!(own.start_time_seconds > 1_000_000_000.0);
    }
}
