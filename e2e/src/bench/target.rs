//! A runtime under test as the benchmark sees it: a CRI client, what it
//! knows about the runtime's processes and directories, and the CRI
//! calls every scenario is made of (with timeouts, errors as text).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_cri::v1::*;

use crate::cri::CriClient;

use super::host;

/// How long one CRI call may take before the benchmark gives up on it.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a started container has to write its first log line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The label every pod and container of one benchmark run carries.
pub const RUN_LABEL: &str = "berth-bench.run";

/// Where a runtime keeps what the benchmark looks at.
#[derive(Debug, Clone)]
pub enum Kind {
    /// A harness berthd: shims under `<state_dir>/shims/<id>/shim.pid`,
    /// blobs under `<root_dir>/content/sha256`.
    Berth {
        state_dir: PathBuf,
        root_dir: PathBuf,
    },
    /// The benchmark's containerd: shims are `containerd-shim-runc-v2`
    /// processes naming `address`; blobs under
    /// `<root>/io.containerd.content.v1.content/blobs/sha256`.
    Containerd { address: PathBuf, root: PathBuf },
    /// A runtime someone else runs (`--endpoint`): only CRI is known.
    External,
}

pub struct Target {
    pub key: String,
    pub client: CriClient,
    pub kind: Kind,
    /// The daemon's pid, when the benchmark knows it.
    pub daemon_pid: Option<i32>,
    /// Where the daemon serves Prometheus metrics.
    pub metrics: Metrics,
}

/// Where a daemon serves its Prometheus metrics (plain HTTP on loopback).
#[derive(Debug, Clone)]
pub enum Metrics {
    /// Asked of the runtime at scrape time: berthd reports the address it
    /// bound in verbose `Status`, `info["metricsAddress"]` (a JSON string,
    /// empty when the endpoint is off); the path is `/metrics`.
    FromStatus,
    /// Known from the config the benchmark wrote (its containerd:
    /// `[metrics] address`, path `/v1/metrics`).
    At { addr: String, path: String },
    /// Not known, and why.
    Unknown(String),
}

/// The key of berthd's verbose `Status` info with its metrics address.
pub const METRICS_ADDRESS_KEY: &str = "metricsAddress";

impl Target {
    /// Where the runtime keeps unpacked layers (one entry per layer).
    pub fn snapshot_dir(&self) -> Option<PathBuf> {
        match &self.kind {
            Kind::Berth { root_dir, .. } => Some(root_dir.join("snapshots")),
            Kind::Containerd { root, .. } => {
                Some(root.join("io.containerd.snapshotter.v1.overlayfs/snapshots"))
            }
            Kind::External => None,
        }
    }

    /// How many unpacked layers the runtime holds (`None`: unknown).
    pub fn snapshot_count(&self) -> Option<usize> {
        let dir = self.snapshot_dir()?;
        Some(std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0))
    }

    /// Where the runtime's content store would keep blob `digest`.
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.trim_start_matches("sha256:");
        match &self.kind {
            Kind::Berth { root_dir, .. } => Some(root_dir.join("content/sha256").join(hex)),
            Kind::Containerd { root, .. } => Some(
                root.join("io.containerd.content.v1.content/blobs/sha256")
                    .join(hex),
            ),
            Kind::External => None,
        }
    }
}

/// A gRPC status as one line: `Unimplemented: message`.
pub fn status_text(s: &tonic::Status) -> String {
    let msg = s.message().trim();
    if msg.is_empty() {
        format!("{:?}", s.code())
    } else {
        format!("{:?}: {msg}", s.code())
    }
}

/// Runs one CRI call with [`RPC_TIMEOUT`]; returns the answer and how long
/// it took, or the error as text.
pub async fn timed<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<(T, Duration), String> {
    let t0 = Instant::now();
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok((r.into_inner(), t0.elapsed())),
        Ok(Err(s)) => Err(status_text(&s)),
        Err(_) => Err(format!("no answer within {RPC_TIMEOUT:?}")),
    }
}

