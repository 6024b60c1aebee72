//! ContainerStats and ListContainerStats read what the kernel accounts to
//! the container: CPU time, memory, and its writable layer.

use std::time::Duration;

use berth_cri::v1::*;
use berth_e2e::pods::{PodEnv, resources, sh_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_report_cpu_memory_and_the_writable_layer() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    let pod = env.run_pod(&env.pod_config("stats")).await;
    let mut config = sh_config(
        "busy",
        &env.busybox(),
        "dd if=/dev/zero of=/tmp/fill bs=1M count=6 2>/dev/null; while :; do :; done",
    );
    resources(&mut config).memory_limit_in_bytes = 64 << 20;
    let id = env.run(&pod, &config).await;
    // Let it write its file and burn some CPU.
    tokio::time::sleep(Duration::from_millis(700)).await;

    let stats = |env: &mut PodEnv| {
        let mut client = env.client.clone();
        let id = id.clone();
        async move {
            client
                .runtime
                .container_stats(ContainerStatsRequest { container_id: id })
                .await
                .expect("ContainerStats")
                .into_inner()
                .stats
                .expect("stats")
        }
    };
    let first = stats(&mut env).await;
    // The busy loop's rate, between samples 500 ms apart: near one core
    // (one looping shell; a machine busy with other tests may lend it a
    // little less for a moment, so the best of five samples counts).
    let mut rates = Vec::new();
    let mut second = first.clone();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        second = stats(&mut env).await;
        let rate = second
            .cpu
            .as_ref()
            .and_then(|c| c.usage_nano_cores.as_ref())
            .expect("a rate after the first sample")
            .value;
        rates.push(rate as f64 / 1e9);
        if rate >= 800_000_000 {
            break;
        }
    }
    let best = rates.iter().cloned().fold(0.0, f64::max);
    assert!(
        best >= 0.8 && rates.iter().all(|r| *r <= 1.1),
        "a busy loop's CPU rate should be near one core: {rates:?}"
    );

    assert_eq!(second.attributes.as_ref().unwrap().id, id);
    let cpu1 = first.cpu.unwrap().usage_core_nano_seconds.unwrap().value;
    let cpu = second.cpu.unwrap();
    let cpu2 = cpu.usage_core_nano_seconds.unwrap().value;
    assert!(
        cpu2 > cpu1 && cpu1 > 100_000_000,
        "cpu time {cpu1} -> {cpu2}"
    );

    let memory = second.memory.unwrap();
    let working_set = memory.working_set_bytes.unwrap().value;
    assert!(working_set > 0);
    let available = memory.available_bytes.expect("a limit was set").value;
    assert!(
        available + working_set <= 64 << 20,
        "{available} + {working_set}"
    );
    assert!(memory.usage_bytes.unwrap().value >= working_set);

    let layer = second.writable_layer.unwrap();
    assert!(layer.used_bytes.unwrap().value >= 6 << 20, "{layer:?}");
    assert!(layer.fs_id.unwrap().mountpoint.ends_with("/upper"));

    let list = env
        .client
        .runtime
        .list_container_stats(ListContainerStatsRequest {
            filter: Some(ContainerStatsFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].attributes.as_ref().unwrap().id, id);

    env.stop_container(&id, 0).await.unwrap();
    let list = env
        .client
        .runtime
        .list_container_stats(ListContainerStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert!(
        list.is_empty(),
        "stopped containers have no stats: {list:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_container_resources_changes_the_cgroup_and_the_status() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    let pod = env.run_pod(&env.pod_config("resize")).await;
    let mut config = sh_config("resize", &env.busybox(), "sleep 1000");
    resources(&mut config).memory_limit_in_bytes = 64 << 20;
    resources(&mut config).cpu_period = 100_000;
    resources(&mut config).cpu_quota = 20_000;
    let id = env.run(&pod, &config).await;

    let new = LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 70_000,
        memory_limit_in_bytes: 96 << 20,
        ..Default::default()
    };
    env.client
        .runtime
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(new.clone()),
            ..Default::default()
        })
        .await
        .expect("UpdateContainerResources");

    let (_, info) = env.status_verbose(&id).await;
    let cgroups_path = info["cgroupsPath"]
        .as_str()
        .expect("cgroupsPath")
        .to_string();
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    if berth_e2e::pods::cgroup_v2() {
        let dir = berth_e2e::pods::cgroup_dir("", &cgroups_path);
        assert_eq!(read(dir.join("cpu.max")), "70000 100000");
        assert_eq!(read(dir.join("memory.max")), (96u64 << 20).to_string());
    } else {
        let cpu = berth_e2e::pods::cgroup_dir("cpu", &cgroups_path);
        assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "70000");
        let memory = berth_e2e::pods::cgroup_dir("memory", &cgroups_path);
        assert_eq!(
            read(memory.join("memory.limit_in_bytes")),
            (96u64 << 20).to_string()
        );
    }
    let status = env.status(&id).await;
    let linux = status.resources.unwrap().linux.unwrap();
    assert_eq!(linux.cpu_quota, 70_000);
    assert_eq!(linux.memory_limit_in_bytes, 96 << 20);

    env.stop_container(&id, 0).await.unwrap();
    let err = env
        .client
        .runtime
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.clone(),
            linux: Some(new),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}
