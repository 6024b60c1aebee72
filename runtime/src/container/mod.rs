//! Containers: berthd prepares the rootfs (an overlay of the image's
//! snapshots), translates the CRI request into an OCI spec and hands it to a
//! berth-shim, which owns the container from then on. berthd's record is a
//! cache of the truth the shim keeps; the shim's exit record wins.

pub mod resources;
pub mod shim;
pub mod stats;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_proto::shim::{ShimConfig, shim_request, shim_response};
use k8s_cri::v1::{ContainerConfig, PodSandboxConfig};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::daemon::{Daemon, container_name_key};
use crate::error::{Error, IoContext, Result};
use crate::oci;
use crate::sandbox::{self, SandboxContext, Undo, namespaces::Kind};
use crate::store::{ContainerRecord, ContainerState, KeyValue, SandboxState};

/// How long berthd waits for a shim to answer an ordinary request.
const SHIM_TIMEOUT: Duration = Duration::from_secs(30);

fn container_dir(daemon: &Daemon, id: &str) -> PathBuf {
    daemon.config.root_dir.join("containers").join(id)
}

fn shim_dir(daemon: &Daemon, id: &str) -> PathBuf {
    shim::shim_dir(&daemon.config.state_dir, id)
}

/// The CRI log path: inside the sandbox's log directory, never outside it.
fn log_path(sandbox: &SandboxContext, relative: &str) -> Result<Option<PathBuf>> {
    if relative.is_empty() || sandbox.record.log_directory.is_empty() {
        return Ok(None);
    }
    let rel = Path::new(relative);
    if rel.is_absolute()
        || rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(Error::InvalidArgument(format!(
            "log_path {relative:?} must be relative to the sandbox's log directory, without `..`"
        )));
    }
    let path = Path::new(&sandbox.record.log_directory).join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).context(|| format!("create {}", parent.display()))?;
    }
    Ok(Some(path))
}