/// [`timed`] without the duration.
pub async fn call<T>(
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    timed(fut).await.map(|(r, _)| r)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Everything a scenario needs to make pods: the run's label, where pod
/// logs go, the cgroup parent all pods share, the image.
#[derive(Debug, Clone)]
pub struct PodFactory {
    pub run_id: String,
    pub logs: PathBuf,
    /// `/berth-bench-<run id>`: every pod's cgroup parent is below.
    pub cgroup_root: String,
    pub image: String,
}

/// The command of every benchmark container: a line to the log, then
/// sleep (pid 1 of its PID namespace, so StopContainer's SIGTERM alone
/// would not end it: timeout 0 kills it).
pub const PAYLOAD: [&str; 3] = ["/bin/sh", "-c", "echo ready; exec sleep 1000"];
/// The payload's command line once it runs.
pub const PAYLOAD_CMDLINE: &str = "sleep 1000";

impl PodFactory {
    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([(RUN_LABEL.to_string(), self.run_id.clone())])
    }

    /// A pod config as kubelet sends it (pod network and IPC, a PID
    /// namespace per container, a cgroup parent, a log directory, which
    /// is created here as kubelet does).
    pub fn pod(&self, name: &str) -> PodSandboxConfig {
        let suffix = host::random_hex(4);
        let name = format!("{name}-{suffix}");
        let log_dir = self.logs.join(&name);
        let _ = std::fs::create_dir_all(&log_dir);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.clone(),
                uid: format!("uid-{}", host::random_hex(8)),
                namespace: "berth-bench".into(),
                attempt: 0,
            }),
            hostname: name.clone(),
            log_directory: log_dir.display().to_string(),
            labels: self.labels(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: format!("{}/{name}", self.cgroup_root),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The container: busybox running [`PAYLOAD`], logging to `c.log`.
    pub fn container(&self) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: PAYLOAD.iter().map(|s| s.to_string()).collect(),
            log_path: "c.log".into(),
            labels: self.labels(),
            ..Default::default()
        }
    }
}

/// Which step of starting a pod failed, and what is left to clean up.
#[derive(Debug)]
pub struct LaunchError {
    pub step: &'static str,
    pub error: String,
    pub pod_id: Option<String>,
    pub container_id: Option<String>,
}

/// A pod with one container, started.
#[derive(Debug, Clone)]
pub struct Launched {
    pub pod_id: String,
    pub container_id: String,
    pub run: Duration,
    pub create: Duration,
    pub start: Duration,
    /// From before RunPodSandbox until the log had the container's first
    /// line (when waited for).
    pub ready: Option<Duration>,
}

/// RunPodSandbox, CreateContainer, StartContainer, and (if `wait_ready`)
/// until the container's first line is in its CRI log.
pub async fn launch(
    client: &mut CriClient,
    factory: &PodFactory,
    name: &str,
    wait_ready: bool,
) -> Result<Launched, LaunchError> {
    let config = factory.pod(name);
    let log_file = Path::new(&config.log_directory).join("c.log");
    let t0 = Instant::now();
    let (r, run) = timed(client.runtime.run_pod_sandbox(RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: String::new(),
    }))
    .await
    .map_err(|error| LaunchError {
        step: "RunPodSandbox",
        error,
        pod_id: None,
        container_id: None,
    })?;
    let pod_id = r.pod_sandbox_id;
    let fail = |step, error, container_id: Option<String>| LaunchError {
        step,
        error,
        pod_id: Some(pod_id.clone()),
        container_id,
    };
    let (r, create) = timed(client.runtime.create_container(CreateContainerRequest {
        pod_sandbox_id: pod_id.clone(),
        config: Some(factory.container()),
        sandbox_config: Some(config),
    }))
    .await
    .map_err(|e| fail("CreateContainer", e, None))?;
    let container_id = r.container_id;
    let (_, start) = timed(client.runtime.start_container(StartContainerRequest {
        container_id: container_id.clone(),
    }))
    .await
    .map_err(|e| fail("StartContainer", e, Some(container_id.clone())))?;
    let ready = if wait_ready {
        Some(
            wait_log_line(&log_file, t0)
                .await
                .map_err(|e| fail("first log line", e, Some(container_id.clone())))?,
        )
    } else {
        None
    };
    Ok(Launched {
        pod_id,
        container_id,
        run,
        create,
        start,
        ready,
    })
}

/// Polls the CRI log until it holds `stdout F ready`; returns the time
/// since `t0`.
pub async fn wait_log_line(log_file: &Path, t0: Instant) -> Result<Duration, String> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(bytes) = std::fs::read(log_file)
            && bytes.windows(b" ready\n".len()).any(|w| w == b" ready\n")
        {
            return Ok(t0.elapsed());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no \"ready\" in {} within {READY_TIMEOUT:?}",
                log_file.display()
            ));
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
}

/// Stops and removes a container and its pod, ignoring errors.
pub async fn teardown(client: &mut CriClient, pod_id: &str, container_id: Option<&str>) {
    if let Some(c) = container_id {
        let _ = call(client.runtime.stop_container(StopContainerRequest {
            container_id: c.to_string(),
            timeout: 0,
        }))
        .await;
        let _ = call(client.runtime.remove_container(RemoveContainerRequest {
            container_id: c.to_string(),
        }))
        .await;
    }
    let _ = call(client.runtime.stop_pod_sandbox(StopPodSandboxRequest {
        pod_sandbox_id: pod_id.to_string(),
    }))
    .await;
    let _ = call(client.runtime.remove_pod_sandbox(RemovePodSandboxRequest {
        pod_sandbox_id: pod_id.to_string(),
    }))
    .await;
}

