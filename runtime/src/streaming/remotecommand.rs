//! Exec and attach sessions over whichever transport the client chose.
//!
//! A transport hands over the client's streams ([`Streams`]); this module
//! connects them to the process, forwards terminal resizes, and writes the
//! outcome on the error stream: a JSON `metav1.Status` for protocol v4 and
//! later (with the exit code of a failed command, reason
//! `NonZeroExitCode`), a plain message for the older protocols.

use std::sync::Arc;
use std::time::Duration;

use berth_cri::v1::{AttachRequest, ExecRequest};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use super::fdio::{FdStream, set_window_size};
use super::{Attached, Backend, Closed, ExecProcess, Output, blocking};
use crate::error::Error;

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// How long output may still drain after the process exited: children it
/// left behind may hold its pipes open forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long a terminal exec waits for the client's first size.
const FIRST_SIZE_WAIT: Duration = Duration::from_millis(100);

/// The client's side of one session.
pub struct Streams {
    pub stdin: Option<BoxRead>,
    pub stdout: Option<BoxWrite>,
    pub stderr: Option<BoxWrite>,
    /// JSON `{"Width":w,"Height":h}` objects, one per resize.
    pub resize: Option<BoxRead>,
    pub error: Option<BoxWrite>,
    /// Protocol v4 or later: the outcome is a JSON Status.
    pub status_json: bool,
    pub closed: Closed,
}

/// How a session ended, for the error stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Exited(i32),
    Failed(String),
    /// The client went away: nobody to tell.
    Gone,
}

pub async fn exec(backend: Arc<dyn Backend>, req: ExecRequest, mut streams: Streams) {
    let tty = req.tty;
    let cmd = req.cmd.clone();
    let mut sizes = streams.resize.take().map(resize_events);
    // A client sends its terminal's size right away: the process starts
    // with it, so its first look at the terminal already sees it.
    let mut initial = None;
    if tty && let Some(rx) = sizes.as_mut() {
        initial = tokio::time::timeout(FIRST_SIZE_WAIT, rx.recv())
            .await
            .ok()
            .flatten();
    }
    let started = {
        let backend = backend.clone();
        let mut closed = streams.closed.clone();
        tokio::select! {
            r = blocking(move || backend.exec(&req, initial)) => r,
            _ = closed.wait() => return,
        }
    };
    let outcome = match started {
        Ok(process) => run_exec(process, tty, sizes, &mut streams).await,
        Err(e) => match exec_failure(&e) {
            // The command could not be started: its exit code and reason,
            // as runc reports them.
            Some(code) => {
                let to = if tty {
                    &mut streams.stdout
                } else {
                    &mut streams.stderr
                };
                if let Some(w) = to {
                    let line = format!("{}\r\n", crate::error::chain(&e));
                    let _ = w.write_all(line.as_bytes()).await;
                }
                Outcome::Exited(code)
            }
            None => Outcome::Failed(format!(
                "error executing command in container: {}",
                crate::error::chain(&e)
            )),
        },
    };
    finish(streams, &cmd, outcome).await;
}

async fn run_exec(
    process: ExecProcess,
    tty: bool,
    sizes: Option<mpsc::Receiver<TermSize>>,
    streams: &mut Streams,
) -> Outcome {
    let ExecProcess {
        pid: _,
        stdin,
        stdout,
        stderr,
        pty,
        exit,
    } = process;
    let mut tasks = Vec::new();
    if let (Some(from), Some(to)) = (streams.stdin.take(), stdin) {
        match FdStream::new(to, tty) {
            // With a terminal, the client's end of stdin is not the
            // terminal's end: Ctrl-D is how a terminal user sends EOF.
            Ok(to) => tasks.push(tokio::spawn(copy_in(from, to))),
            Err(e) => return Outcome::Failed(format!("exec stdin: {e}")),
        }
    }
    let mut outputs = Vec::new();
    for (fd, to) in [
        (stdout, streams.stdout.take()),
        (stderr, streams.stderr.take()),
    ] {
        let Some(fd) = fd else { continue };
        match FdStream::new(fd, tty) {
            Ok(from) => outputs.push(tokio::spawn(copy_out(from, to))),
            Err(e) => return Outcome::Failed(format!("exec output: {e}")),
        }
    }
    if let (Some(sizes), Some(pty)) = (sizes, pty) {
        tasks.push(tokio::spawn(apply_sizes(sizes, pty)));
    }
    let mut closed = streams.closed.clone();
    let code = tokio::select! {
        code = exit => code,
        // Dropping the exit future kills the process.
        _ = closed.wait() => {
            abort_all(&tasks);
            abort_all(&outputs);
            return Outcome::Gone;
        }
    };
    let drained = async {
        for o in outputs.iter_mut() {
            let _ = o.await;
        }
    };
    if tokio::time::timeout(DRAIN_AFTER_EXIT, drained)
        .await
        .is_err()
    {
        abort_all(&outputs);
    }
    abort_all(&tasks);
    match code {
        Ok(code) => Outcome::Exited(code),
        Err(e) => Outcome::Failed(crate::error::chain(&e)),
    }
}

