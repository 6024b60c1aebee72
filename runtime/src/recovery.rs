//! Start-up recovery: berthd may have been killed at any moment. Records are
//! written last and deleted first, so whatever exists on disk without a
//! record is the remains of a create that never finished or of a removal
//! whose deferred cleanup did not: finish it. Whatever has a record is
//! checked against the kernel before it is trusted: a READY sandbox whose
//! namespaces, network or infra process are gone is marked NOTREADY with
//! the reason, never left READY.

use std::path::Path;

use crate::container;
use crate::daemon::Daemon;
use crate::error::Result;
use crate::process::ProcessIdentity;
use crate::sandbox::{self, namespaces};
use crate::store::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};

/// Ids of the entries of `dir` (file stems), or nothing if it is missing.
fn entries(dir: &Path, suffix: &str) -> Vec<String> {
    let Ok(list) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    list.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| name.strip_suffix(suffix).map(str::to_string))
        .filter(|id| !id.is_empty() && !id.contains('.'))
        .collect()
}

/// Logs a cleanup step that failed, with the object it concerns.
fn logged(what: &str, id: &str, result: Result<()>) {
    if let Err(e) = result {
        tracing::error!(id, what, error = %crate::error::chain(&e), "recovery step failed; this may leak");
    }
}

pub fn recover(daemon: &Daemon) -> Result<()> {
    discard_unrecorded_containers(daemon)?;
    discard_unrecorded_sandboxes(daemon)?;
    discard_unfinished_starts(daemon)?;
    adopt_identities(daemon)?;
    verify_sandboxes(daemon)?;
    let tmp = daemon.layout.cni_cache().join("tmp");
    if tmp.exists() {
        logged(
            "remove the CNI temp dir",
            "",
            std::fs::remove_dir_all(&tmp)
                .map_err(|e| crate::error::Error::io(format!("remove {}", tmp.display()), e)),
        );
    }
    Ok(())
}

/// A shim dir or a rootfs without a record.
fn discard_unrecorded_containers(daemon: &Daemon) -> Result<()> {
    let mut ids = entries(&daemon.layout.shims(), "");
    ids.extend(entries(&daemon.layout.containers(), ""));
    ids.sort();
    ids.dedup();
    for id in ids {
        if daemon.store.get::<ContainerRecord>(&id)?.is_none() {
            tracing::warn!(container_id = %id, "removing the remains of a container without a record (an unfinished create or removal)");
            logged(
                "discard an unrecorded container",
                &id,
                container::discard_unrecorded(daemon, &id),
            );
        }
    }
    Ok(())
}

/// How long a shim launch berthd did not see finish may still take.
const LAUNCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A shim launched by a StartContainer that did not record it: the
/// container is CREATED again, to be started anew.
fn discard_unfinished_starts(daemon: &Daemon) -> Result<()> {
    for c in daemon.store.list::<ContainerRecord>()? {
        if c.state == ContainerState::Created && !c.has_shim() {
            let dir = daemon.layout.shim(&c.id);
            container::shim::wait_for_launch(&dir, LAUNCH_TIMEOUT);
            if daemon.host.shim_answers(&dir) {
                tracing::warn!(container_id = %c.id, "discarding the shim of a StartContainer that did not finish; the container is created again");
            }
            container::discard_launch(daemon, &c.id);
        }
    }
    Ok(())
}

/// A network added, namespaces pinned, a cgroup or an infra process made,
/// but no record.
fn discard_unrecorded_sandboxes(daemon: &Daemon) -> Result<()> {
    for id in entries(&daemon.layout.cni_cache(), ".json") {
        if daemon.store.get::<SandboxRecord>(&id)?.is_none() {
            tracing::warn!(pod_id = %id, "releasing the network of an unfinished sandbox");
            // DEL may need a retry (a plugin racing another for a lock).
            for attempt in 1..=5 {
                match daemon.host.network_teardown(&id) {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(pod_id = %id, attempt, error = %crate::error::chain(&e), "network teardown failed");
                        std::thread::sleep(std::time::Duration::from_millis(500 * attempt));
                    }
                }
            }
        }
    }
    for id in entries(&daemon.layout.sandboxes(), "") {
        if daemon.store.get::<SandboxRecord>(&id)?.is_some() {
            continue;
        }
        tracing::warn!(pod_id = %id, "removing the remains of an unfinished sandbox");
        let dir = daemon.layout.sandbox(&id);
        if let Some(infra) = std::fs::read_to_string(dir.join("infra.pid"))
            .ok()
            .and_then(|s| ProcessIdentity::parse_breadcrumb(&s))
        {
            daemon.host.stop_infra(&infra);
        }
        if let Ok(leaf) = std::fs::read_to_string(dir.join("infra-cgroup")) {
            logged(
                "remove the infra process's cgroup",
                &id,
                daemon.host.remove_cgroup(leaf.trim()),
            );
        }
        if let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) {
            logged(
                "remove the pod cgroup",
                &id,
                daemon.host.remove_cgroup(cgroup.trim()),
            );
        }
        for kind in namespaces::Kind::ALL {
            logged(
                "unpin a namespace",
                &id,
                daemon
                    .host
                    .unpin_namespace(&dir.join("ns").join(kind.name())),
            );
        }
        logged(
            "remove the sandbox dir",
            &id,
            std::fs::remove_dir_all(&dir)
                .map_err(|e| crate::error::Error::io(format!("remove {}", dir.display()), e)),
        );
    }
    Ok(())
}

/// Records written before process identities were recorded get them now,
/// from processes that prove to be theirs.
fn adopt_identities(daemon: &Daemon) -> Result<()> {
    for c in daemon.store.list::<ContainerRecord>()? {
        if c.shim.start_time != 0
            || !c.has_shim()
            || !matches!(c.state, ContainerState::Created | ContainerState::Running)
        {
            continue;
        }
        let dir = daemon.layout.shim(&c.id);
        if let Some(shim) = container::shim::adopt_identity(&dir) {
            tracing::info!(container_id = %c.id, pid = shim.pid, "recorded the shim's identity");
            daemon.store.update::<ContainerRecord>(&c.id, |r| {
                r.shim = shim;
                Ok(())
            })?;
        }
    }
    for s in daemon.store.list::<SandboxRecord>()? {
        if s.infra_pid <= 0 || s.infra.start_time != 0 {
            continue;
        }
        if let Some(infra) = sandbox::infra::adopt(s.infra_pid) {
            daemon.store.update::<SandboxRecord>(&s.id, |r| {
                r.infra = infra;
                Ok(())
            })?;
        }
    }
    Ok(())
}

/// Checks every READY sandbox against the kernel.
fn verify_sandboxes(daemon: &Daemon) -> Result<()> {
    for record in daemon.store.list::<SandboxRecord>()? {
        if record.state != SandboxState::Ready {
            continue;
        }
        let ctx = sandbox::context(daemon, record)?;
        if let Some(reason) = sandbox::broken(daemon, &ctx) {
            tracing::warn!(pod_id = %ctx.record.id, reason = %reason, "sandbox found broken; marking it not ready");
            sandbox::mark_not_ready(daemon, &ctx.record.id, &reason)?;
        }
    }
    Ok(())
}
