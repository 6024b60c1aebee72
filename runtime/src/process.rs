//! Which process a pid stands for.
//!
//! A pid alone names a process only until it exits: the kernel hands the
//! number to the next process it starts, and berthd (which outlives its shims
//! and restarts from breadcrumb files) would take that stranger for its shim
//! and signal it. A `ProcessIdentity` adds the process's start time (field 22
//! of `/proc/<pid>/stat`, which no later process with the same pid can share)
//! and signals through a pidfd, so the check and the signal hit one process.
//!
//! Also what every process berthd starts gets: no fd but its stdio
//! ([`no_inherited_fds`], [`NoInheritedFds`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Marks every fd above stdio close-on-exec; for a child between fork and
/// exec (async-signal-safe: raw syscalls only). berthd's own fds are
/// opened close-on-exec, but what its parent left open is not (a shell's
/// fd 10 or 251, say), and none of it may reach a pod (the class of
/// runc's CVE-2024-21626). Marking rather than closing keeps the exec
/// error pipe of `std::process::Command` working.
pub fn no_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range only changes the flags of this process's fds.
    let done = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    } == 0;
    if !done {
        // Kernels before 5.11: one by one, up to the soft fd limit.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes only the struct; fcntl on a closed fd
        // fails harmlessly.
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
            for fd in 3..limit.rlim_cur.min(1 << 20) as i32 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// [`no_inherited_fds`] for the commands berthd runs.
pub trait NoInheritedFds {
    fn no_inherited_fds(&mut self) -> &mut Self;
}

impl NoInheritedFds for std::process::Command {
    fn no_inherited_fds(&mut self) -> &mut Self {
        use std::os::unix::process::CommandExt;
        // SAFETY: no_inherited_fds is async-signal-safe.
        unsafe { self.pre_exec(no_inherited_fds) }
    }
}

impl NoInheritedFds for tokio::process::Command {
    fn no_inherited_fds(&mut self) -> &mut Self {
        // SAFETY: no_inherited_fds is async-signal-safe.
        unsafe { self.pre_exec(no_inherited_fds) }
    }
}

/// A process as pid plus start time (clock ticks since boot).
///
/// `start_time == 0` means "not known" (a legacy breadcrumb holding only a
/// pid): such an identity cannot be verified, so it is never alive and is
/// never signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: i32,
    pub start_time: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("pidfd_open({pid}): {source}")]
    PidfdOpen {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("signal {sig} to pid {pid}: {source}")]
    Signal {
        pid: i32,
        sig: i32,
        #[source]
        source: io::Error,
    },
}

/// What berthd needs from `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: R, S, D, Z, X, ...
    pub state: char,
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
    /// Fields 14 + 15: user and system CPU time, clock ticks.
    pub cpu_ticks: u64,
    /// Field 20.
    pub threads: u64,
    /// Field 24: resident set size, pages.
    pub rss_pages: u64,
}

/// Parses the text of `/proc/<pid>/stat`.
///
/// Field 2 (comm) is in parens and may itself contain spaces and `)`, so the
/// fields are counted from the last `)`.
pub fn parse_stat(stat: &str) -> Option<ProcStat> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is the first after the parenthesis.
    let field = |n: usize| fields.get(n - 3).copied();
    let number = |n: usize| -> Option<u64> { field(n)?.parse().ok() };
    Some(ProcStat {
        state: field(3)?.chars().next()?,
        start_time: number(22)?,
        cpu_ticks: number(14)? + number(15)?,
        threads: number(20)?,
        rss_pages: number(24)?,
    })
}

fn read_stat(pid: i32) -> io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: unexpected format"),
        )
    })
}

