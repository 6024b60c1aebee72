//! ExecSync on top of streaming exec: the shim starts the process exactly
//! as for `kubectl exec` (same namespaces, cgroup, user, capabilities,
//! seccomp) and hands over its pipes; berthd reads them itself, so the
//! output is held once, capped, and the shim stays small.

use std::sync::Arc;
use std::time::Duration;

use berth_cri::v1::ExecRequest;
use tokio::io::AsyncReadExt;

use super::streams::exec_stream;
use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::streaming::ExecProcess;
use crate::streaming::fdio::FdStream;
use crate::streaming::remotecommand::exec_failure;

/// What one stream keeps (kubelet's limit for exec output).
pub const STREAM_CAP: usize = 16 << 20;
/// What the whole answer carries: kubelet and crictl take CRI messages of
/// at most 16 MiB, so both streams together stay below that.
const ANSWER_BUDGET: usize = (16 << 20) - 4096;
/// How long output may still come after the process exited (children it
/// left behind may hold its pipes).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSyncOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
}

pub async fn exec_sync(
    daemon: Arc<Daemon>,
    id: String,
    cmd: Vec<String>,
    timeout_secs: i64,
) -> Result<ExecSyncOutput> {
    if cmd.is_empty() {
        return Err(Error::InvalidArgument("exec command is required".into()));
    }
    let req = ExecRequest {
        container_id: id.clone(),
        cmd: cmd.clone(),
        stdin: false,
        stdout: true,
        stderr: true,
        tty: false,
    };
    let started = daemon.run(move |d| exec_stream(d, &req, None)).await;
    let process = match started {
        Ok(p) => p,
        // A shim from before streaming exec does not know the request:
        // it runs ExecSync itself.
        Err(Error::Shim {
            code: berth_proto::shim::shim_error::Code::InvalidArgument,
            message,
            ..
        }) if message == "empty request" => {
            let (stdout, stderr, exit_code) = daemon
                .run(move |d| super::exec_sync_in_shim(d, &id, cmd, timeout_secs))
                .await?;
            return Ok(ExecSyncOutput {
                stdout,
                stderr,
                exit_code,
            });
        }
        // The process never started: an exit code and the reason, as
        // runc gives them.
        Err(e) if exec_failure(&e).is_some() => {
            return Ok(ExecSyncOutput {
                stdout: Vec::new(),
                stderr: format!("{}\n", crate::error::chain(&e)).into_bytes(),
                exit_code: exec_failure(&e).unwrap_or(126),
            });
        }
        Err(e) => return Err(e),
    };
    let timeout = (timeout_secs > 0).then(|| Duration::from_secs(timeout_secs.unsigned_abs()));
    collect(process, timeout, &cmd).await
}

/// Reads the process's output until it exits (or `timeout` passes: then
/// the process and every process it started are killed).
pub async fn collect(
    process: ExecProcess,
    timeout: Option<Duration>,
    cmd: &[String],
) -> Result<ExecSyncOutput> {
    // `exit` is declared before `tree` so that it is dropped after it: its
    // drop hangs up on the shim, which kills the root at once and would
    // orphan the children before they are found.
    let ExecProcess {
        pid,
        stdout,
        stderr,
        mut exit,
        ..
    } = process;
    // Killing the tree on drop covers a caller that gives up as well.
    let mut tree = TreeKill(pid);
    let mut out = Capped::open(stdout)?;
    let mut err = Capped::open(stderr)?;
    let run = async {
        let reading = async { tokio::join!(out.read_all(), err.read_all()) };
        tokio::pin!(reading);
        let mut read_done = false;
        let code = tokio::select! {
            code = &mut exit => code,
            _ = &mut reading => {
                read_done = true;
                (&mut exit).await
            }
        };
        if !read_done {
            let _ = tokio::time::timeout(DRAIN_AFTER_EXIT, &mut reading).await;
        }
        code
    };
    let code = match timeout {
        Some(limit) => match tokio::time::timeout(limit, run).await {
            Ok(code) => code?,
            Err(_) => {
                tree.kill();
                return Err(Error::DeadlineExceeded(format!(
                    "command {cmd:?} timed out after {}s and was killed",
                    limit.as_secs()
                )));
            }
        },
        None => run.await?,
    };
    tree.0 = None;
    Ok(answer(out, err, code))
}

/// Fits the output into the answer, saying on stderr what was cut.
fn answer(out: Capped, err: Capped, exit_code: i32) -> ExecSyncOutput {
    let (mut stdout, mut stderr) = (out.kept, err.kept);
    let half = ANSWER_BUDGET / 2;
    if stdout.len() + stderr.len() > ANSWER_BUDGET {
        if stdout.len() <= half {
            stderr.truncate(ANSWER_BUDGET - stdout.len());
        } else if stderr.len() <= half {
            stdout.truncate(ANSWER_BUDGET - stderr.len());
        } else {
            stdout.truncate(half);
            stderr.truncate(ANSWER_BUDGET - half);
        }
    }
    for (name, total, kept) in [
        ("stdout", out.total, stdout.len()),
        ("stderr", err.total, stderr.len()),
    ] {
        if total > kept {
            stderr.extend_from_slice(
                format!("\n[berth: {name} was cut to its first {kept} of {total} bytes]\n")
                    .as_bytes(),
            );
        }
    }
    ExecSyncOutput {
        stdout,
        stderr,
        exit_code,
    }
}

