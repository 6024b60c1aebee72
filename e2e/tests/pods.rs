//! Pods and containers through the CRI socket, as kubelet and crictl drive
//! them: sandboxes with pinned namespaces, sysctls and DNS files, the
//! container lifecycle, CRI log files, exit reasons, resource limits,
//! mounts, log rotation, crashes of berthd and of a shim, and cleanup.
//!
//! Pods here have loopback-only network namespaces (no CNI); nothing sends
//! traffic anywhere but 127.0.0.0/8.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::pods::*;
use tonic::Code;

const RUNNING: ContainerState = ContainerState::ContainerRunning;

fn state_name(state: i32) -> String {
    format!("{:?}", ContainerState::try_from(state))
}

/// `ipc:[4026532291]` → 4026532291
fn ns_link_inode(link: &str) -> u64 {
    link.trim()
        .rsplit_once('[')
        .and_then(|(_, r)| r.strip_suffix(']'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a namespace link: {link:?}"))
}

fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn ids(pods: &[PodSandbox]) -> Vec<String> {
    let mut v: Vec<String> = pods.iter().map(|p| p.id.clone()).collect();
    v.sort();
    v
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// The numbers printed one per line (F records of stdout).
fn numbers(lines: &[LogLine]) -> Vec<u64> {
    lines
        .iter()
        .filter(|l| l.stream == "stdout" && l.tag == 'F')
        .map(|l| {
            l.text()
                .trim()
                .trim_start_matches("tick ")
                .parse()
                .unwrap_or_else(|_| panic!("not a number line: {l:?}"))
        })
        .collect()
}

fn assert_contiguous(nums: &[u64], what: &str) {
    assert!(!nums.is_empty(), "{what}: no lines at all");
    for w in nums.windows(2) {
        assert_eq!(
            w[1],
            w[0] + 1,
            "{what}: the sequence jumps from {} to {} (lines lost or repeated)",
            w[0],
            w[1]
        );
    }
}

/// Waits until the log at `path` satisfies `check`; returns its lines.
async fn wait_log(
    path: &Path,
    timeout: Duration,
    what: &str,
    check: impl Fn(&[LogLine]) -> bool,
) -> Vec<LogLine> {
    let deadline = Instant::now() + timeout;
    loop {
        let lines = read_cri_log_so_far(path);
        if check(&lines) {
            return lines;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: {} not as expected within {timeout:?}; it holds {} lines, last: {:?}",
                path.display(),
                lines.len(),
                lines.last()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_namespaces_are_pinned_and_shared_by_its_containers() {
    let mut env = PodEnv::start().await;
    let state = env.d.state_dir();
    let bb = env.busybox();

    let a = env.run_pod(&env.pod_config("pod-a")).await;
    let b = env.run_pod(&env.pod_config("pod-b")).await;

    let ns_dir = state.join("sandboxes").join(&a).join("ns");
    for kind in ["net", "ipc", "uts"] {
        let pinned = ns_dir.join(kind);
        assert!(pinned.exists(), "{} is missing", pinned.display());
        assert!(
            mounts_under(&pinned).contains(&pinned.display().to_string()),
            "{} is not a mount (the namespace is not pinned)",
            pinned.display()
        );
        let holders = processes_in_ns(&pinned, kind);
        assert!(
            holders.is_empty(),
            "a pod without containers holds no process, yet {holders:?} ({:?}) live in its {kind} namespace",
            holders.iter().map(|p| cmdline(*p)).collect::<Vec<_>>()
        );
    }
    assert!(
        berth_processes(&state).is_empty(),
        "no shim before any container: {:?}",
        berth_processes(&state)
    );

    let a1 = env
        .run(&a, &container_config("a1", &bb, &["sleep", "1001"]))
        .await;
    let a2 = env
        .run(&a, &container_config("a2", &bb, &["sleep", "1002"]))
        .await;
    let b1 = env
        .run(&b, &container_config("b1", &bb, &["sleep", "1003"]))
        .await;
    for id in [&a1, &a2, &b1] {
        env.wait_state(id, RUNNING, STATE_TIMEOUT).await;
    }

    for kind in ["ipc", "uts", "net"] {
        let link = format!("/proc/self/ns/{kind}");
        let in_a1 = ns_link_inode(&env.exec(&a1, &["readlink", &link]).await.0);
        let in_a2 = ns_link_inode(&env.exec(&a2, &["readlink", &link]).await.0);
        let in_b1 = ns_link_inode(&env.exec(&b1, &["readlink", &link]).await.0);
        let pinned = ns_inode(&ns_dir.join(kind)).unwrap();
        assert_eq!(
            in_a1, pinned,
            "a1's {kind} namespace is not the pod's pinned one"
        );
        assert_eq!(
            in_a1, in_a2,
            "two containers of one pod must share the {kind} namespace"
        );
        assert_ne!(
            in_a1, in_b1,
            "containers of different pods must not share the {kind} namespace"
        );
    }
    // Each container has its own mount and (without shareProcessNamespace)
    // PID namespace.
    for kind in ["mnt", "pid"] {
        let link = format!("/proc/self/ns/{kind}");
        let in_a1 = env.exec(&a1, &["readlink", &link]).await.0;
        let in_a2 = env.exec(&a2, &["readlink", &link]).await.0;
        assert_ne!(
            in_a1, in_a2,
            "two containers must not share the {kind} namespace by default"
        );
    }
    let ps = env.sh(&a2, "ps -o args").await;
    assert!(
        !ps.contains("sleep 1001"),
        "a2 sees a1's process without a shared PID namespace:\n{ps}"
    );

    assert_eq!(env.exec(&a1, &["hostname"]).await.0.trim(), "pod-a");
    assert_eq!(env.exec(&a2, &["hostname"]).await.0.trim(), "pod-a");
    assert_eq!(env.exec(&b1, &["hostname"]).await.0.trim(), "pod-b");
    assert_eq!(env.sh(&a1, "cat /etc/hostname").await.trim(), "pod-a");

    // Only loopback in the pod's network namespace, and it is up.
    let links = env.sh(&a1, "ls /sys/class/net").await;
    assert_eq!(
        links.split_whitespace().collect::<Vec<_>>(),
        vec!["lo"],
        "interfaces: {links}"
    );
    let lo = env.sh(&a1, "ip -o link show lo").await;
    assert!(lo.contains("UP"), "loopback is not up: {lo}");

    // A SysV shared memory segment made in the pod's IPC namespace (from a
    // thread of this test joined to it: busybox has no ipcmk) shows in
    // both of its containers, not in the other pod nor on the host.
    let ipc = ns_dir.join("ipc");
    let key: i32 = 0x0be2_7e2e;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&ipc).unwrap();
        // SAFETY: setns and shmget only affect this thread and the kernel.
        unsafe {
            assert_eq!(
                libc::setns(f.as_raw_fd(), libc::CLONE_NEWIPC),
                0,
                "setns into {}",
                ipc.display()
            );
            assert!(
                libc::shmget(key, 4096, libc::IPC_CREAT | 0o600) >= 0,
                "shmget"
            );
        }
    })
    .join()
    .expect("make a segment in the pod's IPC namespace");
    let has_key = |table: &str| {
        table
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&key.to_string()))
    };
    for (name, id) in [("a1", &a1), ("a2", &a2)] {
        let table = env.sh(id, "cat /proc/sysvipc/shm").await;
        assert!(
            has_key(&table),
            "{name} does not see the pod's shm segment:\n{table}"
        );
    }
    let table = env.sh(&b1, "cat /proc/sysvipc/shm").await;
    assert!(!has_key(&table), "another pod sees the segment:\n{table}");
    assert!(
        !has_key(&std::fs::read_to_string("/proc/sysvipc/shm").unwrap()),
        "the host sees the pod's segment"
    );

    env.remove_everything().await.expect("remove pods");
    assert!(
        mounts_under(env.d.dir.path()).is_empty(),
        "mounts left after removing the pods: {:?}",
        mounts_under(env.d.dir.path())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_pid_namespace_pod_sees_each_others_processes() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let mut config = env.pod_config("shared-pid");
    pod_namespace_options(&mut config).pid = NamespaceMode::Pod as i32;
    let pauses_before = pause_processes();
    let pod = match env.try_run_pod(&config).await {
        Ok(id) => id,
        Err(e) => panic!(
            "RunPodSandbox with namespace_options.pid = POD failed: {:?}: {}",
            e.code(),
            e.message()
        ),
    };
    let infra: Vec<i32> = pause_processes()
        .into_iter()
        .filter(|p| !pauses_before.contains(p))
        .collect();
    assert_eq!(
        infra.len(),
        1,
        "a shared-PID pod has one infra process (berth-shim pause): {infra:?}"
    );
    // In the pod cgroup, so pod limits cover it; on v2 in a leaf of its
    // own (a cgroup whose children have controllers holds no process).
    let parent = env.cgroup_parent(&pod);
    let want = if cgroup_v2() {
        format!("{parent}/infra")
    } else {
        parent.clone()
    };
    assert_eq!(
        proc_cgroup(infra[0], "memory").as_deref(),
        Some(want.as_str()),
        "the infra process's cgroup"
    );
    let c1 = env
        .run(&pod, &container_config("first", &bb, &["sleep", "1001"]))
        .await;
    let c2 = env
        .run(&pod, &container_config("second", &bb, &["sleep", "1002"]))
        .await;
    env.wait_state(&c1, RUNNING, STATE_TIMEOUT).await;
    env.wait_state(&c2, RUNNING, STATE_TIMEOUT).await;
    // No fd of berthd's (nor of whatever started berthd: this harness's
    // own shell leaves fds open) crosses into the pod.
    let first = env.pid(&c1).await;
    for (what, pid) in [("the infra process", infra[0]), ("a container", first)] {
        assert_eq!(open_fds(pid), [0, 1, 2], "{what} ({pid}) has only stdio");
    }

    let ns1 = env.exec(&c1, &["readlink", "/proc/self/ns/pid"]).await.0;
    let ns2 = env.exec(&c2, &["readlink", "/proc/self/ns/pid"]).await.0;
    assert_eq!(
        ns1, ns2,
        "containers of a shared-PID pod are in one PID namespace"
    );
    let ps = env.sh(&c2, "ps -o args").await;
    assert!(
        ps.contains("sleep 1001"),
        "the second container does not see the first one's process:\n{ps}"
    );
    let ps = env.sh(&c1, "ps -o args").await;
    assert!(
        ps.contains("sleep 1002"),
        "the first container does not see the second one's process:\n{ps}"
    );
    // PID 1 is no container's process: containers come and go, the pod's
    // namespace stays.
    let pid1 = env.sh(&c1, "cat /proc/1/cmdline | tr '\\0' ' '").await;
    assert!(
        !pid1.contains("sleep 100"),
        "PID 1 of the pod is a container's process: {pid1}"
    );

    // Stopping the first container leaves the namespace to the second.
    env.stop_container(&c1, 0).await.unwrap();
    env.wait_exited(&c1).await;
    let ps = env.sh(&c2, "ps -o args").await;
    assert!(
        !ps.contains("sleep 1001"),
        "the stopped container's process is still there:\n{ps}"
    );

    env.stop_pod(&pod).await.expect("StopPodSandbox");
    env.remove_pod(&pod).await.expect("RemovePodSandbox");
    assert!(
        eventually(Duration::from_secs(10), || !pid_alive(infra[0])).await,
        "the infra process {} outlived RemovePodSandbox",
        infra[0]
    );
    assert!(
        cgroup_dirs(&parent).is_empty(),
        "the pod cgroup is left: {:?}",
        cgroup_dirs(&parent)
    );
    assert!(
        mounts_under(env.d.dir.path()).is_empty(),
        "mounts left: {:?}",
        mounts_under(env.d.dir.path())
    );
}

/// Every container of a shared-PID pod starts, whatever pid it gets in the
/// pod's namespace (a pid that exists or not in the host's namespace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_containers_in_a_shared_pid_pod_all_start() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let mut config = env.pod_config("shared-pid-20");
    pod_namespace_options(&mut config).pid = NamespaceMode::Pod as i32;
    let pod = env.run_pod(&config).await;
    let mut failures = Vec::new();
    for i in 0..20 {
        let name = format!("c{i}");
        let config = container_config(&name, &bb, &["sleep", "1000"]);
        match env.try_create(&pod, &config).await {
            Ok(id) => {
                if let Err(e) = env.try_start(&id).await {
                    failures.push(format!("{name}: start: {e:?}"));
                }
            }
            Err(e) => failures.push(format!("{name}: create: {e:?}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    env.remove_everything().await.unwrap();
}

/// The open fds of `pid`, sorted.
fn open_fds(pid: i32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort();
    fds
}

/// `berth-shim pause` processes (infra processes of shared-PID pods).
fn pause_processes() -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|p| {
            cmdline(*p).is_some_and(|c| {
                let mut args = c.split(' ');
                args.next().is_some_and(|a| a.ends_with("berth-shim"))
                    && args.next() == Some("pause")
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysctls_hostname_hosts_and_resolv_conf() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let host_shmmni = std::fs::read_to_string("/proc/sys/kernel/shmmni").unwrap();
    let host_port_start =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap();

    let mut config = env.pod_config("sysctl-pod");
    config.linux.as_mut().unwrap().sysctls = labels(&[
        ("net.ipv4.ip_unprivileged_port_start", "0"),
        ("kernel.shmmni", "2048"),
        ("net/ipv4/ping_group_range", "0 2147483647"),
    ]);
    config.dns_config = Some(DnsConfig {
        servers: vec!["10.96.0.10".into(), "10.96.0.11".into()],
        searches: vec![
            "berth-e2e.svc.cluster.local".into(),
            "svc.cluster.local".into(),
        ],
        options: vec!["ndots:5".into(), "timeout:2".into()],
    });
    let pod = env.run_pod(&config).await;
    let c = env
        .run(&pod, &container_config("probe", &bb, &["sleep", "1000"]))
        .await;
    env.wait_state(&c, RUNNING, STATE_TIMEOUT).await;

    assert_eq!(
        env.sh(&c, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start")
            .await
            .trim(),
        "0"
    );
    assert_eq!(
        env.sh(&c, "cat /proc/sys/kernel/shmmni").await.trim(),
        "2048"
    );
    assert_eq!(
        env.sh(&c, "cat /proc/sys/net/ipv4/ping_group_range")
            .await
            .split_whitespace()
            .collect::<Vec<_>>(),
        vec!["0", "2147483647"],
        "a slash-separated sysctl name is set too"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/shmmni").unwrap(),
        host_shmmni,
        "the host's kernel.shmmni changed"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap(),
        host_port_start,
        "the host's net.ipv4.ip_unprivileged_port_start changed"
    );

    assert_eq!(env.sh(&c, "hostname").await.trim(), "sysctl-pod");
    assert_eq!(env.sh(&c, "cat /etc/hostname").await.trim(), "sysctl-pod");
    let hosts = env.sh(&c, "cat /etc/hosts").await;
    assert!(
        hosts
            .lines()
            .any(|l| l.starts_with("127.0.0.1") && l.split_whitespace().any(|w| w == "localhost")),
        "/etc/hosts has no localhost entry:\n{hosts}"
    );
    assert!(
        hosts.lines().any(|l| !l.trim_start().starts_with('#')
            && l.split_whitespace().skip(1).any(|w| w == "sysctl-pod")),
        "/etc/hosts does not name the pod's hostname:\n{hosts}"
    );
    let resolv = env.sh(&c, "cat /etc/resolv.conf").await;
    let resolv_lines: Vec<&str> = resolv.lines().map(str::trim).collect();
    for want in [
        "nameserver 10.96.0.10",
        "nameserver 10.96.0.11",
        "search berth-e2e.svc.cluster.local svc.cluster.local",
        "options ndots:5 timeout:2",
    ] {
        assert!(
            resolv_lines.contains(&want),
            "/etc/resolv.conf lacks {want:?}:\n{resolv}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sysctls_outside_the_pod_namespaces_are_refused() {
    let mut env = PodEnv::start().await;
    let state = env.d.state_dir();
    // Each value is the host's current one: a bug that wrote it on the
    // host would change nothing.
    let swappiness = std::fs::read_to_string("/proc/sys/vm/swappiness")
        .unwrap()
        .trim()
        .to_string();
    let port_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .unwrap()
        .trim()
        .to_string();

    let mut config = env.pod_config("bad-sysctl");
    config.linux.as_mut().unwrap().sysctls = labels(&[("vm.swappiness", &swappiness)]);
    let err = env
        .try_run_pod(&config)
        .await
        .expect_err("vm.swappiness is not namespaced");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("vm.swappiness"),
        "the message names the sysctl: {}",
        err.message()
    );

    // A log directory climbing out, a host port out of range: refused
    // before anything (CNI included) runs.
    let mut climbing = env.pod_config("climbing-logs");
    climbing.log_directory = "/var/log/pods/../../../etc".into();
    let mut bad_port = env.pod_config("bad-port");
    bad_port.port_mappings = vec![PortMapping {
        host_port: 70000,
        container_port: 80,
        ..Default::default()
    }];
    let mut slash = env.pod_config("slash");
    slash.metadata.as_mut().unwrap().name = "a/b".into();
    for (what, config) in [
        ("log_directory with ..", climbing),
        ("host_port 70000", bad_port),
        ("a pod name with /", slash),
    ] {
        let err = env.try_run_pod(&config).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
    }

    let mut host_net = env.pod_config("host-net-sysctl");
    config_host_network(&mut host_net);
    host_net.linux.as_mut().unwrap().sysctls =
        labels(&[("net.ipv4.ip_unprivileged_port_start", &port_start)]);
    let err = env
        .try_run_pod(&host_net)
        .await
        .expect_err("a net.* sysctl in a host-network pod");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    assert!(
        env.list_pods(None).await.is_empty(),
        "a refused pod is listed"
    );
    let sandboxes = state.join("sandboxes");
    let left: Vec<_> = std::fs::read_dir(&sandboxes)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "refused pods left {left:?}");
    assert!(
        mounts_under(&state).is_empty(),
        "mounts left: {:?}",
        mounts_under(&state)
    );

    // The name is free again: the same pod with a good sysctl runs.
    config.linux.as_mut().unwrap().sysctls = labels(&[("kernel.shmmni", "1024")]);
    env.run_pod(&config).await;
}

fn config_host_network(config: &mut PodSandboxConfig) {
    pod_namespace_options(config).network = NamespaceMode::Node as i32;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_remove_and_list_pod_sandboxes() {
    let mut env = PodEnv::start().await;
    let state = env.d.state_dir();
    let bb = env.busybox();

    let mut config_a = env.pod_config("list-a");
    config_a.labels = labels(&[("app", "web"), ("tier", "front")]);
    let mut config_b = env.pod_config("list-b");
    config_b.labels = labels(&[("app", "db")]);
    let a = env.run_pod(&config_a).await;
    let b = env.run_pod(&config_b).await;
    let parent_a = env.cgroup_parent(&a);

    let all = env.list_pods(None).await;
    assert_eq!(ids(&all), sorted(vec![a.clone(), b.clone()]));
    let pa = all.iter().find(|p| p.id == a).unwrap();
    assert_eq!(pa.state, PodSandboxState::SandboxReady as i32);
    assert_eq!(pa.metadata.as_ref().unwrap().name, "list-a");
    assert_eq!(pa.labels, config_a.labels);
    assert!(pa.created_at > 0);

    let by = |id: &str, state: Option<PodSandboxState>, sel: &[(&str, &str)]| PodSandboxFilter {
        id: id.to_string(),
        state: state.map(|s| PodSandboxStateValue { state: s as i32 }),
        label_selector: labels(sel),
    };
    assert_eq!(
        ids(&env.list_pods(Some(by(&a, None, &[]))).await),
        vec![a.clone()],
        "by id"
    );
    assert_eq!(
        ids(&env.list_pods(Some(by(&a[..12], None, &[]))).await),
        vec![a.clone()],
        "by id prefix"
    );
    assert_eq!(
        ids(&env.list_pods(Some(by("", None, &[("app", "web")]))).await),
        vec![a.clone()],
        "app=web"
    );
    assert_eq!(
        ids(&env.list_pods(Some(by("", None, &[("app", "db")]))).await),
        vec![b.clone()],
        "app=db"
    );
    assert!(
        env.list_pods(Some(by("", None, &[("app", "web"), ("tier", "back")])))
            .await
            .is_empty(),
        "every selector label must match"
    );
    assert_eq!(
        ids(&env
            .list_pods(Some(by("", Some(PodSandboxState::SandboxReady), &[])))
            .await),
        sorted(vec![a.clone(), b.clone()]),
        "state READY"
    );

    let c = env
        .run(&a, &container_config("sleeper", &bb, &["sleep", "1000"]))
        .await;
    env.wait_state(&c, RUNNING, STATE_TIMEOUT).await;
    let pid = env.pid(&c).await;

    env.stop_pod(&a).await.expect("StopPodSandbox");
    env.stop_pod(&a)
        .await
        .expect("StopPodSandbox a second time");
    let st = env.pod_status(&a).await.unwrap();
    assert_eq!(st.state, PodSandboxState::SandboxNotready as i32, "{st:?}");
    let cs = env.status(&c).await;
    assert_eq!(
        cs.state,
        ContainerState::ContainerExited as i32,
        "StopPodSandbox stops its containers: {cs:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || !pid_alive(pid)).await,
        "the container process {pid} survived StopPodSandbox"
    );
    assert_eq!(
        ids(&env
            .list_pods(Some(by("", Some(PodSandboxState::SandboxNotready), &[])))
            .await),
        vec![a.clone()],
        "state NOTREADY"
    );
    assert_eq!(
        ids(&env
            .list_pods(Some(by("", Some(PodSandboxState::SandboxReady), &[])))
            .await),
        vec![b.clone()],
        "state READY after stopping a"
    );
    let err = env
        .try_create(&a, &container_config("late", &bb, &["sleep", "1"]))
        .await
        .expect_err("a container in a stopped pod");
    assert!(
        matches!(
            err.code(),
            Code::FailedPrecondition | Code::NotFound | Code::InvalidArgument
        ),
        "{err:?}"
    );

    env.remove_pod(&a).await.expect("RemovePodSandbox");
    let err = env
        .try_status(&c)
        .await
        .expect_err("the pod's container is removed with it");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        env.list_containers(Some(ContainerFilter {
            pod_sandbox_id: a.clone(),
            ..Default::default()
        }))
        .await
        .is_empty()
    );
    let dir = state.join("sandboxes").join(&a);
    assert!(
        !dir.exists(),
        "{} is left after RemovePodSandbox",
        dir.display()
    );
    assert!(
        !state.join("shims").join(&c).exists(),
        "the container's shim dir is left"
    );
    assert!(
        !env.d.root_dir().join("containers").join(&c).exists(),
        "the container's rootfs dir is left"
    );
    let mounts: Vec<String> = mounts_under(env.d.dir.path());
    assert!(
        mounts.iter().all(|m| !m.contains(&a) && !m.contains(&c)),
        "mounts of the removed pod are left: {mounts:?}"
    );
    assert!(
        cgroup_dirs(&parent_a).is_empty(),
        "the pod cgroup is left: {:?}",
        cgroup_dirs(&parent_a)
    );
    let err = env
        .pod_status(&a)
        .await
        .expect_err("status of a removed pod");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    env.remove_pod(&a).await.expect("RemovePodSandbox again");
    env.stop_pod(&a)
        .await
        .expect("StopPodSandbox of a removed pod");
    assert_eq!(ids(&env.list_pods(None).await), vec![b.clone()]);
    assert_eq!(
        env.pod_status(&b).await.unwrap().state,
        PodSandboxState::SandboxReady as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_go_created_then_running_and_list_with_filters() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("lifecycle")).await;
    let mut config = container_config("sleeper", &bb, &["sleep", "1000"]);
    config.labels = labels(&[("role", "sleeper")]);
    let id = env.create(&pod, &config).await;

    let s = env.status(&id).await;
    assert_eq!(
        s.state,
        ContainerState::ContainerCreated as i32,
        "after CreateContainer: {s:?}"
    );
    assert!(s.created_at > 0, "{s:?}");
    assert_eq!(s.started_at, 0, "{s:?}");
    assert_eq!(s.metadata.as_ref().unwrap().name, "sleeper");
    assert_eq!(s.labels, config.labels);
    assert!(s.image_ref.starts_with("sha256:"), "{s:?}");
    assert!(s.log_path.ends_with("sleeper.log"), "{s:?}");

    env.start_container(&id).await;
    let s = env.status(&id).await;
    assert_eq!(s.state, RUNNING as i32, "after StartContainer: {s:?}");
    assert!(s.started_at >= s.created_at, "{s:?}");
    let pid = env.pid(&id).await;
    assert!(pid_alive(pid), "the reported pid {pid} is not alive");
    // Started means the process was let go; its execve may still be under
    // way for a moment (as after `runc start`; seen under user-mode-linux).
    eventually(Duration::from_secs(5), || {
        cmdline(pid).as_deref() == Some("sleep 1000")
    })
    .await;
    assert_eq!(
        cmdline(pid).as_deref(),
        Some("sleep 1000"),
        "pid {pid} is not the container's process"
    );

    let other = env
        .create(&pod, &container_config("idle", &bb, &["sleep", "1000"]))
        .await;
    let list = env.list_containers(None).await;
    assert_eq!(list.len(), 2, "{list:?}");
    let by_state = |s: ContainerState| ContainerFilter {
        state: Some(ContainerStateValue { state: s as i32 }),
        ..Default::default()
    };
    let running = env.list_containers(Some(by_state(RUNNING))).await;
    assert_eq!(
        running.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![id.clone()]
    );
    let created = env
        .list_containers(Some(by_state(ContainerState::ContainerCreated)))
        .await;
    assert_eq!(
        created.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![other.clone()]
    );
    let labelled = env
        .list_containers(Some(ContainerFilter {
            label_selector: labels(&[("role", "sleeper")]),
            ..Default::default()
        }))
        .await;
    assert_eq!(
        labelled.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![id.clone()]
    );
    let by_id = env
        .list_containers(Some(ContainerFilter {
            id: id[..12].to_string(),
            ..Default::default()
        }))
        .await;
    assert_eq!(by_id.len(), 1);
    assert_eq!(by_id[0].pod_sandbox_id, pod);

    env.stop_container(&id, 0).await.expect("StopContainer");
    let s = env.wait_exited(&id).await;
    assert_eq!(s.exit_code, 137, "SIGKILL'd sleep: {s:?}");
    env.stop_container(&id, 0)
        .await
        .expect("StopContainer on an exited container");
    env.remove_container(&id).await.expect("RemoveContainer");
    env.remove_container(&id)
        .await
        .expect("RemoveContainer again");
    env.remove_container(&other)
        .await
        .expect("RemoveContainer of a created container");
    assert!(env.list_containers(None).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_and_stderr_land_in_the_cri_log() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("logs")).await;
    let config = sh_config(
        "echo",
        &bb,
        "echo out; echo err >&2; echo; echo 'two words'",
    );
    let id = env.run(&pod, &config).await;
    let s = env.wait_exited(&id).await;
    assert_eq!(s.exit_code, 0, "{s:?}");

    let lines = read_cri_log(&env.log_file(&pod, &config));
    assert!(
        lines.iter().all(|l| l.tag == 'F'),
        "only full lines were written: {lines:?}"
    );
    let out: Vec<String> = lines
        .iter()
        .filter(|l| l.stream == "stdout")
        .map(|l| l.text())
        .collect();
    let err: Vec<String> = lines
        .iter()
        .filter(|l| l.stream == "stderr")
        .map(|l| l.text())
        .collect();
    assert_eq!(out, vec!["out", "", "two words"], "{lines:?}");
    assert_eq!(err, vec!["err"], "{lines:?}");
    for w in lines.windows(2) {
        assert!(w[0].time <= w[1].time, "timestamps go backwards: {w:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_last_line_is_tagged_p() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("partial")).await;
    let config = sh_config(
        "printf",
        &bb,
        "printf 'whole\\nno newline'; printf 'err part' >&2",
    );
    let id = env.run(&pod, &config).await;
    env.wait_exited(&id).await;

    let lines = read_cri_log(&env.log_file(&pod, &config));
    let out: Vec<(char, String)> = lines
        .iter()
        .filter(|l| l.stream == "stdout")
        .map(|l| (l.tag, l.text()))
        .collect();
    assert_eq!(
        out,
        vec![('F', "whole".to_string()), ('P', "no newline".to_string())],
        "{lines:?}"
    );
    let err: Vec<(char, String)> = lines
        .iter()
        .filter(|l| l.stream == "stderr")
        .map(|l| (l.tag, l.text()))
        .collect();
    assert_eq!(err, vec![('P', "err part".to_string())], "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_line_is_split_into_16k_partial_chunks() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("long-line")).await;
    // 1..=9000 space-separated: 43893 bytes on one line (about 43 KiB).
    let config = sh_config("long", &bb, "seq 1 9000 | tr '\\n' ' '; echo; echo short");
    let expected: String = (1..=9000).map(|i| format!("{i} ")).collect();
    assert!(expected.len() > 40 * 1024);
    let id = env.run(&pod, &config).await;
    let s = env.wait_exited(&id).await;
    assert_eq!(s.exit_code, 0, "{s:?}");

    let lines = read_cri_log(&env.log_file(&pod, &config));
    let out: Vec<&LogLine> = lines.iter().filter(|l| l.stream == "stdout").collect();
    let chunks = expected.len().div_ceil(16 * 1024);
    assert_eq!(
        out.len(),
        chunks + 1,
        "a {}-byte line makes {chunks} records (16 KiB partial chunks and the rest), then 'short'; got {:?}",
        expected.len(),
        out.iter()
            .map(|l| (l.tag, l.content.len()))
            .collect::<Vec<_>>()
    );
    for (i, l) in out[..chunks - 1].iter().enumerate() {
        assert_eq!(l.tag, 'P', "chunk {i} must be partial");
        assert_eq!(
            l.content.len(),
            16 * 1024,
            "chunk {i} must be exactly 16 KiB"
        );
    }
    assert_eq!(out[chunks - 1].tag, 'F', "the last chunk ends the line");
    let joined: Vec<u8> = out[..chunks]
        .iter()
        .flat_map(|l| l.content.clone())
        .collect();
    assert!(
        joined == expected.as_bytes(),
        "the chunks do not concatenate back to the line"
    );
    assert_eq!(
        (out[chunks].tag, out[chunks].text()),
        ('F', "short".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_reasons_and_timestamps() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("exits")).await;
    let fail = env
        .run(&pod, &sh_config("fail", &bb, "sleep 0.1; exit 3"))
        .await;
    let ok = env
        .run(&pod, &sh_config("ok", &bb, "sleep 0.1; exit 0"))
        .await;

    let s = env.wait_exited(&fail).await;
    assert_eq!(s.exit_code, 3, "{s:?}");
    assert_eq!(s.reason, "Error", "{s:?}");
    assert!(
        s.created_at > 0 && s.started_at > s.created_at,
        "started_at > created_at: {s:?}"
    );
    assert!(
        s.finished_at > s.started_at,
        "finished_at > started_at: {s:?}"
    );
    assert!(
        s.finished_at - s.started_at >= 100_000_000,
        "it ran at least 0.1 s: started {} finished {}",
        s.started_at,
        s.finished_at
    );

    let s = env.wait_exited(&ok).await;
    assert_eq!(s.exit_code, 0, "{s:?}");
    assert_eq!(s.reason, "Completed", "{s:?}");
    assert!(s.created_at > 0 && s.started_at > s.created_at, "{s:?}");
    assert!(s.finished_at > s.started_at, "{s:?}");

    let err = env
        .try_start(&ok)
        .await
        .expect_err("StartContainer on an exited container");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_limit_kills_with_reason_oomkilled() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("oom")).await;
    // busybox awk doubles a string until the cgroup's 32 MiB are gone.
    let mut config = container_config(
        "hog",
        &bb,
        &["awk", "BEGIN { s = \"a\"; while (1) s = s s }"],
    );
    resources(&mut config).memory_limit_in_bytes = 32 << 20;
    let id = env.run(&pod, &config).await;
    let s = env
        .wait_state(
            &id,
            ContainerState::ContainerExited,
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        s.reason,
        "OOMKilled",
        "{s:?}\nlog: {:?}",
        std::fs::read_to_string(env.log_file(&pod, &config))
    );
    assert_eq!(s.exit_code, 137, "killed by SIGKILL: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pids_limit_on_the_pod_cgroup_stops_a_fork_bomb() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("forkbomb")).await;
    let parent = env.cgroup_parent(&pod);
    let pids_dir = cgroup_dir("pids", &parent);
    assert!(
        pids_dir.is_dir(),
        "RunPodSandbox did not create the pod cgroup {}",
        pids_dir.display()
    );
    // What kubelet does for pod pid limits: pids.max on the pod cgroup.
    std::fs::write(pids_dir.join("pids.max"), "20").expect("write pids.max");

    let config = sh_config(
        "bomb",
        &bb,
        "i=0; while [ $i -lt 100 ]; do sleep 100 & i=$((i+1)); done; echo spawned $i; sleep 1000",
    );
    let id = env.run(&pod, &config).await;
    let log = env.log_file(&pod, &config);
    let mut max_seen = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        max_seen = max_seen.max(cgroup_tree_pids(&parent).len());
        let lines = read_cri_log_so_far(&log);
        let text = format!(
            "{}{}",
            stream_text(&lines, "stdout"),
            stream_text(&lines, "stderr")
        );
        if text.contains("can't fork") || text.contains("spawned") {
            // Let the shell try to go on, if it does.
            tokio::time::sleep(Duration::from_millis(500)).await;
            max_seen = max_seen.max(cgroup_tree_pids(&parent).len());
            let lines = read_cri_log_so_far(&log);
            break format!(
                "{}{}",
                stream_text(&lines, "stdout"),
                stream_text(&lines, "stderr")
            );
        }
        assert!(
            Instant::now() < deadline,
            "the fork bomb neither failed nor finished in 30 s; log: {text:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        text.contains("can't fork"),
        "forks beyond pids.max must fail; log: {text:?}"
    );
    assert!(
        !text.contains("spawned 100"),
        "all 100 processes were started: {text:?}"
    );
    assert!(
        max_seen <= 20,
        "{max_seen} processes in the pod cgroup, over pids.max 20"
    );
    let current: u64 = std::fs::read_to_string(pids_dir.join("pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 20, "pids.current {current} > 20");
    let status = env.status(&id).await;
    if status.state == RUNNING as i32 {
        let pid = env.pid(&id).await;
        let cg = proc_cgroup(pid, "pids").expect("the container's pids cgroup");
        assert!(
            cg.starts_with(&parent),
            "the container's pids cgroup {cg} is not under the pod's {parent}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_and_memory_limits_are_applied_to_the_container_cgroup() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("cpu")).await;
    let parent = env.cgroup_parent(&pod);
    let mut config = container_config("limited", &bb, &["sleep", "1000"]);
    {
        let r = resources(&mut config);
        r.cpu_quota = 50_000;
        r.cpu_period = 100_000;
        r.memory_limit_in_bytes = 64 << 20;
    }
    let id = env.run(&pod, &config).await;
    env.wait_state(&id, RUNNING, STATE_TIMEOUT).await;
    let pid = env.pid(&id).await;
    let want = format!("{}/{id}", parent.trim_end_matches('/'));

    let (_, info) = env.status_verbose(&id).await;
    assert_eq!(
        info["cgroupsPath"].as_str(),
        Some(want.as_str()),
        "verbose cgroupsPath: {info}"
    );

    let cpu_dir = cgroup_dir("cpu", &want);
    let mem_dir = cgroup_dir("memory", &want);
    if cgroup_v2() {
        let max = std::fs::read_to_string(cpu_dir.join("cpu.max")).expect("cpu.max");
        assert_eq!(max.trim(), "50000 100000");
        let mem = std::fs::read_to_string(mem_dir.join("memory.max")).expect("memory.max");
        assert_eq!(mem.trim(), (64u64 << 20).to_string());
    } else {
        let read = |p: &Path| {
            std::fs::read_to_string(p)
                .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
                .trim()
                .to_string()
        };
        assert_eq!(read(&cpu_dir.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read(&cpu_dir.join("cpu.cfs_period_us")), "100000");
        assert_eq!(
            read(&mem_dir.join("memory.limit_in_bytes")),
            (64u64 << 20).to_string()
        );
    }
    for controller in ["cpu", "memory", "pids"] {
        let cg = proc_cgroup(pid, controller)
            .unwrap_or_else(|| panic!("no {controller} line in /proc/{pid}/cgroup"));
        assert_eq!(
            cg, want,
            "the container's process is not in its {controller} cgroup"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_user_env_workdir_and_their_overrides() {
    let mut env = PodEnv::start().await;
    let image = env.config_image();
    let pod = env.run_pod(&env.pod_config("config")).await;

    // The image as it is: USER berth, Env, WorkingDir /work, Entrypoint
    // sh -c and its Cmd.
    let plain = container_config("plain", &image, &[]);
    // args replace the image's Cmd, keep its Entrypoint.
    let mut groups = container_config("groups", &image, &[]);
    groups.args = vec!["id -G; echo \"PATH=$PATH\"".into()];
    // command, env, working dir and user from the CRI config.
    let mut over = container_config(
        "override",
        &image,
        &[
            "/bin/sh",
            "-c",
            "echo \"$GREETING $BERTH_TEST $EXTRA from $(pwd) as $(id -u):$(id -g)\"",
        ],
    );
    over.envs = vec![
        KeyValue {
            key: "GREETING".into(),
            value: "bonjour".into(),
        },
        KeyValue {
            key: "EXTRA".into(),
            value: "yes".into(),
        },
    ];
    over.working_dir = "/tmp".into();
    security_context(&mut over).run_as_user = Some(Int64Value { value: 0 });
    // A working dir that does not exist in the image is created.
    let mut newdir = container_config("newdir", &image, &["/bin/sh", "-c", "pwd; id -u"]);
    newdir.working_dir = "/does/not/exist/yet".into();
    security_context(&mut newdir).run_as_user = Some(Int64Value { value: 4242 });

    let mut outputs = Vec::new();
    for config in [&plain, &groups, &over, &newdir] {
        let id = env.run(&pod, config).await;
        let s = env.wait_exited(&id).await;
        let lines = read_cri_log(&env.log_file(&pod, config));
        assert_eq!(
            s.exit_code,
            0,
            "{} exited {}: {s:?}; log {lines:?}",
            config.metadata.as_ref().unwrap().name,
            s.exit_code
        );
        outputs.push(stream_text(&lines, "stdout"));
    }
    assert_eq!(outputs[0], "hello from /work as 1000:1000\n");
    let mut group_lines = outputs[1].lines();
    let mut gids: Vec<&str> = group_lines
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    gids.sort();
    assert_eq!(
        gids,
        vec!["1000", "2000"],
        "the image user's groups from /etc/group: {:?}",
        outputs[1]
    );
    assert_eq!(
        group_lines.next(),
        Some("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
        "the image's PATH"
    );
    assert_eq!(outputs[2], "bonjour 1 yes from /tmp as 0:0\n");
    assert_eq!(outputs[3], "/does/not/exist/yet\n4242\n");
}

/// berthd's `Status` (not verbose).
async fn runtime_status(env: &mut PodEnv) -> StatusResponse {
    env.client
        .runtime
        .status(StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner()
}

/// Merge (the default) adds the image user's groups from /etc/group to the
/// CRI's supplemental groups; Strict keeps only the CRI's. ContainerStatus
/// reports what the process runs with, as `id` shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supplemental_groups_policy_and_the_reported_user() {
    let mut env = PodEnv::start().await;
    let status = runtime_status(&mut env).await;
    assert!(
        status
            .features
            .is_some_and(|f| f.supplemental_groups_policy),
        "Status advertises supplemental_groups_policy"
    );
    let image = env.config_image();
    let pod = env.run_pod(&env.pod_config("groups-policy")).await;
    let mut seen = Vec::new();
    for (name, policy) in [
        ("merge", SupplementalGroupsPolicy::Merge),
        ("strict", SupplementalGroupsPolicy::Strict),
    ] {
        // The image's USER is berth (1000), also in group extra (2000).
        let mut config = container_config(name, &image, &["sleep", "1000"]);
        let sc = security_context(&mut config);
        sc.supplemental_groups = vec![3000];
        sc.supplemental_groups_policy = policy as i32;
        let id = env.run(&pod, &config).await;
        env.wait_state(&id, RUNNING, STATE_TIMEOUT).await;
        let id_out = env.sh(&id, "id -u; id -g; id -G").await;
        let mut lines = id_out.lines();
        let (uid, gid) = (lines.next().unwrap(), lines.next().unwrap());
        let mut groups: Vec<i64> = lines
            .next()
            .unwrap()
            .split_whitespace()
            .map(|g| g.parse().unwrap())
            .collect();
        groups.sort();
        let user = env
            .status(&id)
            .await
            .user
            .and_then(|u| u.linux)
            .expect("ContainerStatus.user");
        assert_eq!(user.uid.to_string(), uid, "{name}");
        assert_eq!(user.gid.to_string(), gid, "{name}");
        let mut reported = user.supplemental_groups.clone();
        reported.sort();
        assert_eq!(
            reported, groups,
            "{name}: reported groups as id -G shows them"
        );
        seen.push(groups);
    }
    assert_eq!(
        seen[0],
        [1000, 2000, 3000],
        "merge: image groups and the CRI's"
    );
    assert_eq!(
        seen[1],
        [1000, 3000],
        "strict: the image's /etc/group is ignored"
    );
    env.remove_everything().await.unwrap();
}

/// Unmounts what a test mounted on the host, also when it fails.
struct HostMount(std::path::PathBuf);

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A read-only bind keeps a submount of its tree writable; a recursive
/// read-only one (`mount_setattr(AT_RECURSIVE)`) does not. Status
/// advertises the feature.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recursive_read_only_mounts_cover_submounts() {
    let mut env = PodEnv::start().await;
    let status = runtime_status(&mut env).await;
    let features = status.runtime_handlers[0].features.unwrap();
    assert!(features.recursive_read_only_mounts, "{features:?}");

    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("rro")).await;
    let tree = env.host_dir("tree");
    let sub = tree.join("sub");
    std::fs::create_dir_all(&sub).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &sub,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("a tmpfs submount on the host");
    let _submount = HostMount(sub.clone());
    let mut config = container_config("rro", &bb, &["sleep", "1000"]);
    for (dest, recursive) in [("/mnt/ro", false), ("/mnt/rro", true)] {
        config.mounts.push(Mount {
            container_path: dest.into(),
            host_path: tree.display().to_string(),
            readonly: true,
            recursive_read_only: recursive,
            ..Default::default()
        });
    }
    let id = env.run(&pod, &config).await;
    env.wait_state(&id, RUNNING, STATE_TIMEOUT).await;
    let (_, err, code) = env.exec(&id, &["touch", "/mnt/rro/sub/x"]).await;
    assert_ne!(
        code, 0,
        "a write in the submount of a recursive read-only mount"
    );
    assert!(err.contains("Read-only file system"), "{err}");
    let (_, err, code) = env.exec(&id, &["touch", "/mnt/ro/sub/y"]).await;
    assert_eq!(
        code, 0,
        "plain read-only leaves the submount writable: {err}"
    );
    assert!(sub.join("y").exists() && !sub.join("x").exists());

    // Recursive read-only wants a read-only, private mount.
    let mut bad = container_config("rro-rw", &bb, &["true"]);
    bad.mounts.push(Mount {
        container_path: "/mnt/x".into(),
        host_path: tree.display().to_string(),
        readonly: false,
        recursive_read_only: true,
        ..Default::default()
    });
    let err = env
        .try_create(&pod, &bad)
        .await
        .expect_err("rro on a rw mount");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    env.remove_everything().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_mounts_and_dev_shm() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("mounts")).await;
    let ro = env.host_dir("ro");
    let rw = env.host_dir("rw");
    std::fs::write(ro.join("existing.txt"), "from the host\n").unwrap();
    let mut config = container_config("mounter", &bb, &["sleep", "1000"]);
    config.mounts = vec![
        Mount {
            container_path: "/mnt/ro".into(),
            host_path: ro.display().to_string(),
            readonly: true,
            ..Default::default()
        },
        Mount {
            container_path: "/mnt/rw".into(),
            host_path: rw.display().to_string(),
            readonly: false,
            ..Default::default()
        },
    ];
    let id = env.run(&pod, &config).await;
    env.wait_state(&id, RUNNING, STATE_TIMEOUT).await;

    assert_eq!(
        env.sh(&id, "cat /mnt/ro/existing.txt").await,
        "from the host\n"
    );
    let (out, err, code) = env.exec(&id, &["touch", "/mnt/ro/new.txt"]).await;
    assert_ne!(code, 0, "touch on a read-only mount succeeded: {out} {err}");
    assert!(
        err.contains("Read-only file system"),
        "touch's error: {err:?}"
    );
    assert!(
        !ro.join("new.txt").exists(),
        "a file appeared in the read-only host dir"
    );

    env.sh(&id, "echo written in the container > /mnt/rw/new.txt")
        .await;
    assert_eq!(
        std::fs::read_to_string(rw.join("new.txt"))
            .expect("the file written in the container is on the host"),
        "written in the container\n"
    );
    std::fs::write(rw.join("from-host.txt"), "host side\n").unwrap();
    assert_eq!(
        env.sh(&id, "cat /mnt/rw/from-host.txt").await,
        "host side\n"
    );

    let mounts = env.sh(&id, "cat /proc/mounts").await;
    let shm = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/dev/shm"))
        .unwrap_or_else(|| panic!("/dev/shm is not a mount:\n{mounts}"));
    assert_eq!(
        shm.split_whitespace().nth(2),
        Some("tmpfs"),
        "/dev/shm: {shm}"
    );
    env.sh(&id, "echo x > /dev/shm/probe && cat /dev/shm/probe")
        .await;
    let ro_line = mounts
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("/mnt/ro"))
        .unwrap_or_else(|| panic!("/mnt/ro is not a mount:\n{mounts}"));
    assert!(
        ro_line
            .split_whitespace()
            .nth(3)
            .unwrap_or("")
            .split(',')
            .any(|o| o == "ro"),
        "/mnt/ro is not mounted ro: {ro_line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_container_log_loses_no_line() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("rotate")).await;
    let config = sh_config(
        "ticker",
        &bb,
        "i=0; while true; do i=$((i+1)); echo $i; sleep 0.01; done",
    );
    let id = env.run(&pod, &config).await;
    let log = env.log_file(&pod, &config);
    wait_log(&log, Duration::from_secs(20), "first lines", |l| {
        l.len() >= 20
    })
    .await;

    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    env.client
        .runtime
        .reopen_container_log(ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .expect("ReopenContainerLog");
    wait_log(
        &log,
        Duration::from_secs(20),
        "lines after reopening",
        |l| l.len() >= 20,
    )
    .await;
    env.stop_container(&id, 0).await.unwrap();
    env.wait_exited(&id).await;

    let old = read_cri_log(&rotated);
    let new = read_cri_log(&log);
    let old_nums = numbers(&old);
    let new_nums = numbers(&new);
    assert!(!old_nums.is_empty() && !new_nums.is_empty());
    assert_eq!(old_nums[0], 1, "the first line is 1");
    let all: Vec<u64> = old_nums.iter().chain(new_nums.iter()).copied().collect();
    assert_contiguous(&all, "rotated + new log");

    let err = env
        .client
        .runtime
        .reopen_container_log(ReopenContainerLogRequest {
            container_id: id.clone(),
        })
        .await
        .expect_err("ReopenContainerLog on an exited container");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_survive_berthd_kill9_and_restart() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let state = env.d.state_dir();
    let pod = env.run_pod(&env.pod_config("survive")).await;
    let config = sh_config(
        "survivor",
        &bb,
        "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.05; done",
    );
    let id = env.run(&pod, &config).await;
    env.wait_state(&id, RUNNING, STATE_TIMEOUT).await;
    let pid = env.pid(&id).await;
    let shim = shim_pid(&state, &id).expect("shim.pid");
    let log = env.log_file(&pod, &config);
    wait_log(&log, Duration::from_secs(10), "ticks", |l| l.len() >= 5).await;

    env.d.kill9();
    let before = read_cri_log_so_far(&log).len();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during = read_cri_log_so_far(&log).len();
    assert!(
        during > before,
        "the log stopped while berthd was down ({before} -> {during} lines)"
    );
    assert!(
        pid_alive(pid),
        "the container process {pid} died with berthd"
    );
    assert!(pid_alive(shim), "the shim {shim} died with berthd");

    env.d.restart().await.expect("restart berthd");
    env.reconnect().await;
    let s = env.status(&id).await;
    assert_eq!(s.state, RUNNING as i32, "after the restart: {s:?}");
    assert_eq!(
        env.pid(&id).await,
        pid,
        "the same process after the restart"
    );
    assert!(pid_alive(pid));
    assert_eq!(
        env.sh(&id, "echo still here").await,
        "still here\n",
        "ExecSync after the restart"
    );
    assert_eq!(
        env.list_pods(None).await.len(),
        1,
        "the pod is still listed"
    );
    assert_eq!(
        env.pod_status(&pod).await.unwrap().state,
        PodSandboxState::SandboxReady as i32
    );

    env.stop_container(&id, 2)
        .await
        .expect("StopContainer after the restart");
    let s = env.wait_exited(&id).await;
    assert!(
        s.exit_code == 137 || s.exit_code == 143,
        "stopped by SIGTERM or SIGKILL: {s:?}"
    );
    assert!(
        eventually(Duration::from_secs(10), || !pid_alive(pid)).await,
        "the process {pid} outlived StopContainer"
    );
    let lines = read_cri_log(&log);
    assert_contiguous(&numbers(&lines), "the log across the berthd crash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_shim_is_never_reported_running_and_remove_cleans_up() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let state = env.d.state_dir();
    let pod = env.run_pod(&env.pod_config("shimkill")).await;
    let parent = env.cgroup_parent(&pod);
    let id = env
        .run(&pod, &container_config("orphan", &bb, &["sleep", "1000"]))
        .await;
    env.wait_state(&id, RUNNING, STATE_TIMEOUT).await;
    let pid = env.pid(&id).await;
    let shim = shim_pid(&state, &id).expect("shim.pid of a running container");
    assert!(pid_alive(shim), "the shim {shim} is not running");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !pid_alive(shim)).await,
        "the shim {shim} survived SIGKILL"
    );
    for _ in 0..20 {
        let s = env.status(&id).await;
        assert!(
            s.state == ContainerState::ContainerUnknown as i32
                || s.state == ContainerState::ContainerExited as i32,
            "with its shim dead the container is {}: {s:?}",
            state_name(s.state)
        );
        let listed = env.list_containers(None).await;
        assert!(
            listed.iter().all(|c| c.state != RUNNING as i32),
            "ListContainers says RUNNING: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    env.stop_container(&id, 0)
        .await
        .expect("StopContainer with a dead shim");
    env.remove_container(&id)
        .await
        .expect("RemoveContainer with a dead shim");
    let err = env.try_status(&id).await.expect_err("status after remove");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        eventually(Duration::from_secs(10), || !pid_alive(pid)).await,
        "the container process {pid} ({:?}) outlived RemoveContainer",
        cmdline(pid)
    );
    // RemoveContainer deletes what is left on disk after its answer.
    let shim_dir = state.join("shims").join(&id);
    let container_dir = env.d.root_dir().join("containers").join(&id);
    assert!(
        eventually(Duration::from_secs(10), || !shim_dir.exists()).await,
        "the shim dir is left"
    );
    assert!(
        eventually(Duration::from_secs(10), || !container_dir.exists()).await,
        "the container dir is left"
    );
    let mounts = mounts_under(env.d.dir.path());
    assert!(
        mounts.iter().all(|m| !m.contains(&id)),
        "mounts left: {mounts:?}"
    );
    assert!(
        berth_processes(&state).is_empty(),
        "processes left: {:?}",
        berth_processes(&state)
    );
    let cg = format!("{parent}/{id}");
    assert!(
        eventually(Duration::from_secs(5), || cgroup_dirs(&cg).is_empty()).await,
        "the container's cgroup is left: {:?}",
        cgroup_dirs(&cg)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_container_cycles_leave_nothing_behind() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let state = env.d.state_dir();
    let root = env.d.root_dir();
    let pod = env.run_pod(&env.pod_config("cycles")).await;
    let parent = env.cgroup_parent(&pod);
    let mut ids = Vec::new();
    let mut shims = Vec::new();
    let mut pids = Vec::new();
    for i in 0..50 {
        let config = container_config(&format!("cycle-{i}"), &bb, &["sleep", "1000"]);
        let id = env.create(&pod, &config).await;
        env.start_container(&id).await;
        shims.extend(shim_pid(&state, &id));
        let s = env.status(&id).await;
        assert_eq!(s.state, RUNNING as i32, "cycle {i}: {s:?}");
        pids.push(env.pid(&id).await);
        env.stop_container(&id, 0)
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: StopContainer: {e:?}"));
        let s = env.status(&id).await;
        assert_eq!(
            s.state,
            ContainerState::ContainerExited as i32,
            "cycle {i}: after StopContainer: {s:?}"
        );
        env.remove_container(&id)
            .await
            .unwrap_or_else(|e| panic!("cycle {i}: RemoveContainer: {e:?}"));
        ids.push(id);
    }
    assert_eq!(shims.len(), 50, "every started container had a shim.pid");

    assert!(env.list_containers(None).await.is_empty());
    // RemoveContainer deletes what is left on disk after its answer.
    let dirs_left = |dir: std::path::PathBuf| {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            .unwrap_or_default()
    };
    eventually(Duration::from_secs(10), || {
        dirs_left(state.join("shims")).is_empty() && dirs_left(root.join("containers")).is_empty()
    })
    .await;
    // RemoveContainer deletes what is left on disk after its answer.
    let leftovers = || {
        let mut left: Vec<String> = mounts_under(&root)
            .into_iter()
            .chain(mounts_under(&state.join("shims")))
            .map(|m| format!("mount {m}"))
            .collect();
        left.extend(
            berth_processes(&state)
                .into_iter()
                .map(|p| format!("process {p:?}")),
        );
        for dir in [state.join("shims"), root.join("containers")] {
            left.extend(
                std::fs::read_dir(&dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| format!("{}: {:?}", dir.display(), e.file_name())),
            );
        }
        // Only the pod's own cgroup remains.
        left.extend(
            cgroup_dirs(&parent)
                .iter()
                .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| format!("cgroup {}", e.path().display())),
        );
        left
    };
    assert!(
        eventually(Duration::from_secs(10), || leftovers().is_empty()).await,
        "left behind: {:?}",
        leftovers()
    );

    // The name is free for the retry kubelet makes.
    let id = env
        .run(&pod, &container_config("nocmd", &bb, &["true"]))
        .await;
    assert_eq!(env.wait_exited(&id).await.exit_code, 0);
}
