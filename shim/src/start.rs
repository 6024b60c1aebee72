//! `berth-shim start <shim_dir>`: forks the monitor, waits until it created
//! the container (or failed) and prints one framed `ShimResponse` on stdout.
//!
//! Exit status 0 whenever an answer was printed; non-zero only if the
//! monitor could not even be forked.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::ExitCode;

use berth_proto::shim::ShimResponse;
use berth_proto::shim::shim_error::Code;
use berth_proto::{read_frame, write_frame};

use crate::files::{self, Diag};
use crate::monitor::{Monitor, error, ok};
use crate::sys;

fn print(resp: &ShimResponse) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match write_frame(&mut out, resp).and_then(|()| out.flush().map_err(Into::into)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-shim start: write answer: {e}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(dir: &Path) -> ExitCode {
    let cfg = match files::read_config(dir) {
        Ok(c) => c,
        Err(msg) => return print(&error(Code::InvalidArgument, msg)),
    };
    let dir = match std::fs::canonicalize(dir) {
        Ok(d) => d,
        Err(e) => {
            return print(&error(
                Code::InvalidArgument,
                format!("shim dir {}: {e}", dir.display()),
            ));
        }
    };
    // Held by this process and the monitor it forks (one open file), so
    // until the monitor exits.
    let _lock = match files::lock_dir(&dir) {
        Ok(l) => l,
        Err(e) => {
            return print(&error(
                Code::FailedPrecondition,
                format!(
                    "lock {}: {e} (another shim lives in this dir)",
                    dir.join(files::LOCK).display()
                ),
            ));
        }
    };
    let (status_r, status_w) = match sys::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("berth-shim start: pipe: {e}");
            return ExitCode::FAILURE;
        }
    };
    // SAFETY: this process is single-threaded here; the child only runs
    // this program's own code.
    match unsafe { libc::fork() } {
        -1 => {
            eprintln!(
                "berth-shim start: fork: {}",
                std::io::Error::last_os_error()
            );
            ExitCode::FAILURE
        }
        0 => {
            drop(status_r);
            monitor_main(cfg, &dir, status_w)
        }
        monitor_pid => {
            drop(status_w);
            let mut r = File::from(status_r);
            let resp = read_frame::<ShimResponse>(&mut r).unwrap_or_else(|e| {
                error(
                    Code::Internal,
                    format!(
                        "monitor (pid {monitor_pid}) exited before reporting ({e}); see {}",
                        dir.join(files::LOG).display()
                    ),
                )
            });
            if !matches!(
                resp.response,
                Some(berth_proto::shim::shim_response::Response::Ok(_))
            ) {
                // The monitor exits after a failed create: no zombie left.
                let _ = sys::wait_pid(monitor_pid);
            }
            print(&resp)
        }
    }
}

/// The forked monitor: detaches, creates the container, reports through
/// `status`, serves until Shutdown, exits.
fn monitor_main(cfg: berth_proto::shim::ShimConfig, dir: &Path, status: OwnedFd) -> ! {
    // Own session, no controlling terminal, no cwd pinning a mount, and
    // berthd's pipes let go of at once.
    // SAFETY: plain syscalls.
    unsafe { libc::setsid() };
    let _ = std::env::set_current_dir("/");
    if let Ok(null) = sys::open_dev_null(libc::O_RDWR) {
        for fd in 0..3 {
            // SAFETY: dup2 onto the stdio numbers.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let diag = Diag::open(dir);
    let mut status = File::from(status);
    match Monitor::create(cfg, dir.to_path_buf(), diag) {
        Ok(monitor) => {
            let _ = write_frame(&mut status, &ok());
            drop(status);
            monitor.run();
            std::process::exit(0)
        }
        Err(resp) => {
            let _ = write_frame(&mut status, &resp);
            std::process::exit(1)
        }
    }
}