/// One output pipe, kept up to [`STREAM_CAP`] and drained beyond it so the
/// process never blocks on a full pipe.
struct Capped {
    pipe: Option<FdStream>,
    kept: Vec<u8>,
    total: usize,
}

impl Capped {
    fn open(fd: Option<std::os::fd::OwnedFd>) -> Result<Capped> {
        let pipe = fd
            .map(|fd| FdStream::new(fd, false))
            .transpose()
            .map_err(|e| Error::io("register exec output", e))?;
        Ok(Capped {
            pipe,
            kept: Vec::new(),
            total: 0,
        })
    }

    async fn read_all(&mut self) {
        let Some(pipe) = self.pipe.as_mut() else {
            return;
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    self.total += n;
                    let room = STREAM_CAP.saturating_sub(self.kept.len());
                    self.kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    }
}

/// Kills a process and all its descendants when dropped (unless its pid
/// was taken out first).
struct TreeKill(Option<i32>);

impl TreeKill {
    fn kill(&mut self) {
        let Some(root) = self.0.take() else {
            return;
        };
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        // Stopped processes fork no more: stop the root, then whatever
        // the tree holds, until no new process shows up; then kill them
        // all. A process whose parent dies is reparented, not freed, so
        // none of these pids can be reused before the kill.
        let _ = kill(Pid::from_raw(root), Signal::SIGSTOP);
        let mut tree: Vec<i32> = Vec::new();
        for _ in 0..8 {
            let found = descendants(root);
            let new: Vec<i32> = found
                .iter()
                .copied()
                .filter(|p| !tree.contains(p))
                .collect();
            if new.is_empty() && !tree.is_empty() {
                break;
            }
            for pid in &new {
                let _ = kill(Pid::from_raw(*pid), Signal::SIGSTOP);
            }
            tree.extend(new);
            std::thread::sleep(Duration::from_millis(5));
        }
        tracing::debug!(root, children = ?tree, "killing an exec and what it started");
        for pid in tree.into_iter().chain([root]) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

impl Drop for TreeKill {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every descendant of `root`, from `/proc/<pid>/task/<tid>/children`.
fn descendants(root: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(text) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in text
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok())
            {
                if !found.contains(&child) && found.len() < 4096 {
                    found.push(child);
                    queue.push(child);
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn capped(len: usize) -> Capped {
        Capped {
            pipe: None,
            kept: vec![b'x'; len.min(STREAM_CAP)],
            total: len,
        }
    }

    #[test]
    fn output_within_the_budget_is_untouched() {
        let a = answer(capped(10), capped(5), 3);
        assert_eq!((a.stdout.len(), a.stderr.len(), a.exit_code), (10, 5, 3));
    }

    #[test]
    fn a_long_stream_is_cut_and_says_so_and_the_answer_fits_kubelets_limit() {
        let a = answer(capped(100 << 20), capped(10), 0);
        assert!(a.stdout.len() + a.stderr.len() < 16 << 20);
        let note = String::from_utf8_lossy(&a.stderr);
        assert!(note.contains("stdout was cut"), "{note}");
        assert!(note.contains(&format!("of {} bytes", 100 << 20)), "{note}");
        assert!(!note.contains("stderr was cut"), "{note}");
    }

    #[test]
    fn two_long_streams_share_the_budget() {
        let a = answer(capped(20 << 20), capped(20 << 20), 0);
        assert!(a.stdout.len() + a.stderr.len() < 16 << 20);
        assert!(a.stdout.len() >= (8 << 20) - 4096);
    }

    #[tokio::test]
    async fn a_timeout_kills_the_process_and_its_children() {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id().unwrap() as i32;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let kids = descendants(pid);
        assert_eq!(kids.len(), 2, "{kids:?}");
        let stdout = child.stdout.take().unwrap().into_owned_fd().unwrap();
        let stderr = child.stderr.take().unwrap().into_owned_fd().unwrap();
        let process = ExecProcess {
            pid: Some(pid),
            stdin: None,
            stdout: Some(stdout),
            stderr: Some(stderr),
            pty: None,
            exit: Box::pin(async move {
                let s = child.wait().await.unwrap();
                Ok(s.code().unwrap_or(137))
            }),
        };
        let t0 = std::time::Instant::now();
        let r = collect(process, Some(Duration::from_millis(300)), &["sh".into()]).await;
        assert!(matches!(r, Err(Error::DeadlineExceeded(_))), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(200)).await;
        for k in kids {
            let stat = std::fs::read_to_string(format!("/proc/{k}/stat")).unwrap_or_default();
            // Gone, or a zombie waiting for its reaper.
            assert!(
                stat.is_empty() || stat.contains(") Z "),
                "child {k} lives: {stat}"
            );
        }
    }
}
