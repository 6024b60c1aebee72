//! Pod sandboxes: the shared namespaces of a pod, pinned as files (no pause
//! container), the pod's hostname, hosts and resolv.conf files, its sysctls
//! and its cgroup parent.

pub mod files;
pub mod infra;
pub mod metrics;
pub mod namespaces;
pub mod stats;

use std::path::{Path, PathBuf};

use berth_cri::v1::{NamespaceMode, PodSandboxConfig};

use crate::daemon::Daemon;
use crate::error::{Error, IoContext, Result};
use crate::events::{Event, EventKind};
use crate::names;
use crate::process::ProcessIdentity;
use crate::store::{KeyValue, SandboxRecord, SandboxState};
use crate::undo::Undo;
use namespaces::{Kind, NamespaceSetup};

/// What a container of this sandbox joins and mounts.
#[derive(Debug, Clone)]
pub struct SandboxContext {
    pub record: SandboxRecord,
    pub config: PodSandboxConfig,
    pub dir: PathBuf,
}

impl SandboxContext {
    pub fn namespace_path(&self, kind: Kind) -> Option<PathBuf> {
        let p = self.dir.join("ns").join(kind.name());
        p.exists().then_some(p)
    }

    pub fn file(&self, name: &str) -> Option<PathBuf> {
        let p = self.dir.join(name);
        p.exists().then_some(p)
    }

    /// The pod's shared PID namespace, when it has one and its infra
    /// process lives.
    pub fn pid_namespace(&self, host: &dyn crate::host::Host) -> Option<PathBuf> {
        host.is_alive(&self.record.infra)
            .then(|| PathBuf::from(format!("/proc/{}/ns/pid", self.record.infra.pid)))
    }

    /// The pod's user namespace mappings (`None` without one), as checked
    /// when the pod was made.
    pub fn user_mappings(&self) -> Result<Option<crate::userns::IdMappings>> {
        crate::userns::pod_mappings(&self.config)
    }

    /// The pod's user namespace as its containers join it.
    pub fn user_namespace(&self) -> Result<Option<crate::oci::UserNamespaceInput>> {
        Ok(self
            .user_mappings()?
            .map(|mappings| crate::oci::UserNamespaceInput {
                path: self.dir.join("ns").join(Kind::User.name()),
                mappings,
            }))
    }

    pub fn namespace_options(&self) -> NamespaceOptionsView {
        NamespaceOptionsView::of(&self.config)
    }
}

/// The pod's namespace modes, defaulted as kubelet means them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceOptionsView {
    pub network: NamespaceMode,
    pub pid: NamespaceMode,
    pub ipc: NamespaceMode,
}

impl NamespaceOptionsView {
    pub fn of(config: &PodSandboxConfig) -> Self {
        let opts = config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.as_ref());
        let mode =
            |v: Option<i32>| NamespaceMode::try_from(v.unwrap_or(0)).unwrap_or(NamespaceMode::Pod);
        NamespaceOptionsView {
            network: mode(opts.map(|o| o.network)),
            pid: mode(opts.map(|o| o.pid)),
            ipc: mode(opts.map(|o| o.ipc)),
        }
    }
}

/// Checks and normalizes the pod's sysctls against its namespaces.
pub fn validate_sysctls(
    sysctls: &std::collections::HashMap<String, String>,
    own_net: bool,
    own_ipc: bool,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (key, value) in sysctls {
        let key = key.replace('/', ".");
        if key.split('.').any(|p| {
            p.is_empty()
                || p == ".."
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }) {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key:?} is malformed"
            )));
        }
        let needs_net = key.starts_with("net.");
        let needs_ipc = key.starts_with("kernel.shm")
            || key.starts_with("kernel.msg")
            || key == "kernel.sem"
            || key.starts_with("fs.mqueue.");
        if !needs_net && !needs_ipc {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key:?} is not namespaced; only net.*, kernel.shm*, kernel.msg*, kernel.sem and fs.mqueue.* may be set for a pod"
            )));
        }
        if needs_net && !own_net {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key:?} cannot be set in a pod that uses the host network"
            )));
        }
        if needs_ipc && !own_ipc {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key:?} cannot be set in a pod that uses the host IPC namespace"
            )));
        }
        if value.contains('\n') {
            return Err(Error::InvalidArgument(format!(
                "sysctl {key:?} value contains a newline"
            )));
        }
        out.push((key, value.clone()));
    }
    out.sort();
    Ok(out)
}

