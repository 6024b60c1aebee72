//! PodSandboxStats and ListPodSandboxStats, as kubelet's CRI stats provider
//! reads them: the pod cgroup's CPU, memory and process count, the
//! interfaces of the pod's network namespace, and its running containers'
//! stats; then the real crictl's `statsp`.
//!
//! The network test sends traffic between two pods of its own, only after
//! net-guard is on (`TestNet::assert_routed`), as network.rs does; it is
//! left out of the cgroup v2 lane (no NAT there for net-guard).

use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::net::{Plugins, TestNet};
use berth_e2e::pods::*;
use berth_e2e::report_skip;
use berth_e2e::streaming::Crictl;
use tonic::Code;

const MIB: i64 = 1 << 20;

async fn try_pod_stats(env: &mut PodEnv, pod: &str) -> Result<PodSandboxStats, tonic::Status> {
    Ok(env
        .client
        .runtime
        .pod_sandbox_stats(PodSandboxStatsRequest {
            pod_sandbox_id: pod.to_string(),
        })
        .await?
        .into_inner()
        .stats
        .expect("PodSandboxStats answers with stats"))
}

async fn pod_stats(env: &mut PodEnv, pod: &str) -> PodSandboxStats {
    try_pod_stats(env, pod)
        .await
        .unwrap_or_else(|e| panic!("PodSandboxStats {pod}: {e:?}"))
}

async fn list_pod_stats(
    env: &mut PodEnv,
    filter: Option<PodSandboxStatsFilter>,
) -> Vec<PodSandboxStats> {
    env.client
        .runtime
        .list_pod_sandbox_stats(ListPodSandboxStatsRequest { filter })
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats
}

fn linux(s: &PodSandboxStats) -> &LinuxPodSandboxStats {
    s.linux.as_ref().expect("linux pod stats")
}

fn working_set(s: &PodSandboxStats) -> i64 {
    linux(s)
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .expect("pod working set")
        .value as i64
}

fn ids(stats: &[PodSandboxStats]) -> Vec<String> {
    let mut v: Vec<String> = stats
        .iter()
        .map(|s| s.attributes.as_ref().unwrap().id.clone())
        .collect();
    v.sort();
    v
}