/// The daemon's own oom_score_adj: containers may not go below it here.
fn own_oom_score_adj() -> i32 {
    std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn memory_cgroup(daemon: &Daemon, cgroups_path: &str) -> String {
    let rel = cgroups_path.trim_start_matches('/');
    match daemon.cgroup_mode {
        crate::cgroups::CgroupMode::Unified => format!("{}/{rel}", crate::cgroups::CGROUP_ROOT),
        crate::cgroups::CgroupMode::Legacy => {
            format!("{}/memory/{rel}", crate::cgroups::CGROUP_ROOT)
        }
    }
}

fn mount_overlay(lower: &[PathBuf], upper: &Path, work: &Path, target: &Path) -> Result<()> {
    if lower.is_empty() {
        return Err(Error::BadImage("image has no layers".into()));
    }
    let lowerdir = lower
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let options = format!(
        "lowerdir={lowerdir},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(|e| Error::Internal(format!("mount overlay rootfs at {}: {e}", target.display())))
}

fn unmount(target: &Path) -> Result<()> {
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(Error::Internal(format!(
            "unmount {}: {e}",
            target.display()
        ))),
    }
}

/// CreateContainer.
pub async fn create(
    daemon: &Daemon,
    sandbox_id: &str,
    config: ContainerConfig,
    _sandbox_config: Option<PodSandboxConfig>,
) -> Result<String> {
    let sandbox = sandbox::context(daemon, sandbox::find(daemon, sandbox_id)?)?;
    if sandbox.record.state != SandboxState::Ready {
        return Err(Error::FailedPrecondition(format!(
            "pod sandbox {} is not ready",
            sandbox.record.id
        )));
    }
    let meta = config
        .metadata
        .clone()
        .ok_or_else(|| Error::InvalidArgument("container metadata is required".into()))?;
    if meta.name.is_empty() {
        return Err(Error::InvalidArgument("container name is required".into()));
    }
    let image_name = config
        .image
        .as_ref()
        .map(|i| i.image.clone())
        .unwrap_or_default();
    if image_name.is_empty() {
        return Err(Error::InvalidArgument("container image is required".into()));
    }
    let image = daemon
        .images
        .resolve(&image_name)?
        .ok_or_else(|| Error::NotFound(format!("image {image_name:?} not found; pull it first")))?;

    let id = sandbox::new_id();
    let reservation = daemon.reserve_name(
        &container_name_key(&sandbox.record.id, &meta.name, meta.attempt),
        &id,
    )?;
    tracing::Span::current().record("container_id", id.as_str());
    tracing::Span::current().record("pod_id", sandbox.record.id.as_str());

    let dir = container_dir(daemon, &id);
    let rootfs = dir.join("rootfs");
    let sdir = shim_dir(daemon, &id);
    let mut undo = Undo::default();
    let mut phases = crate::timing::Phases::start("CreateContainer");
    let result: Result<ContainerRecord> = async {
        for sub in ["upper", "work", "rootfs"] {
            std::fs::create_dir_all(dir.join(sub))
                .context(|| format!("create {}/{sub}", dir.display()))?;
        }
        undo.push_dir(dir.clone());
        mount_overlay(
            &daemon.images.lower_dirs(&image),
            &dir.join("upper"),
            &dir.join("work"),
            &rootfs,
        )?;
        phases.mark("rootfs");
        {
            let rootfs = rootfs.clone();
            undo.push(move || {
                let _ = unmount(&rootfs);
            });
        }

        let log = log_path(&sandbox, &config.log_path)?;
        let ns = sandbox.namespace_options();
        let pid = match ns.pid {
            k8s_cri::v1::NamespaceMode::Node => oci::PidMode::Host,
            k8s_cri::v1::NamespaceMode::Pod => match sandbox.pid_namespace() {
                Some(path) => oci::PidMode::Pod(path),
                None => {
                    return Err(Error::FailedPrecondition(format!(
                        "the shared PID namespace of pod {} is gone (its infra process died)",
                        sandbox.record.id
                    )));
                }
            },
            _ => oci::PidMode::Container,
        };
        let cgroups_path = format!(
            "{}/{id}",
            sandbox.record.cgroup_parent.trim_end_matches('/')
        );
        let process = image.process_config();
        let spec = oci::build_spec(&oci::SpecInput {
            container_id: &id,
            config: &config,
            sandbox: &sandbox.config,
            image: &process,
            rootfs: &rootfs,
            namespaces: oci::NamespacePaths {
                network: sandbox.namespace_path(Kind::Net),
                ipc: sandbox.namespace_path(Kind::Ipc),
                uts: sandbox.namespace_path(Kind::Uts),
            },
            pid,
            files: oci::SandboxFiles {
                hosts: sandbox.file("hosts"),
                resolv_conf: sandbox.file("resolv.conf"),
                hostname: sandbox.file("hostname"),
            },
            cgroups_path: cgroups_path.clone(),
            oom_score_adj_min: own_oom_score_adj(),
        })?;
        // libcontainer fails on a missing working dir; runc creates it.
        oci::ensure_cwd(&spec)?;
        let bundle = sdir.join("bundle");
        std::fs::create_dir_all(&bundle).context(|| format!("create {}", bundle.display()))?;
        undo.push_dir(sdir.clone());
        oci::write_spec(&spec, &bundle)?;

        let shim_config = ShimConfig {
            id: id.clone(),
            bundle: bundle.display().to_string(),
            log_path: log
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            tty: config.tty,
            runtime_root: daemon
                .config
                .state_dir
                .join("runtime")
                .display()
                .to_string(),
            memory_cgroup: memory_cgroup(daemon, &cgroups_path),
            container_helper: shim::container_helper_binary().display().to_string(),
        };
        phases.mark("spec");
        shim::launch(&sdir, &shim_config).await?;
        phases.mark("shim");

        Ok(ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.record.id.clone(),
            name: meta.name.clone(),
            attempt: meta.attempt,
            image_ref: image_name.clone(),
            image_id: image.id.clone(),
            state: ContainerState::Created,
            created_at_ns: crate::timing::now_ns(),
            log_path: log.map(|p| p.display().to_string()).unwrap_or_default(),
            labels: KeyValue::sorted(&config.labels),
            annotations: KeyValue::sorted(&config.annotations),
            snapshot_chain_ids: image.chain_ids.clone(),
            config_json: serde_json::to_string(&config)
                .map_err(|e| Error::Internal(e.to_string()))?,
            cgroups_path,
            ..Default::default()
        })
    }
    .await;
    let result = result.and_then(|record| daemon.store.put(&record).map(|_| record));
    phases.mark("store");
    phases.log();
    match result {
        Ok(record) => {
            undo.forget();
            reservation.keep();
            tracing::info!(container_id = %record.id, name = %record.name, "container created");
            Ok(record.id)
        }
        Err(e) => {
            // The shim may exist already: have it delete the container.
            if shim::is_alive(&sdir) {
                let _ = shim::call(
                    &sdir,
                    shim_request::Request::Shutdown(Default::default()),
                    SHIM_TIMEOUT,
                )
                .await;
            }
            undo.run();
            Err(e)
        }
    }
}

