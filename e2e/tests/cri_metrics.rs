//! ListMetricDescriptors and ListPodSandboxMetrics, as kubelet's
//! `criMetricsCollector` reads them for `/metrics/cadvisor`: every metric
//! named by a descriptor and carrying one label value per key; values that
//! agree with ContainerStats and PodSandboxStats; containers that stop or
//! go away left out; then the real crictl's `metricdescs` and `metricsp`.
//!
//! The network test gives its pod a CNI interface (a bridge); it sends no
//! traffic, and is left out of the cgroup v2 lane (no bridge there).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::net::{Plugins, TestNet};
use berth_e2e::pods::*;
use berth_e2e::report_skip;
use berth_e2e::streaming::Crictl;

const MIB: i64 = 1 << 20;

/// Name -> label keys.
async fn descriptors(env: &mut PodEnv) -> HashMap<String, Vec<String>> {
    let descs = env
        .client
        .runtime
        .list_metric_descriptors(ListMetricDescriptorsRequest {})
        .await
        .expect("ListMetricDescriptors")
        .into_inner()
        .descriptors;
    let map: HashMap<String, Vec<String>> = descs
        .iter()
        .map(|d| (d.name.clone(), d.label_keys.clone()))
        .collect();
    assert_eq!(map.len(), descs.len(), "descriptor names are unique");
    for d in &descs {
        assert!(!d.help.is_empty(), "{d:?}");
    }
    map
}

async fn pod_metrics(env: &mut PodEnv) -> Vec<PodSandboxMetrics> {
    env.client
        .runtime
        .list_pod_sandbox_metrics(ListPodSandboxMetricsRequest {})
        .await
        .expect("ListPodSandboxMetrics")
        .into_inner()
        .pod_metrics
}

/// What kubelet requires of every metric, or drops it.
fn assert_described(descs: &HashMap<String, Vec<String>>, pods: &[PodSandboxMetrics]) {
    let all = pods.iter().flat_map(|p| {
        p.metrics
            .iter()
            .chain(p.container_metrics.iter().flat_map(|c| &c.metrics))
    });
    for m in all {
        let keys = descs
            .get(&m.name)
            .unwrap_or_else(|| panic!("{} has no descriptor", m.name));
        assert_eq!(
            m.label_values.len(),
            keys.len(),
            "{}: values {:?} for keys {keys:?}",
            m.name,
            m.label_values
        );
        assert!(m.value.is_some(), "{m:?}");
        assert!(m.timestamp > 0, "timestamps in ns: {m:?}");
        assert!(
            m.metric_type == MetricType::Counter as i32
                || m.metric_type == MetricType::Gauge as i32,
            "{m:?}"
        );
    }
}

/// The label `key` of `m`, by the descriptor's key order.
fn label<'a>(descs: &HashMap<String, Vec<String>>, m: &'a Metric, key: &str) -> &'a str {
    let i = descs[&m.name]
        .iter()
        .position(|k| k == key)
        .unwrap_or_else(|| panic!("{} has no label {key}", m.name));
    &m.label_values[i]
}

fn container<'a>(
    pods: &'a [PodSandboxMetrics],
    pod: &str,
    id: &str,
) -> Option<&'a ContainerMetrics> {
    pods.iter()
        .find(|p| p.pod_sandbox_id == pod)?
        .container_metrics
        .iter()
        .find(|c| c.container_id == id)
}

fn value(metrics: &[Metric], name: &str) -> u64 {
    metrics
        .iter()
        .find(|m| m.name == name)
        .and_then(|m| m.value.as_ref())
        .unwrap_or_else(|| panic!("no {name} in {metrics:?}"))
        .value
}

