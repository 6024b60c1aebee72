//! One owner per object (issue 9): what berthd's state looks like when CRI
//! calls are cancelled by their deadline, race each other on one object,
//! meet a full disk, and what `GetContainerEvents` publishes.
//!
//! - A mutating call runs to its commit or is fully undone, whatever the
//!   client's deadline: after cancelled CreateContainer and RunPodSandbox
//!   calls, every record has all of its parts (shim, rootfs, dirs; sandbox
//!   dir, netns pins, CNI cache, address, veth) and no part exists without
//!   its record.
//! - Calls on one object are serialized (a pod-level call excludes calls on
//!   its containers): StartContainer racing RemoveContainer, and
//!   StopPodSandbox racing RemovePodSandbox and ContainerStatus, leave
//!   nothing behind and answer with clear codes.
//! - A full root dir gives RESOURCE_EXHAUSTED, reads and removals go on,
//!   RuntimeReady is false while writes fail, and everything works again
//!   once space is freed, without a restart.
//! - `GetContainerEvents` delivers CREATED, STARTED, STOPPED, DELETED in
//!   order to every subscriber, publishes an exit nobody polls for, and a
//!   subscriber that never reads slows no call.
//!
//! Pods with a network use Berth's own CNI plugins on a bridge of the
//! test's own ([`TestNet`]); no test sends traffic anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::cri::CriClient;
use berth_e2e::net::*;
use berth_e2e::pods::*;
use tokio::sync::mpsc;
use tonic::Code;

// ---- helpers ----

/// How long one call may take in these tests before the test says berthd
/// is wedged (instead of hanging).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A random number in `lo..=hi`.
fn rand_between(lo: u64, hi: u64) -> u64 {
    lo + u64::from_str_radix(&random_hex(4), 16).unwrap() % (hi - lo + 1)
}

/// A request with a gRPC deadline (`grpc-timeout`): the client gives up
/// after `timeout` and berthd's gRPC server drops the handler's future at
/// the same moment.
fn with_deadline<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}

/// Awaits a call, panicking with `what` if it takes longer than
/// [`CALL_TIMEOUT`].
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {CALL_TIMEOUT:?} (berthd wedged?)"),
    }
}

/// The codes a client may get for a call that lost a race on its object.
fn clear_refusal(code: Code) -> bool {
    matches!(code, Code::NotFound | Code::FailedPrecondition)
}

/// What a client sees when its deadline expired.
fn cancelled(code: Code) -> bool {
    matches!(code, Code::Cancelled | Code::DeadlineExceeded)
}

/// What a batch of calls with deadlines answered: the ids of those that
/// answered OK (by name), how many hit their deadline, and anything else.
struct Answers {
    answered: BTreeMap<String, String>,
    unexpected: Vec<String>,
    n_cancelled: usize,
}

type Answer = (String, Duration, Result<String, tonic::Status>);

async fn collect_answers(set: &mut tokio::task::JoinSet<Answer>) -> Answers {
    let mut answers = Answers {
        answered: BTreeMap::new(),
        unexpected: Vec::new(),
        n_cancelled: 0,
    };
    while let Some(r) = set.join_next().await {
        let (name, deadline, r) = r.unwrap();
        match r {
            Ok(id) => {
                answers.answered.insert(name, id);
            }
            Err(e) if cancelled(e.code()) => answers.n_cancelled += 1,
            Err(e) => answers.unexpected.push(format!(
                "{name} ({deadline:?}): {:?}: {}",
                e.code(),
                e.message()
            )),
        }
    }
    answers
}

fn outcome<T>(r: &Result<T, tonic::Status>) -> String {
    match r {
        Ok(_) => "OK".into(),
        Err(e) => format!("{:?}: {}", e.code(), e.message()),
    }
}

/// At most 3 items of a list, and how many there are.
fn few<T: std::fmt::Debug>(items: impl IntoIterator<Item = T>) -> String {
    let all: Vec<T> = items.into_iter().collect();
    if all.len() <= 3 {
        format!("{all:?}")
    } else {
        format!("{:?} and {} more", &all[..3], all.len() - 3)
    }
}

/// The names in `dir` (empty when it does not exist).
fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The `<id>` of every `<id>.json` in `dir`.
fn json_stems(dir: &Path) -> BTreeSet<String> {
    names_in(dir)
        .into_iter()
        .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
        .collect()
}

/// `berth-shim` processes of this berthd (not the short-lived
/// `berth-container` helper).
fn shim_processes(state: &Path) -> BTreeMap<i32, String> {
    berth_processes(state)
        .into_iter()
        .filter(|(_, c)| {
            c.split(' ')
                .next()
                .is_some_and(|a| a.ends_with("berth-shim"))
        })
        .collect()
}

/// Mount points under `<root>/containers`, split into the container ids
/// whose `<id>/rootfs` is mounted and anything else mounted there.
fn rootfs_mounts(root: &Path) -> (BTreeSet<String>, Vec<String>) {
    let base = root.join("containers");
    let mut ids = BTreeSet::new();
    let mut other = Vec::new();
    for m in mounts_under(&base) {
        let rel = Path::new(&m)
            .strip_prefix(&base)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let parts: Vec<_> = rel.components().collect();
        if parts.len() == 2 && parts[1].as_os_str() == "rootfs" {
            ids.insert(parts[0].as_os_str().to_string_lossy().into_owned());
        } else {
            other.push(m);
        }
    }
    (ids, other)
}

/// The child cgroups of `parent` (their names), in every hierarchy.
fn child_cgroups(parent: &str) -> BTreeSet<String> {
    cgroup_dirs(parent)
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect()
}

/// `RuntimeReady` from Status.
async fn runtime_ready(c: &mut CriClient) -> RuntimeCondition {
    let s = within("Status", c.runtime.status(StatusRequest { verbose: false }))
        .await
        .unwrap_or_else(|e| panic!("Status: {e:?}"))
        .into_inner();
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.r#type == "RuntimeReady"))
        .cloned()
        .unwrap_or_else(|| panic!("no RuntimeReady condition in {s:?}"))
}

/// A client on a connection of its own.
async fn own_client(env: &PodEnv) -> CriClient {
    env.d.client().await.expect("connect to berthd")
}

// ---- containers: records and their parts ----