pub async fn attach(backend: Arc<dyn Backend>, req: AttachRequest, mut streams: Streams) {
    let tty = req.tty;
    let started = {
        let backend = backend.clone();
        let mut closed = streams.closed.clone();
        tokio::select! {
            r = blocking(move || backend.attach(&req)) => r,
            _ = closed.wait() => return,
        }
    };
    let outcome = match started {
        Ok(attached) => run_attach(attached, tty, &mut streams).await,
        Err(e) => Outcome::Failed(format!(
            "error attaching to container: {}",
            crate::error::chain(&e)
        )),
    };
    finish(streams, &[], outcome).await;
}

async fn run_attach(attached: Attached, tty: bool, streams: &mut Streams) -> Outcome {
    let Attached {
        stdin,
        pty,
        mut output,
    } = attached;
    let mut tasks = Vec::new();
    let (stdin_done_tx, mut stdin_done) = tokio::sync::oneshot::channel::<()>();
    if let (Some(from), Some(to)) = (streams.stdin.take(), stdin) {
        match FdStream::new(to, tty) {
            Ok(to) => tasks.push(tokio::spawn(async move {
                copy_in(from, to).await;
                let _ = stdin_done_tx.send(());
            })),
            Err(e) => return Outcome::Failed(format!("attach stdin: {e}")),
        }
    } else {
        drop(stdin_done_tx);
    }
    if let (Some(resize), Some(pty)) = (streams.resize.take(), pty) {
        tasks.push(tokio::spawn(apply_sizes(resize_events(resize), pty)));
    }
    let mut stdout = streams.stdout.take();
    let mut stderr = streams.stderr.take();
    let mut closed = streams.closed.clone();
    let mut stdin_open = true;
    let outcome = loop {
        tokio::select! {
            chunk = output.next() => match chunk {
                Ok(Some((which, bytes))) => {
                    let to = match which {
                        Output::Stderr if !tty => &mut stderr,
                        _ => &mut stdout,
                    };
                    if let Some(w) = to
                        && w.write_all(&bytes).await.is_err()
                    {
                        break Outcome::Gone;
                    }
                }
                Ok(None) => break Outcome::Exited(0),
                Err(e) => break Outcome::Failed(crate::error::chain(&e)),
            },
            r = &mut stdin_done, if stdin_open => {
                stdin_open = false;
                if r.is_ok() {
                    output.stdin_done();
                }
            }
            _ = closed.wait() => break Outcome::Gone,
        }
    };
    abort_all(&tasks);
    for w in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
        let _ = w.flush().await;
    }
    // Attach has no exit code of its own: the container's is in its status.
    match outcome {
        Outcome::Exited(_) => Outcome::Exited(0),
        other => other,
    }
}

/// The exit code runc gives a command that could not start (127: no
/// such file, 126: not executable), when that is what `e` says.
pub fn exec_failure(e: &Error) -> Option<i32> {
    let Error::Shim {
        code: berth_proto::shim::shim_error::Code::ExecFailed,
        message,
        ..
    } = e
    else {
        return None;
    };
    let lower = message.to_lowercase();
    Some(
        if lower.contains("not found") || lower.contains("no such file") {
            127
        } else {
            126
        },
    )
}

fn abort_all(tasks: &[tokio::task::JoinHandle<()>]) {
    for t in tasks {
        t.abort();
    }
}

async fn copy_in(mut from: BoxRead, mut to: FdStream) {
    let _ = tokio::io::copy(&mut from, &mut to).await;
    // Dropping `to` closes the process's stdin.
}

async fn copy_out(mut from: FdStream, to: Option<BoxWrite>) {
    match to {
        Some(mut to) => {
            let _ = tokio::io::copy(&mut from, &mut to).await;
            let _ = to.flush().await;
        }
        // Output nobody asked for is read and dropped, so the process
        // never blocks on a full pipe.
        None => {
            let _ = tokio::io::copy(&mut from, &mut tokio::io::sink()).await;
        }
    }
}

