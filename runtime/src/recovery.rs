//! Start-up recovery: berthd may have been killed half way through any
//! create. Records are written last, so whatever exists on disk without a
//! record is the remains of a create that never finished: undo it.

use std::path::Path;

use crate::container;
use crate::daemon::Daemon;
use crate::error::Result;
use crate::sandbox::{self, namespaces};
use crate::store::{ContainerRecord, SandboxRecord};

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

pub async fn recover(daemon: &Daemon) -> Result<()> {
    let state = &daemon.config.state_dir;

    // Containers: a shim or a rootfs without a record.
    for id in entries(&container::shim::shim_dir(state, ""), "") {
        if daemon.store.get::<ContainerRecord>(&id)?.is_none() {
            tracing::warn!(container_id = %id, "removing the remains of an unfinished container create");
            container::discard_unrecorded(daemon, &id).await;
        }
    }
    for id in entries(&daemon.config.root_dir.join("containers"), "") {
        if daemon.store.get::<ContainerRecord>(&id)?.is_none() {
            container::discard_unrecorded(daemon, &id).await;
        }
    }

    // Sandboxes: a network added, namespaces pinned, but no record. DEL
    // may need a retry (a plugin racing another for a lock).
    for id in entries(&state.join("cni"), ".json") {
        if daemon.store.get::<SandboxRecord>(&id)?.is_none() {
            tracing::warn!(pod_id = %id, "releasing the network of an unfinished sandbox");
            for attempt in 1..=5 {
                match daemon.network.teardown(&id).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(pod_id = %id, attempt, error = %e, "network teardown failed");
                        tokio::time::sleep(std::time::Duration::from_millis(500 * attempt)).await;
                    }
                }
            }
        }
    }
    for id in entries(&state.join("sandboxes"), "") {
        if daemon.store.get::<SandboxRecord>(&id)?.is_none() {
            tracing::warn!(pod_id = %id, "removing the remains of an unfinished sandbox");
            let dir = sandbox::sandbox_dir(state, &id);
            if let Some(pid) = std::fs::read_to_string(dir.join("infra.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                sandbox::infra::stop(pid);
            }
            if let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) {
                let _ = crate::cgroups::remove_dir(daemon.cgroup_mode, cgroup.trim());
            }
            for kind in [
                namespaces::Kind::Net,
                namespaces::Kind::Ipc,
                namespaces::Kind::Uts,
            ] {
                let _ = namespaces::unpin(&dir.join("ns").join(kind.name()));
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let _ = std::fs::remove_dir_all(state.join("cni").join("tmp"));
    Ok(())
}
