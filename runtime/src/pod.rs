//! Pod-level operations: a sandbox together with its containers, under the
//! pod's exclusive lock. They sit above the sandbox and container modules,
//! which do not call each other's lifecycles.

use crate::container;
use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::locks::SandboxGuard;
use crate::sandbox;
use crate::sandbox::stats::SandboxUsage;
use crate::store::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};

/// StopPodSandbox: its containers first, then the sandbox. Stopping what is
/// gone is done, as kubelet expects.
pub fn stop(daemon: &Daemon, pod: &SandboxGuard) -> Result<()> {
    let Some(record) = daemon.store.get::<SandboxRecord>(&pod.sandbox_id)? else {
        return Ok(());
    };
    tracing::Span::current().record("pod_id", record.id.as_str());
    container::stop_all(daemon, &record.id)?;
    sandbox::stop(daemon, &record)
}

/// RemovePodSandbox: its containers first, then the sandbox. Idempotent.
pub fn remove(daemon: &Daemon, pod: &SandboxGuard) -> Result<()> {
    let Some(record) = daemon.store.get::<SandboxRecord>(&pod.sandbox_id)? else {
        return Ok(());
    };
    tracing::Span::current().record("pod_id", record.id.as_str());
    container::remove_all(daemon, &record.id)?;
    sandbox::remove(daemon, &record)
}

/// A pod's resource usage: the sandbox's own (its cgroup holds its
/// containers') and each running container's.
#[derive(Debug, Clone)]
pub struct PodStats {
    pub record: SandboxRecord,
    pub usage: SandboxUsage,
    pub containers: Vec<(ContainerRecord, container::stats::Stats)>,
}

/// PodSandboxStats. A pod that is not ready has no stats: Unavailable, as
/// containerd answers (its error wraps ErrUnavailable), so that a caller
/// can tell it from a pod that does not exist (NotFound).
pub fn stats(daemon: &Daemon, id: &str) -> Result<PodStats> {
    let record = sandbox::find(daemon, id)?;
    tracing::Span::current().record("pod_id", record.id.as_str());
    if record.state != SandboxState::Ready {
        return Err(Error::Unavailable(format!(
            "pod sandbox {} is not ready: it has no stats",
            record.id
        )));
    }
    read_stats(daemon, record)
}

/// ListPodSandboxStats: the ready pods `wanted` keeps, oldest first. A pod
/// removed meanwhile, or whose stats cannot be read, is left out.
pub fn list_stats(
    daemon: &Daemon,
    wanted: impl Fn(&SandboxRecord) -> bool,
) -> Result<Vec<PodStats>> {
    let mut records: Vec<SandboxRecord> = daemon
        .store
        .list::<SandboxRecord>()?
        .into_iter()
        .filter(|r| r.state == SandboxState::Ready && wanted(r))
        .collect();
    records.sort_by_key(|r| r.created_at_ns);
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        let id = record.id.clone();
        match read_stats(daemon, record) {
            Ok(stats) => {
                // Removed while it was read: what was read may be partial.
                if daemon.store.get::<SandboxRecord>(&id)?.is_some() {
                    out.push(stats);
                }
            }
            Err(e) => {
                tracing::warn!(pod_id = %id, error = %crate::error::chain(&e), "pod left out of ListPodSandboxStats")
            }
        }
    }
    Ok(out)
}

/// ListPodSandboxMetrics: the metrics of every ready pod and its running
/// containers, from the readings ListPodSandboxStats makes. A pod or
/// container removed meanwhile is left out (what was read of it may be
/// partial), never an error.
pub fn list_metrics(daemon: &Daemon) -> Result<Vec<sandbox::metrics::PodSamples>> {
    let mut out = Vec::new();
    for mut stats in list_stats(daemon, |_| true)? {
        let mut kept = Vec::with_capacity(stats.containers.len());
        for (c, s) in stats.containers {
            if daemon.store.get::<ContainerRecord>(&c.id)?.is_some() {
                kept.push((c, s));
            }
        }
        stats.containers = kept;
        out.push(sandbox::metrics::pod_samples(&stats));
    }
    Ok(out)
}

fn read_stats(daemon: &Daemon, record: SandboxRecord) -> Result<PodStats> {
    let containers = container::of_sandbox(daemon, &record.id)?
        .into_iter()
        .map(|c| container::current(daemon, c))
        // As ListContainerStats: the running ones.
        .filter(|c| c.state == ContainerState::Running)
        .map(|c| {
            let s = container::stats(daemon, &c);
            (c, s)
        })
        .collect();
    let ctx = sandbox::context(daemon, record)?;
    let usage = sandbox::stats::read(daemon, &ctx);
    Ok(PodStats {
        record: ctx.record,
        usage,
        containers,
    })
}
