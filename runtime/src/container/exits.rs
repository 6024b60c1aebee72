//! Watching containers exit on their own, so their STOPPED transition (and
//! event) happens within moments of the exit without anyone polling.
//!
//! The shim renames `exit.pb` into its directory when the container exits;
//! an inotify watch per shim directory sees that rename. A pidfd per shim
//! reports a shim that died without an exit record (SIGKILL, the OOM
//! killer) as it dies. A sweep every few seconds catches what neither can
//! report: a watch that could not be added. Read paths that notice a change
//! hand it here (`hint`) instead of writing themselves; list calls answer
//! from the store, which this keeps current.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::process::ProcessIdentity;
use crate::store::ContainerRecord;

/// How often every created or running container is checked regardless of
/// inotify.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How long a hint waits at most before it is handled.
const HINT_LATENCY: Duration = Duration::from_millis(100);

pub struct ExitWatcher {
    inotify: Inotify,
    watches: Mutex<HashMap<WatchDescriptor, String>>,
    hints: Mutex<HashSet<String>>,
    /// A pidfd per watched shim, with its container's id.
    shims: Mutex<Vec<(OwnedFd, String)>>,
}

impl ExitWatcher {
    pub fn new() -> Result<ExitWatcher> {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .map_err(|e| Error::io("inotify for container exits", e.into()))?;
        Ok(ExitWatcher {
            inotify,
            watches: Mutex::new(HashMap::new()),
            hints: Mutex::new(HashSet::new()),
            shims: Mutex::new(Vec::new()),
        })
    }

    /// Watches the shim dir of container `id` for its exit record, and its
    /// shim for its death. A failure is logged: the sweep still notices the
    /// exit, later.
    pub fn watch(&self, shim_dir: &Path, id: &str, shim: &ProcessIdentity) {
        match shim.exit_fd() {
            Ok(Some(fd)) => self.shims.lock().unwrap().push((fd, id.to_string())),
            // Already gone.
            Ok(None) => self.hint(id),
            Err(e) => {
                tracing::warn!(container_id = id, pid = shim.pid, error = %e, "cannot watch the container's shim; the periodic sweep will see it die")
            }
        }
        match self.inotify.add_watch(
            shim_dir,
            AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_ONLYDIR,
        ) {
            Ok(wd) => {
                self.watches.lock().unwrap().insert(wd, id.to_string());
            }
            Err(e) => {
                tracing::warn!(container_id = id, dir = %shim_dir.display(), error = %e, "cannot watch for the container's exit; the periodic sweep will see it")
            }
        }
    }

    /// A read path saw that container `id` changed; record it soon.
    pub fn hint(&self, id: &str) {
        self.hints.lock().unwrap().insert(id.to_string());
    }

    /// Watches every container that may still exit, records the exits that
    /// happened while berthd was down, and starts the watcher thread.
    pub fn start(daemon: &Arc<Daemon>) -> Result<()> {
        for record in daemon.store.list::<ContainerRecord>()? {
            if super::may_exit(&record) {
                daemon.exits.watch(
                    &super::shim_dir(daemon, &record.id),
                    &record.id,
                    &record.shim,
                );
            }
        }
        sweep(daemon);
        let weak = Arc::downgrade(daemon);
        std::thread::Builder::new()
            .name("berth-exits".into())
            .spawn(move || run(weak))
            .map_err(|e| Error::io("spawn the exit watcher", e))?;
        Ok(())
    }
}

fn observe(daemon: &Daemon, id: &str) {
    if let Err(e) = super::observe_exit(daemon, id) {
        tracing::warn!(container_id = id, error = %crate::error::chain(&e), "could not record the container's exit");
    }
}

fn sweep(daemon: &Daemon) {
    match daemon.store.list::<ContainerRecord>() {
        Ok(records) => {
            for record in records.iter().filter(|r| super::may_exit(r)) {
                observe(daemon, &record.id);
            }
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::chain(&e), "exit sweep could not list containers")
        }
    }
}

fn run(weak: Weak<Daemon>) {
    let mut last_sweep = Instant::now();
    loop {
        let Some(daemon) = weak.upgrade() else {
            return;
        };
        let exits = &daemon.exits;
        let pollfd = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = vec![pollfd(exits.inotify.as_fd().as_raw_fd())];
        fds.extend(
            exits
                .shims
                .lock()
                .unwrap()
                .iter()
                .map(|(fd, _)| pollfd(fd.as_raw_fd())),
        );
        // SAFETY: valid pollfds for fds the watcher owns; a shim's pidfd is
        // closed only by this thread, below.
        unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                HINT_LATENCY.as_millis() as i32,
            )
        };
        let mut changed = Vec::new();
        let dead: HashSet<i32> = fds[1..]
            .iter()
            .filter(|p| p.revents != 0)
            .map(|p| p.fd)
            .collect();
        if !dead.is_empty() {
            exits.shims.lock().unwrap().retain(|(fd, id)| {
                let gone = dead.contains(&fd.as_raw_fd());
                if gone {
                    changed.push(id.clone());
                }
                !gone
            });
        }
        if let Ok(events) = exits.inotify.read_events() {
            let mut watches = exits.watches.lock().unwrap();
            for event in events {
                if event.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The shim dir is gone (container removed).
                    watches.remove(&event.wd);
                    continue;
                }
                let is_exit = event
                    .name
                    .as_ref()
                    .is_some_and(|n| n.as_encoded_bytes() == b"exit.pb");
                if is_exit && let Some(id) = watches.get(&event.wd) {
                    changed.push(id.clone());
                }
            }
        }
        changed.extend(exits.hints.lock().unwrap().drain());
        for id in changed {
            observe(&daemon, &id);
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            sweep(&daemon);
            last_sweep = Instant::now();
        }
    }
}
