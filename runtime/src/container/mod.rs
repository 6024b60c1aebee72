//! Containers: berthd prepares the rootfs (an overlay of the image's
//! snapshots), translates the CRI request into an OCI spec and hands it to a
//! berth-shim, which owns the container from then on. berthd's record is a
//! cache of the truth the shim keeps; the shim's exit record wins.

pub mod cleanup;
pub mod exec_sync;
pub mod exits;
mod idmap;
mod image_volumes;
pub mod resources;
pub mod shim;
pub mod signal;
pub mod stats;
mod streams;

pub use streams::{attach, exec_stream, streamable};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_cri::v1::ContainerConfig;
use berth_proto::shim::{ExitRecord, ShimConfig, shim_request, shim_response};

use crate::daemon::Daemon;
use crate::error::{Error, IoContext, Result};
use crate::events::{Event, EventKind};
use crate::host::Host;
use crate::locks::{ContainerGuard, SandboxShared};
use crate::names;
use crate::oci;
use crate::sandbox::{self, SandboxContext, namespaces::Kind};
use crate::store::{ContainerRecord, ContainerState, ImageRecord, KeyValue};
use crate::undo::Undo;

/// How long berthd waits for a shim to answer an ordinary request.
const SHIM_TIMEOUT: Duration = Duration::from_secs(30);

fn container_dir(daemon: &Daemon, id: &str) -> PathBuf {
    daemon.layout.container(id)
}