/// Tears down `pods` with `parallel` calls in flight.
pub async fn teardown_many(
    client: &CriClient,
    pods: Vec<(String, Option<String>)>,
    parallel: usize,
) {
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
    let mut set = tokio::task::JoinSet::new();
    for (pod, ctr) in pods {
        let mut c = client.clone();
        let sem = sem.clone();
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            teardown(&mut c, &pod, ctr.as_deref()).await;
        });
    }
    while set.join_next().await.is_some() {}
}

/// Removes every pod and container of this run the runtime still lists;
/// returns how many pods and containers it found.
pub async fn sweep(client: &mut CriClient, run_id: &str) -> Result<(usize, usize), String> {
    let selector = HashMap::from([(RUN_LABEL.to_string(), run_id.to_string())]);
    let containers = call(client.runtime.list_containers(ListContainersRequest {
        filter: Some(ContainerFilter {
            label_selector: selector.clone(),
            ..Default::default()
        }),
    }))
    .await?
    .containers;
    let pods = call(client.runtime.list_pod_sandbox(ListPodSandboxRequest {
        filter: Some(PodSandboxFilter {
            label_selector: selector,
            ..Default::default()
        }),
    }))
    .await?
    .items;
    let counts = (pods.len(), containers.len());
    let mut work: Vec<(String, Option<String>)> = Vec::new();
    for c in &containers {
        let _ = call(client.runtime.stop_container(StopContainerRequest {
            container_id: c.id.clone(),
            timeout: 0,
        }))
        .await;
        let _ = call(client.runtime.remove_container(RemoveContainerRequest {
            container_id: c.id.clone(),
        }))
        .await;
    }
    for p in pods {
        work.push((p.id, None));
    }
    teardown_many(client, work, 8).await;
    Ok(counts)
}

/// `info["info"]` of a verbose status, parsed.
pub fn verbose_info(info: &HashMap<String, String>) -> Option<serde_json::Value> {
    info.get("info").and_then(|s| serde_json::from_str(s).ok())
}

/// The container's init pid from verbose ContainerStatus, if reported.
pub async fn container_pid(client: &mut CriClient, id: &str) -> Option<i32> {
    let r = call(client.runtime.container_status(ContainerStatusRequest {
        container_id: id.to_string(),
        verbose: true,
    }))
    .await
    .ok()?;
    verbose_info(&r.info)?["pid"].as_i64().map(|p| p as i32)
}

/// The sandbox's pid (its infra process) from verbose PodSandboxStatus.
pub async fn sandbox_pid(client: &mut CriClient, id: &str) -> Option<i32> {
    let r = call(client.runtime.pod_sandbox_status(PodSandboxStatusRequest {
        pod_sandbox_id: id.to_string(),
        verbose: true,
    }))
    .await
    .ok()?;
    verbose_info(&r.info)?["pid"]
        .as_i64()
        .filter(|p| *p > 0)
        .map(|p| p as i32)
}

/// The metrics endpoint `(addr, path)` of `t`, or why there is none
/// (the text of an n/a cell).
pub async fn metrics_endpoint(t: &mut Target) -> Result<(String, String), String> {
    match &t.metrics {
        Metrics::At { addr, path } => Ok((addr.clone(), path.clone())),
        Metrics::Unknown(why) => Err(why.clone()),
        Metrics::FromStatus => {
            let r = call(t.client.runtime.status(StatusRequest { verbose: true }))
                .await
                .map_err(|e| format!("berthd: Status: {e}"))?;
            let addr = r.info.get(METRICS_ADDRESS_KEY).map(|raw| {
                // A JSON string; taken as it is if it is not one.
                serde_json::from_str::<String>(raw).unwrap_or_else(|_| raw.trim().to_string())
            });
            match addr {
                Some(a) if !a.is_empty() => {
                    let ok = a
                        .parse::<std::net::SocketAddr>()
                        .is_ok_and(|s| s.ip().is_loopback());
                    if ok {
                        Ok((a, "/metrics".into()))
                    } else {
                        Err(format!(
                            "berthd: metrics address {a:?} is not a loopback address:port"
                        ))
                    }
                }
                _ => Err("berthd: metrics endpoint not configured".into()),
            }
        }
    }
}

/// PullImage `image`; returns its image ref.
pub async fn pull(client: &mut CriClient, image: &str) -> Result<(String, Duration), String> {
    timed(client.image.pull_image(PullImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        ..Default::default()
    }))
    .await
    .map(|(r, d)| (r.image_ref, d))
}

pub async fn remove_image(client: &mut CriClient, image: &str) -> Result<(), String> {
    call(client.image.remove_image(RemoveImageRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
    }))
    .await
    .map(|_| ())
}