/// Every container record of berthd against what exists on the host: each
/// record has a live shim, a mounted rootfs, its container dir (upper,
/// work, rootfs) and shim dir; no shim process, rootfs mount, container
/// dir, shim dir or container cgroup of `parent` exists without a record.
/// Returns the records (id → name) and the problems found.
async fn container_parts(
    env: &mut PodEnv,
    parent: &str,
) -> (BTreeMap<String, String>, Vec<String>) {
    let state = env.d.state_dir();
    let root = env.d.root_dir();
    let listed = within("ListContainers", env.list_containers(None)).await;
    // A container's shim comes with StartContainer: one never started
    // (created, or stopped before its start) has none.
    let mut unstarted = BTreeSet::new();
    for c in &listed {
        let never_started = c.state == ContainerState::ContainerCreated as i32
            || (c.state == ContainerState::ContainerExited as i32
                && env.try_status(&c.id).await.is_ok_and(|s| s.started_at == 0));
        if never_started {
            unstarted.insert(c.id.clone());
        }
    }
    let records: BTreeMap<String, String> = listed
        .into_iter()
        .map(|c| (c.id, c.metadata.map(|m| m.name).unwrap_or_default()))
        .collect();
    let ids: BTreeSet<String> = records.keys().cloned().collect();
    let mut problems = Vec::new();

    let shims = shim_processes(&state);
    let (mounted, other_mounts) = rootfs_mounts(&root);
    let container_dirs = names_in(&root.join("containers"));
    let shim_dirs = names_in(&state.join("shims"));
    let cgroups = child_cgroups(parent);

    let mut record_shims = BTreeSet::new();
    for id in &ids {
        match shim_pid(&state, id) {
            Some(pid) if unstarted.contains(id) => problems.push(format!(
                "container {id}: never started, but it has a shim.pid ({pid})"
            )),
            None if unstarted.contains(id) => {}
            Some(pid) if pid_alive(pid) => {
                record_shims.insert(pid);
            }
            Some(pid) => problems.push(format!("container {id}: its shim {pid} is not alive")),
            None => problems.push(format!("container {id}: no shim.pid")),
        }
        let dir = root.join("containers").join(id);
        for sub in ["upper", "work", "rootfs"] {
            if !dir.join(sub).is_dir() {
                problems.push(format!(
                    "container {id}: {}/{sub} is missing",
                    dir.display()
                ));
            }
        }
        if !mounted.contains(id) {
            problems.push(format!("container {id}: its rootfs is not mounted"));
        }
    }
    let diff = |what: &str, have: &BTreeSet<String>, problems: &mut Vec<String>| {
        let extra: Vec<_> = have.difference(&ids).collect();
        let missing: Vec<_> = ids.difference(have).collect();
        if !extra.is_empty() || !missing.is_empty() {
            problems.push(format!(
                "{what}: {} for {} records; without a record: {}; records without one: {}",
                have.len(),
                ids.len(),
                few(extra),
                few(missing)
            ));
        }
    };
    diff("rootfs mounts", &mounted, &mut problems);
    diff("container dirs", &container_dirs, &mut problems);
    diff("shim dirs", &shim_dirs, &mut problems);
    if !other_mounts.is_empty() {
        problems.push(format!(
            "other mounts under the containers dir: {other_mounts:?}"
        ));
    }
    let stray_shims: Vec<_> = shims
        .iter()
        .filter(|(pid, _)| !record_shims.contains(pid))
        .collect();
    if shims.len() != record_shims.len() || !stray_shims.is_empty() {
        problems.push(format!(
            "{} shim processes for {} started records; not a record's: {}",
            shims.len(),
            record_shims.len(),
            few(stray_shims)
        ));
    }
    let stray_cgroups: Vec<_> = cgroups.difference(&ids).collect();
    if !stray_cgroups.is_empty() {
        problems.push(format!(
            "{} container cgroups under {parent} without a record: {}",
            stray_cgroups.len(),
            few(&stray_cgroups)
        ));
    }
    (records, problems)
}

/// Runs `calls` (on a client of their own), kills berthd with SIGKILL
/// `after` they began, then restarts it and reconnects.
async fn sigkill_during(
    env: &mut PodEnv,
    after: Duration,
    calls: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let calls = tokio::spawn(calls);
    tokio::time::sleep(after).await;
    env.d.kill9();
    let _ = calls.await;
    within("restart berthd", env.d.restart())
        .await
        .expect("restart berthd");
    env.reconnect().await;
}

/// Polls [`container_parts`] until it finds no problem (or `timeout`).
async fn settled_container_parts(
    env: &mut PodEnv,
    parent: &str,
    timeout: Duration,
) -> Result<BTreeMap<String, String>, (BTreeMap<String, String>, Vec<String>)> {
    let deadline = Instant::now() + timeout;
    loop {
        let (records, problems) = container_parts(env, parent).await;
        if problems.is_empty() {
            return Ok(records);
        }
        if Instant::now() >= deadline {
            return Err((records, problems));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_create_container_leaves_all_or_nothing() {
    const CALLS: usize = 40;
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("cancel-create")).await;
    let parent = env.cgroup_parent(&pod);
    let sandbox_config = env.pod(&pod).clone();

    // 40 calls, 4 in flight, each with its own 2–40 ms deadline.
    let sem = Arc::new(tokio::sync::Semaphore::new(4));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let deadline = Duration::from_millis(rand_between(2, 40));
        let name = format!("cancel-{i}");
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(container_config(&name, &bb, &["sleep", "3600"])),
            sandbox_config: Some(sandbox_config.clone()),
        };
        let mut client = env.client.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let r = client
                .runtime
                .create_container(with_deadline(req, deadline))
                .await
                .map(|r| r.into_inner().container_id);
            (name, deadline, r)
        });
    }
    let Answers {
        answered,
        unexpected,
        n_cancelled,
    } = collect_answers(&mut set).await;
    eprintln!(
        "{} CreateContainer calls answered OK, {n_cancelled} hit their deadline",
        answered.len()
    );
    assert!(
        unexpected.is_empty(),
        "CreateContainer calls failed for another reason than their deadline:\n{}",
        unexpected.join("\n")
    );

    // In-flight work settles: each cancelled call committed or undid all.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records = match settled_container_parts(&mut env, &parent, Duration::from_secs(8)).await {
        Ok(r) => r,
        Err((records, problems)) => panic!(
            "10 s after {CALLS} CreateContainer calls with 2–40 ms deadlines, records and their parts disagree ({} records: {records:?}):\n{}",
            records.len(),
            problems.join("\n")
        ),
    };
    eprintln!("{} container records after settling", records.len());
    for (name, id) in &answered {
        assert_eq!(
            records.get(id),
            Some(name),
            "CreateContainer {name} answered OK ({id}) but the container is not listed"
        );
    }
    // A name whose call was undone is free again (kubelet retries with it).
    let listed_names: BTreeSet<&String> = records.values().collect();
    for i in 0..CALLS {
        let name = format!("cancel-{i}");
        if listed_names.contains(&name) {
            continue;
        }
        within(
            "CreateContainer retry",
            env.try_create(&pod, &container_config(&name, &bb, &["sleep", "3600"])),
        )
        .await
        .unwrap_or_else(|e| {
            panic!("the name {name} of an undone CreateContainer is not free again: {e:?}")
        });
    }
    let (records, problems) = container_parts(&mut env, &parent).await;
    assert!(
        problems.is_empty(),
        "after retrying the undone names:\n{}",
        problems.join("\n")
    );
    assert_eq!(records.len(), CALLS, "one container per name: {records:?}");

    within("remove everything", env.remove_everything())
        .await
        .expect("remove every pod and container");
    let state = env.d.state_dir();
    let root = env.d.root_dir();
    let clean = eventually(Duration::from_secs(10), || {
        shim_processes(&state).is_empty()
            && mounts_under(env.d.dir.path()).is_empty()
            && names_in(&root.join("containers")).is_empty()
            && names_in(&state.join("shims")).is_empty()
            && cgroup_dirs(&parent).is_empty()
    })
    .await;
    assert!(
        clean,
        "left after removing everything: shims {:?}, mounts {:?}, container dirs {:?}, shim dirs {:?}, cgroups {:?}",
        shim_processes(&state),
        mounts_under(env.d.dir.path()),
        names_in(&root.join("containers")),
        names_in(&state.join("shims")),
        cgroup_dirs(&parent)
    );
    assert!(
        within("ListContainers", env.list_containers(None))
            .await
            .is_empty()
    );
}