fn shim_dir(daemon: &Daemon, id: &str) -> PathBuf {
    daemon.layout.shim(id)
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

/// Where the shim reads the container's OOM kills and processes.
fn memory_cgroup(daemon: &Daemon, cgroups_path: &str) -> Result<String> {
    Ok(daemon
        .cgroups
        .dir("memory", cgroups_path)?
        .map(|d| d.display().to_string())
        .unwrap_or_default())
}

/// What a CreateContainer request asks for, checked.
struct CreateRequest {
    name: String,
    attempt: u32,
    image_name: String,
    image: ImageRecord,
    image_volumes: Vec<image_volumes::Requested>,
}

/// The present image an `ImageSpec` names: by `image_ref` (CRI 1.36: the
/// id of the image kubelet pulled) when set, else by `image` (a name, an
/// id or a digest). Absent: NotFound, as kubelet pulls first.
fn resolve_image(
    daemon: &Daemon,
    spec: Option<&berth_cri::v1::ImageSpec>,
    what: &str,
) -> Result<ImageRecord> {
    let reference = spec
        .map(|s| {
            if s.image_ref.is_empty() {
                s.image.as_str()
            } else {
                s.image_ref.as_str()
            }
        })
        .unwrap_or_default();
    if reference.is_empty() {
        return Err(Error::InvalidArgument(format!("{what}: image is required")));
    }
    match daemon.images.resolve(reference)? {
        Some(image) => Ok(image),
        None if crate::image::reference::as_image_id(reference).is_none()
            && crate::image::reference::ImageName::parse(reference).is_err() =>
        {
            Err(Error::InvalidArgument(format!(
                "{what}: image {reference:?} is not a valid image reference"
            )))
        }
        None => Err(Error::NotFound(format!(
            "{what}: image {reference:?} not found; pull it first"
        ))),
    }
}

fn check_create(daemon: &Daemon, config: &ContainerConfig) -> Result<CreateRequest> {
    let meta = config
        .metadata
        .clone()
        .ok_or_else(|| Error::InvalidArgument("container metadata is required".into()))?;
    names::check_name("container name", &meta.name)?;
    names::check_labels("container", &config.labels, &config.annotations)?;
    signal::from_cri(config.stop_signal)?;
    if !config.cdi_devices.is_empty() {
        // Refused rather than ignored: a pod that needs its device would
        // otherwise run without it.
        return Err(Error::Unimplemented(
            "CDI devices (ContainerConfig.CDI_devices); devices come through ContainerConfig.devices",
        ));
    }
    let image = resolve_image(daemon, config.image.as_ref(), "container")?;
    // The name it was asked by, for ContainerStatus.
    let image_name = config
        .image
        .as_ref()
        .map(|i| {
            if i.image.is_empty() {
                &i.image_ref
            } else {
                &i.image
            }
        })
        .cloned()
        .unwrap_or_default();
    Ok(CreateRequest {
        name: meta.name,
        attempt: meta.attempt,
        image_name,
        image,
        image_volumes: image_volumes::check(daemon, config)?,
    })
}

/// CreateContainer, while the pod is held shared (it cannot be stopped or
/// removed meanwhile). Every step registers its undo; on failure they run
/// in reverse and nothing is left.
pub fn create(daemon: &Daemon, pod: &SandboxShared, config: ContainerConfig) -> Result<String> {
    let sandbox = sandbox::context(daemon, sandbox::get(daemon, &pod.sandbox_id)?)?;
    sandbox::require_ready(
        &sandbox.record,
        "containers are created only in a ready pod",
    )?;
    let request = check_create(daemon, &config)?;
    // Until the record keeps them, garbage collection (a RemoveImage of
    // one of these images meanwhile) must not delete its snapshots.
    let _snapshots = daemon.images.hold_snapshots(
        request
            .image
            .chain_ids
            .iter()
            .chain(request.image_volumes.iter().flat_map(|v| v.chain_ids()))
            .cloned()
            .collect(),
    )?;
    // Limits this host cannot apply fail here, before anything exists.
    if let Some(r) = config.linux.as_ref().and_then(|l| l.resources.as_ref()) {
        daemon
            .cgroups
            .check(&sandbox.record.cgroup_parent, &resources::from_cri(r)?)?;
    }
    let id = names::new_id();
    let reservation = daemon.names.reserve(
        &names::container_key(&sandbox.record.id, &request.name, request.attempt),
        &id,
    )?;
    tracing::Span::current().record("container_id", id.as_str());
    tracing::Span::current().record("pod_id", sandbox.record.id.as_str());

    let userns = sandbox.user_namespace()?;
    let mut undo = Undo::new(format!("container {id}"));
    let mut phases = crate::timing::Phases::start("CreateContainer");
    let result = (|| {
        let rootfs = prepare_rootfs(daemon, &id, &request.image, userns.as_ref(), &mut undo)?;
        phases.mark("rootfs");
        let fs = Filesystems {
            image_volumes: image_volumes::mount(
                daemon,
                &container_dir(daemon, &id),
                &request.image_volumes,
                userns.as_ref(),
                &mut undo,
            )?,
            rootfs,
            user_namespace: userns.clone(),
        };
        if !fs.image_volumes.is_empty() {
            phases.mark("image-volumes");
        }
        let Bundle {
            shim_config,
            cgroups_path,
            log,
            user,
        } = write_bundle(
            daemon,
            &id,
            &sandbox,
            &config,
            &request.image,
            &fs,
            &mut undo,
        )?;
        // The shim, and with it the container's processes and cgroup,
        // comes at StartContainer (as with containerd): CreateContainer
        // only prepares what it will run.
        shim::write_config(&shim_dir(daemon, &id), &shim_config)?;
        phases.mark("spec");
        let record = ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.record.id.clone(),
            name: request.name.clone(),
            attempt: request.attempt,
            image_ref: request.image_name.clone(),
            image_id: request.image.id.clone(),
            state: ContainerState::Created,
            created_at_ns: crate::timing::now_ns(),
            log_path: log.map(|p| p.display().to_string()).unwrap_or_default(),
            labels: KeyValue::sorted(&config.labels),
            annotations: KeyValue::sorted(&config.annotations),
            snapshot_chain_ids: request.image.chain_ids.clone(),
            config_json: serde_json::to_string(&config).map_err(|source| Error::Json {
                what: format!("encode the config of {id}"),
                source,
            })?,
            cgroups_path,
            user: Some(user),
            stop_signal: resolve_stop_signal(&config, &request.image),
            image_volumes: request
                .image_volumes
                .iter()
                .map(image_volumes::Requested::record)
                .collect(),
            ..Default::default()
        };
        // The record is the commit point.
        daemon.publish_with(|| {
            daemon.store.insert_new(&record)?;
            Ok(((), vec![event(EventKind::Created, &record)]))
        })?;
        phases.mark("store");
        Ok(record)
    })();
    phases.log();
    match result {
        Ok(record) => {
            undo.forget();
            reservation.keep();
            tracing::info!(container_id = %record.id, name = %record.name, "container created");
            Ok(record.id)
        }
        Err(e) => {
            undo.run();
            Err(e)
        }
    }
}

/// The container's dirs and its overlay rootfs over the image's snapshots
/// (idmapped for a pod user namespace).
fn prepare_rootfs(
    daemon: &Daemon,
    id: &str,
    image: &ImageRecord,
    userns: Option<&oci::UserNamespaceInput>,
    undo: &mut Undo,
) -> Result<PathBuf> {
    let dir = container_dir(daemon, id);
    let rootfs = dir.join("rootfs");
    for sub in ["upper", "work", "rootfs"] {
        std::fs::create_dir_all(dir.join(sub))
            .context(|| format!("create {}/{sub}", dir.display()))?;
    }
    {
        let dir = dir.clone();
        let host = daemon.host.clone();
        undo.push(format!("remove {}", dir.display()), move || {
            remove_mounted_dir(host.as_ref(), &dir)
        });
    }
    let mut lower = daemon.images.lower_dirs(image);
    if let Some(userns) = userns {
        idmap::check_reachable(&dir, userns)?;
        lower = idmap::layers(daemon.host.as_ref(), &dir.join("lower"), &lower, userns)?;
        idmap::give_upper(daemon.host.as_ref(), &dir.join("upper"), userns)?;
    }
    daemon
        .host
        .mount_overlay(&lower, &dir.join("upper"), &dir.join("work"), &rootfs)?;
    {
        let rootfs = rootfs.clone();
        let host = daemon.host.clone();
        undo.push(format!("unmount {}", rootfs.display()), move || {
            host.unmount(&rootfs)
        });
    }
    Ok(rootfs)
}

