//! What RemoveContainer leaves for after its answer: asking the shim to
//! delete the container (its cgroup, libcontainer's state), unmounting the
//! rootfs and deleting the container's dirs.
//!
//! Nothing observable waits on these: the record is gone first, so lists,
//! status and events already say the container is removed. Nothing is lost
//! either: the dirs of a container without a record are exactly what
//! start-up recovery discards, so a berthd killed in the middle finishes the
//! job on its next start. RemovePodSandbox waits for its containers'
//! cleanups, because the pod's cgroup and dirs can only go after theirs.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::Result;

/// How long RemovePodSandbox waits for its containers' cleanups.
const SANDBOX_WAIT: Duration = Duration::from_secs(30);

/// Cleanups running in the background.
#[derive(Default)]
pub struct Cleanups(Arc<Pending>);

#[derive(Default)]
struct Pending {
    /// Container id → its pod's id.
    running: Mutex<HashMap<String, String>>,
    finished: Condvar,
}

impl Cleanups {
    /// Runs `job` for container `id` of pod `sandbox_id` on a thread of its
    /// own, or here if no thread can be started.
    pub fn spawn(
        &self,
        id: &str,
        sandbox_id: &str,
        job: impl FnOnce() -> Result<()> + Send + 'static,
    ) {
        let pending = self.0.clone();
        pending
            .running
            .lock()
            .unwrap()
            .insert(id.to_string(), sandbox_id.to_string());
        let id = id.to_string();
        let job = Arc::new(Mutex::new(Some(job)));
        let run = {
            let job = job.clone();
            let id = id.clone();
            move || {
                let job = job.lock().unwrap().take();
                if let Some(job) = job
                    && let Err(e) = job()
                {
                    tracing::error!(container_id = %id, error = %crate::error::chain(&e), "cleanup of a removed container failed; the next start of berthd retries it");
                }
                pending.running.lock().unwrap().remove(&id);
                pending.finished.notify_all();
            }
        };
        let spawned = std::thread::Builder::new()
            .name("berth-cleanup".into())
            .spawn(run.clone());
        if let Err(e) = spawned {
            tracing::warn!(container_id = %id, error = %e, "no thread for the cleanup; running it now");
            run();
        }
    }

    /// Waits until no cleanup of a container of pod `sandbox_id` runs (at
    /// most `SANDBOX_WAIT`; one still running then is logged, and recovery
    /// finishes it).
    pub fn wait_for_sandbox(&self, sandbox_id: &str) {
        let deadline = Instant::now() + SANDBOX_WAIT;
        let mut running = self.0.running.lock().unwrap();
        while running.values().any(|s| s == sandbox_id) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    pod_id = sandbox_id,
                    "a container cleanup is still running; removing the pod anyway"
                );
                return;
            }
            running = self.0.finished.wait_timeout(running, left).unwrap().0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_waits_for_its_own_containers_cleanups_only() {
        let cleanups = Cleanups::default();
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let done = Arc::new(Mutex::new(Vec::new()));
        {
            let done = done.clone();
            cleanups.spawn("c1", "pod-a", move || {
                gate.recv().unwrap();
                done.lock().unwrap().push("c1");
                Ok(())
            });
        }
        cleanups.spawn("c2", "pod-b", || {
            Err(crate::error::Error::Internal("boom".into()))
        });
        // pod-b's failed cleanup is over at once; pod-a's waits on the gate.
        cleanups.wait_for_sandbox("pod-b");
        cleanups.wait_for_sandbox("no-such-pod");
        assert!(done.lock().unwrap().is_empty());
        release.send(()).unwrap();
        cleanups.wait_for_sandbox("pod-a");
        assert_eq!(*done.lock().unwrap(), vec!["c1"]);
    }
}