// ---- pods with a network: records and their parts ----

/// A PodEnv whose berthd runs `net`'s plugins (declare the TestNet first,
/// so it is dropped after the PodEnv), with the conflist written.
async fn start_net_env(net: &TestNet) -> PodEnv {
    let env =
        PodEnv::start_with_cni(berth_e2e::BerthdOptions::default(), net.cni_options(None)).await;
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(false));
    env
}

/// The host end of the pod's veth, from berthd's cached ADD result.
fn host_veth(env: &PodEnv, net: &TestNet, pod_id: &str) -> Option<String> {
    let path = env.d.state_dir().join("cni").join(format!("{pod_id}.json"));
    let cached: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    cached["result"]["interfaces"]
        .as_array()?
        .iter()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .filter_map(|i| i["name"].as_str())
        .find(|n| *n != net.bridge)
        .map(str::to_string)
}

/// Sandbox ids whose dir has a mount under `<state>/sandboxes`.
fn pinned_sandboxes(state: &Path) -> BTreeSet<String> {
    let base = state.join("sandboxes");
    mounts_under(&base)
        .iter()
        .filter_map(|m| {
            Path::new(m)
                .strip_prefix(&base)
                .ok()
                .and_then(|r| r.components().next())
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
        })
        .collect()
}

/// Every sandbox record against the host: each is READY with an address
/// of the test subnet in PodSandboxStatus, its sandbox dir, pinned
/// namespaces, CNI cache file, host-local allocation and veth on the
/// bridge; none of these exists without a record. Returns the records
/// (id → name) and the problems found.
async fn sandbox_parts(env: &mut PodEnv, net: &TestNet) -> (BTreeMap<String, String>, Vec<String>) {
    let state = env.d.state_dir();
    let records: BTreeMap<String, String> = within("ListPodSandbox", env.list_pods(None))
        .await
        .into_iter()
        .map(|p| (p.id, p.metadata.map(|m| m.name).unwrap_or_default()))
        .collect();
    let ids: BTreeSet<String> = records.keys().cloned().collect();
    let mut problems = Vec::new();

    let dirs = names_in(&state.join("sandboxes"));
    let caches = json_stems(&state.join("cni"));
    let owners: BTreeSet<String> = net
        .allocations()
        .iter()
        .map(|ip| {
            net.allocation_owner(ip)
                .unwrap_or_else(|| format!("<{ip}: no owner>"))
        })
        .collect();
    let ports: BTreeSet<String> = net.bridge_ports().into_iter().collect();
    let pinned = pinned_sandboxes(&state);

    let mut record_veths = BTreeSet::new();
    for id in &ids {
        match within("PodSandboxStatus", env.pod_status(id)).await {
            Ok(s) => {
                if s.state != PodSandboxState::SandboxReady as i32 {
                    problems.push(format!("pod {id} is listed but not READY: {s:?}"));
                }
                let ip = s.network.map(|n| n.ip).unwrap_or_default();
                if !net.contains(&ip) {
                    problems.push(format!(
                        "pod {id} has no address of {} in PodSandboxStatus ({ip:?})",
                        net.subnet()
                    ));
                }
            }
            Err(e) => problems.push(format!("PodSandboxStatus of listed pod {id}: {e:?}")),
        }
        for kind in ["net", "ipc", "uts"] {
            let pin = state.join("sandboxes").join(id).join("ns").join(kind);
            if !mounts_under(&pin).contains(&pin.display().to_string()) {
                problems.push(format!("pod {id}: {} is not pinned", pin.display()));
            }
        }
        match host_veth(env, net, id) {
            Some(v) if ports.contains(&v) => {
                record_veths.insert(v);
            }
            Some(v) => problems.push(format!("pod {id}: its veth {v} is not on {}", net.bridge)),
            None => problems.push(format!("pod {id}: no host veth in its CNI cache")),
        }
    }
    let diff = |what: &str, have: &BTreeSet<String>, problems: &mut Vec<String>| {
        let extra: Vec<_> = have.difference(&ids).collect();
        let missing: Vec<_> = ids.difference(have).collect();
        if !extra.is_empty() || !missing.is_empty() {
            problems.push(format!(
                "{what}: {} for {} records; without a record: {}; records without one: {}",
                have.len(),
                ids.len(),
                few(extra),
                few(missing)
            ));
        }
    };
    diff("sandbox dirs", &dirs, &mut problems);
    diff("CNI cache files", &caches, &mut problems);
    diff("host-local allocations (by owner)", &owners, &mut problems);
    let stray_pins: Vec<_> = pinned.difference(&ids).collect();
    if !stray_pins.is_empty() {
        problems.push(format!(
            "{} namespace pins without a record: {}",
            stray_pins.len(),
            few(&stray_pins)
        ));
    }
    let stray_ports: Vec<_> = ports.difference(&record_veths).collect();
    if ports.len() != ids.len() || !stray_ports.is_empty() {
        problems.push(format!(
            "{} veths on {} for {} records; not a record's: {}",
            ports.len(),
            net.bridge,
            ids.len(),
            few(&stray_ports)
        ));
    }
    (records, problems)
}

