//! What CRI 1.36 added, through berthd's own CRI definition: a container's
//! stop signal, in-place pod resize of the pod cgroup, and the streaming
//! list calls.

use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::pods::{PodEnv, cgroup_dir, cgroup_v2, sh_config};

/// A container that exits 0 when it gets SIGUSR1, and ignores SIGTERM.
fn usr1_config(image: &str) -> ContainerConfig {
    let mut config = sh_config(
        "stopsig",
        image,
        "trap 'exit 0' USR1; trap '' TERM; while :; do sleep 0.1; done",
    );
    config.stop_signal = Signal::Sigusr1 as i32;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_container_sends_the_configured_stop_signal() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    let pod = env.run_pod(&env.pod_config("stopsig")).await;
    let id = env.run(&pod, &usr1_config(&env.busybox())).await;
    let status = env.status(&id).await;
    assert_eq!(status.stop_signal, Signal::Sigusr1 as i32);
    // Let the shell install its traps.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    env.stop_container(&id, 20).await.expect("StopContainer");
    let status = env.status(&id).await;
    assert_eq!(
        status.exit_code, 0,
        "the trap on SIGUSR1 exits 0 (SIGTERM is ignored, SIGKILL gives 137): {status:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it stopped on the first signal, not after the timeout: {:?}",
        started.elapsed()
    );

    // Without one, the image's or SIGTERM, reported as such.
    let plain = env
        .run(&pod, &sh_config("plain", &env.busybox(), "sleep 1000"))
        .await;
    assert_eq!(env.status(&plain).await.stop_signal, Signal::Sigterm as i32);

    // A value the API does not define is refused before anything exists.
    let mut bad = sh_config("badsig", &env.busybox(), "sleep 1000");
    bad.stop_signal = 4242;
    let err = env.try_create(&pod, &bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("stop_signal"), "{err:?}");
    env.remove_everything().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_pod_sandbox_resources_sets_the_pod_cgroup() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    let pod = env.run_pod(&env.pod_config("podresize")).await;
    let parent = env.cgroup_parent(&pod);
    let overhead = LinuxContainerResources {
        memory_limit_in_bytes: 16 << 20,
        ..Default::default()
    };
    let resources = LinuxContainerResources {
        memory_limit_in_bytes: 128 << 20,
        cpu_period: 100_000,
        cpu_quota: 150_000,
        ..Default::default()
    };
    env.client
        .runtime
        .update_pod_sandbox_resources(UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: pod.clone(),
            overhead: Some(overhead),
            resources: Some(resources),
        })
        .await
        .expect("UpdatePodSandboxResources");
    let read = |p: std::path::PathBuf| {
        std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .to_string()
    };
    let memory = (144u64 << 20).to_string();
    if cgroup_v2() {
        let dir = cgroup_dir("", &parent);
        assert_eq!(read(dir.join("memory.max")), memory);
        assert_eq!(read(dir.join("cpu.max")), "150000 100000");
    } else {
        assert_eq!(
            read(cgroup_dir("memory", &parent).join("memory.limit_in_bytes")),
            memory
        );
        assert_eq!(
            read(cgroup_dir("cpu", &parent).join("cpu.cfs_quota_us")),
            "150000"
        );
    }

    let unknown = env
        .client
        .runtime
        .update_pod_sandbox_resources(UpdatePodSandboxResourcesRequest {
            pod_sandbox_id: "0123456789abcdef".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    env.remove_everything().await.unwrap();
}

/// Every message of a server stream, or its error.
async fn collect<T>(stream: Result<tonic::Response<tonic::Streaming<T>>, tonic::Status>) -> Vec<T> {
    let mut stream = stream.expect("the stream starts").into_inner();
    let mut out = Vec::new();
    while let Some(message) = stream.message().await.expect("a stream message") {
        out.push(message);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_lists_answer_what_the_unary_lists_do() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    let mut pods = Vec::new();
    for i in 0..3 {
        let pod = env.run_pod(&env.pod_config(&format!("stream{i}"))).await;
        env.run(&pod, &sh_config("sleeper", &env.busybox(), "sleep 1000"))
            .await;
        pods.push(pod);
    }
    let mut rt = env.client.runtime.clone();

    let streamed: Vec<String> = collect(
        rt.stream_pod_sandboxes(StreamPodSandboxesRequest { filter: None })
            .await,
    )
    .await
    .into_iter()
    .flat_map(|m| m.pod_sandboxes)
    .map(|p| p.id)
    .collect();
    let listed: Vec<String> = env
        .list_pods(None)
        .await
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(streamed, listed);
    assert_eq!(listed.len(), 3);

    let streamed: Vec<String> = collect(
        rt.stream_containers(StreamContainersRequest {
            filter: Some(ContainerFilter {
                pod_sandbox_id: pods[1].clone(),
                ..Default::default()
            }),
        })
        .await,
    )
    .await
    .into_iter()
    .flat_map(|m| m.containers)
    .map(|c| c.pod_sandbox_id)
    .collect();
    assert_eq!(streamed, vec![pods[1].clone()]);

    let stats: Vec<ContainerStats> = collect(
        rt.stream_container_stats(StreamContainerStatsRequest { filter: None })
            .await,
    )
    .await
    .into_iter()
    .flat_map(|m| m.container_stats)
    .collect();
    assert_eq!(stats.len(), 3);
    assert!(stats.iter().all(|s| s.memory.is_some() && s.cpu.is_some()));

    let pod_stats: Vec<PodSandboxStats> = collect(
        rt.stream_pod_sandbox_stats(StreamPodSandboxStatsRequest { filter: None })
            .await,
    )
    .await
    .into_iter()
    .flat_map(|m| m.pod_sandbox_stats)
    .collect();
    assert_eq!(pod_stats.len(), 3);

    let metrics: Vec<PodSandboxMetrics> = collect(
        rt.stream_pod_sandbox_metrics(StreamPodSandboxMetricsRequest {})
            .await,
    )
    .await
    .into_iter()
    .flat_map(|m| m.pod_sandbox_metrics)
    .collect();
    assert_eq!(metrics.len(), 3);
    assert!(
        metrics.iter().all(|m| m.container_metrics.len() == 1),
        "{metrics:?}"
    );

    let images: Vec<Image> = collect(
        env.client
            .image
            .clone()
            .stream_images(StreamImagesRequest { filter: None })
            .await,
    )
    .await
    .into_iter()
    .flat_map(|m| m.images)
    .collect();
    let listed = env
        .client
        .image
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(images, listed);

    // Nothing to list is still an answer: one empty message.
    let empty = collect(
        rt.stream_containers(StreamContainersRequest {
            filter: Some(ContainerFilter {
                id: "ffffffffffff".into(),
                ..Default::default()
            }),
        })
        .await,
    )
    .await;
    assert_eq!(empty.len(), 1);
    assert!(empty[0].containers.is_empty());
    env.remove_everything().await.unwrap();
}

/// Labels big enough that four containers exceed the 16 MiB a unary answer
/// may be: the stream still carries them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_too_big_for_one_message_streams_in_chunks() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    let pod = env.run_pod(&env.pod_config("bigstream")).await;
    let mut want = Vec::new();
    for i in 0..40 {
        let mut config = sh_config(&format!("big{i}"), &env.busybox(), "sleep 1000");
        // 400 KiB of labels each: 16 MiB in all.
        for l in 0..4 {
            config.labels.insert(format!("l{l}"), "x".repeat(100 << 10));
        }
        want.push(env.create(&pod, &config).await);
    }
    let messages = collect(
        env.client
            .runtime
            .clone()
            .stream_containers(StreamContainersRequest { filter: None })
            .await,
    )
    .await;
    assert!(messages.len() > 1, "{} messages", messages.len());
    let mut got: Vec<String> = messages
        .into_iter()
        .flat_map(|m| m.containers)
        .map(|c| c.id)
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    env.remove_everything().await.unwrap();
}
