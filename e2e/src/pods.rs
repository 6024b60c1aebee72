//! Pods and containers for the scenario tests: a ready environment (the
//! harness registry with the test images, a berthd, the images pulled),
//! builders for CRI pod and container configs, waiting for container
//! states, reading CRI log files, and looking for what a container leaves
//! behind (mounts, cgroups, shim processes).
//!
//! A [`PodEnv`] removes every pod and container it can reach when dropped,
//! also when a test panics; whatever berthd could not remove (berthd killed,
//! a bug) is killed and unmounted by hand, so a failed test leaves no
//! process, mount or cgroup on the host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use berth_cri::v1::*;
use tonic::Status;

use crate::cri::CriClient;
use crate::{Berthd, BerthdOptions, CniOptions, Registry, TestImages, require_root};

/// How long a test waits for a container to reach a state.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Random lowercase hex of `bytes` bytes.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n as usize, buf.len(), "getrandom failed");
    hex::encode(buf)
}

/// A registry with the test images, a berthd with `berth-test/busybox` and
/// `berth-test/config` pulled, a CRI client, and a temp dir for pod logs.
pub struct PodEnv {
    pub client: CriClient,
    pub d: Berthd,
    pub images: TestImages,
    pub registry: Registry,
    /// Holds the image layouts, pod log directories and host dirs to mount.
    pub work: tempfile::TempDir,
    /// The configs of the pods run through [`PodEnv::run_pod`], by id.
    pods: HashMap<String, PodSandboxConfig>,
    /// Every cgroup parent handed out (cleaned up by hand on drop).
    cgroup_parents: Mutex<Vec<String>>,
}

impl PodEnv {
    pub async fn start() -> PodEnv {
        Self::start_with(BerthdOptions::default()).await
    }

    pub async fn start_with(options: BerthdOptions) -> PodEnv {
        Self::start_with_cni(options, CniOptions::default()).await
    }

    /// [`PodEnv::start_with`] with CNI plugin dirs and timeout for berthd.
    pub async fn start_with_cni(options: BerthdOptions, cni: CniOptions) -> PodEnv {
        require_root();
        let registry = Registry::start().expect("start the harness registry");
        let work = tempfile::Builder::new()
            .prefix("berth-e2e-pods-")
            .tempdir()
            .expect("temp dir");
        let layouts = work.path().join("layouts");
        std::fs::create_dir_all(&layouts).unwrap();
        let images = TestImages::push_all(&registry, &layouts).expect("push the test images");
        let d = Berthd::start_with_cni(options, cni)
            .await
            .expect("start berthd");
        let client = d.client().await.expect("connect to berthd");
        let mut env = PodEnv {
            client,
            d,
            images,
            registry,
            work,
            pods: HashMap::new(),
            cgroup_parents: Mutex::new(Vec::new()),
        };
        for image in [env.busybox(), env.config_image()] {
            env.pull(&image).await;
        }
        env
    }

    /// PullImage of `reference`; the image's id (panics on failure).
    pub async fn pull(&mut self, reference: &str) -> String {
        self.client
            .image
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: reference.to_string(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("pull {reference}: {e:?}"))
            .into_inner()
            .image_ref
    }

    /// `berth-test/busybox` (Cmd `sh`).
    pub fn busybox(&self) -> String {
        self.images.busybox.reference.clone()
    }

    /// `berth-test/config` (USER berth, Env, WorkingDir, Entrypoint, Cmd).
    pub fn config_image(&self) -> String {
        self.images.config.reference.clone()
    }

    /// A new CRI client (after a berthd restart).
    pub async fn reconnect(&mut self) {
        self.client = self.d.client().await.expect("reconnect to berthd");
    }

