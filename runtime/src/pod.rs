//! Pod-level operations: a sandbox together with its containers, under the
//! pod's exclusive lock. They sit above the sandbox and container modules,
//! which do not call each other's lifecycles.

use crate::container;
use crate::daemon::Daemon;
use crate::error::Result;
use crate::locks::SandboxGuard;
use crate::sandbox;
use crate::store::SandboxRecord;

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