/// What a RunPodSandbox request asks for, checked.
struct RunRequest {
    meta: berth_cri::v1::PodSandboxMetadata,
    own_net: bool,
    own_ipc: bool,
    shared_pid: bool,
    sysctls: Vec<(String, String)>,
    user: Option<crate::userns::IdMappings>,
}

fn check_run(config: &PodSandboxConfig, runtime_handler: &str) -> Result<RunRequest> {
    if !runtime_handler.is_empty() {
        return Err(Error::NotFound(format!(
            "runtime handler {runtime_handler:?} is not configured (only the default handler \"\" is)"
        )));
    }
    let meta = config
        .metadata
        .clone()
        .ok_or_else(|| Error::InvalidArgument("sandbox metadata is required".into()))?;
    names::check_name("sandbox name", &meta.name)?;
    names::check_name("sandbox namespace", &meta.namespace)?;
    names::check_name("sandbox uid", &meta.uid)?;
    names::check_labels("sandbox", &config.labels, &config.annotations)?;
    crate::network::check_port_mappings(&config.port_mappings)?;
    let ns = NamespaceOptionsView::of(config);
    let own_net = ns.network != NamespaceMode::Node;
    let own_ipc = ns.ipc != NamespaceMode::Node;
    let sysctls = validate_sysctls(
        &config
            .linux
            .as_ref()
            .map(|l| l.sysctls.clone())
            .unwrap_or_default(),
        own_net,
        own_ipc,
    )?;
    if ns.pid == NamespaceMode::Target {
        return Err(Error::InvalidArgument(
            "pid namespace mode TARGET is for containers, not pods".into(),
        ));
    }
    let log_dir = Path::new(&config.log_directory);
    if !config.log_directory.is_empty()
        && (!log_dir.is_absolute()
            || log_dir
                .components()
                .any(|c| c == std::path::Component::ParentDir))
    {
        return Err(Error::InvalidArgument(format!(
            "log_directory {:?} must be an absolute path without '..'",
            config.log_directory
        )));
    }
    let user = crate::userns::pod_mappings(config)?;
    Ok(RunRequest {
        meta,
        own_net,
        own_ipc,
        shared_pid: ns.pid == NamespaceMode::Pod,
        sysctls,
        user,
    })
}

fn event(kind: EventKind, id: &str) -> Event {
    Event {
        kind,
        id: id.to_string(),
        sandbox_id: id.to_string(),
        at_ns: crate::timing::now_ns(),
        container: None,
    }
}