    /// A pod config as kubelet sends it: metadata with a random uid, the
    /// hostname `name`, a fresh log directory and a random cgroup parent
    /// `/berth-e2e/<name>-<random>`.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        let suffix = random_hex(6);
        let log_dir = self
            .work
            .path()
            .join("logs")
            .join(format!("{name}-{suffix}"));
        let cgroup_parent = format!("/berth-e2e/{name}-{suffix}");
        self.cgroup_parents
            .lock()
            .unwrap()
            .push(cgroup_parent.clone());
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: format!("uid-{suffix}"),
                namespace: "berth-e2e".into(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: log_dir.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent,
                // What kubelet always sends: the pod's own network and IPC,
                // a PID namespace per container (no shareProcessNamespace).
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

    /// RunPodSandbox; remembers the config for CreateContainer.
    pub async fn try_run_pod(&mut self, config: &PodSandboxConfig) -> Result<String, Status> {
        let id = self
            .client
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: String::new(),
            })
            .await?
            .into_inner()
            .pod_sandbox_id;
        self.pods.insert(id.clone(), config.clone());
        Ok(id)
    }

    pub async fn run_pod(&mut self, config: &PodSandboxConfig) -> String {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        self.try_run_pod(config)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e:?}"))
    }

    /// The config a pod was run with.
    pub fn pod(&self, pod_id: &str) -> &PodSandboxConfig {
        self.pods
            .get(pod_id)
            .unwrap_or_else(|| panic!("pod {pod_id} was not run through PodEnv::run_pod"))
    }

    /// `<log_directory>` of a pod run through [`PodEnv::run_pod`].
    pub fn log_dir(&self, pod_id: &str) -> PathBuf {
        PathBuf::from(&self.pod(pod_id).log_directory)
    }

    /// `<cgroup_parent>` of a pod run through [`PodEnv::run_pod`].
    pub fn cgroup_parent(&self, pod_id: &str) -> String {
        self.pod(pod_id)
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .unwrap_or_default()
    }

    pub async fn pod_status(&mut self, pod_id: &str) -> Result<PodSandboxStatus, Status> {
        Ok(self
            .client
            .runtime
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod_id.to_string(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .expect("PodSandboxStatus without status"))
    }

    pub async fn stop_pod(&mut self, pod_id: &str) -> Result<(), Status> {
        self.client
            .runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod_id.to_string(),
            })
            .await?;
        Ok(())
    }

    pub async fn remove_pod(&mut self, pod_id: &str) -> Result<(), Status> {
        self.client
            .runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod_id.to_string(),
            })
            .await?;
        Ok(())
    }

    pub async fn list_pods(&mut self, filter: Option<PodSandboxFilter>) -> Vec<PodSandbox> {
        self.client
            .runtime
            .list_pod_sandbox(ListPodSandboxRequest { filter })
            .await
            .expect("ListPodSandbox")
            .into_inner()
            .items
    }

    /// CreateContainer in a pod run through [`PodEnv::run_pod`] (the pod's
    /// config goes along, as kubelet sends it).
    pub async fn try_create(
        &mut self,
        pod_id: &str,
        config: &ContainerConfig,
    ) -> Result<String, Status> {
        let sandbox_config = self.pods.get(pod_id).cloned();
        Ok(self
            .client
            .runtime
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod_id.to_string(),
                config: Some(config.clone()),
                sandbox_config,
            })
            .await?
            .into_inner()
            .container_id)
    }

    pub async fn create(&mut self, pod_id: &str, config: &ContainerConfig) -> String {
        let name = container_name(config);
        self.try_create(pod_id, config)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e:?}"))
    }

    pub async fn try_start(&mut self, id: &str) -> Result<(), Status> {
        self.client
            .runtime
            .start_container(StartContainerRequest {
                container_id: id.to_string(),
            })
            .await?;
        Ok(())
    }

    pub async fn start_container(&mut self, id: &str) {
        self.try_start(id)
            .await
            .unwrap_or_else(|e| panic!("StartContainer {id}: {e:?}"));
    }

    /// CreateContainer + StartContainer.
    pub async fn run(&mut self, pod_id: &str, config: &ContainerConfig) -> String {
        let id = self.create(pod_id, config).await;
        self.start_container(&id).await;
        id
    }

    pub async fn stop_container(&mut self, id: &str, timeout: i64) -> Result<(), Status> {
        self.client
            .runtime
            .stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout,
            })
            .await?;
        Ok(())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<(), Status> {
        self.client
            .runtime
            .remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            })
            .await?;
        Ok(())
    }

    pub async fn list_containers(&mut self, filter: Option<ContainerFilter>) -> Vec<Container> {
        self.client
            .runtime
            .list_containers(ListContainersRequest { filter })
            .await
            .expect("ListContainers")
            .into_inner()
            .containers
    }

    pub async fn try_status(&mut self, id: &str) -> Result<ContainerStatus, Status> {
        Ok(self
            .client
            .runtime
            .container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .expect("ContainerStatus without status"))
    }

    pub async fn status(&mut self, id: &str) -> ContainerStatus {
        self.try_status(id)
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus {id}: {e:?}"))
    }

    /// ContainerStatus with verbose info: the status and the parsed
    /// `info["info"]` JSON.
    pub async fn status_verbose(&mut self, id: &str) -> (ContainerStatus, serde_json::Value) {
        let resp = self
            .client
            .runtime
            .container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: true,
            })
            .await
            .unwrap_or_else(|e| panic!("ContainerStatus {id} (verbose): {e:?}"))
            .into_inner();
        let info = resp
            .info
            .get("info")
            .map(|s| {
                serde_json::from_str(s)
                    .unwrap_or_else(|e| panic!("info of {id} is not JSON ({e}): {s}"))
            })
            .unwrap_or_else(|| {
                panic!(
                    "ContainerStatus {id} verbose has no info[\"info\"]: {:?}",
                    resp.info
                )
            });
        (resp.status.expect("ContainerStatus without status"), info)
    }

    /// The container's init pid from verbose ContainerStatus (`"pid"`).
    pub async fn pid(&mut self, id: &str) -> i32 {
        let (_, info) = self.status_verbose(id).await;
        let pid = info["pid"]
            .as_i64()
            .unwrap_or_else(|| panic!("verbose info of {id} has no numeric \"pid\": {info}"));
        assert!(pid > 0, "container {id} reports pid {pid}: {info}");
        pid as i32
    }

    /// Polls ContainerStatus until the state is `want`; panics after
    /// `timeout` with the last status.
    pub async fn wait_state(
        &mut self,
        id: &str,
        want: ContainerState,
        timeout: Duration,
    ) -> ContainerStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(id).await;
            if s.state == want as i32 {
                return s;
            }
            if Instant::now() >= deadline {
                panic!(
                    "container {id} did not become {want:?} within {timeout:?}; last status: state {:?}, {s:?}",
                    ContainerState::try_from(s.state)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_exited(&mut self, id: &str) -> ContainerStatus {
        self.wait_state(id, ContainerState::ContainerExited, STATE_TIMEOUT)
            .await
    }

    /// ExecSync (timeout 30 s): stdout, stderr, exit code.
    pub async fn try_exec(
        &mut self,
        id: &str,
        cmd: &[&str],
    ) -> Result<(String, String, i32), Status> {
        let r = self
            .client
            .runtime
            .exec_sync(ExecSyncRequest {
                container_id: id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 30,
            })
            .await?
            .into_inner();
        Ok((
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
            r.exit_code,
        ))
    }

    pub async fn exec(&mut self, id: &str, cmd: &[&str]) -> (String, String, i32) {
        self.try_exec(id, cmd)
            .await
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?} in {id}: {e:?}"))
    }

    /// Waits until something listens on TCP `port` in the container's
    /// network namespace (busybox netstat).
    pub async fn wait_listening(&mut self, ctr: &str, port: u16) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (out, _, _) = self.exec(ctr, &["netstat", "-ltn"]).await;
            if out
                .lines()
                .any(|l| l.contains(&format!(":{port} ")) && l.contains("LISTEN"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "nothing listens on :{port} in {ctr} after 20 s:\n{out}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `sh -c script` through ExecSync; asserts exit 0 and returns stdout.
    pub async fn sh(&mut self, id: &str, script: &str) -> String {
        let (out, err, code) = self.exec(id, &["sh", "-c", script]).await;
        assert_eq!(
            code, 0,
            "ExecSync sh -c {script:?} in {id} exited {code}; stdout {out:?}, stderr {err:?}"
        );
        out
    }

    /// Where a container's CRI log is: `<log_directory>/<log_path>`.
    pub fn log_file(&self, pod_id: &str, config: &ContainerConfig) -> PathBuf {
        self.log_dir(pod_id).join(&config.log_path)
    }

    /// A host directory under the work dir, created fresh.
    pub fn host_dir(&self, name: &str) -> PathBuf {
        let p = self.work.path().join("host").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Removes every pod and container berthd knows (stop, then remove).
    pub async fn remove_everything(&mut self) -> Result<(), Status> {
        remove_all(&mut self.client).await
    }
}

/// A container config as kubelet sends it: metadata `name` (attempt 0), the
/// image, `command` (empty keeps the image's entrypoint) and the log path
/// `<name>.log`.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// [`container_config`] running `sh -c script`.
pub fn sh_config(name: &str, image: &str, script: &str) -> ContainerConfig {
    container_config(name, image, &["/bin/sh", "-c", script])
}

fn container_name(config: &ContainerConfig) -> String {
    config
        .metadata
        .as_ref()
        .map(|m| m.name.clone())
        .unwrap_or_default()
}

/// Sets `linux.resources` of a container config (created if missing).
pub fn resources(config: &mut ContainerConfig) -> &mut LinuxContainerResources {
    config
        .linux
        .get_or_insert_with(Default::default)
        .resources
        .get_or_insert_with(Default::default)
}

/// Sets `linux.security_context` of a container config.
pub fn security_context(config: &mut ContainerConfig) -> &mut LinuxContainerSecurityContext {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
}

/// Sets `linux.security_context.namespace_options` of a pod config.
pub fn pod_namespace_options(config: &mut PodSandboxConfig) -> &mut NamespaceOption {
    config
        .linux
        .get_or_insert_with(Default::default)
        .security_context
        .get_or_insert_with(Default::default)
        .namespace_options
        .get_or_insert_with(Default::default)
}

/// Stops and removes every pod, then every container left; goes on past
/// errors and returns the first one.
async fn remove_all(c: &mut CriClient) -> Result<(), Status> {
    let mut first: Option<Status> = None;
    let mut note = |r: Result<(), Status>| {
        if let Err(e) = r
            && first.is_none()
        {
            first = Some(e);
        }
    };
    let pods = c
        .runtime
        .list_pod_sandbox(ListPodSandboxRequest { filter: None })
        .await?
        .into_inner()
        .items;
    for p in pods {
        let stopped = c
            .runtime
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: p.id.clone(),
            })
            .await
            .map(|_| ());
        note(stopped);
        let removed = c
            .runtime
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: p.id.clone(),
            })
            .await
            .map(|_| ());
        note(removed);
    }
    let containers = c
        .runtime
        .list_containers(ListContainersRequest { filter: None })
        .await?
        .into_inner()
        .containers;
    for ct in containers {
        let removed = c
            .runtime
            .remove_container(RemoveContainerRequest {
                container_id: ct.id.clone(),
            })
            .await
            .map(|_| ());
        note(removed);
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Drop for PodEnv {
    fn drop(&mut self) {
        // The harness prints berthd's log when a test panics; this shows it
        // for passing tests too.
        if std::env::var_os("BERTH_E2E_PRINT_LOG").is_some() && !std::thread::panicking() {
            eprintln!(
                "---- berthd log ({}) ----\n{}",
                self.d.log_path().display(),
                self.d.log()
            );
        }
        // Through berthd first, on a thread of its own (this one may be a
        // runtime worker, which cannot block on another runtime).
        if self.d.pid().is_some() {
            let socket = self.d.socket.clone();
            let result = std::thread::spawn(move || -> anyhow::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async {
                    tokio::time::timeout(Duration::from_secs(120), async {
                        let mut c = CriClient::connect(&socket).await?;
                        remove_all(&mut c).await?;
                        anyhow::Ok(())
                    })
                    .await?
                })
            })
            .join();
            match result {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("pods harness: cleanup through berthd failed: {e:#}"),
                Err(_) => eprintln!("pods harness: cleanup thread panicked"),
            }
        }
        // Then by hand, whatever is left.
        let state = self.d.state_dir();
        for (pid, cmd) in berth_processes(&state) {
            eprintln!("pods harness: killing leftover {pid} {cmd}");
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let parents = self.cgroup_parents.lock().unwrap().clone();
        for parent in &parents {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let pids = cgroup_tree_pids(parent);
                if pids.is_empty() || Instant::now() >= deadline {
                    break;
                }
                for pid in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let mut leftover = mounts_under(self.d.dir.path());
        leftover.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in leftover {
            eprintln!("pods harness: unmounting leftover {m}");
            let _ = nix::mount::umount2(Path::new(&m), nix::mount::MntFlags::MNT_DETACH);
        }
        for parent in &parents {
            for dir in cgroup_dirs(parent) {
                remove_cgroup_tree(&dir);
            }
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

// ---- CRI log files ----

/// One line of a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// `2006-01-02T15:04:05.000000000Z`
    pub time: String,
    /// `stdout` or `stderr`
    pub stream: String,
    /// `F` (full) or `P` (partial)
    pub tag: char,
    pub content: Vec<u8>,
}

impl LogLine {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.content).into_owned()
    }
}

/// Whether `ts` is `YYYY-MM-DDTHH:MM:SS.NNNNNNNNNZ` exactly (nine digits).
pub fn is_cri_timestamp(ts: &str) -> bool {
    let b = ts.as_bytes();
    if b.len() != 30 {
        return false;
    }
    let pattern = b"dddd-dd-ddTdd:dd:dd.dddddddddZ";
    b.iter().zip(pattern.iter()).all(|(c, p)| match p {
        b'd' => c.is_ascii_digit(),
        other => c == other,
    })
}

/// Parses a CRI log: every line must be
/// `^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z (stdout|stderr) (F|P) .*$`
/// and the file must end with a newline.
pub fn parse_cri_log(bytes: &[u8]) -> Result<Vec<LogLine>, String> {
    let mut out = Vec::new();
    if bytes.is_empty() {
        return Ok(out);
    }
    if !bytes.ends_with(b"\n") {
        return Err(format!(
            "the log does not end with a newline: ...{:?}",
            String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(80)..])
        ));
    }
    for (n, line) in bytes[..bytes.len() - 1].split(|b| *b == b'\n').enumerate() {
        let bad = |why: &str| {
            format!(
                "line {} is not CRI format ({why}): {:?}",
                n + 1,
                String::from_utf8_lossy(&line[..line.len().min(120)])
            )
        };
        let mut parts = line.splitn(4, |b| *b == b' ');
        let time = parts.next().ok_or_else(|| bad("no timestamp"))?;
        let stream = parts.next().ok_or_else(|| bad("no stream"))?;
        let tag = parts.next().ok_or_else(|| bad("no tag"))?;
        let content = parts.next().ok_or_else(|| bad("no space after the tag"))?;
        let time = std::str::from_utf8(time).map_err(|_| bad("timestamp not utf-8"))?;
        if !is_cri_timestamp(time) {
            return Err(bad(
                "timestamp is not RFC 3339 UTC with nine fraction digits",
            ));
        }
        let stream = match stream {
            b"stdout" => "stdout",
            b"stderr" => "stderr",
            _ => return Err(bad("stream is neither stdout nor stderr")),
        };
        let tag = match tag {
            b"F" => 'F',
            b"P" => 'P',
            _ => return Err(bad("tag is neither F nor P")),
        };
        out.push(LogLine {
            time: time.to_string(),
            stream: stream.to_string(),
            tag,
            content: content.to_vec(),
        });
    }
    Ok(out)
}