/// Nothing of any pod is left: none listed, no link on the bridge, no
/// allocation, no cache file, no sandbox dir, no mount under the state
/// dir, no cgroup of `parents`.
async fn assert_no_pod_left(env: &mut PodEnv, net: &TestNet, parents: &[String]) {
    let state = env.d.state_dir();
    let clean = eventually(Duration::from_secs(10), || {
        net.bridge_ports().is_empty()
            && net.allocations().is_empty()
            && json_stems(&state.join("cni")).is_empty()
            && names_in(&state.join("sandboxes")).is_empty()
            && mounts_under(&state).is_empty()
            && parents.iter().all(|p| cgroup_dirs(p).is_empty())
    })
    .await;
    assert!(
        clean,
        "left after removing every pod: veths {:?}, allocations {:?}, CNI cache {:?}, sandbox dirs {:?}, mounts {:?}, cgroups {:?}",
        net.bridge_ports(),
        net.allocations(),
        json_stems(&state.join("cni")),
        names_in(&state.join("sandboxes")),
        mounts_under(&state),
        parents
            .iter()
            .flat_map(|p| cgroup_dirs(p))
            .collect::<Vec<_>>()
    );
    let pods = within("ListPodSandbox", env.list_pods(None)).await;
    assert!(pods.is_empty(), "pods are still listed: {pods:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_run_pod_sandbox_leaves_all_or_nothing() {
    const CALLS: usize = 20;
    let net = TestNet::new(Plugins::Berth);
    let mut env = start_net_env(&net).await;

    let configs: Vec<PodSandboxConfig> = (0..CALLS)
        .map(|i| env.pod_config(&format!("cancel-pod-{i}")))
        .collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(2));
    let mut set = tokio::task::JoinSet::new();
    for config in configs.clone() {
        let deadline = Duration::from_millis(rand_between(5, 40));
        let mut client = env.client.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let name = config.metadata.as_ref().unwrap().name.clone();
            let r = client
                .runtime
                .run_pod_sandbox(with_deadline(
                    RunPodSandboxRequest {
                        config: Some(config),
                        runtime_handler: String::new(),
                    },
                    deadline,
                ))
                .await
                .map(|r| r.into_inner().pod_sandbox_id);
            (name, deadline, r)
        });
    }
    let Answers {
        answered,
        unexpected,
        n_cancelled,
    } = collect_answers(&mut set).await;
    eprintln!(
        "{} RunPodSandbox calls answered OK, {n_cancelled} hit their deadline",
        answered.len()
    );
    assert!(
        unexpected.is_empty(),
        "RunPodSandbox calls failed for another reason than their deadline:\n{}",
        unexpected.join("\n")
    );

    tokio::time::sleep(Duration::from_secs(2)).await;
    let deadline = Instant::now() + Duration::from_secs(8);
    let records = loop {
        let (records, problems) = sandbox_parts(&mut env, &net).await;
        if problems.is_empty() {
            break records;
        }
        assert!(
            Instant::now() < deadline,
            "10 s after {CALLS} RunPodSandbox calls with 5–40 ms deadlines, sandbox records and their parts disagree ({} records: {records:?}):\n{}",
            records.len(),
            problems.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("{} sandbox records after settling", records.len());
    for (name, id) in &answered {
        assert_eq!(
            records.get(id),
            Some(name),
            "RunPodSandbox {name} answered OK ({id}) but the pod is not listed"
        );
    }
    // The cgroup parent exists exactly for the listed pods.
    let listed: BTreeSet<&String> = records.values().collect();
    for config in &configs {
        let name = &config.metadata.as_ref().unwrap().name;
        let parent = &config.linux.as_ref().unwrap().cgroup_parent;
        let dirs = cgroup_dirs(parent);
        if listed.contains(name) {
            assert!(!dirs.is_empty(), "listed pod {name} has no cgroup {parent}");
        } else {
            assert!(
                dirs.is_empty(),
                "pod {name} is not listed but its cgroup is there: {dirs:?}"
            );
        }
    }

    within("remove everything", env.remove_everything())
        .await
        .expect("stop and remove every pod");
    let parents: Vec<String> = configs
        .iter()
        .map(|c| c.linux.as_ref().unwrap().cgroup_parent.clone())
        .collect();
    assert_no_pod_left(&mut env, &net, &parents).await;
    let rules = net.rules_mentioning(&[]);
    assert!(rules.is_empty(), "rules left:\n{}", rules.join("\n"));
}

// ---- a full disk ----

/// A tmpfs mounted over a harness dir; unmounted when dropped (declare it
/// before the PodEnv, so the PodEnv's clean-up runs while it is there).
#[derive(Default)]
struct TmpfsGuard(Option<PathBuf>);

impl TmpfsGuard {
    fn mounted(p: &Path) -> bool {
        mounts_under(p).contains(&p.display().to_string())
    }

    fn unmount(&mut self) {
        if let Some(p) = self.0.take()
            && Self::mounted(&p)
            && let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH)
        {
            eprintln!("unmount the test tmpfs {}: {e}", p.display());
        }
    }
}

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Bytes free for unprivileged writers on the filesystem of `p`.
fn free_bytes(p: &Path) -> u64 {
    let s = nix::sys::statvfs::statvfs(p).expect("statvfs");
    s.blocks_available() as u64 * s.fragment_size() as u64
}

