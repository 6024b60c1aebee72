//! `berth-shim pause`: the infra process of a pod sharing one PID
//! namespace. berthd starts it as PID 1 of that namespace; it only reaps
//! zombies, and exits on SIGTERM or SIGINT. Every other signal stays
//! blocked.

use std::process::ExitCode;

pub fn run() -> ExitCode {
    // SAFETY: sigset manipulation on locals, then plain syscalls.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
        let mut wanted: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut wanted);
        for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut wanted, s);
        }
        loop {
            let sig = libc::sigwaitinfo(&wanted, std::ptr::null_mut());
            match sig {
                libc::SIGTERM | libc::SIGINT => return ExitCode::SUCCESS,
                libc::SIGCHLD => {
                    let mut status = 0;
                    while libc::waitpid(-1, &mut status, libc::WNOHANG) > 0 {}
                }
                _ => {}
            }
        }
    }
}
