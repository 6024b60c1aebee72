//! Streaming exec and attach: the container side of the streaming server.
//! The shim starts the process (or attaches) and hands berthd the client's
//! ends of the stdio descriptors; berthd pumps them itself.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use berth_cri::v1::{AttachRequest, ExecRequest};
use berth_proto::shim::ShimResponse;
use bytes::Bytes;
use prost::Message;
use tokio::io::AsyncReadExt;

use super::{current, find, not_running, shim, shim_dir};
use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::store::{ContainerRecord, ContainerState};
use crate::streaming::remotecommand::TermSize;
use crate::streaming::{AttachOutput, Attached, BoxFuture, ExecProcess, Output};

/// The container, if exec and attach can reach it now.
pub fn streamable(daemon: &Daemon, id: &str) -> Result<ContainerRecord> {
    let record = current(daemon, find(daemon, id)?);
    tracing::Span::current().record("container_id", record.id.as_str());
    if record.state != ContainerState::Running {
        return Err(not_running(&record));
    }
    Ok(record)
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    fd.try_clone()
        .map_err(|e| Error::io("duplicate a stdio descriptor", e))
}

/// Starts `req.cmd` in the container, with a terminal of `size` when asked.
pub fn exec_stream(
    daemon: &Daemon,
    req: &ExecRequest,
    size: Option<TermSize>,
) -> Result<ExecProcess> {
    let record = streamable(daemon, &req.container_id)?;
    let dir = shim_dir(daemon, &record.id);
    let size = size.map(|s| shim::TermSize {
        rows: s.height,
        cols: s.width,
    });
    let session = shim::exec_stream(&dir, req.cmd.clone(), req.tty, req.stdin, size)?;
    tracing::debug!(container_id = %record.id, pid = session.pid, tty = session.pty, "exec started");
    // The control connection stays open until the process exits; closing
    // it (dropping the exit future) makes the shim kill the process.
    let control = session
        .control()
        .try_clone()
        .map_err(|e| Error::io("duplicate the exec's control connection", e))?;
    let socket = dir.join("shim.sock");
    let exit = wait_exit(control, socket);
    let pid = session.pid;
    if session.pty {
        let master = session.stdout;
        Ok(ExecProcess {
            pid: Some(pid),
            stdin: if req.stdin { Some(dup(&master)?) } else { None },
            stdout: Some(dup(&master)?),
            stderr: None,
            pty: Some(master),
            exit,
        })
    } else {
        Ok(ExecProcess {
            pid: Some(pid),
            stdin: session.stdin,
            stdout: Some(session.stdout),
            stderr: session.stderr,
            pty: None,
            exit,
        })
    }
}

/// Reads the shim's `ExecExited` from the control connection, without a
/// thread of its own.
fn wait_exit(control: UnixStream, socket: PathBuf) -> BoxFuture<'static, Result<i32>> {
    Box::pin(async move {
        let protocol = |e: std::io::Error| Error::ShimProtocol {
            socket: socket.clone(),
            what: "read the exit of an exec",
            source: berth_proto::FrameError::Io(e),
        };
        control.set_nonblocking(true).map_err(protocol)?;
        let mut control = tokio::net::UnixStream::from_std(control).map_err(protocol)?;
        let mut len = [0u8; 4];
        control.read_exact(&mut len).await.map_err(protocol)?;
        let len = berth_proto::frame_len(len).map_err(|source| Error::ShimProtocol {
            socket: socket.clone(),
            what: "read the exit of an exec",
            source,
        })?;
        let mut body = vec![0u8; len];
        control.read_exact(&mut body).await.map_err(protocol)?;
        let resp = ShimResponse::decode(body.as_slice()).map_err(|e| Error::ShimProtocol {
            socket: socket.clone(),
            what: "decode the exit of an exec",
            source: berth_proto::FrameError::Decode(e),
        })?;
        shim::exec_exit(&socket, resp)
    })
}

/// Attaches to the container's own stdio, held by its shim.
pub fn attach(daemon: &Daemon, req: &AttachRequest) -> Result<Attached> {
    let record = streamable(daemon, &req.container_id)?;
    let dir = shim_dir(daemon, &record.id);
    let parts = shim::attach(&dir, req.stdin)?.into_parts();
    let stdin = match (&parts.pty_master, parts.stdin_granted) {
        (Some(master), true) => Some(dup(master)?),
        (None, true) => parts.stdin,
        _ => None,
    };
    parts
        .output
        .set_nonblocking(true)
        .map_err(|e| Error::io("attach output connection", e))?;
    Ok(Attached {
        stdin,
        pty: parts.pty_master,
        output: Box::new(ShimOutput {
            socket: Some(parts.output),
            stream: None,
            decoder: parts.decoder,
            path: dir.join("shim.sock"),
        }),
    })
}

/// The container's output as its shim sends it on an attach connection.
struct ShimOutput {
    /// Registered with tokio at the first read (this is made on a
    /// blocking thread).
    socket: Option<UnixStream>,
    stream: Option<tokio::net::UnixStream>,
    decoder: berth_proto::output::Decoder,
    path: PathBuf,
}

impl ShimOutput {
    fn stream(&mut self) -> std::io::Result<&mut tokio::net::UnixStream> {
        if let Some(socket) = self.socket.take() {
            self.stream = Some(tokio::net::UnixStream::from_std(socket)?);
        }
        self.stream
            .as_mut()
            .ok_or_else(|| std::io::Error::other("attach connection is gone"))
    }

    async fn next_chunk(&mut self) -> Result<Option<(Output, Bytes)>> {
        let path = self.path.clone();
        let protocol = |what, e: std::io::Error| Error::ShimProtocol {
            socket: path.clone(),
            what,
            source: berth_proto::FrameError::Io(e),
        };
        loop {
            match self.decoder.next_frame() {
                Ok(Some((which, data))) => {
                    let which = if which == berth_proto::output::STDERR {
                        Output::Stderr
                    } else {
                        Output::Stdout
                    };
                    return Ok(Some((which, Bytes::from(data))));
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(Error::Internal(format!(
                        "bad output frame from the shim at {}: {e}",
                        self.path.display()
                    )));
                }
            }
            let mut buf = vec![0u8; 64 * 1024];
            let n = match self.stream() {
                Ok(s) => s.read(&mut buf).await,
                Err(e) => Err(e),
            };
            match n {
                Ok(0) => return Ok(None),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) => return Err(protocol("read attach output", e)),
            }
        }
    }
}

impl AttachOutput for ShimOutput {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<(Output, Bytes)>>> {
        Box::pin(self.next_chunk())
    }

    fn stdin_done(&mut self) {
        // Half-closing the attach connection tells the shim this client's
        // stdin ended (stdin_once closes the container's stdin then).
        let _ = self.stream().map(|s| {
            let fd = std::os::fd::AsRawFd::as_raw_fd(s);
            // SAFETY: shutdown on a socket we own; no memory is passed.
            unsafe { libc::shutdown(fd, libc::SHUT_WR) }
        });
    }
}
