//! Child processes owned by the harness: killed with the test process, and
//! stopped (TERM, then KILL) when dropped.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub struct OwnedChild {
    name: String,
    child: Option<Child>,
}

impl OwnedChild {
    /// Spawns `cmd`; the child gets SIGKILL if the spawning thread dies, so
    /// an aborted test run leaves nothing running.
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<OwnedChild> {
        // SAFETY: prctl is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("spawn {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(OwnedChild {
            name: name.to_string(),
            child: Some(child),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// The exit status if the child has already exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn signal(&self, sig: Signal) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// Waits up to `timeout` for the child to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.try_status() {
            self.child = None;
            return Some(s);
        }
        self.signal(Signal::SIGTERM);
        let status = self.wait_timeout(grace).or_else(|| {
            self.signal(Signal::SIGKILL);
            self.child.as_mut().and_then(|c| c.wait().ok())
        });
        self.child = None;
        status
    }

    /// SIGKILL and reap, as a crash would.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.signal(Signal::SIGKILL);
        let status = self.child.as_mut().and_then(|c| c.wait().ok());
        self.child = None;
        status
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        if self.child.is_some() && self.stop(Duration::from_secs(5)).is_none() {
            eprintln!("harness: could not stop {}", self.name);
        }
    }
}

/// A free TCP port on 127.0.0.1 (the listener is closed before returning).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Polls `check` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    check()
}
