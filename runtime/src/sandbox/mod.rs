//! Pod sandboxes: the shared namespaces of a pod, pinned as files (no pause
//! container), the pod's hostname, hosts and resolv.conf files, its sysctls
//! and its cgroup parent.

pub mod files;
pub mod infra;
pub mod namespaces;

use std::path::{Path, PathBuf};

use k8s_cri::v1::{NamespaceMode, PodSandboxConfig};

use crate::daemon::Daemon;
use crate::error::{Error, IoContext, Result};
use crate::store::{KeyValue, SandboxRecord, SandboxState};
use namespaces::{Kind, NamespaceSetup};

/// Where a sandbox keeps its files and pinned namespaces.
pub fn sandbox_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("sandboxes").join(id)
}

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
    pub fn pid_namespace(&self) -> Option<PathBuf> {
        (self.record.infra_pid > 0 && infra::is_alive(self.record.infra_pid))
            .then(|| PathBuf::from(format!("/proc/{}/ns/pid", self.record.infra_pid)))
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

pub fn new_id() -> String {
    let mut bytes = [0u8; 32];
    getrandom(&mut bytes);
    hex::encode(bytes)
}

fn getrandom(buf: &mut [u8]) {
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n as usize, buf.len(), "getrandom failed");
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

/// RunPodSandbox. Everything made is undone when a later step fails.
pub async fn run(
    daemon: &Daemon,
    config: PodSandboxConfig,
    runtime_handler: &str,
) -> Result<String> {
    if !runtime_handler.is_empty() {
        return Err(Error::NotFound(format!(
            "runtime handler {runtime_handler:?} is not configured (only the default handler \"\" is)"
        )));
    }
    let meta = config
        .metadata
        .clone()
        .ok_or_else(|| Error::InvalidArgument("sandbox metadata is required".into()))?;
    if meta.name.is_empty() || meta.namespace.is_empty() || meta.uid.is_empty() {
        return Err(Error::InvalidArgument(
            "sandbox metadata needs name, namespace and uid".into(),
        ));
    }
    let ns = NamespaceOptionsView::of(&config);
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
    let shared_pid = ns.pid == NamespaceMode::Pod;

    let id = new_id();
    let reservation = daemon.reserve_name(
        &format!(
            "sandbox/{}/{}/{}/{}",
            meta.namespace, meta.name, meta.uid, meta.attempt
        ),
        &id,
    )?;
    tracing::Span::current().record("pod_id", id.as_str());

    let dir = sandbox_dir(&daemon.config.state_dir, &id);
    let mut phases = crate::timing::Phases::start("RunPodSandbox");
    let mut undo = Undo::default();
    let mut network_added = false;
    let result = async {
        std::fs::create_dir_all(dir.join("ns")).context(|| format!("create {}", dir.display()))?;
        undo.push_dir(dir.clone());

        let hostname = if own_net {
            config.hostname.clone()
        } else {
            String::new()
        };
        let mut kinds = Vec::new();
        if own_net {
            kinds.push(Kind::Net);
            kinds.push(Kind::Uts);
        }
        if own_ipc {
            kinds.push(Kind::Ipc);
        }
        let pinned = namespaces::create(
            &dir.join("ns"),
            NamespaceSetup {
                kinds,
                hostname: (!hostname.is_empty()).then(|| hostname.clone()),
                sysctls,
            },
        )?;
        for (_, path) in &pinned {
            undo.push_pin(path.clone());
        }
        phases.mark("namespaces");

        let pod_ips = if own_net {
            network_added = true;
            daemon
                .network
                .setup(&id, &dir.join("ns").join("net"), &config)
                .await?
        } else {
            Vec::new()
        };
        phases.mark("network");

        // Files the containers bind-mount.
        if own_net {
            let name = if hostname.is_empty() {
                meta.name.clone()
            } else {
                hostname.clone()
            };
            files::write(&dir.join("hostname"), &format!("{name}\n"))?;
            files::write(&dir.join("hosts"), &files::hosts(&name, &pod_ips))?;
        } else {
            files::copy_host("/etc/hosts", &dir.join("hosts"))?;
            files::write(&dir.join("hostname"), &format!("{}\n", host_hostname()))?;
        }
        let dns = config.dns_config.as_ref();
        match files::resolv_conf(dns) {
            Some(text) if own_net => files::write(&dir.join("resolv.conf"), &text)?,
            _ => files::copy_host("/etc/resolv.conf", &dir.join("resolv.conf"))?,
        }

        if !config.log_directory.is_empty() {
            let log_dir = Path::new(&config.log_directory);
            if !log_dir.is_absolute() {
                return Err(Error::InvalidArgument(format!(
                    "log_directory {:?} must be absolute",
                    config.log_directory
                )));
            }
            std::fs::create_dir_all(log_dir).context(|| format!("create {}", log_dir.display()))?;
        }

        phases.mark("files");
        let cgroup_parent = config
            .linux
            .as_ref()
            .map(|l| l.cgroup_parent.clone())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("/berth/{id}"));
        let created_cgroup = crate::cgroups::create_dir(daemon.cgroup_mode, &cgroup_parent)?;
        if created_cgroup {
            undo.push_cgroup(daemon.cgroup_mode, cgroup_parent.clone());
            // For start-up recovery, should berthd die before the record.
            let _ = std::fs::write(dir.join("cgroup"), &cgroup_parent);
        }
        let infra_pid = if shared_pid {
            let pid = infra::start(
                &crate::container::shim::shim_binary(),
                &dir.join("infra.log"),
            )?;
            undo.push(move || infra::stop(pid));
            // Inside the pod's cgroup, so pod limits apply to it too.
            let _ = std::fs::write(dir.join("infra.pid"), pid.to_string());
            crate::cgroups::add_process(daemon.cgroup_mode, &cgroup_parent, pid)?;
            pid
        } else {
            0
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
            config_json: serde_json::to_string(&config)
                .map_err(|e| Error::Internal(e.to_string()))?,
            cgroup_parent,
            created_cgroup,
            hostname,
            pod_ips,
            infra_pid,
        };
        daemon.store.put(&record)?;
        phases.mark("store");
        Ok(())
    }
    .await;
    phases.log();
    match result {
        Ok(()) => {
            undo.forget();
            reservation.keep();
            tracing::info!(pod_id = %id, name = %meta.name, namespace = %meta.namespace, "sandbox ready");
            Ok(id)
        }
        Err(e) => {
            if network_added && let Err(del) = daemon.network.teardown(&id).await {
                tracing::warn!(pod_id = %id, error = %del, "network teardown after a failed RunPodSandbox failed");
            }
            undo.run();
            Err(e)
        }
    }
}