/// RunPodSandbox. Every step registers its undo; on failure they run in
/// reverse and nothing is left.
pub fn run(daemon: &Daemon, config: PodSandboxConfig, runtime_handler: &str) -> Result<String> {
    let request = check_run(&config, runtime_handler)?;
    if request.user.is_some() && !daemon.user_namespaces {
        return Err(Error::FailedPrecondition(format!(
            "pods with a user namespace need idmapped mounts, which the filesystem of {} does \
             not support",
            daemon.config.root_dir.display()
        )));
    }
    let meta = &request.meta;
    let id = names::new_id();
    let reservation = daemon.names.reserve(
        &names::sandbox_key(&meta.namespace, &meta.name, &meta.uid, meta.attempt),
        &id,
    )?;
    tracing::Span::current().record("pod_id", id.as_str());

    let dir = daemon.layout.sandbox(&id);
    let mut phases = crate::timing::Phases::start("RunPodSandbox");
    let mut undo = Undo::new(format!("pod sandbox {id}"));
    let result = (|| {
        make_dir(&dir, &mut undo)?;
        let hostname = if request.own_net {
            config.hostname.clone()
        } else {
            String::new()
        };
        pin_namespaces(daemon, &dir, &request, &hostname, &mut undo)?;
        phases.mark("namespaces");
        let pod_ips = if request.own_net {
            add_network(daemon, &id, &dir, &config, &mut undo)?
        } else {
            Vec::new()
        };
        phases.mark("network");
        write_files(&dir, &config, &request, &hostname, &pod_ips)?;
        phases.mark("files");
        let (cgroup_parent, created_cgroup) = make_cgroup(daemon, &id, &dir, &config, &mut undo)?;
        let infra = if request.shared_pid {
            let userns = request
                .user
                .as_ref()
                .map(|_| dir.join("ns").join(Kind::User.name()));
            start_infra(daemon, &dir, &cgroup_parent, userns.as_deref(), &mut undo)?
        } else {
            ProcessIdentity::default()
        };
        phases.mark("cgroup+infra");
        let record = SandboxRecord {
            id: id.clone(),
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            uid: meta.uid.clone(),
            attempt: meta.attempt,
            state: SandboxState::Ready,
            created_at_ns: crate::timing::now_ns(),
            runtime_handler: runtime_handler.to_string(),
            labels: KeyValue::sorted(&config.labels),
            annotations: KeyValue::sorted(&config.annotations),
            log_directory: config.log_directory.clone(),
            config_json: serde_json::to_string(&config).map_err(|source| Error::Json {
                what: format!("encode the config of {id}"),
                source,
            })?,
            cgroup_parent,
            created_cgroup,
            hostname,
            pod_ips,
            infra_pid: infra.pid,
            infra,
            reason: String::new(),
        };
        // The record is the commit point.
        daemon.publish_with(|| {
            daemon.store.insert_new(&record)?;
            Ok((
                (),
                vec![
                    event(EventKind::Created, &id),
                    event(EventKind::Started, &id),
                ],
            ))
        })?;
        phases.mark("store");
        Ok(())
    })();
    phases.log();
    match result {
        Ok(()) => {
            undo.forget();
            reservation.keep();
            tracing::info!(pod_id = %id, name = %meta.name, namespace = %meta.namespace, "sandbox ready");
            Ok(id)
        }
        Err(e) => {
            undo.run();
            Err(e)
        }
    }
}

fn make_dir(dir: &Path, undo: &mut Undo) -> Result<()> {
    std::fs::create_dir_all(dir.join("ns")).context(|| format!("create {}", dir.display()))?;
    let dir = dir.to_path_buf();
    undo.push(format!("remove {}", dir.display()), move || {
        remove_dir_all(&dir)
    });
    Ok(())
}

fn pin_namespaces(
    daemon: &Daemon,
    dir: &Path,
    request: &RunRequest,
    hostname: &str,
    undo: &mut Undo,
) -> Result<()> {
    let mut kinds = Vec::new();
    if request.own_net {
        kinds.push(Kind::Net);
        kinds.push(Kind::Uts);
    }
    if request.own_ipc {
        kinds.push(Kind::Ipc);
    }
    // Each pin is undone even if a later one fails: create() unpins what it
    // pinned before failing.
    let pinned = daemon.host.pin_namespaces(
        &dir.join("ns"),
        NamespaceSetup {
            kinds,
            hostname: (!hostname.is_empty()).then(|| hostname.to_string()),
            sysctls: request.sysctls.clone(),
            user: request.user.clone(),
        },
    )?;
    for (_, path) in pinned {
        let host = daemon.host.clone();
        undo.push(format!("unpin {}", path.display()), move || {
            host.unpin_namespace(&path)
        });
    }
    Ok(())
}

fn add_network(
    daemon: &Daemon,
    id: &str,
    dir: &Path,
    config: &PodSandboxConfig,
    undo: &mut Undo,
) -> Result<Vec<String>> {
    // Registered first: a failed ADD may have made part of the network, and
    // teardown is a no-op without the cache ADD writes before it starts.
    {
        let host = daemon.host.clone();
        let id = id.to_string();
        undo.push(format!("tear down the network of {id}"), move || {
            host.network_teardown(&id)
        });
    }
    daemon
        .host
        .network_setup(id, &dir.join("ns").join("net"), config)
}