/// Finds a container by id or unique id prefix.
pub fn find(daemon: &Daemon, id: &str) -> Result<ContainerRecord> {
    if id.is_empty() {
        return Err(Error::InvalidArgument("container id is required".into()));
    }
    if let Some(r) = daemon.store.get::<ContainerRecord>(id)? {
        return Ok(r);
    }
    let matches: Vec<ContainerRecord> = daemon
        .store
        .list::<ContainerRecord>()?
        .into_iter()
        .filter(|c| c.id.starts_with(id))
        .collect();
    match matches.len() {
        1 => Ok(matches.into_iter().next().unwrap()),
        0 => Err(Error::NotFound(format!("container {id} not found"))),
        _ => Err(Error::InvalidArgument(format!(
            "container id prefix {id} is ambiguous"
        ))),
    }
}

/// Brings a record up to date with what the shim knows: an exit it
/// recorded, or its death.
pub fn refresh(daemon: &Daemon, mut record: ContainerRecord) -> Result<ContainerRecord> {
    if matches!(record.state, ContainerState::Exited) {
        return Ok(record);
    }
    let dir = shim_dir(daemon, &record.id);
    if let Some(exit) = shim::read_exit(&dir) {
        record.state = ContainerState::Exited;
        record.exit_code = exit.exit_code;
        record.finished_at_ns = exit.finished_at_ns;
        record.reason = exit.reason;
        record.message = exit.message;
        if record.started_at_ns == 0 {
            record.started_at_ns = exit.started_at_ns;
        }
        daemon.store.put(&record)?;
        return Ok(record);
    }
    if !shim::is_alive(&dir) && record.state != ContainerState::Unknown {
        tracing::warn!(container_id = %record.id, "shim is gone; container state unknown");
        record.state = ContainerState::Unknown;
        record.reason = "Unknown".into();
        record.message = "the container's shim died".into();
        daemon.store.put(&record)?;
    }
    Ok(record)
}

/// StartContainer: only from CREATED.
pub async fn start(daemon: &Daemon, id: &str) -> Result<()> {
    let record = refresh(daemon, find(daemon, id)?)?;
    tracing::Span::current().record("container_id", record.id.as_str());
    if record.state != ContainerState::Created {
        return Err(Error::FailedPrecondition(format!(
            "container {} is {:?}, not created",
            record.id, record.state
        )));
    }
    let dir = shim_dir(daemon, &record.id);
    shim::call(
        &dir,
        shim_request::Request::Start(Default::default()),
        SHIM_TIMEOUT,
    )
    .await?;
    let mut record = record;
    record.state = ContainerState::Running;
    record.started_at_ns = match shim::call(
        &dir,
        shim_request::Request::State(Default::default()),
        SHIM_TIMEOUT,
    )
    .await
    {
        Ok(shim_response::Response::State(s)) if s.started_at_ns > 0 => s.started_at_ns,
        _ => crate::timing::now_ns(),
    };
    if let Some(pid_state) = current_pid(&dir).await {
        record.pid = pid_state;
    }
    daemon.store.put(&record)?;
    // It may have exited already (a command that finishes at once).
    refresh(daemon, record)?;
    Ok(())
}

async fn current_pid(dir: &Path) -> Option<i32> {
    match shim::call(
        dir,
        shim_request::Request::State(Default::default()),
        SHIM_TIMEOUT,
    )
    .await
    {
        Ok(shim_response::Response::State(s)) => Some(s.pid),
        _ => None,
    }
}

/// The signal that asks this container to stop: the image's StopSignal or
/// SIGTERM.
fn stop_signal(daemon: &Daemon, record: &ContainerRecord) -> i32 {
    let name = daemon
        .store
        .get::<crate::store::ImageRecord>(&record.image_id)
        .ok()
        .flatten()
        .map(|i| i.process_config().stop_signal)
        .unwrap_or_default();
    parse_signal(&name).unwrap_or(libc::SIGTERM)
}