async fn container_stats(env: &mut PodEnv, id: &str) -> ContainerStats {
    env.client
        .runtime
        .container_stats(ContainerStatsRequest {
            container_id: id.to_string(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats")
}

fn cpu_ns(s: &ContainerStats) -> u64 {
    s.cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .expect("cpu time")
        .value
}

fn working_set(s: &ContainerStats) -> i64 {
    s.memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .expect("working set")
        .value as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_described_agree_with_stats_and_leave_out_what_went_away() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("crimetrics")).await;
    let holder = env
        .run(&pod, &container_config("holder", &bb, &["sleep", "100000"]))
        .await;
    let busy = env
        .run(&pod, &sh_config("busy", &bb, "while :; do :; done"))
        .await;
    // 32 MiB in the holder's /dev/shm: shmem, in its working set.
    let size = 32 * MIB;
    env.sh(
        &holder,
        &format!("head -c {size} /dev/zero > /dev/shm/fill"),
    )
    .await;

    let descs = descriptors(&mut env).await;
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_memory_rss",
        "container_network_receive_bytes_total",
        "container_fs_usage_bytes",
    ] {
        assert!(descs.contains_key(name), "{name} is not described");
    }

    // Wait for the busy loop's first whole second (the CRI metric is an
    // integer), reading the stats either side of the metrics.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (before, pods, after) = loop {
        let before = container_stats(&mut env, &busy).await;
        let pods = pod_metrics(&mut env).await;
        let after = container_stats(&mut env, &busy).await;
        let c = container(&pods, &pod, &busy).expect("the busy container's metrics");
        if value(&c.metrics, "container_cpu_usage_seconds_total") >= 1 || Instant::now() > deadline
        {
            break (before, pods, after);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_described(&descs, &pods);

    let p = pods.iter().find(|p| p.pod_sandbox_id == pod).unwrap();
    let mut ids: Vec<&str> = p
        .container_metrics
        .iter()
        .map(|c| c.container_id.as_str())
        .collect();
    ids.sort();
    let mut want = vec![holder.as_str(), busy.as_str()];
    want.sort();
    assert_eq!(ids, want);

    // CPU: whole seconds between the two readings of the stats.
    let b = container(&pods, &pod, &busy).unwrap();
    let cpu = b
        .metrics
        .iter()
        .find(|m| m.name == "container_cpu_usage_seconds_total")
        .unwrap();
    let seconds = cpu.value.as_ref().unwrap().value;
    assert!(seconds >= 1, "the busy loop ran a second: {cpu:?}");
    assert!(
        cpu_ns(&before) / 1_000_000_000 <= seconds && seconds <= cpu_ns(&after) / 1_000_000_000,
        "{seconds} s between {} and {} ns",
        cpu_ns(&before),
        cpu_ns(&after)
    );
    assert_eq!(cpu.metric_type, MetricType::Counter as i32);
    assert_eq!(label(&descs, cpu, "id"), busy);
    assert_eq!(label(&descs, cpu, "container"), "busy");
    assert_eq!(label(&descs, cpu, "pod"), "crimetrics");
    assert_eq!(label(&descs, cpu, "namespace"), "berth-e2e");
    assert_eq!(label(&descs, cpu, "cpu"), "total");
    assert!(label(&descs, cpu, "image").contains("busybox"), "{cpu:?}");

    // Memory: the holder's working set as ContainerStats says, within 10%.
    let h = container(&pods, &pod, &holder).unwrap();
    let ws = value(&h.metrics, "container_memory_working_set_bytes") as i64;
    let stats_ws = working_set(&container_stats(&mut env, &holder).await);
    assert!(
        (ws - stats_ws).abs() <= stats_ws / 10,
        "working set {ws} in the metrics, {stats_ws} in ContainerStats"
    );
    assert!(ws >= size - size / 10, "{ws} for {size} bytes held");
    assert!(value(&h.metrics, "container_memory_usage_bytes") as i64 >= ws);
    assert!(value(&h.metrics, "container_processes") >= 1);
    assert!(value(&h.metrics, "container_start_time_seconds") > 0);
    let ws_metric = h
        .metrics
        .iter()
        .find(|m| m.name == "container_memory_working_set_bytes")
        .unwrap();
    assert_eq!(ws_metric.metric_type, MetricType::Gauge as i32);

    // Counters do not go back.
    let again = pod_metrics(&mut env).await;
    let later = value(
        &container(&again, &pod, &busy).unwrap().metrics,
        "container_cpu_usage_seconds_total",
    );
    assert!(later >= seconds, "{later} after {seconds}");

    // A stopped container is left out, and so is a removed one.
    env.stop_container(&busy, 0).await.unwrap();
    let stopped = pod_metrics(&mut env).await;
    assert!(container(&stopped, &pod, &busy).is_none(), "{stopped:?}");
    assert!(container(&stopped, &pod, &holder).is_some());
    env.remove_container(&busy).await.unwrap();
    let removed = pod_metrics(&mut env).await;
    assert_described(&descs, &removed);
    assert!(container(&removed, &pod, &busy).is_none());

    // A removed pod too.
    env.stop_pod(&pod).await.unwrap();
    env.remove_pod(&pod).await.unwrap();
    let none = pod_metrics(&mut env).await;
    assert!(none.iter().all(|p| p.pod_sandbox_id != pod), "{none:?}");
    env.remove_everything().await.expect("clean up");
}

/// Network-dependent: not for the v2 lane (no bridge there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_network_metrics_per_interface_agree_with_pod_stats() {
    Plugins::Berth.require();
    // Declared before the env: dropped after it (berthd's DEL first).
    let net = TestNet::new(Plugins::Berth);
    let mut env =
        PodEnv::start_with_cni(berth_e2e::BerthdOptions::default(), net.cni_options(None)).await;
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(false));
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("crimetrics-net")).await;
    env.run(
        &pod,
        &container_config("sleeper", &bb, &["sleep", "100000"]),
    )
    .await;

    let pod_eth0 = |s: PodSandboxStats| -> NetworkInterfaceUsage {
        s.linux
            .and_then(|l| l.network)
            .and_then(|n| n.default_interface)
            .expect("the pod's eth0 in its stats")
    };
    let stats = |env: &mut PodEnv| {
        let pod = pod.clone();
        let mut runtime = env.client.runtime.clone();
        async move {
            runtime
                .pod_sandbox_stats(PodSandboxStatsRequest {
                    pod_sandbox_id: pod,
                })
                .await
                .expect("PodSandboxStats")
                .into_inner()
                .stats
                .expect("stats")
        }
    };
    let before = pod_eth0(stats(&mut env).await);
    let descs = descriptors(&mut env).await;
    let pods = pod_metrics(&mut env).await;
    let after = pod_eth0(stats(&mut env).await);
    assert_described(&descs, &pods);

    let p = pods.iter().find(|p| p.pod_sandbox_id == pod).unwrap();
    let eth0: Vec<&Metric> = p
        .metrics
        .iter()
        .filter(|m| label(&descs, m, "interface") == "eth0")
        .collect();
    let get = |name: &str| {
        eth0.iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no {name} for eth0 in {:?}", p.metrics))
            .value
            .as_ref()
            .unwrap()
            .value
    };
    let v = |x: &Option<UInt64Value>| x.as_ref().unwrap().value;
    for (name, lo, hi) in [
        (
            "container_network_receive_bytes_total",
            v(&before.rx_bytes),
            v(&after.rx_bytes),
        ),
        (
            "container_network_transmit_bytes_total",
            v(&before.tx_bytes),
            v(&after.tx_bytes),
        ),
        (
            "container_network_receive_errors_total",
            v(&before.rx_errors),
            v(&after.rx_errors),
        ),
        (
            "container_network_transmit_errors_total",
            v(&before.tx_errors),
            v(&after.tx_errors),
        ),
    ] {
        let got = get(name);
        assert!(lo <= got && got <= hi, "{name} {got}, stats {lo}..{hi}");
    }
    get("container_network_receive_packets_total");
    get("container_network_transmit_packets_total");
    for m in &eth0 {
        assert_eq!(label(&descs, m, "container"), "POD");
        assert_eq!(label(&descs, m, "id"), pod);
        assert_eq!(label(&descs, m, "pod"), "crimetrics-net");
        assert_eq!(m.metric_type, MetricType::Counter as i32);
    }
    assert!(
        p.metrics
            .iter()
            .all(|m| label(&descs, m, "interface") != "lo"),
        "{:?}",
        p.metrics
    );

    env.stop_pod(&pod).await.unwrap();
    env.remove_pod(&pod).await.unwrap();
    env.remove_everything().await.expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_metricdescs_and_metricsp_show_the_names() {
    let test = "crictl_metricdescs_and_metricsp_show_the_names";
    let mut env = PodEnv::start().await;
    let Some(crictl) = Crictl::new(&env.d.socket, env.work.path()) else {
        report_skip(
            test,
            "crictl not found (set $BERTH_CRICTL or put it in shared/tools beside the workspace)",
        );
        return;
    };
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("crictl-metricsp")).await;
    let holder = env
        .run(&pod, &container_config("holder", &bb, &["sleep", "100000"]))
        .await;

    let run = crictl
        .run(&["metricdescs"], b"", Duration::from_secs(30))
        .await;
    assert_eq!(run.code, Some(0), "crictl metricdescs: {run:?}");
    for name in [
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_network_receive_bytes_total",
    ] {
        assert!(run.stdout.contains(name), "{name} not in {}", run.stdout);
    }
    assert!(run.stdout.contains("namespace"), "{}", run.stdout);

    let run = crictl
        .run(&["metricsp"], b"", Duration::from_secs(30))
        .await;
    assert_eq!(run.code, Some(0), "crictl metricsp: {run:?}");
    for want in [
        pod.as_str(),
        holder.as_str(),
        "container_memory_working_set_bytes",
        "container_cpu_usage_seconds_total",
    ] {
        assert!(run.stdout.contains(want), "{want} not in {}", run.stdout);
    }
    env.remove_everything().await.expect("clean up");
}
