//! The infra process of a pod that shares one PID namespace between its
//! containers: `berth-shim pause`, PID 1 of a new PID namespace. Only such
//! pods have a process of their own; every other namespace is a pinned file.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::process::ProcessIdentity;

/// Starts the infra process in a new PID namespace (made inside the pod's
/// pinned user namespace `userns`, when it has one, so that the namespace
/// belongs to it); returns its identity.
///
/// berthd is multi-threaded, so the forked child only makes raw syscalls
/// until it execs: setns into the user namespace, unshare, fork (the
/// grandchild is PID 1 of the new namespace), report the pid through a
/// pipe, exit. Its files are opened before the fork: inside a user
/// namespace host root's files are no longer its own.
pub fn start(shim: &Path, log: &Path, userns: Option<&Path>) -> Result<ProcessIdentity> {
    use std::os::fd::AsRawFd;
    let prog = CString::new(shim.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument("shim path contains NUL".into()))?;
    let arg1 = CString::new("pause").unwrap();
    let argv = [prog.as_ptr(), arg1.as_ptr(), std::ptr::null()];
    let null = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::io("open /dev/null", e))?;
    let out = std::fs::File::options()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(log)
        .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
    let userns = userns
        .map(|p| std::fs::File::open(p).map_err(|e| Error::io(format!("open {}", p.display()), e)))
        .transpose()?;
    let userns_fd = userns.as_ref().map_or(-1, |f| f.as_raw_fd());
    let (null_fd, out_fd) = (null.as_raw_fd(), out.as_raw_fd());

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
            if userns_fd >= 0 && libc::setns(userns_fd, libc::CLONE_NEWUSER) != 0 {
                libc::_exit(13);
            }
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
            libc::dup2(null_fd, 0);
            libc::dup2(out_fd, 1);
            libc::dup2(out_fd, 2);
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