/// A terminal size as the resize stream carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Parses the resize stream (JSON objects, whitespace or nothing between
/// them: Go's json.Encoder writes one per line) into size events.
fn resize_events(from: BoxRead) -> mpsc::Receiver<TermSize> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut reader = BufReader::new(from);
        let mut pending = Vec::new();
        loop {
            let buf = match reader.fill_buf().await {
                Ok([]) | Err(_) => return,
                Ok(b) => b,
            };
            pending.extend_from_slice(buf);
            let n = buf.len();
            reader.consume(n);
            let mut stream = serde_json::Deserializer::from_slice(&pending).into_iter::<TermSize>();
            let mut used = 0;
            loop {
                match stream.next() {
                    Some(Ok(size)) => {
                        used = stream.byte_offset();
                        if tx.send(size).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    // Garbage on the resize stream: stop resizing, keep
                    // the session.
                    Some(Err(_)) => return,
                    None => {
                        used = stream.byte_offset();
                        break;
                    }
                }
            }
            pending.drain(..used);
            if pending.len() > 4096 {
                return;
            }
        }
    });
    rx
}

async fn apply_sizes(mut sizes: mpsc::Receiver<TermSize>, pty: std::os::fd::OwnedFd) {
    while let Some(size) = sizes.recv().await {
        let _ = set_window_size(&pty, size.width, size.height);
    }
}

/// Writes the outcome and closes the client's streams.
async fn finish(mut streams: Streams, cmd: &[String], outcome: Outcome) {
    if let Some(mut error) = streams.error.take() {
        if let Some(message) = status_message(&outcome, cmd, streams.status_json) {
            let _ = error.write_all(message.as_bytes()).await;
        }
        let _ = error.shutdown().await;
    }
    for w in [streams.stdout.as_mut(), streams.stderr.as_mut()]
        .into_iter()
        .flatten()
    {
        let _ = w.shutdown().await;
    }
}

/// What goes on the error stream, if anything.
pub fn status_message(outcome: &Outcome, cmd: &[String], json: bool) -> Option<String> {
    let value = match outcome {
        Outcome::Gone => return None,
        Outcome::Exited(0) => {
            if !json {
                return None;
            }
            serde_json::json!({"metadata": {}, "status": "Success"})
        }
        Outcome::Exited(code) => {
            let message = format!(
                "command terminated with non-zero exit code: error executing command {}, exit code {code}",
                go_list(cmd)
            );
            if !json {
                return Some(message);
            }
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
            })
        }
        Outcome::Failed(why) => {
            let message = format!("Internal error occurred: {why}");
            if !json {
                return Some(message);
            }
            serde_json::json!({
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": "InternalError",
                "details": {"causes": [{"message": why}]},
                "code": 500,
            })
        }
    };
    Some(value.to_string())
}

/// A command as Go prints a `[]string` (`[sh -c exit 3]`), as kubelet's
/// messages show it.
fn go_list(cmd: &[String]) -> String {
    format!("[{}]", cmd.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> Vec<String> {
        ["sh", "-c", "exit 3"].map(String::from).to_vec()
    }

    #[test]
    fn a_failed_command_reports_its_exit_code_as_kubelet_does() {
        let m = status_message(&Outcome::Exited(3), &cmd(), true).unwrap();
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("[sh -c exit 3], exit code 3")
        );
    }

    #[test]
    fn success_is_a_status_for_v4_and_silence_before() {
        let m = status_message(&Outcome::Exited(0), &cmd(), true).unwrap();
        assert_eq!(m, r#"{"metadata":{},"status":"Success"}"#);
        assert_eq!(status_message(&Outcome::Exited(0), &cmd(), false), None);
        assert!(
            status_message(&Outcome::Exited(1), &cmd(), false)
                .unwrap()
                .starts_with("command terminated with non-zero exit code")
        );
        assert_eq!(status_message(&Outcome::Gone, &cmd(), true), None);
    }

    #[tokio::test]
    async fn resize_events_reach_the_terminal() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let events: &[u8] = b"{\"Width\":100,\"Height\":30}\n{\"Width\":7";
        let (mut w, r) = tokio::io::duplex(64);
        let task = tokio::spawn(apply_sizes(
            resize_events(Box::new(r)),
            pty.master.try_clone().unwrap(),
        ));
        w.write_all(events).await.unwrap();
        w.write_all(b"7,\"Height\":9}").await.unwrap();
        drop(w);
        task.await.unwrap();
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one winsize.
        unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&pty.slave),
                libc::TIOCGWINSZ,
                &mut size,
            )
        };
        assert_eq!((size.ws_col, size.ws_row), (77, 9));
    }
}
