//! Pod-level operations: a sandbox together with its containers, under the
//! pod's exclusive lock. They sit above the sandbox and container modules,
//! which do not call each other's lifecycles.

use std::collections::HashMap;

use berth_cri::v1::LinuxContainerResources;

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

/// UpdatePodSandboxResources (in-place pod resize): the pod cgroup gets
/// the sum of its containers' resources plus the pod's overhead, as the
/// kubelet computes the pod cgroup's own limits. A value left at zero in
/// `resources` leaves that limit alone (overhead alone sets no limit).
pub fn update_resources(
    daemon: &Daemon,
    pod: &crate::locks::SandboxShared,
    overhead: Option<LinuxContainerResources>,
    resources: Option<LinuxContainerResources>,
) -> Result<()> {
    let record = sandbox::get(daemon, &pod.sandbox_id)?;
    tracing::Span::current().record("pod_id", record.id.as_str());
    sandbox::require_ready(&record, "resources are updated only while it is ready")?;
    let Some(wanted) = pod_limits(overhead.unwrap_or_default(), resources) else {
        return Ok(());
    };
    let limits = container::resources::from_cri(&wanted)?;
    daemon.cgroups.check(&record.cgroup_parent, &limits)?;
    daemon
        .host
        .apply_resources(&record.cgroup_parent, &limits)?;
    tracing::info!(pod_id = %record.id, cgroup = %record.cgroup_parent, "pod resources updated");
    Ok(())
}

/// The pod cgroup's limits: `resources` (the containers' sum) plus
/// `overhead`, where `resources` sets one. `None` when there is nothing
/// to apply.
fn pod_limits(
    overhead: LinuxContainerResources,
    resources: Option<LinuxContainerResources>,
) -> Option<LinuxContainerResources> {
    let mut out = resources?;
    if out.memory_limit_in_bytes > 0 {
        out.memory_limit_in_bytes = out
            .memory_limit_in_bytes
            .saturating_add(overhead.memory_limit_in_bytes.max(0));
    }
    if out.cpu_shares > 0 {
        out.cpu_shares = out.cpu_shares.saturating_add(overhead.cpu_shares.max(0));
    }
    if out.cpu_quota > 0 && overhead.cpu_quota > 0 {
        // The overhead's quota over the pod's period.
        let period = if out.cpu_period > 0 {
            out.cpu_period
        } else {
            100_000
        };
        let overhead_period = if overhead.cpu_period > 0 {
            overhead.cpu_period
        } else {
            100_000
        };
        let extra = (overhead.cpu_quota as i128 * period as i128 / overhead_period as i128) as i64;
        out.cpu_quota = out.cpu_quota.saturating_add(extra);
    }
    Some(out)
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
    let containers = container::of_sandbox(daemon, &record.id)?;
    read_stats(daemon, record, containers)
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
    // The containers of every pod from one read of the store, not one per
    // pod (which made the call quadratic in the number of pods).
    let mut containers: HashMap<String, Vec<ContainerRecord>> = HashMap::new();
    for c in daemon.store.list::<ContainerRecord>()? {
        containers.entry(c.sandbox_id.clone()).or_default().push(c);
    }
    let pods: Vec<(SandboxRecord, Vec<ContainerRecord>)> = records
        .into_iter()
        .map(|r| {
            let of_pod = containers.remove(&r.id).unwrap_or_default();
            (r, of_pod)
        })
        .collect();
    let read = container::stats::read_many(pods, |(record, of_pod)| {
        let id = record.id.clone();
        match read_stats(daemon, record, of_pod) {
            // Removed while it was read: what was read may be partial.
            Ok(stats) => Ok(daemon
                .store
                .contains::<SandboxRecord>(&id)?
                .then_some(stats)),
            Err(e) => {
                tracing::warn!(pod_id = %id, error = %crate::error::chain(&e), "pod left out of ListPodSandboxStats");
                Ok(None)
            }
        }
    });
    read.into_iter().filter_map(Result::transpose).collect()
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
            if daemon.store.contains::<ContainerRecord>(&c.id)? {
                kept.push((c, s));
            }
        }
        stats.containers = kept;
        out.push(sandbox::metrics::pod_samples(&stats));
    }
    Ok(out)
}

/// The stats of pod `record` and of those of `containers` (its own) that
/// run.
fn read_stats(
    daemon: &Daemon,
    record: SandboxRecord,
    containers: Vec<ContainerRecord>,
) -> Result<PodStats> {
    let containers: Vec<_> = containers
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
    let mut pids: Vec<i32> = containers.iter().map(|(c, _)| c.pid).collect();
    pids.push(ctx.record.infra.pid);
    let usage = sandbox::stats::read(daemon, &ctx, &pids);
    Ok(PodStats {
        record: ctx.record,
        usage,
        containers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_limits_add_the_overhead_where_the_containers_set_a_limit() {
        let overhead = LinuxContainerResources {
            memory_limit_in_bytes: 10 << 20,
            cpu_shares: 10,
            cpu_quota: 5_000,
            cpu_period: 50_000,
            ..Default::default()
        };
        let resources = LinuxContainerResources {
            memory_limit_in_bytes: 100 << 20,
            cpu_shares: 512,
            cpu_quota: 50_000,
            cpu_period: 100_000,
            cpuset_cpus: "0".into(),
            ..Default::default()
        };
        let out = pod_limits(overhead.clone(), Some(resources)).unwrap();
        assert_eq!(out.memory_limit_in_bytes, 110 << 20);
        assert_eq!(out.cpu_shares, 522);
        assert_eq!(out.cpu_quota, 60_000, "5 ms per 50 ms is 10 ms per 100 ms");
        assert_eq!(out.cpuset_cpus, "0");

        // No container limit: the overhead sets none either.
        let unlimited = pod_limits(overhead.clone(), Some(Default::default())).unwrap();
        assert_eq!(unlimited.memory_limit_in_bytes, 0);
        assert_eq!(unlimited.cpu_quota, 0);
        assert_eq!(pod_limits(overhead, None), None);
    }
}