async fn clean_up(env: &mut PodEnv) {
    env.remove_everything().await.expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_stats_sum_the_pod_cgroup_and_list_its_containers() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let mut pod_config = env.pod_config("podstats");
    pod_config.labels.insert("app".into(), "podstats".into());
    pod_config
        .annotations
        .insert("note".into(), "pod-level".into());
    let pod = env.run_pod(&pod_config).await;
    let holder = env
        .run(&pod, &container_config("holder", &bb, &["sleep", "100000"]))
        .await;
    let busy = env
        .run(&pod, &sh_config("busy", &bb, "while :; do :; done"))
        .await;

    let baseline = working_set(&pod_stats(&mut env, &pod).await);
    // 64 MiB in the holder's /dev/shm: shmem, charged to its memory cgroup
    // (so to the pod's) and held after the writer exits.
    let size = 64 * MIB;
    env.sh(
        &holder,
        &format!(
            "head -c {size} /dev/zero > /dev/shm/fill && test $(wc -c < /dev/shm/fill) = {size}"
        ),
    )
    .await;

    // The first sample has no rate; the next ones do. The busy loop uses
    // about one core (the host has two, the v2 lane guest one).
    let first = pod_stats(&mut env, &pod).await;
    let first_cpu = linux(&first)
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .expect("pod cpu time")
        .value;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (stats, cores) = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = pod_stats(&mut env, &pod).await;
        let cores = linux(&s)
            .cpu
            .as_ref()
            .and_then(|c| c.usage_nano_cores.as_ref())
            .expect("a CPU rate from the second sample on")
            .value;
        if cores >= 500_000_000 || Instant::now() > deadline {
            break (s, cores);
        }
    };
    assert!(
        cores >= 500_000_000,
        "a busy loop uses about one core, the pod {cores} nanocores"
    );
    let l = linux(&stats);
    let cpu = l.cpu.as_ref().unwrap();
    assert!(cpu.usage_core_nano_seconds.as_ref().unwrap().value > first_cpu);
    assert!(cpu.timestamp > 0);

    let attributes = stats.attributes.as_ref().unwrap();
    assert_eq!(attributes.id, pod);
    let meta = attributes.metadata.as_ref().unwrap();
    assert_eq!(meta.name, "podstats");
    assert_eq!(meta.namespace, "berth-e2e");
    assert_eq!(
        attributes.labels.get("app").map(String::as_str),
        Some("podstats")
    );
    assert_eq!(
        attributes.annotations.get("note").map(String::as_str),
        Some("pod-level")
    );

    // Memory: the pod holds what its containers hold.
    let pod_ws = working_set(&stats);
    let grown = pod_ws - baseline;
    assert!(
        (grown - size).abs() <= size / 10,
        "the pod working set grew by {grown} bytes ({baseline} -> {pod_ws}) for {size} bytes held"
    );
    let memory = l.memory.as_ref().unwrap();
    assert!(memory.usage_bytes.as_ref().unwrap().value as i64 >= pod_ws);

    // Processes: the holder's sleep and the busy shell at least.
    let processes = l
        .process
        .as_ref()
        .and_then(|p| p.process_count.as_ref())
        .expect("process count")
        .value;
    assert!(processes >= 2, "{processes} processes in the pod");

    // The running containers, with their own stats.
    let mut listed: Vec<String> = l
        .containers
        .iter()
        .map(|c| c.attributes.as_ref().unwrap().id.clone())
        .collect();
    listed.sort();
    let mut want = vec![holder.clone(), busy.clone()];
    want.sort();
    assert_eq!(listed, want, "the pod's containers in its stats");
    let holder_stats = l
        .containers
        .iter()
        .find(|c| c.attributes.as_ref().unwrap().id == holder)
        .unwrap();
    let holder_ws = holder_stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .unwrap()
        .value as i64;
    assert!(
        (holder_ws - size).abs() <= size / 10,
        "the holder's working set {holder_ws} for {size} bytes held"
    );
    assert!(
        pod_ws >= holder_ws,
        "the pod working set {pod_ws} is below its container's {holder_ws}"
    );
    assert_eq!(
        holder_stats
            .attributes
            .as_ref()
            .unwrap()
            .metadata
            .as_ref()
            .unwrap()
            .name,
        "holder"
    );

    // A pod with loopback only has no default interface, and lo is never
    // listed.
    if let Some(network) = &l.network {
        assert!(
            network.interfaces.iter().all(|i| i.name != "lo"),
            "{network:?}"
        );
    }

    // An exited container is no longer among them.
    env.stop_container(&busy, 0).await.unwrap();
    let after = pod_stats(&mut env, &pod).await;
    let names: Vec<String> = linux(&after)
        .containers
        .iter()
        .map(|c| c.attributes.as_ref().unwrap().id.clone())
        .collect();
    assert_eq!(names, vec![holder.clone()]);
    clean_up(&mut env).await;
}

