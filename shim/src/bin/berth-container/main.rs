//! berth-container: the short-lived helper that does berth-shim's
//! libcontainer work (like runc for containerd's shim), so the long-lived
//! monitor never maps libcontainer.
//!
//! ```text
//! berth-container [--root DIR] [--report-fd N] create --bundle DIR [--console-socket PATH] ID
//! berth-container [--root DIR] [--report-fd N] start ID
//! berth-container [--root DIR] [--report-fd N] [--mark-running] exec [--console-socket PATH [--console-size ROWSxCOLS]] ID -- ARG...
//! berth-container [--root DIR] [--report-fd N] [--mark-running] pause|resume ID
//! berth-container [--root DIR] [--report-fd N] delete ID
//! berth-container --version
//! ```
//!
//! For `create` the container's init inherits this process's stdin, stdout
//! and stderr (unless the spec asks for a terminal: then the pty master goes
//! to the console socket). For `exec` the new process inherits them too.
//! Nothing is ever printed on stdout/stderr, which belong to the container:
//! the outcome goes to the report fd as one line, `ok[ PID[ FLAGS]]` or
//! `error MESSAGE`, and the exit status is 0 or 1. Without `--report-fd` the
//! outcome is printed on stderr.
//!
//! `--mark-running`: the monitor started the container itself through the
//! notify socket; first record the `running` state libcontainer's start would
//! have saved.

mod ops;

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;

use ops::{ContainerOps, CreateOpts, ExecOpts, Libcontainer, OpError};

const DEFAULT_ROOT: &str = "/run/berth/runtime";

struct Args {
    root: PathBuf,
    report_fd: Option<i32>,
    mark_running: bool,
    command: String,
    bundle: Option<PathBuf>,
    console_socket: Option<PathBuf>,
    console_size: Option<(u32, u32)>,
    id: Option<String>,
    rest: Vec<String>,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        root: PathBuf::from(DEFAULT_ROOT),
        report_fd: None,
        mark_running: false,
        command: String::new(),
        bundle: None,
        console_socket: None,
        console_size: None,
        id: None,
        rest: Vec::new(),
    };
    let value = |it: &mut dyn Iterator<Item = String>, flag: &str| {
        it.next().ok_or_else(|| format!("{flag} needs a value"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--root" => args.root = value(&mut it, "--root")?.into(),
            "--report-fd" => {
                let v = value(&mut it, "--report-fd")?;
                args.report_fd = Some(v.parse().map_err(|_| format!("bad --report-fd {v}"))?);
            }
            "--mark-running" => args.mark_running = true,
            "--bundle" => args.bundle = Some(value(&mut it, "--bundle")?.into()),
            "--console-socket" => {
                args.console_socket = Some(value(&mut it, "--console-socket")?.into())
            }
            "--console-size" => {
                let v = value(&mut it, "--console-size")?;
                let parsed = v
                    .split_once('x')
                    .and_then(|(h, w)| Some((h.parse().ok()?, w.parse().ok()?)));
                args.console_size =
                    Some(parsed.ok_or_else(|| format!("bad --console-size {v} (ROWSxCOLS)"))?);
            }
            "--" => {
                args.rest = it.by_ref().collect();
            }
            flag if flag.starts_with('-') => return Err(format!("unknown flag {flag}")),
            word if args.command.is_empty() => args.command = word.to_owned(),
            word if args.id.is_none() => args.id = Some(word.to_owned()),
            word => args.rest.push(word.to_owned()),
        }
    }
    if args.command.is_empty() {
        return Err("missing command (create, start, exec, pause, resume, delete)".into());
    }
    Ok(args)
}

/// Runs the command; `Ok(Some(pid))` when it produced a process.
fn run(args: &Args, ops: &dyn ContainerOps) -> Result<String, OpError> {
    let id = args
        .id
        .as_deref()
        .ok_or_else(|| OpError("missing container id".into()))?;
    if args.mark_running {
        ops.mark_running(id)?;
    }
    match args.command.as_str() {
        "create" => {
            let bundle = args
                .bundle
                .as_deref()
                .ok_or_else(|| OpError("create needs --bundle".into()))?;
            let created = ops.create(&CreateOpts {
                id,
                bundle,
                console_socket: args.console_socket.as_deref(),
            })?;
            Ok(format!(
                "{} poststart={}",
                created.pid,
                u8::from(created.poststart_hooks)
            ))
        }
        "start" => ops.start(id).map(|()| String::new()),
        "exec" => {
            if args.rest.is_empty() {
                return Err(OpError("exec needs a command after --".into()));
            }
            ops.exec(&ExecOpts {
                id,
                args: args.rest.clone(),
                console_socket: args.console_socket.as_deref(),
                console_size: args.console_size,
            })
            .map(|pid| pid.to_string())
        }
        "pause" => ops.pause(id).map(|()| String::new()),
        "resume" => ops.resume(id).map(|()| String::new()),
        "delete" => ops.delete(id).map(|()| String::new()),
        other => Err(OpError(format!("unknown command {other}"))),
    }
}