/// The hostname, hosts and resolv.conf files the containers bind-mount, and
/// the pod's log directory.
fn write_files(
    dir: &Path,
    config: &PodSandboxConfig,
    request: &RunRequest,
    hostname: &str,
    pod_ips: &[String],
) -> Result<()> {
    if request.own_net {
        let name = if hostname.is_empty() {
            request.meta.name.clone()
        } else {
            hostname.to_string()
        };
        files::write(&dir.join("hostname"), &format!("{name}\n"))?;
        files::write(&dir.join("hosts"), &files::hosts(&name, pod_ips))?;
    } else {
        files::copy_host("/etc/hosts", &dir.join("hosts"))?;
        files::write(&dir.join("hostname"), &format!("{}\n", host_hostname()))?;
    }
    match files::resolv_conf(config.dns_config.as_ref()) {
        Some(text) if request.own_net => files::write(&dir.join("resolv.conf"), &text)?,
        _ => files::copy_host("/etc/resolv.conf", &dir.join("resolv.conf"))?,
    }
    if !config.log_directory.is_empty() {
        let log_dir = Path::new(&config.log_directory);
        std::fs::create_dir_all(log_dir).context(|| format!("create {}", log_dir.display()))?;
    }
    Ok(())
}

/// The pod cgroup. A breadcrumb naming it is written before it is made, so
/// start-up recovery finds it should berthd die before the record exists;
/// if the breadcrumb cannot be written, nothing is made.
fn make_cgroup(
    daemon: &Daemon,
    id: &str,
    dir: &Path,
    config: &PodSandboxConfig,
    undo: &mut Undo,
) -> Result<(String, bool)> {
    let cgroup_parent = config
        .linux
        .as_ref()
        .map(|l| l.cgroup_parent.clone())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| format!("/berth/{id}"));
    let breadcrumb = dir.join("cgroup");
    std::fs::write(&breadcrumb, &cgroup_parent)
        .context(|| format!("write {}", breadcrumb.display()))?;
    let created = daemon.host.create_cgroup(&cgroup_parent)?;
    if created {
        let host = daemon.host.clone();
        let path = cgroup_parent.clone();
        undo.push(format!("remove cgroup {path}"), move || {
            host.remove_cgroup(&path)
        });
    } else {
        // Not ours (kubelet made it): recovery must leave it alone.
        std::fs::remove_file(&breadcrumb).context(|| format!("remove {}", breadcrumb.display()))?;
    }
    Ok((cgroup_parent, created))
}

/// The infra process of a shared PID namespace, inside the pod cgroup (on
/// v2 in a leaf of its own under it, see [`berth_cgroup::INFRA_LEAF`]).
fn start_infra(
    daemon: &Daemon,
    dir: &Path,
    cgroup_parent: &str,
    userns: Option<&Path>,
    undo: &mut Undo,
) -> Result<ProcessIdentity> {
    let cgroup = daemon.cgroups.infra_path(cgroup_parent);
    // Made before the process, so the undo stack stops it before the
    // leaf is removed. Its breadcrumb comes first: the pod cgroup may be
    // kubelet's, which recovery leaves alone, but the leaf is Berth's.
    if cgroup != cgroup_parent {
        let breadcrumb = dir.join("infra-cgroup");
        std::fs::write(&breadcrumb, &cgroup)
            .context(|| format!("write {}", breadcrumb.display()))?;
    }
    if cgroup != cgroup_parent && daemon.host.create_cgroup(&cgroup)? {
        let host = daemon.host.clone();
        let path = cgroup.clone();
        undo.push(format!("remove cgroup {path}"), move || {
            host.remove_cgroup(&path)
        });
    }
    let infra = daemon.host.start_infra(&dir.join("infra.log"), userns)?;
    {
        let host = daemon.host.clone();
        undo.push(format!("stop infra process {}", infra.pid), move || {
            host.stop_infra(&infra);
            Ok(())
        });
    }
    // For start-up recovery, should berthd die before the record.
    let breadcrumb = dir.join("infra.pid");
    std::fs::write(&breadcrumb, infra.to_breadcrumb())
        .context(|| format!("write {}", breadcrumb.display()))?;
    // Inside the pod's cgroup, so pod limits apply to it too.
    daemon.host.add_to_cgroup(&cgroup, infra.pid)?;
    Ok(infra)
}