/// Network-dependent: excluded from the v2 lane (see scripts/v2-lane).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_rx_tx_bytes_of_eth0_grow_with_traffic_between_pods() {
    Plugins::Berth.require();
    // Declared before the env: dropped after it (berthd's DEL first).
    let net = TestNet::new(Plugins::Berth);
    let mut env =
        PodEnv::start_with_cni(berth_e2e::BerthdOptions::default(), net.cni_options(None)).await;
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(false));
    let bb = env.busybox();

    let a = env.run_pod(&env.pod_config("netstats-a")).await;
    let b = env.run_pod(&env.pod_config("netstats-b")).await;
    let ip_a = env
        .pod_status(&a)
        .await
        .unwrap()
        .network
        .expect("pod a network")
        .ip;
    assert!(net.contains(&ip_a), "{ip_a} is not in {}", net.subnet());
    let server = env
        .run(
            &a,
            &container_config(
                "server",
                &bb,
                &[
                    "nc",
                    "-ll",
                    "-p",
                    "8080",
                    "-e",
                    "sh",
                    "-c",
                    "head -c 200000 /dev/zero",
                ],
            ),
        )
        .await;
    let client = env
        .run(&b, &container_config("client", &bb, &["sleep", "3600"]))
        .await;

    let eth0 = |s: &PodSandboxStats| -> NetworkInterfaceUsage {
        let network = linux(s)
            .network
            .clone()
            .expect("a pod with its own network has network stats");
        assert!(
            network.interfaces.iter().all(|i| i.name != "lo"),
            "lo is not listed: {network:?}"
        );
        let eth0 = network
            .default_interface
            .expect("the CNI interface is the default one");
        assert_eq!(eth0.name, "eth0");
        eth0
    };
    let value = |v: &Option<UInt64Value>| v.as_ref().expect("counter").value;
    let before_a = eth0(&pod_stats(&mut env, &a).await);
    let before_b = eth0(&pod_stats(&mut env, &b).await);

    net.assert_routed(&ip_a);
    env.wait_listening(&server, 8080).await;
    let script = format!("echo hi | nc -w 5 {ip_a} 8080 | wc -c");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (out, err, code) = env.exec(&client, &["sh", "-c", &script]).await;
        if code == 0 && out.trim() == "200000" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pod B could not fetch from {ip_a}:8080: exit {code}, stdout {out:?}, stderr {err:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let after_a = eth0(&pod_stats(&mut env, &a).await);
    let after_b = eth0(&pod_stats(&mut env, &b).await);
    let sent_a = value(&after_a.tx_bytes) - value(&before_a.tx_bytes);
    let got_b = value(&after_b.rx_bytes) - value(&before_b.rx_bytes);
    assert!(
        sent_a >= 200_000,
        "pod A sent 200000 bytes, its eth0 tx grew by {sent_a}"
    );
    assert!(
        got_b >= 200_000,
        "pod B received 200000 bytes, its eth0 rx grew by {got_b}"
    );
    assert!(value(&after_a.rx_bytes) > value(&before_a.rx_bytes));
    assert!(value(&after_b.tx_bytes) > value(&before_b.tx_bytes));
    assert_eq!(value(&after_a.rx_errors), value(&before_a.rx_errors));

    // The same through the list.
    let listed = list_pod_stats(&mut env, None).await;
    assert_eq!(ids(&listed), {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    });
    for s in &listed {
        assert!(value(&eth0(s).tx_bytes) > 0);
    }

    // A host-network pod has no network stats, as containerd's.
    let mut host_config = env.pod_config("netstats-host");
    pod_namespace_options(&mut host_config).network = NamespaceMode::Node as i32;
    let host_pod = env.run_pod(&host_config).await;
    let host_stats = pod_stats(&mut env, &host_pod).await;
    assert!(
        linux(&host_stats).network.is_none(),
        "{:?}",
        linux(&host_stats).network
    );

    for pod in [&a, &b, &host_pod] {
        env.stop_pod(pod).await.unwrap();
        env.remove_pod(pod).await.unwrap();
    }
    clean_up(&mut env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pod_stats_filters_by_id_and_labels_and_lists_ready_pods_only() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let mut pods = Vec::new();
    for (name, tier) in [("lst-a", "front"), ("lst-b", "back"), ("lst-c", "back")] {
        let mut config = env.pod_config(name);
        config.labels.insert("tier".into(), tier.into());
        config.labels.insert("suite".into(), "pod-stats".into());
        let pod = env.run_pod(&config).await;
        env.run(
            &pod,
            &container_config("sleeper", &bb, &["sleep", "100000"]),
        )
        .await;
        pods.push(pod);
    }
    let (a, b, c) = (pods[0].clone(), pods[1].clone(), pods[2].clone());
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };

    assert_eq!(
        ids(&list_pod_stats(&mut env, None).await),
        sorted(pods.clone())
    );
    // By id, also by prefix as ListPodSandbox.
    let by_id = list_pod_stats(
        &mut env,
        Some(PodSandboxStatsFilter {
            id: a[..12].to_string(),
            ..Default::default()
        }),
    )
    .await;
    assert_eq!(ids(&by_id), vec![a.clone()]);
    assert_eq!(linux(&by_id[0]).containers.len(), 1);
    assert!(working_set(&by_id[0]) > 0);
    // By labels: every pair must match.
    let selector = |pairs: &[(&str, &str)]| PodSandboxStatsFilter {
        label_selector: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    assert_eq!(
        ids(&list_pod_stats(&mut env, Some(selector(&[("tier", "back")]))).await),
        sorted(vec![b.clone(), c.clone()])
    );
    assert_eq!(
        ids(&list_pod_stats(
            &mut env,
            Some(selector(&[("tier", "back"), ("suite", "pod-stats")]))
        )
        .await),
        sorted(vec![b.clone(), c.clone()])
    );
    assert!(
        list_pod_stats(&mut env, Some(selector(&[("tier", "db")])))
            .await
            .is_empty()
    );
    let by_both = list_pod_stats(
        &mut env,
        Some(PodSandboxStatsFilter {
            id: c.clone(),
            label_selector: selector(&[("tier", "front")]).label_selector,
        }),
    )
    .await;
    assert!(by_both.is_empty(), "{:?}", ids(&by_both));

    // An unknown id: NotFound.
    let unknown = try_pod_stats(&mut env, &random_hex(32)).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");

    // A stopped pod is not listed, and has no stats (Unavailable, as
    // containerd's "not in ready state").
    env.stop_pod(&b).await.unwrap();
    assert_eq!(
        ids(&list_pod_stats(&mut env, None).await),
        sorted(vec![a.clone(), c.clone()])
    );
    let stopped = try_pod_stats(&mut env, &b).await.unwrap_err();
    assert_eq!(stopped.code(), Code::Unavailable, "{stopped:?}");

    // A removed pod is gone from the list, and unknown.
    env.stop_pod(&c).await.unwrap();
    env.remove_pod(&c).await.unwrap();
    assert_eq!(ids(&list_pod_stats(&mut env, None).await), vec![a.clone()]);
    assert!(
        list_pod_stats(&mut env, Some(selector(&[("tier", "back")])))
            .await
            .is_empty()
    );
    let removed = try_pod_stats(&mut env, &c).await.unwrap_err();
    assert_eq!(removed.code(), Code::NotFound, "{removed:?}");
    clean_up(&mut env).await;
}

/// The `value` of a UInt64Value in crictl's JSON: a string or a number.
fn json_u64(v: &serde_json::Value) -> Option<u64> {
    match &v["value"] {
        serde_json::Value::String(s) => s.parse().ok(),
        n => n.as_u64(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_statsp_shows_the_pod_with_its_memory() {
    let test = "crictl_statsp_shows_the_pod_with_its_memory";
    let mut env = PodEnv::start().await;
    let Some(crictl) = Crictl::new(&env.d.socket, env.work.path()) else {
        report_skip(
            test,
            "crictl not found (set $BERTH_CRICTL or put it in shared/tools beside the workspace)",
        );
        return;
    };
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("crictl-statsp")).await;
    let holder = env
        .run(&pod, &container_config("holder", &bb, &["sleep", "100000"]))
        .await;
    env.sh(&holder, "head -c 16777216 /dev/zero > /dev/shm/fill")
        .await;

    let run = crictl
        .run(
            &["statsp", "-o", "json", "--id", &pod],
            b"",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(run.code, Some(0), "crictl statsp -o json: {run:?}");
    let json: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("crictl statsp -o json is not JSON ({e}): {}", run.stdout));
    let stats = json["stats"]
        .as_array()
        .unwrap_or_else(|| panic!("no stats in {json}"));
    assert_eq!(stats.len(), 1, "{json}");
    let s = &stats[0];
    assert_eq!(s["attributes"]["id"], pod.as_str(), "{s}");
    assert_eq!(s["attributes"]["metadata"]["name"], "crictl-statsp", "{s}");
    let ws = json_u64(&s["linux"]["memory"]["workingSetBytes"])
        .unwrap_or_else(|| panic!("no working set in {s}"));
    assert!(ws >= 16 << 20, "working set {ws} in {s}");
    assert_eq!(
        s["linux"]["containers"][0]["attributes"]["id"],
        holder.as_str(),
        "{s}"
    );

    // The table: the pod's name and id, and a memory column that is not 0.
    let run = crictl
        .run(&["statsp", "--id", &pod], b"", Duration::from_secs(30))
        .await;
    assert_eq!(run.code, Some(0), "crictl statsp: {run:?}");
    let line = run
        .stdout
        .lines()
        .find(|l| l.contains("crictl-statsp"))
        .unwrap_or_else(|| panic!("the pod is not in crictl statsp:\n{}", run.stdout));
    assert!(line.contains(&pod[..13]), "{line}");
    let memory = line.split_whitespace().last().unwrap();
    assert!(
        memory.chars().next().is_some_and(|c| c.is_ascii_digit())
            && memory
                .trim_start_matches(['0', '.'])
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit()),
        "memory column {memory:?} in {line:?}"
    );
    clean_up(&mut env).await;
}
