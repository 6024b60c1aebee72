//! What a container's cgroup does, as a user sees it, on cgroup v1 (a
//! controller per hierarchy at /sys/fs/cgroup/<controller>) and on v2 (the
//! unified hierarchy at /sys/fs/cgroup; `scripts/v2-lane`): OOM kills,
//! CPU quota and weight, memory accounting, cleanup of many pods, a
//! read-only and namespaced cgroupfs inside the container, device rules,
//! `unified` resources and swap limits. Every test reads the hierarchy at
//! run time and checks the files of that version.
//!
//! Pods here have loopback-only network namespaces (no CNI); nothing sends
//! traffic anywhere.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::pods::*;
use tonic::{Code, Status};

const MIB: i64 = 1 << 20;
const RUNNING: ContainerState = ContainerState::ContainerRunning;
const EXITED: ContainerState = ContainerState::ContainerExited;

/// A fresh pod named `name` with one running container from `config`:
/// (pod id, container id, the container's cgroup from
/// `/proc/<pid>/cgroup`).
async fn pod_with(
    env: &mut PodEnv,
    name: &str,
    config: &ContainerConfig,
) -> (String, String, String) {
    let pod = env.run_pod(&env.pod_config(name)).await;
    let (id, cg) = running(env, &pod, config).await;
    (pod, id, cg)
}

/// Runs `config` in `pod`: (container id, its cgroup), checked to be
/// `<pod cgroup parent>/<id>`.
async fn running(env: &mut PodEnv, pod: &str, config: &ContainerConfig) -> (String, String) {
    let id = env.run(pod, config).await;
    env.wait_state(&id, RUNNING, STATE_TIMEOUT).await;
    let pid = env.pid(&id).await;
    let cg = proc_cgroup(pid, "memory")
        .unwrap_or_else(|| panic!("no memory cgroup in /proc/{pid}/cgroup"));
    let want = format!("{}/{id}", env.cgroup_parent(pod).trim_end_matches('/'));
    assert_eq!(cg, want, "the cgroup of container {id}");
    (id, cg)
}

/// Whether every line of a `/proc/self/cgroup` read inside a container
/// names the root: its cgroups are namespaced.
fn namespaced(proc_self_cgroup: &str) -> bool {
    !proc_self_cgroup.trim().is_empty()
        && proc_self_cgroup
            .lines()
            .all(|l| l.splitn(3, ':').nth(2) == Some("/"))
}

/// The cgroup dirs below cgroup `path`, in every hierarchy.
fn child_cgroups(path: &str) -> BTreeSet<PathBuf> {
    cgroup_dirs(path)
        .into_iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect()
}

