//! One owner per object: every mutating CRI call on a sandbox or container
//! holds that object's lock for its whole operation.
//!
//! A sandbox has a reader-writer lock: container operations hold it shared
//! (containers of one pod change in parallel), pod-level operations
//! (StopPodSandbox, RemovePodSandbox) hold it exclusively, so they never
//! interleave with a change to one of the pod's containers. A container has
//! a plain lock taken after its sandbox's, always in that order, so two
//! operations never wait on each other in a cycle.
//!
//! The locks are async: a call waiting its turn holds no thread, and its
//! wait ends with the call's deadline (the future is dropped). The guards
//! are owned, so they move with the operation onto its blocking thread and
//! are released when it ends, even if the caller is gone by then.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedMutexGuard, OwnedRwLockReadGuard, OwnedRwLockWriteGuard};

/// A table of per-key locks; an entry lives while someone holds or waits
/// for it.
struct Table<L> {
    entries: Mutex<HashMap<String, Arc<L>>>,
}

impl<L: Default> Table<L> {
    fn new() -> Self {
        Table {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &str) -> Arc<L> {
        let mut entries = self.entries.lock().unwrap();
        // Forget entries nobody refers to any more, so the table stays as
        // small as the set of objects being changed right now.
        if entries.len() > 64 {
            entries.retain(|_, l| Arc::strong_count(l) > 1);
        }
        entries.entry(key.to_string()).or_default().clone()
    }
}

pub struct ObjectLocks {
    sandboxes: Table<tokio::sync::RwLock<()>>,
    containers: Table<tokio::sync::Mutex<()>>,
}

impl Default for ObjectLocks {
    fn default() -> Self {
        ObjectLocks {
            sandboxes: Table::new(),
            containers: Table::new(),
        }
    }
}

/// Held by a pod-level operation: nothing else changes the pod or any of
/// its containers meanwhile.
pub struct SandboxGuard {
    pub sandbox_id: String,
    _guard: OwnedRwLockWriteGuard<()>,
}

/// Held by an operation that adds a container to a pod: the pod cannot be
/// stopped or removed meanwhile.
pub struct SandboxShared {
    pub sandbox_id: String,
    _guard: OwnedRwLockReadGuard<()>,
}

/// Held by an operation on one container.
pub struct ContainerGuard {
    pub sandbox_id: String,
    pub container_id: String,
    _sandbox: OwnedRwLockReadGuard<()>,
    _container: OwnedMutexGuard<()>,
}

impl ObjectLocks {
    pub async fn sandbox(&self, sandbox_id: &str) -> SandboxGuard {
        let lock = self.sandboxes.get(sandbox_id);
        SandboxGuard {
            sandbox_id: sandbox_id.to_string(),
            _guard: lock.write_owned().await,
        }
    }

    pub async fn sandbox_shared(&self, sandbox_id: &str) -> SandboxShared {
        let lock = self.sandboxes.get(sandbox_id);
        SandboxShared {
            sandbox_id: sandbox_id.to_string(),
            _guard: lock.read_owned().await,
        }
    }

    pub async fn container(&self, sandbox_id: &str, container_id: &str) -> ContainerGuard {
        let sandbox = self.sandboxes.get(sandbox_id).read_owned().await;
        let container = self.containers.get(container_id).lock_owned().await;
        ContainerGuard {
            sandbox_id: sandbox_id.to_string(),
            container_id: container_id.to_string(),
            _sandbox: sandbox,
            _container: container,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_pod_operation_excludes_its_containers() {
        let locks = Arc::new(ObjectLocks::default());
        let pod = locks.sandbox("p").await;
        let waiting = {
            let locks = locks.clone();
            tokio::spawn(async move { locks.container("p", "c").await.container_id })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a container op ran during a pod op");
        drop(pod);
        assert_eq!(waiting.await.unwrap(), "c");
    }

    #[tokio::test]
    async fn containers_of_one_pod_change_in_parallel() {
        let locks = ObjectLocks::default();
        let _a = locks.container("p", "a").await;
        let b = tokio::time::timeout(Duration::from_secs(1), locks.container("p", "b")).await;
        assert!(b.is_ok(), "two containers of one pod excluded each other");
        let same = tokio::time::timeout(Duration::from_millis(50), locks.container("p", "a")).await;
        assert!(same.is_err(), "one container was changed twice at once");
    }

    #[tokio::test]
    async fn a_waiter_can_give_up() {
        let locks = ObjectLocks::default();
        let _held = locks.sandbox("p").await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), locks.sandbox_shared("p")).await;
        assert!(gave_up.is_err());
        // The abandoned wait leaves the lock usable.
        drop(_held);
        let _again = locks.sandbox("p").await;
    }
}
