//! The infra process of a pod that shares one PID namespace between its
//! containers: `berth-shim pause`, PID 1 of a new PID namespace. Only such
//! pods have a process of their own; every other namespace is a pinned file.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::process::ProcessIdentity;

/// Starts the infra process in a new PID namespace; returns its identity.
///
/// berthd is multi-threaded, so the forked child only makes raw syscalls
/// until it execs: unshare, fork (the grandchild is PID 1 of the new
/// namespace), report the pid through a pipe, exit.
pub fn start(shim: &Path, log: &Path) -> Result<ProcessIdentity> {
    let prog = CString::new(shim.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument("shim path contains NUL".into()))?;
    let arg1 = CString::new("pause").unwrap();
    let argv = [prog.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let devnull = CString::new("/dev/null").unwrap();
    let log_c = CString::new(log.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument("log path contains NUL".into()))?;

    let mut fds = [0i32; 2];
    // SAFETY: plain syscalls; the child below only calls async-signal-safe
    // functions on memory prepared before fork.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(Error::io(
                "pipe for infra process",
                std::io::Error::last_os_error(),
            ));
        }
        let (rd, wr) = (fds[0], fds[1]);
        let child = libc::fork();
        if child < 0 {
            libc::close(rd);
            libc::close(wr);
            return Err(Error::io(
                "fork infra process",
                std::io::Error::last_os_error(),
            ));
        }
        if child == 0 {
            libc::close(rd);
            if libc::unshare(libc::CLONE_NEWPID) != 0 {
                libc::_exit(10);
            }
            let pid1 = libc::fork();
            if pid1 < 0 {
                libc::_exit(11);
            }
            if pid1 > 0 {
                let bytes = pid1.to_ne_bytes();
                libc::write(wr, bytes.as_ptr().cast(), bytes.len());
                libc::_exit(0);
            }
            libc::setsid();
            let null = libc::open(devnull.as_ptr(), libc::O_RDWR);
            let out = libc::open(
                log_c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                0o600,
            );
            if null >= 0 {
                libc::dup2(null, 0);
            }
            if out >= 0 {
                libc::dup2(out, 1);
                libc::dup2(out, 2);
            }
            let _ = crate::process::no_inherited_fds();
            libc::execv(prog.as_ptr(), argv.as_ptr());
            libc::_exit(12);
        }
        libc::close(wr);
        let mut buf = [0u8; 4];
        let n = libc::read(rd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(rd);
        let mut status = 0;
        libc::waitpid(child, &mut status, 0);
        if n != 4 {
            return Err(Error::Internal(format!(
                "infra process did not start (status {status:#x})"
            )));
        }
        let pid = i32::from_ne_bytes(buf);
        // Read while it cannot have been reaped: PID 1 of its namespace
        // lives until it is killed.
        ProcessIdentity::of(pid)
            .map_err(|e| Error::io(format!("identity of infra process {pid}"), e))
    }
}

/// Kills the infra process if it is still the one recorded (a recycled
/// pid is never signalled) and waits until it is gone.
pub fn stop(infra: &ProcessIdentity) {
    match infra.signal(libc::SIGKILL) {
        Ok(true) => {
            if !infra.wait_gone(std::time::Duration::from_secs(5)) {
                tracing::warn!(
                    pid = infra.pid,
                    "infra process still there 5 s after SIGKILL"
                );
            }
        }
        Ok(false) => {}
        Err(e) => tracing::warn!(pid = infra.pid, error = %e, "could not signal the infra process"),
    }
}

/// The identity of infra process `pid` from a record made before
/// identities were recorded: trusted only if it is a `berth-shim pause`.
pub fn adopt(pid: i32) -> Option<ProcessIdentity> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let is_infra = cmdline.windows(10).any(|w| w == b"berth-shim")
        && cmdline.windows(5).any(|w| w == b"pause");
    if !is_infra {
        return None;
    }
    ProcessIdentity::of(pid).ok().filter(|p| p.is_alive())
}