/// Moves berthd's root dir (stopped) onto a fresh tmpfs of `mib` MiB.
fn move_root_to_tmpfs(root: &Path, mib: u64, guard: &mut TmpfsGuard) {
    use std::os::unix::fs::PermissionsExt;
    let seed = root.with_file_name("root.seed");
    std::fs::rename(root, &seed).unwrap();
    let mode = std::fs::metadata(&seed).unwrap().permissions().mode() & 0o7777;
    std::fs::create_dir(root).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some(format!("size={mib}m,mode={mode:o}").as_str()),
    )
    .unwrap_or_else(|e| panic!("mount a tmpfs on {}: {e}", root.display()));
    guard.0 = Some(root.to_path_buf());
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", seed.display()))
        .arg(root)
        .output()
        .expect("run cp");
    assert!(
        out.status.success(),
        "cp -a {} {}: {}",
        seed.display(),
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&seed).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_gives_resource_exhausted_and_removal_still_works() {
    const TMPFS_MIB: u64 = 96;
    let mut tmpfs = TmpfsGuard::default();
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let root = env.d.root_dir();
    // berthd's root dir (store, images, container dirs) onto a small tmpfs.
    env.d.stop();
    move_root_to_tmpfs(&root, TMPFS_MIB, &mut tmpfs);
    let free_at_start = free_bytes(&root);
    eprintln!(
        "root dir on a {TMPFS_MIB} MiB tmpfs, {} MiB free with the images",
        free_at_start >> 20
    );
    assert!(
        free_at_start > 64 << 20,
        "the images take too much of the tmpfs: {free_at_start} bytes free"
    );
    env.d.restart().await.expect("restart berthd on the tmpfs");
    env.reconnect().await;
    assert!(
        runtime_ready(&mut env.client).await.status,
        "RuntimeReady before the disk is full"
    );

    let pod = env.run_pod(&env.pod_config("full-disk")).await;
    // Fills the root dir (its rootfs' upper dir is there), then exits on
    // its own.
    let filler = within(
        "create+start the filler",
        env.run(
            &pod,
            &sh_config(
                "filler",
                &bb,
                "dd if=/dev/zero of=/fill bs=1M; echo filled; exit 7",
            ),
        ),
    )
    .await;
    let full = eventually(Duration::from_secs(20), || free_bytes(&root) < 1 << 20).await;
    assert!(
        full,
        "the filler did not fill {}: {} bytes free",
        root.display(),
        free_bytes(&root)
    );
    // Reads still answer, also the one that learns the filler exited.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = within("ContainerStatus on a full disk", env.try_status(&filler))
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus of the filler on a full disk: {e:?}"));
        if s.state == ContainerState::ContainerExited as i32 {
            assert_eq!(s.exit_code, 7, "the filler's exit: {s:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the filler did not exit within 20 s: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let err = within(
        "CreateContainer on a full disk",
        env.try_create(&pod, &container_config("second", &bb, &["sleep", "3600"])),
    )
    .await
    .expect_err("CreateContainer with the root dir full");
    eprintln!(
        "CreateContainer on a full disk: {:?}: {}",
        err.code(),
        err.message()
    );
    assert_eq!(
        err.code(),
        Code::ResourceExhausted,
        "CreateContainer with no space left: {err:?}"
    );
    // Status after a failed write.
    let ready = runtime_ready(&mut env.client).await;
    assert!(
        !ready.status,
        "RuntimeReady is true while writes to the root dir fail: {ready:?}"
    );
    let listed = within("ListContainers on a full disk", env.list_containers(None)).await;
    assert_eq!(
        listed.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![filler.clone()],
        "the failed CreateContainer left a record (or the filler's is gone): {listed:?}"
    );
    assert_eq!(
        names_in(&root.join("containers")),
        BTreeSet::from([filler.clone()]),
        "the failed CreateContainer left its dir"
    );
    within("ContainerStatus on a full disk", env.try_status(&filler))
        .await
        .expect("ContainerStatus of the filler on a full disk");

    within(
        "RemoveContainer on a full disk",
        env.remove_container(&filler),
    )
    .await
    .unwrap_or_else(|e| panic!("RemoveContainer of the filler on a full disk: {e:?}"));
    // Its writable layer is deleted after the answer.
    eventually(Duration::from_secs(10), || {
        free_bytes(&root) > free_at_start / 2
    })
    .await;
    assert!(
        free_bytes(&root) > free_at_start / 2,
        "removing the filler freed no space: {} bytes free",
        free_bytes(&root)
    );

    // Space is back: everything works again, without a restart.
    let deadline = Instant::now() + Duration::from_secs(5);
    let id = loop {
        match within(
            "CreateContainer after freeing space",
            env.try_create(&pod, &container_config("after", &bb, &["sleep", "3600"])),
        )
        .await
        {
            Ok(id) => break id,
            Err(e) if e.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("CreateContainer once space is free again: {e:?}"),
        }
    };
    within("StartContainer after freeing space", env.try_start(&id))
        .await
        .unwrap_or_else(|e| panic!("StartContainer once space is free again: {e:?}"));
    env.wait_state(&id, ContainerState::ContainerRunning, STATE_TIMEOUT)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = runtime_ready(&mut env.client).await;
        if ready.status {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "RuntimeReady is still false 10 s after space was freed: {ready:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    within("remove everything", env.remove_everything())
        .await
        .expect("remove everything");
    // Stop berthd before the tmpfs goes.
    env.d.stop();
    tmpfs.unmount();
}

// ---- races on one object ----

/// RemoveContainer answers once the record is gone and deletes the rest
/// (shim, cgroup, rootfs mount, dirs) afterwards. berthd killed with SIGKILL
/// while those deletions run, at a different moment in every round, leaves
/// remains without a record, which its next start deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_deferred_removals_is_finished_by_the_next_start() {
    const ROUNDS: u64 = 6;
    const CONTAINERS: usize = 4;
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("deferred")).await;
    let parent = env.cgroup_parent(&pod);
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for i in 0..CONTAINERS {
            let config = container_config(&format!("r{round}-{i}"), &bb, &["sleep", "3600"]);
            let id = within("CreateContainer", env.create(&pod, &config)).await;
            if i % 2 == 0 {
                within("StartContainer", env.start_container(&id)).await;
            }
            ids.push(id);
        }
        let kept = ids.pop().expect("one container stays");
        let mut c = own_client(&env).await;
        let removals = async move {
            for id in ids {
                if c.runtime
                    .remove_container(RemoveContainerRequest { container_id: id })
                    .await
                    .is_err()
                {
                    // berthd is gone.
                    return;
                }
            }
        };
        // From right after the first answer to after the last one.
        sigkill_during(&mut env, Duration::from_millis(2 + round * 4), removals).await;
        let records = settled_container_parts(&mut env, &parent, Duration::from_secs(20))
            .await
            .unwrap_or_else(|(records, problems)| {
                panic!("round {round}: after the restart: {problems:#?} (records {records:?})")
            });
        assert!(
            records.contains_key(&kept),
            "round {round}: the container that was not removed is gone: {records:?}"
        );
        for id in records.keys() {
            within("RemoveContainer", env.remove_container(id))
                .await
                .expect("RemoveContainer");
        }
        settled_container_parts(&mut env, &parent, Duration::from_secs(20))
            .await
            .unwrap_or_else(|(records, problems)| {
                panic!("round {round}: after removing the rest: {problems:#?} ({records:?})")
            });
    }
    within("RemovePodSandbox", env.remove_everything())
        .await
        .expect("remove the pod");
    let finished = env
        .d
        .log()
        .matches("removing the remains of a container without a record")
        .count();
    eprintln!("remains of removed containers finished by a restart: {finished}");
    assert!(
        finished > 0,
        "no SIGKILL hit a removal's deferred cleanup in {ROUNDS} rounds"
    );
}