impl ProcessIdentity {
    /// The identity of the process that has `pid` now; call it right after
    /// launching the process, while it cannot have been replaced.
    pub fn of(pid: i32) -> io::Result<ProcessIdentity> {
        if pid <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid pid {pid}"),
            ));
        }
        let stat = read_stat(pid)?;
        Ok(ProcessIdentity {
            pid,
            start_time: stat.start_time,
        })
    }

    /// An identity with an unknown start time cannot be told apart from a
    /// recycled pid, so it is not trusted.
    fn is_verifiable(&self) -> bool {
        self.pid > 0 && self.start_time != 0
    }

    /// Whether this very process still runs (a zombie does not count).
    pub fn is_alive(&self) -> bool {
        if !self.is_verifiable() {
            return false;
        }
        match read_stat(self.pid) {
            Ok(stat) => stat.start_time == self.start_time && !matches!(stat.state, 'Z' | 'X'),
            Err(_) => false,
        }
    }

    /// Sends `sig` to this process if, and only if, it is still alive.
    /// Returns whether the signal was sent.
    pub fn signal(&self, sig: i32) -> Result<bool, ProcessError> {
        if !self.is_verifiable() {
            return Ok(false);
        }
        let pidfd = match self.pidfd() {
            Ok(Some(fd)) => fd,
            Ok(None) => return Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return self.signal_by_pid(sig),
            Err(source) => {
                return Err(ProcessError::PidfdOpen {
                    pid: self.pid,
                    source,
                });
            }
        };
        // Checked after the pidfd is open: the pidfd pins the process that
        // had the pid when it was opened, and a matching start time now
        // proves that process is ours.
        if !self.is_alive() {
            return Ok(false);
        }
        // SAFETY: plain syscall on a pidfd we own; a null siginfo means "as kill(2)".
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0u32,
            )
        };
        self.signal_outcome(rc == 0, sig)
    }

    /// A pidfd that polls readable once this process has exited; `None`
    /// when it is not alive now (its pid free, or another process's).
    pub fn exit_fd(&self) -> io::Result<Option<OwnedFd>> {
        if !self.is_verifiable() {
            return Ok(None);
        }
        let Some(fd) = self.pidfd()? else {
            return Ok(None);
        };
        // Checked after the open, as for signals: the pidfd pins whichever
        // process had the pid, and a matching start time proves it is ours.
        Ok(self.is_alive().then_some(fd))
    }

    /// Kernels without pidfds (< 5.3): check, then kill(2). This leaves the
    /// window between the two, which is all such a kernel allows.
    fn signal_by_pid(&self, sig: i32) -> Result<bool, ProcessError> {
        if !self.is_alive() {
            return Ok(false);
        }
        // SAFETY: kill(2) on a pid whose start time we just verified.
        let sent = unsafe { libc::kill(self.pid, sig) } == 0;
        self.signal_outcome(sent, sig)
    }

    /// What a signal syscall's result means: sent, the process exited
    /// between the check and the signal (ESRCH), or a real failure.
    fn signal_outcome(&self, sent: bool, sig: i32) -> Result<bool, ProcessError> {
        if sent {
            return Ok(true);
        }
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            source => Err(ProcessError::Signal {
                pid: self.pid,
                sig,
                source,
            }),
        }
    }

    /// A pidfd for the pid, or None when no process has it.
    fn pidfd(&self) -> io::Result<Option<OwnedFd>> {
        // SAFETY: plain syscall; the result is a new fd we then own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0u32) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: pidfd_open returned a fresh fd nobody else owns.
        Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// Waits up to `timeout` for this process to exit; returns whether it
    /// has (a zombie has exited). Meant for after a SIGKILL.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        if !self.is_alive() {
            return true;
        }
        let deadline = Instant::now() + timeout;
        let pidfd = match self.pidfd() {
            Ok(Some(fd)) => fd,
            Ok(None) => return true,
            Err(_) => return self.poll_gone(deadline),
        };
        // The pidfd may have caught a process that took the pid after ours exited.
        if !self.is_alive() {
            return true;
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Rounded up, so a sub-millisecond remainder still waits.
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n > 0 {
                // A pidfd becomes readable when its process exits.
                return true;
            }
            if n == 0 {
                return !self.is_alive();
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                return self.poll_gone(deadline);
            }
        }
    }

    fn poll_gone(&self, deadline: Instant) -> bool {
        loop {
            if !self.is_alive() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
        }
    }

    /// The breadcrumb file form: `"<pid> <start_time>\n"`.
    pub fn to_breadcrumb(&self) -> String {
        format!("{} {}\n", self.pid, self.start_time)
    }

    /// Reads a breadcrumb. A legacy one holding only `"<pid>"` gives a
    /// start time of 0: an identity that is never alive and never signalled,
    /// since it cannot be verified.
    pub fn parse_breadcrumb(text: &str) -> Option<ProcessIdentity> {
        let mut fields = text.split_whitespace();
        let pid: i32 = fields.next()?.parse().ok()?;
        let start_time = match fields.next() {
            Some(s) => s.parse().ok()?,
            None => 0,
        };
        if pid <= 0 || fields.next().is_some() {
            return None;
        }
        Some(ProcessIdentity { pid, start_time })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    fn sleeper() -> Child {
        Command::new("sleep").arg("30").spawn().unwrap()
    }

    /// Kills and reaps `child` whatever the test did to it.
    struct Reap(Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn parse_stat_counts_fields_after_the_last_paren() {
        let tail = "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21";
        let stat = parse_stat(&format!("123 (a) b) S {tail}")).unwrap();
        assert_eq!(
            stat,
            ProcStat {
                state: 'S',
                start_time: 424242,
                cpu_ticks: 11 + 12,
                threads: 17,
                rss_pages: 21,
            }
        );
        let stat = parse_stat(&format!("7 (we ird ) ) (x) Z {tail}\n")).unwrap();
        assert_eq!(stat.state, 'Z');
        assert_eq!(stat.start_time, 424242);
        assert_eq!(parse_stat("123 (a) S 1 2"), None);
        assert_eq!(parse_stat("no paren S"), None);
        assert_eq!(
            parse_stat(&format!("1 (a) S {}", tail.replace("424242", "x"))),
            None
        );
    }

    #[test]
    fn own_process_parses() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        assert!(me.start_time > 0);
        assert!(me.is_alive());
    }

    #[test]
    fn signal_reaches_the_live_process() {
        let mut child = Reap(sleeper());
        let id = ProcessIdentity::of(child.0.id() as i32).unwrap();
        assert!(id.is_alive());
        assert!(id.signal(libc::SIGTERM).unwrap());
        let status = child.0.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(!id.is_alive());
    }

    #[test]
    fn another_start_time_is_another_process() {
        let mut child = Reap(sleeper());
        let real = ProcessIdentity::of(child.0.id() as i32).unwrap();
        let impostor = ProcessIdentity {
            start_time: real.start_time - 1,
            ..real
        };
        assert!(!impostor.is_alive());
        assert!(!impostor.signal(libc::SIGKILL).unwrap());
        // For the impostor identity, "its" process is long gone.
        assert!(impostor.wait_gone(Duration::ZERO));
        assert!(child.0.try_wait().unwrap().is_none(), "child was signalled");
        assert!(real.is_alive());
    }

    #[test]
    fn reaped_child_is_gone() {
        let mut child = Reap(sleeper());
        let id = ProcessIdentity::of(child.0.id() as i32).unwrap();
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        assert!(!id.is_alive());
        assert!(!id.signal(libc::SIGKILL).unwrap());
        assert!(id.wait_gone(Duration::ZERO));
    }

    #[test]
    fn wait_gone_sees_the_exit_of_a_zombie() {
        let mut child = Reap(sleeper());
        let id = ProcessIdentity::of(child.0.id() as i32).unwrap();
        assert!(!id.wait_gone(Duration::from_millis(50)));
        assert!(id.signal(libc::SIGKILL).unwrap());
        // Not reaped yet: a zombie, which has exited.
        assert!(id.wait_gone(Duration::from_secs(10)));
        assert!(!id.is_alive());
        child.0.wait().unwrap();
    }

    #[test]
    fn legacy_identity_is_never_trusted() {
        let mut child = Reap(sleeper());
        let pid = child.0.id() as i32;
        let legacy = ProcessIdentity::parse_breadcrumb(&format!("{pid}\n")).unwrap();
        assert_eq!(legacy, ProcessIdentity { pid, start_time: 0 });
        assert!(!legacy.is_alive());
        assert!(!legacy.signal(libc::SIGKILL).unwrap());
        assert!(child.0.try_wait().unwrap().is_none());
    }

    #[test]
    fn breadcrumb_round_trip() {
        let id = ProcessIdentity {
            pid: 4321,
            start_time: 987654321,
        };
        assert_eq!(id.to_breadcrumb(), "4321 987654321\n");
        assert_eq!(
            ProcessIdentity::parse_breadcrumb(&id.to_breadcrumb()),
            Some(id)
        );
        for bad in ["", "x", "12 y", "0 5", "-3 5", "1 2 3"] {
            assert_eq!(ProcessIdentity::parse_breadcrumb(bad), None, "{bad:?}");
        }
    }
}