/// Reads and parses a CRI log file; panics naming the file when malformed.
pub fn read_cri_log(path: &Path) -> Vec<LogLine> {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("read CRI log {}: {e}", path.display()));
    parse_cri_log(&bytes).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\nwhole file:\n{}",
            path.display(),
            String::from_utf8_lossy(&bytes[..bytes.len().min(4000)])
        )
    })
}

/// What a CRI log holds so far, while it is being written: a missing file
/// is empty and a last record still being written is left out; the
/// complete records must be well-formed.
pub fn read_cri_log_so_far(path: &Path) -> Vec<LogLine> {
    let Ok(bytes) = std::fs::read(path) else {
        return Vec::new();
    };
    let end = bytes
        .iter()
        .rposition(|b| *b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    parse_cri_log(&bytes[..end]).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The lines of one stream reassembled: P chunks joined with what follows
/// them, every F line ending in a newline (a trailing P chunk stays
/// without one).
pub fn stream_text(lines: &[LogLine], stream: &str) -> String {
    let mut text = Vec::new();
    for l in lines.iter().filter(|l| l.stream == stream) {
        text.extend_from_slice(&l.content);
        if l.tag == 'F' {
            text.push(b'\n');
        }
    }
    String::from_utf8_lossy(&text).into_owned()
}

// ---- the host: mounts, processes, cgroups ----

/// A mountinfo field with its octal escapes (`\040` for a space) decoded.
pub fn unescape_mountinfo(field: &str) -> String {
    let mut out = Vec::new();
    let b = field.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or under `prefix` in this (the host's) mount namespace.
pub fn mounts_under(prefix: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| Path::new(m).starts_with(prefix))
        .collect()
}

/// The argv of a process, joined with spaces.
pub fn cmdline(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Every pid in /proc.
pub fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| {
                !rest.trim_start().starts_with('Z') && !rest.trim_start().starts_with('X')
            })
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// `berth-shim` and `berth-container` processes of one berthd (not of
/// tests running beside it): their command line names `state_dir`, or one
/// of their open files is under it (a shared-PID pod's `berth-shim pause`
/// logs to `<state_dir>/sandboxes/<id>/infra.log`).
pub fn berth_processes(state_dir: &Path) -> Vec<(i32, String)> {
    let state = state_dir.display().to_string();
    let has_file_under = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten().any(|e| {
                    std::fs::read_link(e.path()).is_ok_and(|target| target.starts_with(state_dir))
                })
            })
            .unwrap_or(false)
    };
    all_pids()
        .into_iter()
        .filter(|pid| *pid as u32 != std::process::id())
        .filter_map(|pid| cmdline(pid).map(|c| (pid, c)))
        .filter(|(pid, c)| {
            let argv0 = c.split(' ').next().unwrap_or("");
            (argv0.ends_with("berth-shim") || argv0.ends_with("berth-container"))
                && (c.contains(&state) || has_file_under(*pid))
        })
        .collect()
}

