//! Pods in a user namespace of their own (`userns_options` mode POD): root
//! in the pod is an unprivileged id on the host, the image and the volumes
//! show their files through idmapped mounts, and what cannot be done is
//! refused before anything exists.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use berth_cri::v1::*;
use berth_e2e::pods::{
    PodEnv, mounts_under, ns_inode, pod_namespace_options, security_context, sh_config,
};
use berth_e2e::report_skip;
use berth_e2e::streaming::Crictl;

/// Host ids 100000.. for the pod's 0..65536, as kubelet hands them out.
const HOST_BASE: u32 = 100_000;

fn mapping(container_id: u32, host_id: u32, length: u32) -> IdMapping {
    IdMapping {
        container_id,
        host_id,
        length,
    }
}

fn with_userns(config: &mut PodSandboxConfig, uids: Vec<IdMapping>, gids: Vec<IdMapping>) {
    pod_namespace_options(config).userns_options = Some(UserNamespace {
        mode: NamespaceMode::Pod as i32,
        uids,
        gids,
    });
}

fn userns_pod(env: &PodEnv, name: &str) -> PodSandboxConfig {
    let mut config = env.pod_config(name);
    with_userns(
        &mut config,
        vec![mapping(0, HOST_BASE, 65536)],
        vec![mapping(0, HOST_BASE, 65536)],
    );
    config
}

/// Whether berthd advertises user namespaces. Where it does not (the root
/// dir's filesystem takes no idmapped mounts: tmpfs before Linux 6.3, as in
/// the cgroup v2 lane's guest), a pod asking for one must be refused with
/// FailedPrecondition, and the rest of `test` is skipped.
async fn supported(env: &mut PodEnv, test: &str) -> bool {
    let status = env
        .client
        .runtime
        .status(StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    if status.runtime_handlers[0].features.unwrap().user_namespaces {
        return true;
    }
    let config = userns_pod(env, "userns-unsupported");
    let err = env.try_run_pod(&config).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("idmapped"), "{err:?}");
    report_skip(
        test,
        "the root dir's filesystem takes no idmapped mounts (refused as it should be)",
    );
    false
}