/// StartContainer launches the container's shim and records it last.
/// berthd killed with SIGKILL while starts run, at a different moment in
/// every round: after the restart each container is RUNNING with its shim,
/// or CREATED without one (a launch that was not recorded is discarded),
/// and a CREATED one starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_start_container_leaves_it_created_or_running() {
    const ROUNDS: u64 = 6;
    const CONTAINERS: usize = 3;
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("kill-start")).await;
    let parent = env.cgroup_parent(&pod);
    let mut left_created = 0;
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for i in 0..CONTAINERS {
            let config = container_config(&format!("s{round}-{i}"), &bb, &["sleep", "3600"]);
            ids.push(within("CreateContainer", env.create(&pod, &config)).await);
        }
        let mut c = own_client(&env).await;
        let starts = {
            let ids = ids.clone();
            async move {
                for id in ids {
                    if c.runtime
                        .start_container(StartContainerRequest { container_id: id })
                        .await
                        .is_err()
                    {
                        // berthd is gone.
                        return;
                    }
                }
            }
        };
        sigkill_during(&mut env, Duration::from_millis(5 + round * 9), starts).await;
        settled_container_parts(&mut env, &parent, Duration::from_secs(20))
            .await
            .unwrap_or_else(|(records, problems)| {
                panic!("round {round}: after the restart: {problems:#?} (records {records:?})")
            });
        for id in &ids {
            let s = env.status(id).await;
            if s.state == ContainerState::ContainerCreated as i32 {
                left_created += 1;
                within("StartContainer", env.start_container(id)).await;
            }
            let s = env.status(id).await;
            assert_eq!(
                s.state,
                ContainerState::ContainerRunning as i32,
                "round {round}: {s:?}"
            );
            let pid = env.pid(id).await;
            assert!(
                eventually(Duration::from_secs(5), || cmdline(pid).as_deref()
                    == Some("sleep 3600"))
                .await,
                "round {round}: {id} runs {:?}",
                cmdline(pid)
            );
        }
        settled_container_parts(&mut env, &parent, Duration::from_secs(20))
            .await
            .unwrap_or_else(|(records, problems)| {
                panic!("round {round}: after the starts: {problems:#?} ({records:?})")
            });
        for id in &ids {
            within("RemoveContainer", env.remove_container(id))
                .await
                .expect("RemoveContainer");
        }
        settled_container_parts(&mut env, &parent, Duration::from_secs(20))
            .await
            .unwrap_or_else(|(records, problems)| {
                panic!("round {round}: after removing them: {problems:#?} ({records:?})")
            });
    }
    within("RemovePodSandbox", env.remove_everything())
        .await
        .expect("remove the pod");
    let discarded = env
        .d
        .log()
        .matches("discarding the shim of a StartContainer that did not finish")
        .count();
    eprintln!(
        "containers CREATED after a restart: {left_created}; launches discarded: {discarded}"
    );
    assert!(
        discarded > 0,
        "no SIGKILL hit a StartContainer's launch in {ROUNDS} rounds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_racing_remove_leaves_nothing() {
    const ROUNDS: usize = 50;
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let state = env.d.state_dir();
    let root = env.d.root_dir();
    let pod = env.run_pod(&env.pod_config("start-remove")).await;
    let parent = env.cgroup_parent(&pod);
    let mut a = own_client(&env).await;
    let mut b = own_client(&env).await;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for round in 0..ROUNDS {
        let id = within(
            "CreateContainer",
            env.create(
                &pod,
                &container_config(&format!("race-{round}"), &bb, &["sleep", "3600"]),
            ),
        )
        .await;
        let shim = shim_pid(&state, &id);
        // Sent together; one of them up to 3 ms later (alternating), so the
        // rounds sweep the interleavings.
        let lag = Duration::from_micros(rand_between(0, 3000));
        let (start_lag, remove_lag) = if round % 2 == 0 {
            (lag, Duration::ZERO)
        } else {
            (Duration::ZERO, lag)
        };
        let (started, removed) = within("StartContainer racing RemoveContainer", async {
            tokio::join!(
                async {
                    tokio::time::sleep(start_lag).await;
                    a.runtime
                        .start_container(StartContainerRequest {
                            container_id: id.clone(),
                        })
                        .await
                },
                async {
                    tokio::time::sleep(remove_lag).await;
                    b.runtime
                        .remove_container(RemoveContainerRequest {
                            container_id: id.clone(),
                        })
                        .await
                },
            )
        })
        .await;
        let what = format!(
            "round {round} ({id}): StartContainer {}, RemoveContainer {}",
            outcome(&started),
            outcome(&removed)
        );
        *tally
            .entry(format!(
                "start {:?} / remove {:?}",
                started.as_ref().map(|_| ()).map_err(|e| e.code()),
                removed.as_ref().map(|_| ()).map_err(|e| e.code())
            ))
            .or_default() += 1;
        for r in [started.as_ref().map(|_| ()), removed.as_ref().map(|_| ())] {
            if let Err(e) = r {
                assert!(clear_refusal(e.code()), "{what}: not a clear refusal");
            }
        }
        match within("ContainerStatus", env.try_status(&id)).await {
            Err(e) if e.code() == Code::NotFound => {}
            other => panic!("{what}: afterwards ContainerStatus answers {other:?}"),
        }
        assert!(
            !within("ListContainers", env.list_containers(None))
                .await
                .iter()
                .any(|c| c.id == id),
            "{what}: still listed"
        );
        let cg = format!("{parent}/{id}");
        let clean = eventually(Duration::from_secs(10), || {
            shim.is_none_or(|p| !pid_alive(p))
                && berth_processes(&state).is_empty()
                && !mounts_under(env.d.dir.path())
                    .iter()
                    .any(|m| m.contains(&id))
                && !root.join("containers").join(&id).exists()
                && !state.join("shims").join(&id).exists()
                && cgroup_dirs(&cg).is_empty()
                && cgroup_tree_pids(&parent).is_empty()
        })
        .await;
        assert!(
            clean,
            "{what}: left behind: shim {shim:?} alive {:?}, processes {:?}, mounts {:?}, container dir {}, shim dir {}, cgroup {:?}, pids in the pod cgroup {:?}",
            shim.map(pid_alive),
            berth_processes(&state),
            mounts_under(env.d.dir.path())
                .into_iter()
                .filter(|m| m.contains(&id))
                .collect::<Vec<_>>(),
            root.join("containers").join(&id).exists(),
            state.join("shims").join(&id).exists(),
            cgroup_dirs(&cg),
            cgroup_tree_pids(&parent)
        );
    }
    eprintln!("outcomes over {ROUNDS} rounds: {tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_pod_racing_remove_pod_and_status_leaves_nothing() {
    const ROUNDS: usize = 50;
    let net = TestNet::new(Plugins::Berth);
    let mut env = start_net_env(&net).await;
    let bb = env.busybox();
    let state = env.d.state_dir();
    let mut a = own_client(&env).await;
    let mut b = own_client(&env).await;
    let mut c = own_client(&env).await;
    let mut parents = Vec::new();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let config = env.pod_config(&format!("stop-remove-{round}"));
        let parent = config.linux.as_ref().unwrap().cgroup_parent.clone();
        parents.push(parent.clone());
        let pod = within("RunPodSandbox", env.run_pod(&config)).await;
        let ctr = within(
            "create+start",
            env.run(&pod, &container_config("app", &bb, &["sleep", "3600"])),
        )
        .await;
        let ip = env
            .pod_status(&pod)
            .await
            .ok()
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        assert!(
            net.contains(&ip),
            "round {round}: pod {pod} has no address: {ip:?}"
        );
        // Sent together, each after its own 0–10 ms, so the rounds sweep
        // the interleavings.
        let lags: Vec<Duration> = (0..3)
            .map(|_| Duration::from_micros(rand_between(0, 10_000)))
            .collect();
        let (stopped, removed, status) = within(
            "StopPodSandbox + RemovePodSandbox + ContainerStatus",
            async {
                tokio::join!(
                    async {
                        tokio::time::sleep(lags[0]).await;
                        a.runtime
                            .stop_pod_sandbox(StopPodSandboxRequest {
                                pod_sandbox_id: pod.clone(),
                            })
                            .await
                    },
                    async {
                        tokio::time::sleep(lags[1]).await;
                        b.runtime
                            .remove_pod_sandbox(RemovePodSandboxRequest {
                                pod_sandbox_id: pod.clone(),
                            })
                            .await
                    },
                    async {
                        tokio::time::sleep(lags[2]).await;
                        c.runtime
                            .container_status(ContainerStatusRequest {
                                container_id: ctr.clone(),
                                verbose: false,
                            })
                            .await
                    },
                )
            },
        )
        .await;
        let what = format!(
            "round {round} (pod {pod}, container {ctr}, {ip}): StopPodSandbox {}, RemovePodSandbox {}, ContainerStatus {}",
            outcome(&stopped),
            outcome(&removed),
            outcome(&status)
        );
        *tally
            .entry(format!(
                "stop {:?} / status {:?}",
                stopped.as_ref().map(|_| ()).map_err(|e| e.code()),
                status.as_ref().map(|_| ()).map_err(|e| e.code())
            ))
            .or_default() += 1;
        assert!(removed.is_ok(), "{what}: RemovePodSandbox must succeed");
        for r in [stopped.as_ref().map(|_| ()), status.as_ref().map(|_| ())] {
            if let Err(e) = r {
                assert!(clear_refusal(e.code()), "{what}: not a clear refusal");
            }
        }
        for when in ["right after", "a moment after"] {
            let listed = within("ListPodSandbox", env.list_pods(None)).await;
            assert!(
                !listed.iter().any(|p| p.id == pod),
                "{what}: {when} the calls the pod is listed: {listed:?}"
            );
            let containers = within("ListContainers", env.list_containers(None)).await;
            assert!(
                containers.is_empty(),
                "{what}: {when} the calls containers are listed: {containers:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let sandbox_dir = state.join("sandboxes").join(&pod);
        let clean = eventually(Duration::from_secs(10), || {
            net.allocations().is_empty()
                && net.bridge_ports().is_empty()
                && !sandbox_dir.exists()
                && mounts_under(&state).is_empty()
                && json_stems(&state.join("cni")).is_empty()
                && cgroup_dirs(&parent).is_empty()
                && berth_processes(&state).is_empty()
        })
        .await;
        assert!(
            clean,
            "{what}: left behind: allocations {:?}, veths {:?}, sandbox dir {}, mounts {:?}, CNI cache {:?}, cgroup {:?}, processes {:?}",
            net.allocations(),
            net.bridge_ports(),
            sandbox_dir.exists(),
            mounts_under(&state),
            json_stems(&state.join("cni")),
            cgroup_dirs(&parent),
            berth_processes(&state)
        );
    }
    eprintln!(
        "{ROUNDS} rounds in {:.1} s; outcomes: {tally:?}",
        started.elapsed().as_secs_f64()
    );

    // What berthd restarts from has none of them.
    env.d.kill9();
    env.d.restart().await.expect("restart berthd");
    env.reconnect().await;
    let pods = within("ListPodSandbox after a restart", env.list_pods(None)).await;
    assert!(
        pods.is_empty(),
        "removed pods came back after a restart: {pods:?}"
    );
    let containers = within("ListContainers after a restart", env.list_containers(None)).await;
    assert!(
        containers.is_empty(),
        "removed containers came back after a restart: {containers:?}"
    );
    assert_no_pod_left(&mut env, &net, &parents).await;
}

// ---- GetContainerEvents ----

/// One received event and when it arrived.
type Received = (Instant, ContainerEventResponse);

/// A GetContainerEvents stream on a connection of its own, read by a task
/// into a channel (each event stamped on arrival).
struct Subscriber {
    rx: mpsc::UnboundedReceiver<Result<Received, String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Opens the stream; panics with the status if berthd refuses it.
    async fn open(env: &PodEnv) -> Subscriber {
        let mut client = own_client(env).await;
        let mut stream = within(
            "GetContainerEvents",
            client.runtime.get_container_events(GetEventsRequest {}),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "GetContainerEvents: {:?}: {} (berthd must stream container events)",
                e.code(),
                e.message()
            )
        })
        .into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match stream.message().await {
                    Ok(Some(ev)) => {
                        if tx.send(Ok((Instant::now(), ev))).is_err() {
                            return;
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Err("the event stream ended".into()));
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(format!(
                            "the event stream failed: {:?}: {}",
                            e.code(),
                            e.message()
                        )));
                        return;
                    }
                }
            }
        });
        Subscriber { rx, task }
    }

    /// The next event of `container_id` (others are skipped), within
    /// `timeout`.
    async fn next_for(
        &mut self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<Received, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Err(_) => return Err(format!("no event of {container_id} within {timeout:?}")),
                Ok(None) => return Err("the reading task is gone".into()),
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(r))) if r.1.container_id == container_id => return Ok(r),
                Ok(Some(Ok(_))) => {}
            }
        }
    }

    /// Every event received so far, without waiting.
    fn drain(&mut self) -> (Vec<Received>, Option<String>) {
        let mut events = Vec::new();
        let mut error = None;
        while let Ok(r) = self.rx.try_recv() {
            match r {
                Ok(ev) => events.push(ev),
                Err(e) => error = Some(e),
            }
        }
        (events, error)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn event_type(ev: &ContainerEventResponse) -> String {
    format!(
        "{:?}",
        ContainerEventType::try_from(ev.container_event_type)
    )
}

fn type_is(ev: &ContainerEventResponse, t: ContainerEventType) -> bool {
    ev.container_event_type == t as i32
}

/// The container's entry in an event's containers_statuses.
fn status_in<'a>(ev: &'a ContainerEventResponse, id: &str) -> Option<&'a ContainerStatus> {
    ev.containers_statuses.iter().find(|s| s.id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_two_subscribers_in_order() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("events")).await;
    let mut subs = [Subscriber::open(&env).await, Subscriber::open(&env).await];

    let id = env
        .create(&pod, &container_config("watched", &bb, &["sleep", "3600"]))
        .await;
    env.start_container(&id).await;
    env.stop_container(&id, 0).await.expect("StopContainer");
    env.remove_container(&id).await.expect("RemoveContainer");

    use ContainerEventType::*;
    let want = [
        (
            ContainerCreatedEvent,
            Some(ContainerState::ContainerCreated),
        ),
        (
            ContainerStartedEvent,
            Some(ContainerState::ContainerRunning),
        ),
        (ContainerStoppedEvent, Some(ContainerState::ContainerExited)),
        (ContainerDeletedEvent, None),
    ];
    for (n, sub) in subs.iter_mut().enumerate() {
        let mut got = Vec::new();
        for (kind, state) in want {
            let (_, ev) = sub
                .next_for(&id, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "subscriber {n}: waiting for {kind:?} of {id} after {:?}: {e}",
                        got
                    )
                });
            got.push(event_type(&ev));
            assert!(
                type_is(&ev, kind),
                "subscriber {n}: events of {id} are {got:?}, want CREATED, STARTED, STOPPED, DELETED in this order"
            );
            assert!(
                ev.created_at > 0,
                "subscriber {n}: {kind:?} has no created_at: {ev:?}"
            );
            let sandbox = ev.pod_sandbox_status.as_ref().unwrap_or_else(|| {
                panic!("subscriber {n}: {kind:?} of {id} has no pod_sandbox_status: {ev:?}")
            });
            assert_eq!(
                sandbox.id, pod,
                "subscriber {n}: {kind:?}: pod_sandbox_status is another pod's"
            );
            if let Some(state) = state {
                let s = status_in(&ev, &id).unwrap_or_else(|| {
                    panic!("subscriber {n}: {kind:?} of {id} does not carry its status: {ev:?}")
                });
                assert_eq!(
                    s.state,
                    state as i32,
                    "subscriber {n}: {kind:?} carries the container in state {:?}: {s:?}",
                    ContainerState::try_from(s.state)
                );
            }
        }
        // Nothing more for it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (more, _) = sub.drain();
        let more: Vec<String> = more
            .iter()
            .filter(|(_, e)| e.container_id == id)
            .map(|(_, e)| event_type(e))
            .collect();
        assert!(
            more.is_empty(),
            "subscriber {n}: more events of {id} after DELETED: {more:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_on_its_own_is_published_without_polling() {
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let pod = env.run_pod(&env.pod_config("self-exit")).await;
    let mut sub = Subscriber::open(&env).await;
    let id = env
        .create(&pod, &sh_config("quitter", &bb, "sleep 0.5; exit 3"))
        .await;
    env.start_container(&id).await;
    let started = Instant::now();
    // No ContainerStatus, no ListContainers from here on: only the stream.
    let mut seen = Vec::new();
    let stopped = loop {
        let (at, ev) = sub
            .next_for(&id, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| {
                panic!("no STOPPED event of {id} (exits 0.5 s after start); saw {seen:?}: {e}")
            });
        seen.push(event_type(&ev));
        if type_is(&ev, ContainerEventType::ContainerStoppedEvent) {
            break (at, ev);
        }
    };
    let (at, ev) = stopped;
    let after = at.saturating_duration_since(started);
    eprintln!("STOPPED arrived {after:?} after StartContainer returned");
    assert!(
        after <= Duration::from_millis(1500),
        "STOPPED of a container that exits 0.5 s after start arrived {after:?} after StartContainer returned (at most 1.5 s)"
    );
    let s = status_in(&ev, &id)
        .unwrap_or_else(|| panic!("STOPPED of {id} does not carry its status: {ev:?}"));
    assert_eq!(
        s.state,
        ContainerState::ContainerExited as i32,
        "STOPPED carries state {:?}: {s:?}",
        ContainerState::try_from(s.state)
    );
    assert_eq!(s.exit_code, 3, "STOPPED carries the exit code: {s:?}");
}