/// What berthd mounted for a container: its rootfs and its image volumes,
/// and the pod's user namespace they are idmapped for.
struct Filesystems {
    rootfs: PathBuf,
    image_volumes: Vec<oci::ImageVolumeSource>,
    user_namespace: Option<oci::UserNamespaceInput>,
}

/// What [`write_bundle`] made.
struct Bundle {
    shim_config: ShimConfig,
    cgroups_path: String,
    log: Option<PathBuf>,
    /// Who the container's process runs as.
    user: crate::store::ProcessUser,
}

/// The OCI spec and the shim's config, written into the shim dir.
fn write_bundle(
    daemon: &Daemon,
    id: &str,
    sandbox: &SandboxContext,
    config: &ContainerConfig,
    image: &ImageRecord,
    fs: &Filesystems,
    undo: &mut Undo,
) -> Result<Bundle> {
    let user_namespace = fs.user_namespace.as_ref();
    let sdir = shim_dir(daemon, id);
    let log = log_path(sandbox, &config.log_path)?;
    let ns = sandbox.namespace_options();
    let pid = match ns.pid {
        berth_cri::v1::NamespaceMode::Node => oci::PidMode::Host,
        berth_cri::v1::NamespaceMode::Pod => match sandbox.pid_namespace(daemon.host.as_ref()) {
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
    let mut spec = oci::build_spec(&oci::SpecInput {
        container_id: id,
        config,
        sandbox: &sandbox.config,
        image: &process,
        rootfs: &fs.rootfs,
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
        user_namespace: user_namespace.cloned(),
        image_volumes: &fs.image_volumes,
    })?;
    // libcontainer fails on a missing working dir; runc creates it.
    let cwd_owner = user_namespace.and_then(|u| {
        let user = spec.process().as_ref()?.user();
        Some((
            u.mappings.host_uid(user.uid())?,
            u.mappings.host_gid(user.gid())?,
        ))
    });
    oci::ensure_cwd(&spec, cwd_owner)?;
    idmap::mounts(
        daemon.host.as_ref(),
        &container_dir(daemon, id),
        config,
        user_namespace,
        &mut spec,
    )?;
    let bundle = sdir.join("bundle");
    std::fs::create_dir_all(&bundle).context(|| format!("create {}", bundle.display()))?;
    {
        let sdir = sdir.clone();
        undo.push(format!("remove {}", sdir.display()), move || {
            remove_dir_all(&sdir)
        });
    }
    oci::write_spec(&spec, &bundle)?;
    let shim_config = ShimConfig {
        id: id.to_string(),
        bundle: bundle.display().to_string(),
        log_path: log
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        stdin: config.stdin,
        stdin_once: config.stdin_once,
        tty: config.tty,
        runtime_root: runtime_root(daemon).display().to_string(),
        memory_cgroup: memory_cgroup(daemon, &cgroups_path)?,
        container_helper: shim::container_helper_binary().display().to_string(),
    };
    let user = spec
        .process()
        .as_ref()
        .map(|p| crate::store::ProcessUser {
            uid: p.user().uid(),
            gid: p.user().gid(),
            supplemental_groups: p.user().additional_gids().clone().unwrap_or_default(),
        })
        .unwrap_or_default();
    Ok(Bundle {
        shim_config,
        cgroups_path,
        log,
        user,
    })
}

/// Launches the shim of a created container, which creates the container
/// (its processes wait for the start). A shim that failed half way may
/// have left a container or a monitor behind: they are discarded.
fn launch_shim(daemon: &Daemon, id: &str) -> Result<crate::process::ProcessIdentity> {
    let sdir = shim_dir(daemon, id);
    daemon.host.launch_shim(&sdir, id).inspect_err(|_| {
        discard_launch(daemon, id);
    })
}

/// Deletes what a launch of the shim of `id` made (its monitor and
/// container), keeping the bundle for another launch.
pub fn discard_launch(daemon: &Daemon, id: &str) {
    let sdir = shim_dir(daemon, id);
    let discarded = discard_shim(daemon.host.as_ref(), &sdir, &runtime_root(daemon), id)
        .and_then(|()| shim::remove_monitor_files(&sdir));
    if let Err(e) = discarded {
        tracing::warn!(container_id = %id, error = %crate::error::chain(&e), "could not discard the shim of a failed start");
    }
}

fn runtime_root(daemon: &Daemon) -> PathBuf {
    daemon.layout.runtime_root()
}

/// Removes a container dir once nothing is mounted in it any more (its
/// rootfs, idmapped layers and volumes are unmounted first).
fn remove_mounted_dir(host: &dyn Host, dir: &Path) -> Result<()> {
    host.unmount_all_under(dir)?;
    remove_dir_all(dir)
}

fn remove_dir_all(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// Asks a shim that answers to delete its container and exit; without a
/// shim, deletes what libcontainer may have left.
fn discard_shim(host: &dyn Host, sdir: &Path, runtime_root: &Path, id: &str) -> Result<()> {
    if host.shim_answers(sdir) {
        host.call_shim(
            sdir,
            shim_request::Request::Shutdown(Default::default()),
            SHIM_TIMEOUT,
        )?;
    }
    if runtime_root.join(id).exists() {
        host.delete_container(runtime_root, id)?;
    }
    Ok(())
}

fn event(kind: EventKind, record: &ContainerRecord) -> Event {
    Event {
        kind,
        id: record.id.clone(),
        sandbox_id: record.sandbox_id.clone(),
        at_ns: crate::timing::now_ns(),
        container: Some(record.clone()),
    }
}

/// Finds a container by id or unique id prefix; `None` when there is none.
pub fn lookup(daemon: &Daemon, id: &str) -> Result<Option<ContainerRecord>> {
    if id.is_empty() {
        return Err(Error::InvalidArgument("container id is required".into()));
    }
    if let Some(r) = daemon.store.get::<ContainerRecord>(id)? {
        return Ok(Some(r));
    }
    let mut matches: Vec<ContainerRecord> = daemon
        .store
        .list::<ContainerRecord>()?
        .into_iter()
        .filter(|c| c.id.starts_with(id))
        .collect();
    match matches.len() {
        0 | 1 => Ok(matches.pop()),
        _ => Err(Error::InvalidArgument(format!(
            "container id prefix {id} is ambiguous"
        ))),
    }
}

/// Finds a container by id or unique id prefix.
pub fn find(daemon: &Daemon, id: &str) -> Result<ContainerRecord> {
    lookup(daemon, id)?.ok_or_else(|| Error::Missing {
        kind: "container",
        id: id.to_string(),
    })
}

/// The record of container `id` (a full id), if it still exists.
fn get(daemon: &Daemon, id: &str) -> Result<ContainerRecord> {
    daemon
        .store
        .get::<ContainerRecord>(id)?
        .ok_or_else(|| Error::Missing {
            kind: "container",
            id: id.to_string(),
        })
}

/// Whether the container's shim is alive, by its recorded identity.
fn shim_alive(daemon: &Daemon, record: &ContainerRecord) -> bool {
    daemon.host.is_alive(&record.shim)
}

/// Whether the container has a shim that may record an exit or die: it
/// is created or running, and its shim was launched.
pub fn may_exit(record: &ContainerRecord) -> bool {
    matches!(
        record.state,
        ContainerState::Created | ContainerState::Running
    ) && record.has_shim()
}

fn apply_exit(record: &mut ContainerRecord, exit: &ExitRecord) {
    record.state = ContainerState::Exited;
    record.exit_code = exit.exit_code;
    record.finished_at_ns = exit.finished_at_ns;
    record.reason = exit.reason.clone();
    record.message = exit.message.clone();
    if record.started_at_ns == 0 {
        record.started_at_ns = exit.started_at_ns;
    }
}

fn apply_lost_shim(record: &mut ContainerRecord) {
    record.state = ContainerState::Unknown;
    record.reason = "Unknown".into();
    record.message = "the container's shim died".into();
}

/// The container as it is now: the record, with an exit the shim recorded
/// or the shim's death laid over it. Never writes: a change it finds is
/// handed to the exit watcher, which records it.
pub fn current(daemon: &Daemon, mut record: ContainerRecord) -> ContainerRecord {
    if !may_exit(&record) {
        return record;
    }
    let dir = shim_dir(daemon, &record.id);
    if let Some(exit) = shim::read_exit(&dir) {
        apply_exit(&mut record, &exit);
        daemon.exits.hint(&record.id);
    } else if !shim_alive(daemon, &record) {
        apply_lost_shim(&mut record);
        daemon.exits.hint(&record.id);
    }
    record
}

/// The container for ContainerStatus: [`current`], with a change it finds
/// recorded before the answer, so that lists (which answer from the store)
/// agree with it from then on. A failure to record is logged; the watcher
/// retries.
pub fn observed(daemon: &Daemon, record: ContainerRecord) -> ContainerRecord {
    let now = current(daemon, record.clone());
    if now.state == record.state {
        return now;
    }
    if let Err(e) = observe_exit(daemon, &record.id) {
        tracing::warn!(container_id = %record.id, error = %crate::error::chain(&e), "could not record the container's exit");
    }
    match daemon.store.get::<ContainerRecord>(&record.id) {
        Ok(Some(stored)) => current(daemon, stored),
        _ => now,
    }
}

/// ContainerStatus's container when it shows no change to record: only
/// memory, a file that is not there and `/proc` are read, so it is called
/// on the RPC's own thread. `None` when [`observed`] must record a change
/// first.
pub fn unchanged(daemon: &Daemon, id: &str) -> Result<Option<ContainerRecord>> {
    let record = find(daemon, id)?;
    let recorded = record.state;
    let now = current(daemon, record);
    Ok((now.state == recorded).then_some(now))
}

/// The one place a stored container changes after its creation: `change`
/// edits the record inside one store transaction (a removed container is
/// never written back) and names the events it makes, which are published
/// in commit order.
fn transition(
    daemon: &Daemon,
    id: &str,
    change: impl FnOnce(&mut ContainerRecord) -> Vec<EventKind>,
) -> Result<ContainerRecord> {
    daemon.publish_with(|| {
        let mut kinds = Vec::new();
        let record = daemon.store.update::<ContainerRecord>(id, |r| {
            kinds = change(r);
            Ok(())
        })?;
        let events = kinds.into_iter().map(|k| event(k, &record)).collect();
        Ok((record, events))
    })
}

/// Records an exit the shim wrote, or the shim's death, if the record
/// does not know it yet. Called by the exit watcher and by StopContainer.
pub fn observe_exit(daemon: &Daemon, id: &str) -> Result<()> {
    let Some(record) = daemon.store.get::<ContainerRecord>(id)? else {
        return Ok(());
    };
    if !may_exit(&record) {
        return Ok(());
    }
    let dir = shim_dir(daemon, id);
    if let Some(exit) = shim::read_exit(&dir) {
        transition(daemon, id, |r| match r.state {
            // It exited before StartContainer recorded the start.
            ContainerState::Created => {
                apply_exit(r, &exit);
                vec![EventKind::Started, EventKind::Stopped]
            }
            ContainerState::Running => {
                apply_exit(r, &exit);
                vec![EventKind::Stopped]
            }
            _ => Vec::new(),
        })?;
        tracing::info!(container_id = %id, exit_code = exit.exit_code, reason = %exit.reason, "container exited");
    } else if !shim_alive(daemon, &record) {
        tracing::warn!(container_id = %id, "shim is gone; container state unknown");
        transition(daemon, id, |r| {
            if matches!(r.state, ContainerState::Created | ContainerState::Running) {
                apply_lost_shim(r);
                vec![EventKind::Stopped]
            } else {
                Vec::new()
            }
        })?;
    }
    Ok(())
}

/// StartContainer: only from CREATED. Launches the shim, which creates
/// the container, then lets its process go. A failure leaves the container
/// EXITED with reason StartError (as containerd does) and no shim.
pub fn start(daemon: &Daemon, guard: &ContainerGuard) -> Result<()> {
    let record = current(daemon, get(daemon, &guard.container_id)?);
    tracing::Span::current().record("container_id", record.id.as_str());
    if record.state != ContainerState::Created {
        return Err(Error::WrongState {
            kind: "container",
            id: record.id.clone(),
            state: format!("{:?}", record.state).to_lowercase(),
            wanted: "only a created container can be started",
        });
    }
    let launched = if record.has_shim() {
        // A record from before shims were launched at start.
        None
    } else {
        sandbox::require_ready(
            &sandbox::get(daemon, &record.sandbox_id)?,
            "containers are started only in a ready pod",
        )?;
        let mut phases = crate::timing::Phases::start("StartContainer");
        let shim = launch_shim(daemon, &record.id).or_else(|e| start_failed(daemon, &record, e))?;
        phases.mark("shim");
        phases.log();
        Some(shim)
    };
    let dir = shim_dir(daemon, &record.id);
    if let Err(e) = daemon.host.call_shim(
        &dir,
        shim_request::Request::Start(Default::default()),
        SHIM_TIMEOUT,
    ) {
        if launched.is_none() {
            return Err(e);
        }
        discard_launch(daemon, &record.id);
        return start_failed(daemon, &record, e);
    }
    let (started_at_ns, pid) = match daemon.host.call_shim(
        &dir,
        shim_request::Request::State(Default::default()),
        SHIM_TIMEOUT,
    ) {
        Ok(shim_response::Response::State(s)) => (s.started_at_ns, s.pid),
        _ => (0, 0),
    };
    // The commit point of a launch: until the record names the shim, a
    // restart discards it (recovery) and the container is CREATED again.
    let record = transition(daemon, &record.id, |r| {
        if let Some(shim) = &launched {
            r.shim = *shim;
        }
        if r.state != ContainerState::Created {
            // The exit watcher recorded a fast exit (and its events) first.
            return Vec::new();
        }
        r.state = ContainerState::Running;
        r.started_at_ns = if started_at_ns > 0 {
            started_at_ns
        } else {
            crate::timing::now_ns()
        };
        r.pid = pid;
        vec![EventKind::Started]
    })?;
    if launched.is_some() {
        daemon.exits.watch(&dir, &record.id, &record.shim);
    }
    // It may have exited already (a command that finishes at once).
    observe_exit(daemon, &record.id)
}

/// Records a start that failed (its launch discarded) and returns its error.
fn start_failed<T>(daemon: &Daemon, record: &ContainerRecord, error: Error) -> Result<T> {
    let message = crate::error::chain(&error);
    let recorded = end_unstarted(
        daemon,
        &record.id,
        START_ERROR_EXIT_CODE,
        "StartError",
        message,
    );
    if let Err(e) = recorded {
        tracing::warn!(container_id = %record.id, error = %crate::error::chain(&e), "could not record the failed start");
    }
    Err(error)
}

/// Records a CREATED container that never ran as EXITED, with the end the
/// caller names; a container no longer CREATED is left as it is.
fn end_unstarted(
    daemon: &Daemon,
    id: &str,
    exit_code: i32,
    reason: &str,
    message: String,
) -> Result<ContainerRecord> {
    transition(daemon, id, |r| {
        if r.state != ContainerState::Created {
            return Vec::new();
        }
        r.state = ContainerState::Exited;
        r.exit_code = exit_code;
        r.finished_at_ns = crate::timing::now_ns();
        r.reason = reason.into();
        r.message = message;
        vec![EventKind::Stopped]
    })
}

/// The exit code of a container that failed to start (containerd's).
const START_ERROR_EXIT_CODE: i32 = 128;

/// The exit code of a container stopped before it was started: what the
/// SIGKILL of its waiting process would give (CRI-O's, and Berth's when the
/// shim was launched at create).
const STOPPED_UNSTARTED_EXIT_CODE: i32 = 128 + libc::SIGKILL;

/// The signal that stops a container: the one its CRI config names (known
/// valid: `check_create` checked it), else its image's StopSignal, else
/// SIGTERM.
fn resolve_stop_signal(config: &ContainerConfig, image: &ImageRecord) -> i32 {
    signal::from_cri(config.stop_signal)
        .ok()
        .flatten()
        .unwrap_or_else(|| image_stop_signal(Some(image)))
}

/// The image's StopSignal, else SIGTERM.
fn image_stop_signal(image: Option<&ImageRecord>) -> i32 {
    image
        .and_then(|i| signal::parse(&i.process_config().stop_signal))
        .unwrap_or(libc::SIGTERM)
}

/// The signal that asks this container to stop; records made before it was
/// resolved at create (whose configs had no stop_signal) look up the
/// image's now.
fn stop_signal(daemon: &Daemon, record: &ContainerRecord) -> i32 {
    if record.stop_signal > 0 {
        return record.stop_signal;
    }
    let image = daemon
        .store
        .get::<ImageRecord>(&record.image_id)
        .ok()
        .flatten();
    image_stop_signal(image.as_ref())
}

/// Waits until the shim records the exit, up to `timeout`.
fn wait_exit(daemon: &Daemon, dir: &Path, record: &ContainerRecord, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if shim::read_exit(dir).is_some() {
            return true;
        }
        if Instant::now() >= deadline || !shim_alive(daemon, record) {
            return shim::read_exit(dir).is_some();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// StopContainer: the stop signal, then SIGKILL after `timeout`.
/// Idempotent on an exited container.
pub fn stop(daemon: &Daemon, guard: &ContainerGuard, timeout_secs: i64) -> Result<()> {
    let record = get(daemon, &guard.container_id)?;
    tracing::Span::current().record("container_id", record.id.as_str());
    stop_record(daemon, record, timeout_secs)
}

/// StopContainer's work, for a caller that holds the container (or its
/// whole pod).
fn stop_record(daemon: &Daemon, record: ContainerRecord, timeout_secs: i64) -> Result<()> {
    let record = current(daemon, record);
    if record.state == ContainerState::Created && !record.has_shim() {
        // Nothing runs yet: it just never will.
        end_unstarted(
            daemon,
            &record.id,
            STOPPED_UNSTARTED_EXIT_CODE,
            "Error",
            "stopped before it was started".into(),
        )?;
        return Ok(());
    }
    let dir = shim_dir(daemon, &record.id);
    match record.state {
        ContainerState::Exited => return observe_exit(daemon, &record.id),
        ContainerState::Unknown => {
            if let Err(e) = daemon
                .host
                .delete_container(&runtime_root(daemon), &record.id)
            {
                tracing::warn!(container_id = %record.id, error = %crate::error::chain(&e), "could not delete the orphaned container");
            }
            return observe_exit(daemon, &record.id);
        }
        ContainerState::Created | ContainerState::Running => {}
    }
    if timeout_secs > 0 {
        let signal = stop_signal(daemon, &record);
        kill(daemon, &dir, &record, signal)?;
        if wait_exit(
            daemon,
            &dir,
            &record,
            Duration::from_secs(timeout_secs as u64),
        ) {
            return observe_exit(daemon, &record.id);
        }
        tracing::info!(container_id = %record.id, "stop timeout passed; killing");
    }
    kill(daemon, &dir, &record, libc::SIGKILL)?;
    if !wait_exit(daemon, &dir, &record, Duration::from_secs(10)) && shim_alive(daemon, &record) {
        return Err(Error::Internal(format!(
            "container {} did not exit after SIGKILL",
            record.id
        )));
    }
    observe_exit(daemon, &record.id)
}

fn kill(daemon: &Daemon, dir: &Path, record: &ContainerRecord, signal: i32) -> Result<()> {
    match daemon.host.call_shim(
        dir,
        shim_request::Request::Kill(berth_proto::shim::KillRequest { signal, all: false }),
        SHIM_TIMEOUT,
    ) {
        Ok(_) => Ok(()),
        // The shim died under us: observe_exit reports it.
        Err(Error::ShimUnreachable { .. }) if !shim_alive(daemon, record) => Ok(()),
        Err(e) => Err(e),
    }
}

/// RemoveContainer: stops it and deletes its record; the shim's delete,
/// the rootfs and the dirs follow in the background (`cleanup`). Keeps the
/// log file.
pub fn remove(daemon: &Daemon, guard: &ContainerGuard) -> Result<()> {
    match daemon.store.get::<ContainerRecord>(&guard.container_id)? {
        Some(record) => remove_record(daemon, record, Cleanup::Later),
        // Removed while this call waited its turn.
        None => Ok(()),
    }
}

/// When a removal deletes the container's remains.
#[derive(Clone, Copy)]
enum Cleanup {
    /// After the record is gone, in the background (RemoveContainer).
    Later,
    /// Before the record goes, so that a failure keeps it for a retry
    /// (RemovePodSandbox, whose own cgroup and dirs come next).
    Now,
}

/// RemoveContainer's work, for a caller that holds the container (or its
/// whole pod).
fn remove_record(daemon: &Daemon, record: ContainerRecord, cleanup: Cleanup) -> Result<()> {
    tracing::Span::current().record("container_id", record.id.as_str());
    let mut phases = crate::timing::Phases::start("RemoveContainer");
    let record = current(daemon, record);
    if matches!(
        record.state,
        ContainerState::Created | ContainerState::Running
    ) {
        match stop_record(daemon, record.clone(), 0) {
            // Killed, but the exit could not be recorded on a full disk: the
            // record goes anyway (deletes have a reserve), freeing space.
            Err(Error::NoSpace { .. }) => {
                tracing::warn!(container_id = %record.id, "disk full: removing the container without recording its exit")
            }
            other => other?,
        }
    }
    phases.mark("stop");
    let discard = discard_job(daemon, &record.id);
    let later = match cleanup {
        Cleanup::Now => {
            discard()?;
            phases.mark("shim+rootfs+dirs");
            None
        }
        Cleanup::Later => Some(discard),
    };
    // The commit point: from here on what is left on disk is the remains of
    // a container without a record, which start-up recovery discards.
    daemon.publish_with(|| {
        daemon.store.delete::<ContainerRecord>(&record.id)?;
        Ok(((), vec![event(EventKind::Deleted, &record)]))
    })?;
    phases.mark("store");
    daemon.names.release(&record.id);
    daemon.cpu_samples.forget(&record.id);
    daemon.layer_usage.forget(&record.id);
    if let Some(discard) = later {
        // Image garbage collection may now delete the snapshots under the
        // rootfs: the container is dead, and its overlay keeps what it has
        // open until the unmount.
        daemon
            .cleanups
            .spawn(&record.id, &record.sandbox_id, discard);
    }
    phases.log();
    tracing::info!(container_id = %record.id, "container removed");
    Ok(())
}

/// Stops every container of a pod, for StopPodSandbox (which holds the pod).
pub fn stop_all(daemon: &Daemon, sandbox_id: &str) -> Result<()> {
    for c in of_sandbox(daemon, sandbox_id)? {
        stop_record(daemon, c, 0)?;
    }
    Ok(())
}

/// Removes every container of a pod, for RemovePodSandbox (which holds the
/// pod).
pub fn remove_all(daemon: &Daemon, sandbox_id: &str) -> Result<()> {
    for c in of_sandbox(daemon, sandbox_id)? {
        remove_record(daemon, c, Cleanup::Now)?;
    }
    daemon.cleanups.wait_for_sandbox(sandbox_id);
    Ok(())
}

/// Removes what an unfinished create of `id` left: its shim (asked to
/// delete the container), the libcontainer state, the rootfs mount, dirs.
pub fn discard_unrecorded(daemon: &Daemon, id: &str) -> Result<()> {
    discard_job(daemon, id)()
}

/// Deletes container `id` from disk, as a job that needs no daemon: its
/// shim (asked to delete the container, or libcontainer's state deleted
/// without it), the rootfs and idmapped mounts, the container and shim dirs.
fn discard_job(daemon: &Daemon, id: &str) -> impl FnOnce() -> Result<()> + Send + 'static {
    let host = daemon.host.clone();
    let sdir = shim_dir(daemon, id);
    let runtime_root = runtime_root(daemon);
    let cdir = container_dir(daemon, id);
    let id = id.to_string();
    move || {
        discard_shim(host.as_ref(), &sdir, &runtime_root, &id)?;
        remove_mounted_dir(host.as_ref(), &cdir)?;
        remove_dir_all(&sdir)
    }
}

/// UpdateContainerResources: the new limits go into the cgroup and into the
/// stored config, so ContainerStatus reports them.
pub fn update_resources(
    daemon: &Daemon,
    guard: &ContainerGuard,
    new: berth_cri::v1::LinuxContainerResources,
) -> Result<()> {
    let record = current(daemon, get(daemon, &guard.container_id)?);
    tracing::Span::current().record("container_id", record.id.as_str());
    if !matches!(
        record.state,
        ContainerState::Created | ContainerState::Running
    ) {
        return Err(Error::WrongState {
            kind: "container",
            id: record.id.clone(),
            state: format!("{:?}", record.state).to_lowercase(),
            wanted: "resources are updated only while it runs",
        });
    }
    let limits = resources::from_cri(&new)?;
    daemon.cgroups.check(&record.cgroups_path, &limits)?;
    if record.has_shim() {
        daemon.host.apply_resources(&record.cgroups_path, &limits)?;
    } else {
        // No cgroup yet: the spec the launch creates it from gets them.
        oci::update_resources(&shim_dir(daemon, &record.id).join("bundle"), &new)?;
    }
    let mut config: ContainerConfig =
        serde_json::from_str(&record.config_json).map_err(|source| Error::Json {
            what: format!("decode the stored config of container {}", record.id),
            source,
        })?;
    config.linux.get_or_insert_with(Default::default).resources = Some(new);
    let config_json = serde_json::to_string(&config).map_err(|source| Error::Json {
        what: format!("encode the config of {}", record.id),
        source,
    })?;
    transition(daemon, &record.id, |r| {
        r.config_json = config_json;
        Vec::new()
    })?;
    Ok(())
}

/// Resource usage of a container; `None` once it is not running.
pub fn stats(daemon: &Daemon, record: &ContainerRecord) -> stats::Stats {
    stats::read(
        &daemon.cgroups,
        &record.cgroups_path,
        &record.id,
        &container_dir(daemon, &record.id).join("upper"),
        &daemon.cpu_samples,
        &daemon.layer_usage,
    )
}

/// ContainerStats of container `id` (a prefix will do). NotFound also when
/// it was removed while it was read.
pub fn stats_of(daemon: &Daemon, id: &str) -> Result<(ContainerRecord, stats::Stats)> {
    let record = current(daemon, find(daemon, id)?);
    tracing::Span::current().record("container_id", record.id.as_str());
    let s = stats(daemon, &record);
    get(daemon, &record.id)?;
    Ok((record, s))
}

/// ListContainerStats: the running containers `wanted` keeps (kubelet
/// asks for those), with their usage. A container removed while it was
/// read is left out: what was read of it may be partial.
pub fn list_stats(
    daemon: &Daemon,
    wanted: impl Fn(&ContainerRecord) -> bool,
) -> Result<Vec<(ContainerRecord, stats::Stats)>> {
    let running: Vec<ContainerRecord> = daemon
        .store
        .list::<ContainerRecord>()?
        .into_iter()
        .filter(|r| wanted(r) && r.state == ContainerState::Running)
        .collect();
    let read = stats::read_many(running, |r| {
        let s = stats(daemon, &r);
        daemon
            .store
            .contains::<ContainerRecord>(&r.id)
            .map(|kept| kept.then_some((r, s)))
    });
    read.into_iter().filter_map(Result::transpose).collect()
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

/// ExecSync run by the shim itself: for shims started before streaming
/// exec existed (berthd was upgraded under them).
pub fn exec_sync_in_shim(
    daemon: &Daemon,
    id: &str,
    cmd: Vec<String>,
    timeout_secs: i64,
) -> Result<(Vec<u8>, Vec<u8>, i32)> {
    let record = current(daemon, find(daemon, id)?);
    tracing::Span::current().record("container_id", record.id.as_str());
    if record.state != ContainerState::Running {
        return Err(not_running(&record));
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
    let resp = daemon.host.call_shim(
        &dir,
        shim_request::Request::ExecSync(berth_proto::shim::ExecSyncRequest {
            args: cmd,
            timeout_secs: timeout_secs.max(0),
        }),
        wait,
    )?;
    match resp {
        shim_response::Response::ExecSync(r) => Ok((r.stdout, r.stderr, r.exit_code)),
        _ => Err(Error::Internal("unexpected answer to exec".into())),
    }
}

fn not_running(record: &ContainerRecord) -> Error {
    Error::WrongState {
        kind: "container",
        id: record.id.clone(),
        state: format!("{:?}", record.state).to_lowercase(),
        wanted: "it must be running",
    }
}

/// ReopenContainerLog.
pub fn reopen_log(daemon: &Daemon, guard: &ContainerGuard) -> Result<()> {
    let record = current(daemon, get(daemon, &guard.container_id)?);
    if record.state != ContainerState::Running {
        return Err(not_running(&record));
    }
    daemon.host.call_shim(
        &shim_dir(daemon, &record.id),
        shim_request::Request::ReopenLog(Default::default()),
        SHIM_TIMEOUT,
    )?;
    Ok(())
}