fn remove_dir_all(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

fn host_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Finds a sandbox by full id or unique prefix; `None` when there is none.
pub fn lookup(daemon: &Daemon, id: &str) -> Result<Option<SandboxRecord>> {
    if id.is_empty() {
        return Err(Error::InvalidArgument("pod sandbox id is required".into()));
    }
    if let Some(r) = daemon.store.get::<SandboxRecord>(id)? {
        return Ok(Some(r));
    }
    let mut matches: Vec<SandboxRecord> = daemon
        .store
        .list::<SandboxRecord>()?
        .into_iter()
        .filter(|s| s.id.starts_with(id))
        .collect();
    match matches.len() {
        0 | 1 => Ok(matches.pop()),
        _ => Err(Error::InvalidArgument(format!(
            "pod sandbox id prefix {id} is ambiguous"
        ))),
    }
}

/// Finds a sandbox by full id or unique prefix.
pub fn find(daemon: &Daemon, id: &str) -> Result<SandboxRecord> {
    lookup(daemon, id)?.ok_or_else(|| Error::Missing {
        kind: "pod sandbox",
        id: id.to_string(),
    })
}

/// The record of sandbox `id` (a full id).
pub fn get(daemon: &Daemon, id: &str) -> Result<SandboxRecord> {
    daemon
        .store
        .get::<SandboxRecord>(id)?
        .ok_or_else(|| Error::Missing {
            kind: "pod sandbox",
            id: id.to_string(),
        })
}

/// WrongState unless the pod is READY; `wanted` says what needs it.
pub fn require_ready(record: &SandboxRecord, wanted: &'static str) -> Result<()> {
    if record.state == SandboxState::Ready {
        return Ok(());
    }
    Err(Error::WrongState {
        kind: "pod sandbox",
        id: record.id.clone(),
        state: "not ready".into(),
        wanted,
    })
}

pub fn context(daemon: &Daemon, record: SandboxRecord) -> Result<SandboxContext> {
    let config: PodSandboxConfig =
        serde_json::from_str(&record.config_json).map_err(|source| Error::Json {
            what: format!("decode the stored config of pod sandbox {}", record.id),
            source,
        })?;
    Ok(SandboxContext {
        dir: daemon.layout.sandbox(&record.id),
        record,
        config,
    })
}

/// What is broken in a READY sandbox, checked against the kernel: a pinned
/// namespace gone, the infra process gone, the network gone.
pub fn broken(daemon: &Daemon, ctx: &SandboxContext) -> Option<String> {
    let ns = ctx.namespace_options();
    let mut kinds = Vec::new();
    if ns.network != NamespaceMode::Node {
        kinds.extend([Kind::Net, Kind::Uts]);
    }
    if ns.ipc != NamespaceMode::Node {
        kinds.push(Kind::Ipc);
    }
    if ctx.user_mappings().ok().flatten().is_some() {
        kinds.push(Kind::User);
    }
    for kind in kinds {
        let path = ctx.dir.join("ns").join(kind.name());
        if !daemon.host.is_pinned(&path) {
            return Some(format!("the pod's {} namespace is gone", kind.name()));
        }
    }
    if ns.pid == NamespaceMode::Pod && !daemon.host.is_alive(&ctx.record.infra) {
        return Some("the infra process holding the pod's PID namespace is gone".into());
    }
    if ns.network != NamespaceMode::Node {
        return daemon.host.network_check(
            &ctx.record.id,
            &ctx.dir.join("ns").join("net"),
            &ctx.record.pod_ips,
        );
    }
    None
}

/// Marks the sandbox not ready (with why), publishing the change once.
pub fn mark_not_ready(daemon: &Daemon, id: &str, reason: &str) -> Result<()> {
    daemon.publish_with(|| {
        let mut changed = false;
        daemon.store.update::<SandboxRecord>(id, |r| {
            changed = r.state != SandboxState::NotReady;
            r.state = SandboxState::NotReady;
            if !reason.is_empty() {
                r.reason = reason.to_string();
            }
            Ok(())
        })?;
        let events = if changed {
            vec![event(EventKind::Stopped, id)]
        } else {
            Vec::new()
        };
        Ok(((), events))
    })
}

/// The sandbox's part of StopPodSandbox, once its containers are stopped:
/// marks it not ready (durably, before anything is released, so a crash half
/// way never leaves a READY pod without its network), then releases the
/// network and the infra process. Idempotent.
pub fn stop(daemon: &Daemon, record: &SandboxRecord) -> Result<()> {
    mark_not_ready(daemon, &record.id, "")?;
    release(daemon, record)?;
    tracing::info!(pod_id = %record.id, "sandbox stopped");
    Ok(())
}

fn release(daemon: &Daemon, record: &SandboxRecord) -> Result<()> {
    daemon.host.network_teardown(&record.id)?;
    if record.infra.pid > 0 {
        daemon.host.stop_infra(&record.infra);
        let leaf = daemon.cgroups.infra_path(&record.cgroup_parent);
        if leaf != record.cgroup_parent {
            daemon.host.remove_cgroup(&leaf)?;
        }
    }
    Ok(())
}

/// The sandbox's part of RemovePodSandbox, once its containers are removed:
/// the network, namespaces, files and cgroup, and last the record.
/// Idempotent.
pub fn remove(daemon: &Daemon, record: &SandboxRecord) -> Result<()> {
    match mark_not_ready(daemon, &record.id, "") {
        // A full disk must not keep a removal, which frees space, from
        // going on: the record is deleted below (deletes have a reserve),
        // and recovery finds a half-removed READY pod broken.
        Err(Error::NoSpace { .. }) => {
            tracing::warn!(pod_id = %record.id, "disk full: removing the sandbox without marking it not ready first")
        }
        other => other?,
    }
    release(daemon, record)?;
    let dir = daemon.layout.sandbox(&record.id);
    for kind in Kind::ALL {
        daemon
            .host
            .unpin_namespace(&dir.join("ns").join(kind.name()))?;
    }
    if record.created_cgroup {
        daemon.host.remove_cgroup(&record.cgroup_parent)?;
    }
    remove_dir_all(&dir)?;
    daemon.publish_with(|| {
        daemon.store.delete::<SandboxRecord>(&record.id)?;
        Ok(((), vec![event(EventKind::Deleted, &record.id)]))
    })?;
    daemon.names.release(&record.id);
    stats::forget(daemon, &record.id);
    tracing::info!(pod_id = %record.id, "sandbox removed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctls_are_checked_against_namespaces() {
        let m = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            validate_sysctls(
                &m(&[("net/ipv4/ip_forward", "1"), ("kernel.shmmax", "1000")]),
                true,
                true
            )
            .unwrap(),
            vec![
                ("kernel.shmmax".to_string(), "1000".to_string()),
                ("net.ipv4.ip_forward".to_string(), "1".to_string())
            ]
        );
        assert!(validate_sysctls(&m(&[("kernel.hostname", "x")]), true, true).is_err());
        assert!(validate_sysctls(&m(&[("vm.swappiness", "1")]), true, true).is_err());
        assert!(validate_sysctls(&m(&[("net.ipv4.ip_forward", "1")]), false, true).is_err());
        assert!(validate_sysctls(&m(&[("kernel.msgmax", "1")]), true, false).is_err());
        assert!(validate_sysctls(&m(&[("net...x", "1")]), true, true).is_err());
    }
}