/// Containers created, started, stopped and removed one after the other in
/// `pod` until `until` (at most `max`), each with a 4 KiB annotation (so
/// every event carrying its status is large); returns their ids.
async fn churn(
    mut c: CriClient,
    pod: String,
    sandbox: PodSandboxConfig,
    image: String,
    until: Instant,
    max: usize,
) -> Vec<String> {
    let ballast = "x".repeat(4096);
    let mut ids = Vec::new();
    while ids.len() < max && Instant::now() < until {
        let mut config =
            container_config(&format!("churn-{}", ids.len()), &image, &["sleep", "3600"]);
        config
            .annotations
            .insert("berth-e2e/ballast".into(), ballast.clone());
        let id = within(
            "CreateContainer with a stalled subscriber",
            c.runtime.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox.clone()),
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("CreateContainer: {e:?}"))
        .into_inner()
        .container_id;
        within(
            "StartContainer with a stalled subscriber",
            c.runtime.start_container(StartContainerRequest {
                container_id: id.clone(),
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("StartContainer {id}: {e:?}"));
        within(
            "StopContainer with a stalled subscriber",
            c.runtime.stop_container(StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("StopContainer {id}: {e:?}"));
        within(
            "RemoveContainer with a stalled subscriber",
            c.runtime.remove_container(RemoveContainerRequest {
                container_id: id.clone(),
            }),
        )
        .await
        .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e:?}"));
        ids.push(id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_does_not_slow_calls() {
    const WORKERS: usize = 2;
    const MAX_CYCLES: usize = 1000;
    const BUDGET: Duration = Duration::from_secs(25);
    let mut env = PodEnv::start().await;
    let bb = env.busybox();
    let mut pods = Vec::new();
    for w in 0..WORKERS {
        let config = env.pod_config(&format!("stalled-{w}"));
        let id = env.run_pod(&config).await;
        pods.push((id, config));
    }

    // Opened, kept, never read (a connection of its own: an unread stream
    // on a shared connection would hold up the reading one in the client).
    let mut stalled_client = own_client(&env).await;
    let stalled = within(
        "GetContainerEvents",
        stalled_client
            .runtime
            .get_container_events(GetEventsRequest {}),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "GetContainerEvents: {:?}: {} (berthd must stream container events)",
            e.code(),
            e.message()
        )
    })
    .into_inner();
    let mut reader = Subscriber::open(&env).await;

    // Version latency from a client of its own, all along.
    let stop = Arc::new(AtomicBool::new(false));
    let mut vc = own_client(&env).await;
    let stop2 = stop.clone();
    let versions = tokio::spawn(async move {
        let mut lat = Vec::new();
        let mut errors = Vec::new();
        while !stop2.load(Ordering::Relaxed) {
            let t0 = Instant::now();
            match tokio::time::timeout(
                Duration::from_secs(10),
                vc.runtime.version(VersionRequest::default()),
            )
            .await
            {
                Ok(Ok(_)) => lat.push(t0.elapsed()),
                Ok(Err(e)) => errors.push(format!("{:?}: {}", e.code(), e.message())),
                Err(_) => errors.push("no answer within 10 s".into()),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (lat, errors)
    });

    // Many large events, from two pods at once.
    let t0 = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for (pod, config) in &pods {
        workers.spawn(churn(
            own_client(&env).await,
            pod.clone(),
            config.clone(),
            bb.clone(),
            t0 + BUDGET,
            MAX_CYCLES / WORKERS,
        ));
    }
    let mut ids = Vec::new();
    while let Some(r) = workers.join_next().await {
        ids.extend(r.expect("a churn worker panicked"));
    }
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut lat, errors) = versions.await.unwrap();
    eprintln!(
        "{} create+start+stop+remove cycles in {:.1} s (about {} events); {} Version calls",
        ids.len(),
        took.as_secs_f64(),
        4 * ids.len(),
        lat.len()
    );
    assert!(errors.is_empty(), "Version failed meanwhile: {errors:?}");
    lat.sort();
    assert!(lat.len() >= 100, "only {} Version calls", lat.len());
    let p99 = lat[(lat.len() * 99).div_ceil(100) - 1];
    let median = lat[lat.len() / 2];
    eprintln!(
        "Version latency: median {median:?}, p99 {p99:?}, max {:?}",
        lat.last().unwrap()
    );

    // The reading subscriber got every container's four events, in order.
    let wanted: BTreeSet<&String> = ids.iter().collect();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut deleted = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while deleted < ids.len() {
        let r = match tokio::time::timeout_at(deadline, reader.rx.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => panic!("the reading subscriber's task is gone"),
            Err(_) => panic!(
                "the reading subscriber got DELETED for {deleted} of {} containers within 15 s of the last call (a stalled subscriber must not hold it up)",
                ids.len()
            ),
        };
        let (_, ev) = r.unwrap_or_else(|e| {
            panic!("the reading subscriber, after DELETED of {deleted} containers: {e}")
        });
        if !wanted.contains(&ev.container_id) {
            continue;
        }
        if type_is(&ev, ContainerEventType::ContainerDeletedEvent) {
            deleted += 1;
        }
        seen.entry(ev.container_id.clone())
            .or_default()
            .push(event_type(&ev));
    }
    let want: Vec<String> = [
        ContainerEventType::ContainerCreatedEvent,
        ContainerEventType::ContainerStartedEvent,
        ContainerEventType::ContainerStoppedEvent,
        ContainerEventType::ContainerDeletedEvent,
    ]
    .iter()
    .map(|t| format!("{:?}", ContainerEventType::try_from(*t as i32)))
    .collect();
    for id in &ids {
        assert_eq!(
            seen.get(id),
            Some(&want),
            "the reading subscriber's events of {id}"
        );
    }
    assert!(
        p99 < Duration::from_millis(50),
        "Version p99 is {p99:?} (median {median:?}) while a subscriber never reads"
    );

    // What became of the stalled one (the implementation may drop it).
    let mut stalled = stalled;
    let mut delivered = 0usize;
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(2), stalled.message()).await {
            Ok(Ok(Some(_))) => delivered += 1,
            Ok(Ok(None)) => break "ended".to_string(),
            Ok(Err(e)) => break format!("failed: {:?}: {}", e.code(), e.message()),
            Err(_) => break "still open".to_string(),
        }
    };
    eprintln!(
        "the stalled subscriber, read at last, delivered {delivered} of about {} events, then {end}",
        4 * ids.len()
    );
}