fn host_hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

/// Finds a sandbox by full id or unique prefix.
pub fn find(daemon: &Daemon, id: &str) -> Result<SandboxRecord> {
    if id.is_empty() {
        return Err(Error::InvalidArgument("pod sandbox id is required".into()));
    }
    if let Some(r) = daemon.store.get::<SandboxRecord>(id)? {
        return Ok(r);
    }
    let matches: Vec<SandboxRecord> = daemon
        .store
        .list::<SandboxRecord>()?
        .into_iter()
        .filter(|s| s.id.starts_with(id))
        .collect();
    match matches.len() {
        1 => Ok(matches.into_iter().next().unwrap()),
        0 => Err(Error::NotFound(format!("pod sandbox {id} not found"))),
        _ => Err(Error::InvalidArgument(format!(
            "pod sandbox id prefix {id} is ambiguous"
        ))),
    }
}

pub fn context(daemon: &Daemon, record: SandboxRecord) -> Result<SandboxContext> {
    let config: PodSandboxConfig = serde_json::from_str(&record.config_json)
        .map_err(|e| Error::Store(format!("sandbox {} config: {e}", record.id)))?;
    Ok(SandboxContext {
        dir: sandbox_dir(&daemon.config.state_dir, &record.id),
        record,
        config,
    })
}

/// StopPodSandbox after its containers were stopped: releases the network.
/// Idempotent.
pub async fn stop(daemon: &Daemon, record: &mut SandboxRecord) -> Result<()> {
    daemon.network.teardown(&record.id).await?;
    if record.infra_pid > 0 {
        infra::stop(record.infra_pid);
    }
    if record.state != SandboxState::NotReady {
        record.state = SandboxState::NotReady;
        daemon.store.put(record)?;
        tracing::info!(pod_id = %record.id, "sandbox stopped");
    }
    Ok(())
}

/// RemovePodSandbox after its containers were removed: unpins the
/// namespaces, removes files and cgroup, forgets the record.
pub async fn remove(daemon: &Daemon, record: &SandboxRecord) -> Result<()> {
    daemon.network.teardown(&record.id).await?;
    if record.infra_pid > 0 {
        infra::stop(record.infra_pid);
    }
    let dir = sandbox_dir(&daemon.config.state_dir, &record.id);
    for kind in [Kind::Net, Kind::Ipc, Kind::Uts] {
        namespaces::unpin(&dir.join("ns").join(kind.name()))?;
    }
    if record.created_cgroup {
        crate::cgroups::remove_dir(daemon.cgroup_mode, &record.cgroup_parent)?;
    }
    match std::fs::remove_dir_all(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("remove {}", dir.display()), e)),
    }
    daemon.store.delete::<SandboxRecord>(&record.id)?;
    daemon.release_name(&record.id);
    tracing::info!(pod_id = %record.id, "sandbox removed");
    Ok(())
}

/// Undo steps of a create, run in reverse on failure.
#[derive(Default)]
pub struct Undo {
    steps: Vec<Box<dyn FnOnce() + Send>>,
}

impl Undo {
    pub fn push(&mut self, f: impl FnOnce() + Send + 'static) {
        self.steps.push(Box::new(f));
    }
    pub fn push_dir(&mut self, dir: PathBuf) {
        self.push(move || {
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
    fn push_pin(&mut self, path: PathBuf) {
        self.push(move || {
            let _ = namespaces::unpin(&path);
        });
    }
    fn push_cgroup(&mut self, mode: crate::cgroups::CgroupMode, path: String) {
        self.push(move || {
            let _ = crate::cgroups::remove_dir(mode, &path);
        });
    }
    pub fn run(self) {
        for step in self.steps.into_iter().rev() {
            step();
        }
    }
    pub fn forget(mut self) {
        self.steps.clear();
    }
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
