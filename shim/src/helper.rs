//! Running `berth-container`, the short-lived libcontainer helper.
//!
//! The monitor never links libcontainer: every operation that needs it is
//! one run of the helper, whose stdin/stdout/stderr are the stdio the new
//! process (container init or exec'd process) should get, and whose outcome
//! arrives as one line on a report pipe (`ok[ WORDS]` / `error MESSAGE`).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::sys;

/// Environment variables that must not reach libcontainer (it would pass
/// socket-activation fds into the container, or notify a systemd).
const SCRUBBED_ENV: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// How to invoke the helper for one container.
#[derive(Clone, Debug)]
pub struct Helper {
    pub path: PathBuf,
    pub root: PathBuf,
    pub id: String,
}

/// A running helper: its pid and the read end of its report pipe
/// (non-blocking).
#[derive(Debug)]
pub struct Spawned {
    pub pid: i32,
    pub report: OwnedFd,
}

/// The three stdio fds for the helper (and the process it creates).
#[derive(Debug)]
pub struct HelperStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl HelperStdio {
    pub fn null() -> io::Result<Self> {
        Ok(HelperStdio {
            stdin: sys::open_dev_null(libc::O_RDONLY)?,
            stdout: sys::open_dev_null(libc::O_WRONLY)?,
            stderr: sys::open_dev_null(libc::O_WRONLY)?,
        })
    }
}

impl Helper {
    /// The helper next to the running binary, unless configured.
    pub fn default_path(configured: &str) -> PathBuf {
        if !configured.is_empty() {
            return PathBuf::from(configured);
        }
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("berth-container")))
            .unwrap_or_else(|| PathBuf::from("berth-container"))
    }

    /// Starts `berth-container [--mark-running] <command> <options> <id> [-- <tail>]`.
    pub fn spawn(
        &self,
        command: &str,
        options: &[OsString],
        tail: &[String],
        mark_running: bool,
        stdio: HelperStdio,
    ) -> io::Result<Spawned> {
        let (report_r, report_w) = sys::pipe()?;
        sys::set_nonblocking(report_r.as_raw_fd())?;
        let mut cmd = Command::new(&self.path);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--report-fd")
            .arg(report_w.as_raw_fd().to_string());
        if mark_running {
            cmd.arg("--mark-running");
        }
        cmd.arg(command).args(options).arg(&self.id);
        if !tail.is_empty() {
            cmd.arg("--").args(tail);
        }
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        cmd.stdin(Stdio::from(stdio.stdin))
            .stdout(Stdio::from(stdio.stdout))
            .stderr(Stdio::from(stdio.stderr));
        // The report pipe's write end is inherited by this one child only:
        // the monitor is single-threaded, so nothing else can be spawned
        // between these two fcntl calls.
        sys::set_cloexec(report_w.as_raw_fd(), false)?;
        let spawned = cmd.spawn();
        let _ = sys::set_cloexec(report_w.as_raw_fd(), true);
        drop(report_w);
        let child = spawned
            .map_err(|e| io::Error::new(e.kind(), format!("run {}: {e}", self.path.display())))?;
        // The monitor reaps every child itself (it is a subreaper); the
        // std handle is dropped without waiting.
        Ok(Spawned {
            pid: child.id() as i32,
            report: report_r,
        })
    }
}

/// Reads what is in a (non-blocking) report pipe, appending to `buf`; true
/// at EOF.
pub fn read_report(fd: &OwnedFd, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 512];
    loop {
        match sys::read(fd.as_raw_fd(), &mut chunk) {
            Ok(0) => return true,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > 64 * 1024 {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

/// The helper's outcome from its report and exit code: the words after
/// `ok`, or the error message.
pub fn outcome(report: &[u8], exit_code: i32) -> Result<Vec<String>, String> {
    let text = String::from_utf8_lossy(report);
    let line = text.lines().next().unwrap_or("").trim_end();
    if let Some(rest) = line.strip_prefix("ok")
        && (rest.is_empty() || rest.starts_with(' '))
        && exit_code == 0
    {
        return Ok(rest.split_whitespace().map(str::to_owned).collect());
    }
    if let Some(msg) = line.strip_prefix("error ") {
        return Err(msg.to_owned());
    }
    Err(format!(
        "berth-container exited with status {exit_code} without reporting an outcome"
    ))
}

/// `key=value` among the outcome words.
pub fn word_value<'a>(words: &'a [String], key: &str) -> Option<&'a str> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

pub fn console_socket_option(dir: &Path, name: &str) -> Vec<OsString> {
    vec![
        OsString::from("--console-socket"),
        dir.join(name).into_os_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_outcomes() {
        assert_eq!(
            outcome(b"ok 42 poststart=0\n", 0),
            Ok(vec!["42".to_owned(), "poststart=0".to_owned()])
        );
        assert_eq!(outcome(b"ok\n", 0), Ok(vec![]));
        assert_eq!(
            outcome(b"error create container: boom\n", 1),
            Err("create container: boom".to_owned())
        );
        assert!(outcome(b"", 137).unwrap_err().contains("status 137"));
        assert!(outcome(b"okay\n", 0).is_err());
        let words = vec!["42".to_owned(), "poststart=1".to_owned()];
        assert_eq!(word_value(&words, "poststart"), Some("1"));
        assert_eq!(word_value(&words, "post"), None);
    }
}