fn report(fd: Option<i32>, line: &str) {
    match fd {
        Some(fd) => {
            // SAFETY: the monitor passed this fd open for us; it is written
            // once and then the process exits.
            let mut f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
            let _ = f.write_all(line.as_bytes());
        }
        None => eprint!("{line}"),
    }
}

/// The container's processes are forked from this one and keep what it
/// inherited through execve: blocked signals and ignored ones (the monitor
/// blocks SIGCHLD/SIGTERM/..., Rust ignores SIGPIPE, a caller may ignore
/// more). Start them clean: nothing blocked, every disposition default.
fn reset_signals() {
    // The kernel's struct sigaction; all-zero means SIG_DFL, no flags, empty
    // mask, whatever the architecture's field order. Raw rt_sigaction also
    // reaches the signals glibc reserves (32, 33).
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: libc::c_ulong,
        restorer: usize,
        mask: u64,
    }
    let dfl = KernelSigaction {
        handler: 0,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction with a valid struct and sigsetsize 8.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
    // SAFETY: sigset manipulation on a local, then a plain syscall.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

fn main() -> ExitCode {
    reset_signals();
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.first().map(String::as_str) == Some("--version") {
        println!("berth-container {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(raw.into_iter()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("berth-container: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(fd) = args.report_fd {
        // Keep the report channel out of anything exec'd from here (hooks).
        // The container's init is forked, so it holds it until its own
        // execve (libcontainer marks stray fds close-on-exec): the monitor
        // waits for this process's exit, not for EOF.
        // SAFETY: fcntl on an fd number; failure is harmless.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        // A panic must not print into the container's stderr.
        std::panic::set_hook(Box::new(move |info| {
            report(
                Some(fd),
                &format!("error berth-container panicked: {info}\n").replace('\n', " "),
            );
        }));
    }
    let ops = Libcontainer {
        root: args.root.clone(),
    };
    match run(&args, &ops) {
        Ok(out) if out.is_empty() => {
            report(args.report_fd, "ok\n");
            ExitCode::SUCCESS
        }
        Ok(out) => {
            report(args.report_fd, &format!("ok {out}\n"));
            ExitCode::SUCCESS
        }
        Err(e) => {
            report(args.report_fd, &format!("error {e}\n"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Args {
        parse_args(s.split_whitespace().map(str::to_owned)).unwrap()
    }

    #[test]
    fn parses_create() {
        let a = parse("--root /r --report-fd 3 create --bundle /b --console-socket /c x1");
        assert_eq!(a.root, PathBuf::from("/r"));
        assert_eq!(a.report_fd, Some(3));
        assert_eq!(a.command, "create");
        assert_eq!(a.bundle, Some(PathBuf::from("/b")));
        assert_eq!(a.console_socket, Some(PathBuf::from("/c")));
        assert_eq!(a.id.as_deref(), Some("x1"));
    }

    #[test]
    fn parses_exec_args_after_double_dash() {
        let a = parse("--mark-running exec x1 -- sh -c --version");
        assert!(a.mark_running);
        assert_eq!(a.command, "exec");
        assert_eq!(a.rest, vec!["sh", "-c", "--version"]);
        let a = parse("exec --console-socket /c --console-size 24x80 x1 -- sh");
        assert_eq!(a.console_socket, Some(PathBuf::from("/c")));
        assert_eq!(a.console_size, Some((24, 80)));
        assert!(parse_args("exec --console-size 24 x1".split(' ').map(str::to_owned)).is_err());
    }

    #[test]
    fn rejects_unknown_flags() {
        assert!(parse_args(["--nope".to_owned()].into_iter()).is_err());
        assert!(parse_args(std::iter::empty()).is_err());
    }
}