/// The pid in `<state_dir>/shims/<id>/shim.pid`.
pub fn shim_pid(state_dir: &Path, container_id: &str) -> Option<i32> {
    std::fs::read_to_string(state_dir.join("shims").join(container_id).join("shim.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The inode of a namespace file (`/proc/<pid>/ns/<kind>` or a pinned one).
pub fn ns_inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Processes whose `kind` namespace is the one of `ns_file`.
pub fn processes_in_ns(ns_file: &Path, kind: &str) -> Vec<i32> {
    let Some(ino) = ns_inode(ns_file) else {
        return Vec::new();
    };
    all_pids()
        .into_iter()
        .filter(|pid| ns_inode(Path::new(&format!("/proc/{pid}/ns/{kind}"))) == Some(ino))
        .collect()
}

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Whether /sys/fs/cgroup is a cgroup2 (unified) mount.
pub fn cgroup_v2() -> bool {
    nix::sys::statfs::statfs(CGROUP_ROOT)
        .is_ok_and(|fs| fs.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

/// The v1 hierarchies mounted under /sys/fs/cgroup: (mount point, its
/// controllers from the super options).
pub fn v1_hierarchies() -> Vec<(PathBuf, Vec<String>)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut r = right.split(' ');
        if r.next() != Some("cgroup") {
            continue;
        }
        let _source = r.next();
        let opts = r.next().unwrap_or("");
        let Some(mp) = left.split(' ').nth(4) else {
            continue;
        };
        let mp = unescape_mountinfo(mp);
        if !Path::new(&mp).starts_with(CGROUP_ROOT) {
            continue;
        }
        let controllers = opts
            .split(',')
            .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
            .map(String::from)
            .collect();
        out.push((PathBuf::from(mp), controllers));
    }
    out
}

/// The directory of cgroup `path` for `controller` (`cpu`, `memory`,
/// `pids`, ...): `/sys/fs/cgroup/<path>` on cgroup v2, the controller's
/// hierarchy on v1.
pub fn cgroup_dir(controller: &str, path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    if cgroup_v2() {
        return Path::new(CGROUP_ROOT).join(rel);
    }
    let (mp, _) = v1_hierarchies()
        .into_iter()
        .find(|(_, c)| c.iter().any(|c| c == controller))
        .unwrap_or_else(|| panic!("no cgroup v1 hierarchy has the {controller} controller"));
    mp.join(rel)
}

/// The trimmed content of `file` in the `controller` directory of cgroup
/// `path` (see [`cgroup_dir`]); panics naming the file when unreadable.
pub fn read_cgroup_file(controller: &str, path: &str, file: &str) -> String {
    let p = cgroup_dir(controller, path).join(file);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        .trim()
        .to_string()
}

/// Every existing directory of cgroup `path`, in every hierarchy.
pub fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let rel = path.trim_start_matches('/');
    let roots: Vec<PathBuf> = if cgroup_v2() {
        vec![PathBuf::from(CGROUP_ROOT)]
    } else {
        v1_hierarchies().into_iter().map(|(mp, _)| mp).collect()
    };
    roots
        .into_iter()
        .map(|r| r.join(rel))
        .filter(|p| p.is_dir())
        .collect()
}

/// The pids in cgroup `path` and below, in every hierarchy.
pub fn cgroup_tree_pids(path: &str) -> Vec<i32> {
    fn walk(dir: &Path, out: &mut Vec<i32>) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(&e.path(), out);
                }
            }
        }
    }
    let mut out = Vec::new();
    for dir in cgroup_dirs(path) {
        walk(&dir, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// The cgroup path of `pid` for `controller` (from `/proc/<pid>/cgroup`;
/// the `0::` line on cgroup v2).
pub fn proc_cgroup(pid: i32, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let v2 = cgroup_v2();
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        let hit = if v2 {
            controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        hit.then(|| path.to_string())
    })
}

/// Polls a blocking check every 50 ms without blocking the runtime.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_parse() {
        let log = b"2024-01-02T03:04:05.123456789Z stdout F hello\n2024-01-02T03:04:05.123456789Z stderr P par\n2024-01-02T03:04:05.123456789Z stderr F tial\n2024-01-02T03:04:05.000000000Z stdout F \n";
        let lines = parse_cri_log(log).unwrap();
        assert_eq!(lines.len(), 4);
        assert_eq!(stream_text(&lines, "stdout"), "hello\n\n");
        assert_eq!(stream_text(&lines, "stderr"), "partial\n");
        assert!(parse_cri_log(b"2024-01-02T03:04:05.1234Z stdout F x\n").is_err());
        assert!(parse_cri_log(b"2024-01-02T03:04:05.123456789Z stdin F x\n").is_err());
        assert!(parse_cri_log(b"2024-01-02T03:04:05.123456789Z stdout X x\n").is_err());
        assert!(parse_cri_log(b"2024-01-02T03:04:05.123456789Z stdout F\n").is_err());
        assert!(parse_cri_log(b"2024-01-02T03:04:05.123456789Z stdout F x").is_err());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