/// The `Uid:` (or `Gid:`) line of a process: real, effective, saved, fs.
fn status_ids(pid: i32, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_user_namespace_maps_root_and_idmaps_the_rootfs_and_volumes() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    if !supported(
        &mut env,
        "a_pod_user_namespace_maps_root_and_idmaps_the_rootfs_and_volumes",
    )
    .await
    {
        return;
    }
    // A volume with a root-owned dir and a file of host uid 1000.
    let vol = env.host_dir("userns-vol");
    std::fs::write(vol.join("theirs"), "x").unwrap();
    std::os::unix::fs::chown(vol.join("theirs"), Some(1000), Some(1000)).unwrap();

    let pod = env.run_pod(&userns_pod(&env, "userns")).await;
    let mut config = sh_config("app", &env.busybox(), "sleep 1000");
    // A working dir the image lacks: made for root in the pod.
    config.working_dir = "/made/by/berth".into();
    config.mounts.push(Mount {
        container_path: "/data".into(),
        host_path: vol.display().to_string(),
        ..Default::default()
    });
    // An image volume: its layers are idmapped too.
    config.mounts.push(Mount {
        container_path: "/iv".into(),
        image: Some(ImageSpec {
            image: env.busybox(),
            ..Default::default()
        }),
        readonly: true,
        ..Default::default()
    });
    let id = env.run(&pod, &config).await;

    // Inside: the requested mapping, and root.
    let uid_map = env.sh(&id, "cat /proc/self/uid_map").await;
    let fields: Vec<&str> = uid_map.split_whitespace().collect();
    assert_eq!(fields, ["0", "100000", "65536"], "{uid_map:?}");
    let gid_map = env.sh(&id, "cat /proc/self/gid_map").await;
    assert_eq!(
        gid_map.split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"]
    );
    assert_eq!(env.sh(&id, "id -u; id -g").await.trim(), "0\n0");

    // Outside: the process is host uid 100000, in the pod's pinned user
    // namespace, and the pod's network namespace.
    let pid = env.pid(&id).await;
    assert_eq!(status_ids(pid, "Uid:"), vec![HOST_BASE; 4]);
    assert_eq!(status_ids(pid, "Gid:"), vec![HOST_BASE; 4]);
    let sandbox_ns = env.d.state_dir().join("sandboxes").join(&pod).join("ns");
    assert_eq!(
        ns_inode(Path::new(&format!("/proc/{pid}/ns/user"))),
        ns_inode(&sandbox_ns.join("user"))
    );
    assert_eq!(
        ns_inode(Path::new(&format!("/proc/{pid}/ns/net"))),
        ns_inode(&sandbox_ns.join("net"))
    );

    // The image's files: root's inside, the mapped id's seen from the host.
    let inside = env
        .sh(&id, "stat -c '%u %g' /bin/sh /etc/hosts / /iv/bin/sh")
        .await;
    assert_eq!(
        inside.lines().collect::<Vec<_>>(),
        ["0 0", "0 0", "0 0", "0 0"],
        "{inside}"
    );
    let host_view = std::fs::metadata(format!("/proc/{pid}/root/bin/sh")).unwrap();
    assert_eq!((host_view.uid(), host_view.gid()), (HOST_BASE, HOST_BASE));
    // Root in the pod writes its rootfs; the file is the mapped id's.
    env.sh(&id, "echo hi > /made-inside && touch /made/by/berth/x")
        .await;
    assert_eq!(env.sh(&id, "stat -c %u /made/by/berth").await.trim(), "0");
    let made = std::fs::metadata(format!("/proc/{pid}/root/made-inside")).unwrap();
    assert_eq!(made.uid(), HOST_BASE);

    // The volume: owners shown through the mapping, writable by root in
    // the pod, and what it writes is host root's on disk.
    let owners = env.sh(&id, "stat -c '%u' /data /data/theirs").await;
    assert_eq!(
        owners.lines().collect::<Vec<_>>(),
        ["0", "1000"],
        "{owners}"
    );
    env.sh(&id, "echo from-pod > /data/mine").await;
    let mine = std::fs::metadata(vol.join("mine")).unwrap();
    assert_eq!((mine.uid(), mine.gid()), (0, 0));
    assert_eq!(
        std::fs::read_to_string(vol.join("mine")).unwrap(),
        "from-pod\n"
    );

    // Root in the pod is nobody to the host's cgroup files.
    let (_, err, code) = env
        .exec(
            &id,
            &[
                "sh",
                "-c",
                "for f in /sys/fs/cgroup/memory.max /sys/fs/cgroup/memory/memory.limit_in_bytes; do \
                 [ -e $f ] && echo 1 > $f; done",
            ],
        )
        .await;
    assert_ne!(code, 0, "a cgroup write succeeded: {err}");

    // A restart keeps the pod ready and the container running.
    env.d.kill9();
    env.d.restart().await.expect("restart berthd");
    env.reconnect().await;
    let ready = env.pod_status(&pod).await.unwrap();
    assert_eq!(
        ready.state,
        PodSandboxState::SandboxReady as i32,
        "{ready:?}"
    );
    assert_eq!(env.sh(&id, "id -u").await.trim(), "0");

    let root = env.d.root_dir();
    env.remove_everything().await.unwrap();
    assert_eq!(mounts_under(&root), Vec::<String>::new());
    assert_eq!(
        mounts_under(&env.d.state_dir()),
        Vec::<String>::new(),
        "the pinned user namespace is gone too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_pid_pod_in_a_user_namespace() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    if !supported(&mut env, "a_shared_pid_pod_in_a_user_namespace").await {
        return;
    }
    let mut config = userns_pod(&env, "userns-pid");
    pod_namespace_options(&mut config).pid = NamespaceMode::Pod as i32;
    let pod = env.run_pod(&config).await;
    let a = env
        .run(&pod, &sh_config("a", &env.busybox(), "sleep 1001"))
        .await;
    let b = env
        .run(&pod, &sh_config("b", &env.busybox(), "sleep 1002"))
        .await;
    // Each sees the other's process, and /proc is the pod's.
    let ps = env.sh(&b, "ps -o args").await;
    assert!(
        ps.contains("sleep 1001") && ps.contains("sleep 1002"),
        "{ps}"
    );
    let pid = env.pid(&a).await;
    let infra_user = std::fs::read_link(format!("/proc/{pid}/ns/user")).unwrap();
    let sandbox_ns = env.d.state_dir().join("sandboxes").join(&pod).join("ns");
    assert_eq!(
        ns_inode(Path::new(&format!("/proc/{pid}/ns/user"))),
        ns_inode(&sandbox_ns.join("user")),
        "{infra_user:?}"
    );
    assert_eq!(env.sh(&a, "id -u").await.trim(), "0");
    assert_eq!(status_ids(pid, "Uid:")[0], HOST_BASE);

    // A process exec'd into a container is who the container's process is,
    // inside the namespace, with the same capabilities.
    let mut user = sh_config("user", &env.busybox(), "sleep 1003");
    security_context(&mut user).run_as_user = Some(Int64Value { value: 1000 });
    security_context(&mut user).run_as_group = Some(Int64Value { value: 3000 });
    let c = env.run(&pod, &user).await;
    let cpid = env.pid(&c).await;
    assert_eq!(status_ids(cpid, "Uid:")[0], HOST_BASE + 1000);
    assert_eq!(env.sh(&c, "id -u; id -g").await.trim(), "1000\n3000");
    let caps = |status: &str| {
        status
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let init_caps = caps(&std::fs::read_to_string(format!("/proc/{cpid}/status")).unwrap());
    let exec_caps = caps(&env.sh(&c, "cat /proc/self/status").await);
    assert_eq!(exec_caps, init_caps);
    let exec_map = env.sh(&c, "cat /proc/self/uid_map").await;
    assert_eq!(
        exec_map.split_whitespace().collect::<Vec<_>>(),
        ["0", "100000", "65536"]
    );

    // The streaming exec of the real crictl lands in the namespace too.
    match Crictl::new(&env.d.socket, env.work.path()) {
        None => report_skip(
            "a_shared_pid_pod_in_a_user_namespace (crictl exec)",
            "crictl not found (set $BERTH_CRICTL or put it in shared/tools beside the workspace)",
        ),
        Some(crictl) => {
            let run = crictl
                .run(
                    &["exec", &c, "sh", "-c", "id -u; cat /proc/self/uid_map"],
                    b"",
                    Duration::from_secs(30),
                )
                .await;
            assert_eq!(run.code, Some(0), "crictl exec: {run:?}");
            let words: Vec<&str> = run.stdout.split_whitespace().collect();
            assert_eq!(words, ["1000", "0", "100000", "65536"], "{run:?}");
        }
    }
    env.remove_everything().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_namespace_requests_that_cannot_work_are_refused() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    let refused = |what: &str, err: tonic::Status, needle: &str| {
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err:?}");
        assert!(err.message().contains(needle), "{what}: {err:?}");
    };

    let mut two = env.pod_config("userns-two");
    with_userns(
        &mut two,
        vec![mapping(0, HOST_BASE, 1000), mapping(1000, 300_000, 1000)],
        vec![mapping(0, HOST_BASE, 2000)],
    );
    refused(
        "two mappings",
        env.try_run_pod(&two).await.unwrap_err(),
        "exactly one",
    );

    let mut no_root = env.pod_config("userns-noroot");
    with_userns(
        &mut no_root,
        vec![mapping(1, HOST_BASE, 65536)],
        vec![mapping(1, HOST_BASE, 65536)],
    );
    refused(
        "container id 0 unmapped",
        env.try_run_pod(&no_root).await.unwrap_err(),
        "container id 0",
    );

    for mode in [NamespaceMode::Container, NamespaceMode::Target] {
        let mut c = env.pod_config("userns-mode");
        pod_namespace_options(&mut c).userns_options = Some(UserNamespace {
            mode: mode as i32,
            ..Default::default()
        });
        refused(
            mode.as_str_name(),
            env.try_run_pod(&c).await.unwrap_err(),
            mode.as_str_name(),
        );
    }

    let mut host_net = userns_pod(&env, "userns-hostnet");
    pod_namespace_options(&mut host_net).network = NamespaceMode::Node as i32;
    refused(
        "host network",
        env.try_run_pod(&host_net).await.unwrap_err(),
        "host network",
    );

    // A user outside the mapping is refused at create; nothing is left.
    if !supported(
        &mut env,
        "user_namespace_requests_that_cannot_work_are_refused (create)",
    )
    .await
    {
        return;
    }
    let pod = env.run_pod(&userns_pod(&env, "userns-bad-user")).await;
    let mut outside = sh_config("outside", &env.busybox(), "sleep 1000");
    security_context(&mut outside).run_as_user = Some(Int64Value { value: 70_000 });
    refused(
        "unmapped uid",
        env.try_create(&pod, &outside).await.unwrap_err(),
        "uid 70000",
    );
    let containers = env.d.root_dir().join("containers");
    assert_eq!(
        std::fs::read_dir(&containers)
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "the refused create left a container dir"
    );

    // Mode NODE is the host's user namespace.
    let mut node = env.pod_config("userns-node");
    pod_namespace_options(&mut node).userns_options = Some(UserNamespace {
        mode: NamespaceMode::Node as i32,
        ..Default::default()
    });
    let node_pod = env.run_pod(&node).await;
    // A mount with id mappings of its own is idmapped with them: host
    // root's file shows as 1000.
    let vol = env.host_dir("userns-mapped");
    std::fs::write(vol.join("roots"), "x").unwrap();
    let mut host = sh_config("host", &env.busybox(), "sleep 1000");
    host.mounts.push(Mount {
        container_path: "/mapped".into(),
        host_path: vol.display().to_string(),
        uid_mappings: vec![mapping(0, 1000, 1)],
        gid_mappings: vec![mapping(0, 2000, 1)],
        ..Default::default()
    });
    let id = env.run(&node_pod, &host).await;
    assert_eq!(
        env.sh(&id, "stat -c '%u %g' /mapped/roots").await.trim(),
        "1000 2000"
    );
    let host_map = std::fs::read_to_string("/proc/self/uid_map").unwrap();
    assert_eq!(
        env.sh(&id, "cat /proc/self/uid_map")
            .await
            .split_whitespace()
            .collect::<Vec<_>>(),
        host_map.split_whitespace().collect::<Vec<_>>()
    );
    env.remove_everything().await.unwrap();
}