pub fn parse_signal(name: &str) -> Option<i32> {
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    if let Ok(n) = name.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let upper = name.to_ascii_uppercase();
    let full = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    full.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

/// Waits until the shim records the exit, up to `timeout`.
async fn wait_exit(dir: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if shim::read_exit(dir).is_some() {
            return true;
        }
        if Instant::now() >= deadline || !shim::is_alive(dir) {
            return shim::read_exit(dir).is_some();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// StopContainer: the stop signal, then SIGKILL after `timeout`.
/// Idempotent on an exited container.
pub async fn stop(daemon: &Daemon, id: &str, timeout_secs: i64) -> Result<()> {
    let record = refresh(daemon, find(daemon, id)?)?;
    tracing::Span::current().record("container_id", record.id.as_str());
    let dir = shim_dir(daemon, &record.id);
    match record.state {
        ContainerState::Exited => return Ok(()),
        ContainerState::Unknown => {
            kill_orphaned(daemon, &record);
            return Ok(());
        }
        ContainerState::Created | ContainerState::Running => {}
    }
    if timeout_secs > 0 {
        let signal = stop_signal(daemon, &record);
        kill(&dir, signal).await?;
        if wait_exit(&dir, Duration::from_secs(timeout_secs as u64)).await {
            refresh(daemon, record)?;
            return Ok(());
        }
        tracing::info!(container_id = %record.id, "stop timeout passed; killing");
    }
    kill(&dir, libc::SIGKILL).await?;
    if !wait_exit(&dir, Duration::from_secs(10)).await {
        return Err(Error::Internal(format!(
            "container {} did not exit after SIGKILL",
            record.id
        )));
    }
    refresh(daemon, record)?;
    Ok(())
}

async fn kill(dir: &Path, signal: i32) -> Result<()> {
    match shim::call(
        dir,
        shim_request::Request::Kill(berth_proto::shim::KillRequest { signal, all: false }),
        SHIM_TIMEOUT,
    )
    .await
    {
        Ok(_) => Ok(()),
        // The shim died under us: the caller's refresh reports it.
        Err(Error::FailedPrecondition(_)) if !shim::is_alive(dir) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A container whose shim is gone: kill what is left through libcontainer.
fn kill_orphaned(daemon: &Daemon, record: &ContainerRecord) {
    let root = daemon.config.state_dir.join("runtime");
    let helper = shim::container_helper_binary();
    let output = std::process::Command::new(&helper)
        .arg("--root")
        .arg(&root)
        .args(["delete", &record.id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output();
    match output {
        Ok(out) if out.status.success() => {}
        Ok(out) => tracing::warn!(
            container_id = %record.id,
            status = %out.status,
            stderr = %String::from_utf8_lossy(&out.stderr).trim(),
            "could not delete the orphaned container"
        ),
        Err(e) => {
            tracing::warn!(container_id = %record.id, error = %e, "could not run the container helper")
        }
    }
}

/// RemoveContainer: stops it, has the shim delete it, removes the rootfs
/// and state; keeps the log file. Idempotent.
pub async fn remove(daemon: &Daemon, id: &str) -> Result<()> {
    let record = match find(daemon, id) {
        Ok(r) => refresh(daemon, r)?,
        Err(Error::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    tracing::Span::current().record("container_id", record.id.as_str());
    let dir = shim_dir(daemon, &record.id);
    let mut phases = crate::timing::Phases::start("RemoveContainer");
    if matches!(
        record.state,
        ContainerState::Created | ContainerState::Running
    ) {
        stop(daemon, &record.id, 0).await?;
    }
    phases.mark("stop");
    if shim::is_alive(&dir) {
        shim::call(
            &dir,
            shim_request::Request::Shutdown(Default::default()),
            SHIM_TIMEOUT,
        )
        .await?;
    } else {
        kill_orphaned(daemon, &record);
    }
    phases.mark("shim-shutdown");
    let cdir = container_dir(daemon, &record.id);
    unmount(&cdir.join("rootfs"))?;
    for path in [&cdir, &dir] {
        match std::fs::remove_dir_all(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(format!("remove {}", path.display()), e)),
        }
    }
    phases.mark("rootfs+dirs");
    daemon.store.delete::<ContainerRecord>(&record.id)?;
    phases.mark("store");
    phases.log();
    daemon.release_name(&record.id);
    daemon.cpu_samples.forget(&record.id);
    tracing::info!(container_id = %record.id, "container removed");
    Ok(())
}

/// Removes what an unfinished create of `id` left: its shim (asked to
/// delete the container), the libcontainer state, the rootfs mount, dirs.
pub async fn discard_unrecorded(daemon: &Daemon, id: &str) {
    let dir = shim_dir(daemon, id);
    if shim::is_alive(&dir) {
        let _ = shim::call(
            &dir,
            shim_request::Request::Shutdown(Default::default()),
            SHIM_TIMEOUT,
        )
        .await;
    }
    let record = ContainerRecord {
        id: id.to_string(),
        ..Default::default()
    };
    if daemon.config.state_dir.join("runtime").join(id).exists() {
        kill_orphaned(daemon, &record);
    }
    let cdir = container_dir(daemon, id);
    let _ = unmount(&cdir.join("rootfs"));
    let _ = std::fs::remove_dir_all(&cdir);
    let _ = std::fs::remove_dir_all(&dir);
}

/// UpdateContainerResources: the new limits go into the cgroup and into the
/// stored config, so ContainerStatus reports them.
pub fn update_resources(
    daemon: &Daemon,
    id: &str,
    new: k8s_cri::v1::LinuxContainerResources,
) -> Result<()> {
    let mut record = refresh(daemon, find(daemon, id)?)?;
    tracing::Span::current().record("container_id", record.id.as_str());
    if !matches!(
        record.state,
        ContainerState::Created | ContainerState::Running
    ) {
        return Err(Error::FailedPrecondition(format!(
            "container {} is not running",
            record.id
        )));
    }
    resources::apply(daemon.cgroup_mode, &record.cgroups_path, &new)?;
    let mut config: ContainerConfig = serde_json::from_str(&record.config_json)
        .map_err(|e| Error::Store(format!("container {} config: {e}", record.id)))?;
    config.linux.get_or_insert_with(Default::default).resources = Some(new);
    record.config_json =
        serde_json::to_string(&config).map_err(|e| Error::Internal(e.to_string()))?;
    daemon.store.put(&record)
}

/// Resource usage of a container; `None` once it is not running.
pub fn stats(daemon: &Daemon, record: &ContainerRecord) -> stats::Stats {
    stats::read(
        daemon.cgroup_mode,
        &record.cgroups_path,
        &record.id,
        &container_dir(daemon, &record.id).join("upper"),
        &daemon.cpu_samples,
    )
}

/// Containers of a sandbox.
pub fn of_sandbox(daemon: &Daemon, sandbox_id: &str) -> Result<Vec<ContainerRecord>> {
    Ok(daemon
        .store
        .list::<ContainerRecord>()?
        .into_iter()
        .filter(|c| c.sandbox_id == sandbox_id)
        .collect())
}

/// ExecSync through the shim.
pub async fn exec_sync(
    daemon: &Daemon,
    id: &str,
    cmd: Vec<String>,
    timeout_secs: i64,
) -> Result<(Vec<u8>, Vec<u8>, i32)> {
    let record = refresh(daemon, find(daemon, id)?)?;
    tracing::Span::current().record("container_id", record.id.as_str());
    if record.state != ContainerState::Running {
        return Err(Error::FailedPrecondition(format!(
            "container {} is not running",
            record.id
        )));
    }
    if cmd.is_empty() {
        return Err(Error::InvalidArgument("exec command is required".into()));
    }
    let dir = shim_dir(daemon, &record.id);
    let wait = if timeout_secs > 0 {
        Duration::from_secs(timeout_secs as u64 + 10)
    } else {
        Duration::from_secs(24 * 3600)
    };
    let resp = shim::call(
        &dir,
        shim_request::Request::ExecSync(berth_proto::shim::ExecSyncRequest {
            args: cmd,
            timeout_secs: timeout_secs.max(0),
        }),
        wait,
    )
    .await?;
    match resp {
        shim_response::Response::ExecSync(r) => Ok((r.stdout, r.stderr, r.exit_code)),
        _ => Err(Error::Internal("unexpected answer to exec".into())),
    }
}

/// ReopenContainerLog.
pub async fn reopen_log(daemon: &Daemon, id: &str) -> Result<()> {
    let record = refresh(daemon, find(daemon, id)?)?;
    if record.state != ContainerState::Running {
        return Err(Error::FailedPrecondition(format!(
            "container {} is not running",
            record.id
        )));
    }
    shim::call(
        &shim_dir(daemon, &record.id),
        shim_request::Request::ReopenLog(Default::default()),
        SHIM_TIMEOUT,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SIGQUIT"), Some(libc::SIGQUIT));
        assert_eq!(parse_signal("quit"), Some(libc::SIGQUIT));
        assert_eq!(parse_signal("9"), Some(9));
        assert_eq!(parse_signal(""), None);
        assert_eq!(parse_signal("SIGNOPE"), None);
    }
}