async fn container_stats(env: &mut PodEnv, id: &str) -> ContainerStats {
    env.client
        .runtime
        .container_stats(ContainerStatsRequest {
            container_id: id.to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("ContainerStats {id}: {e:?}"))
        .into_inner()
        .stats
        .expect("ContainerStats without stats")
}

/// (working set, usage) of ContainerStats.
async fn memory_stats(env: &mut PodEnv, id: &str) -> (u64, u64) {
    let m = container_stats(env, id)
        .await
        .memory
        .expect("ContainerStats without memory");
    (
        m.working_set_bytes.expect("no working_set_bytes").value,
        m.usage_bytes.expect("no usage_bytes").value,
    )
}

async fn update(env: &mut PodEnv, id: &str, r: LinuxContainerResources) -> Result<(), Status> {
    env.client
        .runtime
        .update_container_resources(UpdateContainerResourcesRequest {
            container_id: id.to_string(),
            linux: Some(r),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

fn unified(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What is wrong with `result` of a request with the bad unified key
/// `key`: it must be InvalidArgument naming the key.
fn not_invalid_naming<T>(what: &str, key: &str, result: Result<T, Status>) -> Option<String> {
    match result {
        Ok(_) => Some(format!("{what} with unified key {key:?} succeeded")),
        Err(e) if e.code() != Code::InvalidArgument || !e.message().contains(key) => Some(format!(
            "{what} with unified key {key:?}: {:?} {:?} (want InvalidArgument naming the key)",
            e.code(),
            e.message()
        )),
        Err(_) => None,
    }
}

/// What is wrong with CreateContainer of `config` (bad unified key `key`)
/// in `pod`: it must be refused (see [`not_invalid_naming`]) and leave no
/// container and no cgroup.
async fn refused(env: &mut PodEnv, pod: &str, config: &ContainerConfig, key: &str) -> Vec<String> {
    let parent = env.cgroup_parent(pod);
    let containers = env.list_containers(None).await.len();
    let cgroups = child_cgroups(&parent);
    let result = env.try_create(pod, config).await;
    let mut problems: Vec<String> = not_invalid_naming("CreateContainer", key, result)
        .into_iter()
        .collect();
    let now = env.list_containers(None).await.len();
    if now != containers {
        problems.push(format!(
            "{key:?}: {containers} containers before, {now} after"
        ));
    }
    let left: Vec<_> = child_cgroups(&parent)
        .difference(&cgroups)
        .cloned()
        .collect();
    if !left.is_empty() {
        problems.push(format!("{key:?}: cgroups left: {left:?}"));
    }
    problems
}

async fn clean_up(env: &mut PodEnv) {
    env.remove_everything()
        .await
        .expect("remove every pod and container");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_killed_by_oom_makes_the_container_oomkilled() {
    let mut env = PodEnv::start().await;
    let pod = env.run_pod(&env.pod_config("childoom")).await;
    // tail keeps every byte of a line, and /dev/zero has no newline: the
    // kernel OOM-kills tail, the shell lives on and exits 7.
    let mut config = sh_config("hog", &env.busybox(), "tail /dev/zero; exit 7");
    resources(&mut config).memory_limit_in_bytes = 32 * MIB;
    let id = env.run(&pod, &config).await;
    let s = env.wait_state(&id, EXITED, Duration::from_secs(60)).await;
    let log = std::fs::read_to_string(env.log_file(&pod, &config));
    assert_eq!(
        s.exit_code, 7,
        "the shell's own exit code: {s:?}\nlog: {log:?}"
    );
    assert_eq!(
        s.reason, "OOMKilled",
        "a process of the container was OOM-killed: {s:?}\nlog: {log:?}"
    );
    clean_up(&mut env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_quota_is_set_and_throttles() {
    let mut env = PodEnv::start().await;
    let mut config = sh_config("spin", &env.busybox(), "while :; do :; done");
    let wanted = LinuxContainerResources {
        cpu_quota: 20_000,
        cpu_period: 100_000,
        cpu_shares: 512,
        ..Default::default()
    };
    *resources(&mut config) = wanted.clone();
    let (_, id, cg) = pod_with(&mut env, "quota", &config).await;
    let cpu = |file: &str| read_cgroup_file("cpu", &cg, file);
    if cgroup_v2() {
        assert_eq!(cpu("cpu.max"), "20000 100000");
    } else {
        assert_eq!(cpu("cpu.cfs_quota_us"), "20000");
        assert_eq!(cpu("cpu.cfs_period_us"), "100000");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let throttled = || {
        cpu("cpu.stat")
            .lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("cpu.stat has no nr_throttled:\n{}", cpu("cpu.stat")))
    };
    assert!(
        eventually(Duration::from_secs(5), || throttled() > 0).await,
        "a busy loop at 20% of a CPU is never throttled; cpu.stat:\n{}",
        cpu("cpu.stat")
    );
    // The same shares give the same weight at create and after an update.
    let (file, weight) = if cgroup_v2() {
        // runc's (since 1.3) and libcgroups' conversion, a quadratic in
        // log2(shares): 512 → ceil(10^((81 + 1125) / 612 - 7 / 34)) = 59.
        ("cpu.weight", "59")
    } else {
        ("cpu.shares", "512")
    };
    assert_eq!(cpu(file), weight, "{file} for cpu_shares 512 at create");
    update(&mut env, &id, wanted)
        .await
        .expect("UpdateContainerResources");
    assert_eq!(
        cpu(file),
        weight,
        "{file} for cpu_shares 512 after an update"
    );
    clean_up(&mut env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stats_are_within_ten_percent_of_what_the_container_allocates() {
    let mut env = PodEnv::start().await;
    let mut config = container_config("holder", &env.busybox(), &["sleep", "100000"]);
    resources(&mut config).memory_limit_in_bytes = 256 * MIB;
    let (_, id, _) = pod_with(&mut env, "memstats", &config).await;
    let (baseline, _) = memory_stats(&mut env, &id).await;
    // 64 MiB in the container's /dev/shm: shmem, charged to the
    // container's memory cgroup and held after the writer exits.
    let size = 64 * MIB;
    env.sh(
        &id,
        &format!(
            "head -c {size} /dev/zero > /dev/shm/fill && test $(wc -c < /dev/shm/fill) = {size}"
        ),
    )
    .await;
    let (working_set, usage) = memory_stats(&mut env, &id).await;
    let grown = working_set as i64 - baseline as i64;
    assert!(
        (grown - size).abs() <= size / 10,
        "the working set grew by {grown} bytes ({baseline} -> {working_set}) for {size} bytes held"
    );
    assert!(
        usage >= working_set,
        "memory usage {usage} is below the working set {working_set}"
    );
    clean_up(&mut env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_pods_leave_no_cgroup_behind() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let started = Instant::now();
    let mut cgroups = Vec::new();
    let mut pods = Vec::new();
    for i in 0..20 {
        // Every other pod shares its PID namespace: an infra process
        // holds it, in the pod cgroup (v2: its infra leaf).
        let shared_pid = i % 2 == 0;
        let mut pod_config = env.pod_config(&format!("many-{i}"));
        if shared_pid {
            pod_namespace_options(&mut pod_config).pid = NamespaceMode::Pod as i32;
        }
        let pod = env.run_pod(&pod_config).await;
        let (_, cg) = running(
            &mut env,
            &pod,
            &container_config("sleeper", &bb, &["sleep", "1000"]),
        )
        .await;
        let parent = env.cgroup_parent(&pod);
        if shared_pid && cgroup_v2() {
            let infra = format!("{parent}/infra");
            assert!(
                !cgroup_dirs(&infra).is_empty(),
                "pod {pod} has no infra leaf {infra}"
            );
            cgroups.push(infra);
        }
        cgroups.extend([cg, parent]);
        pods.push(pod);
    }
    let created = started.elapsed();
    for pod in &pods {
        env.stop_pod(pod)
            .await
            .unwrap_or_else(|e| panic!("StopPodSandbox {pod}: {e:?}"));
        env.remove_pod(pod)
            .await
            .unwrap_or_else(|e| panic!("RemovePodSandbox {pod}: {e:?}"));
    }
    eprintln!(
        "twenty pods: created in {created:?}, all removed after {:?}",
        started.elapsed()
    );
    let left: Vec<PathBuf> = cgroups.iter().flat_map(|c| cgroup_dirs(c)).collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
    assert!(env.list_pods(None).await.is_empty());
    assert!(env.list_containers(None).await.is_empty());
    clean_up(&mut env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cgroup_filesystem_is_read_only_and_namespaced() {
    let mut env = PodEnv::start().await;
    let v2 = cgroup_v2();
    let (memory_dir, limit_file) = if v2 {
        ("/sys/fs/cgroup", "memory.max")
    } else {
        ("/sys/fs/cgroup/memory", "memory.limit_in_bytes")
    };
    let mut config = container_config("plain", &env.busybox(), &["sleep", "1000"]);
    resources(&mut config).memory_limit_in_bytes = 64 * MIB;
    let (_, id, cg) = pod_with(&mut env, "cgroupfs", &config).await;

    let own = env.sh(&id, "cat /proc/self/cgroup").await;
    if v2 {
        assert_eq!(own.trim(), "0::/", "a private cgroup namespace");
    }
    assert!(
        namespaced(&own),
        "/proc/self/cgroup in the container:\n{own}"
    );
    let (out, err, code) = env.exec(&id, &["mkdir", &format!("{memory_dir}/x")]).await;
    assert_ne!(
        code, 0,
        "mkdir in the container's cgroupfs: {out:?} {err:?}"
    );
    assert!(
        err.contains("Read-only file system"),
        "mkdir {memory_dir}/x: {err:?}"
    );
    assert!(!cgroup_dir("memory", &cg).join("x").exists());
    let write = format!("echo 1073741824 > {memory_dir}/{limit_file}");
    let (out, err, code) = env.exec(&id, &["sh", "-c", &write]).await;
    assert_ne!(code, 0, "{write} in the container: {out:?} {err:?}");
    assert!(
        err.contains("Read-only file system"),
        "{write} in the container: {err:?}"
    );
    assert_eq!(
        read_cgroup_file("memory", &cg, limit_file),
        (64 * MIB).to_string(),
        "the container raised its own memory limit"
    );

    // Privileged (in a privileged pod): /sys/fs/cgroup is writable (still
    // its own cgroup), and a child cgroup made there (with the init
    // process moved into it, as a nested runtime does) goes away with the
    // container and the pod.
    let mut pod_config = env.pod_config("privileged");
    pod_config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .privileged = true;
    let pod = env.run_pod(&pod_config).await;
    let mut config = container_config("privileged", &env.busybox(), &["sleep", "1000"]);
    security_context(&mut config).privileged = true;
    resources(&mut config).memory_limit_in_bytes = 64 * MIB;
    let (privileged, priv_cg) = running(&mut env, &pod, &config).await;
    let own = env.sh(&privileged, "cat /proc/self/cgroup").await;
    assert!(
        namespaced(&own),
        "the privileged container sees host cgroups (not writing there):\n{own}"
    );
    let enable = if v2 {
        "echo +memory > cgroup.subtree_control\n"
    } else {
        ""
    };
    let script = format!(
        "set -e\ncd {memory_dir}\nmkdir child\necho 1 > child/cgroup.procs\necho $$ > child/cgroup.procs\n{enable}echo 16777216 > child/{limit_file}\ncat child/{limit_file}"
    );
    assert_eq!(env.sh(&privileged, &script).await.trim(), "16777216");
    let child = format!("{priv_cg}/child");
    assert_eq!(read_cgroup_file("memory", &child, limit_file), "16777216");
    let pid = env.pid(&privileged).await;
    assert_eq!(proc_cgroup(pid, "memory"), Some(child.clone()));

    env.stop_container(&privileged, 0)
        .await
        .expect("StopContainer of the privileged container");
    env.remove_container(&privileged)
        .await
        .expect("RemoveContainer of a container with a child cgroup");
    assert!(
        eventually(Duration::from_secs(5), || cgroup_dirs(&priv_cg).is_empty()).await,
        "the privileged container's cgroup is left: {:?}",
        cgroup_dirs(&priv_cg)
    );
    env.stop_pod(&pod).await.expect("StopPodSandbox");
    env.remove_pod(&pod).await.expect("RemovePodSandbox");
    let parent = env.cgroup_parent(&pod);
    assert!(
        cgroup_dirs(&parent).is_empty(),
        "the pod cgroup is left: {:?}",
        cgroup_dirs(&parent)
    );
    clean_up(&mut env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_rules_deny_an_unlisted_device() {
    let mut env = PodEnv::start().await;
    let config = container_config("nodev", &env.busybox(), &["sleep", "1000"]);
    let (_, id, _) = pod_with(&mut env, "devices", &config).await;
    // c 1:1 is /dev/mem: not among the container's devices.
    let (out, err, code) = env
        .exec(
            &id,
            &["sh", "-c", "mknod /tmp/mem c 1 1 && head -c1 /tmp/mem"],
        )
        .await;
    assert_ne!(code, 0, "/dev/mem was readable: {out:?}");
    assert!(
        err.contains("Operation not permitted"),
        "mknod /tmp/mem c 1 1 && head -c1 /tmp/mem: {err:?}"
    );
    assert_eq!(
        env.sh(&id, "echo x > /dev/null && head -c 3 /dev/zero | wc -c")
            .await
            .trim(),
        "3"
    );
    clean_up(&mut env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unified_resources() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("unified")).await;
    let with = |name: &str, pairs: &[(&str, &str)]| {
        let mut config = container_config(name, &bb, &["sleep", "1000"]);
        resources(&mut config).unified = unified(pairs);
        config
    };
    if !cgroup_v2() {
        let config = with("v1", &[("memory.high", "50331648")]);
        let problems = refused(&mut env, &pod, &config, "memory.high").await;
        assert!(problems.is_empty(), "unified on cgroup v1: {problems:?}");
        clean_up(&mut env).await;
        return;
    }

    let config = with("good", &[("memory.high", "50331648"), ("pids.max", "77")]);
    let (id, cg) = running(&mut env, &pod, &config).await;
    assert_eq!(read_cgroup_file("memory", &cg, "memory.high"), "50331648");
    assert_eq!(read_cgroup_file("pids", &cg, "pids.max"), "77");

    let hugetlb = read_cgroup_file("memory", &cg, "cgroup.controllers")
        .split_whitespace()
        .any(|c| c == "hugetlb");
    let mut bad = vec![
        ("../memory.max", "max"),
        ("memory.max/../../x", "max"),
        // A pid that does not exist, should a write get through.
        ("cgroup.procs", "999999"),
        ("nosuch.thing", "1"),
        ("memory.max", "-5"),
    ];
    if hugetlb {
        eprintln!("unified_resources: this host has hugetlb; not trying hugetlb.2MB.max");
    } else {
        bad.push(("hugetlb.2MB.max", "1"));
    }
    let mut problems = Vec::new();
    for (n, (key, value)) in bad.iter().enumerate() {
        let config = with(&format!("bad-{n}"), &[(key, value)]);
        problems.extend(refused(&mut env, &pod, &config, key).await);
    }
    for (key, value) in [
        ("../memory.max", "max"),
        ("nosuch.thing", "1"),
        ("memory.max", "-5"),
    ] {
        let r = LinuxContainerResources {
            unified: unified(&[(key, value)]),
            ..Default::default()
        };
        let result = update(&mut env, &id, r).await;
        problems.extend(not_invalid_naming("UpdateContainerResources", key, result));
    }
    assert!(
        problems.is_empty(),
        "bad unified resources:\n{}",
        problems.join("\n")
    );
    // The refused updates changed nothing.
    assert_eq!(read_cgroup_file("memory", &cg, "memory.high"), "50331648");
    clean_up(&mut env).await;
}

/// Where the host has a cpuset controller, `cpuset_cpus` pins the
/// container (its cgroup's `cpuset.cpus`, the process's allowed CPUs, and
/// a live update); where it has none (the v2 lane's kernel) the request is
/// refused up front, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpuset_pins_the_container_where_the_controller_exists() {
    let mut env = PodEnv::start().await;
    let mut config = container_config("pinned", &env.busybox(), &["sleep", "1000"]);
    resources(&mut config).cpuset_cpus = "0".into();
    let has_cpuset = if cgroup_v2() {
        std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .unwrap()
            .split_whitespace()
            .any(|c| c == "cpuset")
    } else {
        std::path::Path::new("/sys/fs/cgroup/cpuset").is_dir()
    };
    if !has_cpuset {
        let pod = env.run_pod(&env.pod_config("no-cpuset")).await;
        let err = env
            .try_create(&pod, &config)
            .await
            .expect_err("cpuset without the controller");
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("cpuset"), "{}", err.message());
        clean_up(&mut env).await;
        return;
    }
    let (_, id, cg) = pod_with(&mut env, "cpuset", &config).await;
    assert_eq!(read_cgroup_file("cpuset", &cg, "cpuset.cpus").trim(), "0");
    let allowed = env
        .sh(&id, "grep Cpus_allowed_list /proc/self/status")
        .await;
    assert!(
        allowed.trim().ends_with("\t0") || allowed.trim().ends_with(" 0"),
        "{allowed:?}"
    );
    if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
        update(
            &mut env,
            &id,
            LinuxContainerResources {
                cpuset_cpus: "1".into(),
                ..Default::default()
            },
        )
        .await
        .expect("UpdateContainerResources cpuset");
        assert_eq!(read_cgroup_file("cpuset", &cg, "cpuset.cpus").trim(), "1");
    }
    clean_up(&mut env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_limit_follows_memory_swap() {
    let mut env = PodEnv::start().await;
    let mut config = container_config("swapper", &env.busybox(), &["sleep", "1000"]);
    resources(&mut config).memory_limit_in_bytes = 64 * MIB;
    resources(&mut config).memory_swap_limit_in_bytes = 128 * MIB;
    let (_, id, cg) = pod_with(&mut env, "swap", &config).await;
    let v2 = cgroup_v2();
    let (memory_file, swap_file) = if v2 {
        ("memory.max", "memory.swap.max")
    } else {
        ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
    };
    if !cgroup_dir("memory", &cg).join(swap_file).exists() {
        eprintln!(
            "swap_limit_follows_memory_swap: SKIPPED: no swap accounting here (the container cgroup has no {swap_file})"
        );
        clean_up(&mut env).await;
        return;
    }
    // v1 counts memory + swap, v2 swap alone.
    let check = |memory: i64, memory_and_swap: i64, when: &str| {
        let swap = if v2 {
            memory_and_swap - memory
        } else {
            memory_and_swap
        };
        assert_eq!(
            read_cgroup_file("memory", &cg, memory_file),
            memory.to_string(),
            "{memory_file} {when}"
        );
        assert_eq!(
            read_cgroup_file("memory", &cg, swap_file),
            swap.to_string(),
            "{swap_file} {when}"
        );
    };
    check(
        64 * MIB,
        128 * MIB,
        "at create (64 MiB, memory+swap 128 MiB)",
    );
    update(
        &mut env,
        &id,
        LinuxContainerResources {
            memory_limit_in_bytes: 96 * MIB,
            memory_swap_limit_in_bytes: 192 * MIB,
            ..Default::default()
        },
    )
    .await
    .expect("UpdateContainerResources");
    check(
        96 * MIB,
        192 * MIB,
        "after the update to 96 MiB, memory+swap 192 MiB",
    );
    // The stats say how much swap is left: the limit (swap alone) minus
    // what the idle container swapped.
    let swap = container_stats(&mut env, &id)
        .await
        .swap
        .expect("swap usage where swap is accounted");
    let used = swap.swap_usage_bytes.expect("swap usage").value;
    let available = swap.swap_available_bytes.expect("swap available").value;
    assert_eq!(used + available, 96 * MIB as u64, "{swap:?}");
    clean_up(&mut env).await;
}
