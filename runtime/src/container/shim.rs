//! berthd's side of the shim protocol: launching a shim, calling it, and
//! reading what it leaves in its directory; and the streaming sessions
//! ([`exec_stream`], [`attach`]) whose stdio fds the shim passes over.

use crate::process::NoInheritedFds;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::shim::{
    AttachRequest, ExecStreamRequest, ExitRecord, ShimConfig, ShimRequest, ShimResponse,
    shim_error, shim_request, shim_response,
};
use berth_proto::{FrameError, MAX_FRAME_LEN, output, read_frame, write_frame};
use prost::Message;

use crate::error::{Error, IoContext, Result};
use crate::process::ProcessIdentity;

/// `<state_dir>/shims/<id>`: config.pb, shim.sock, shim.pid, exit.pb.
pub fn shim_dir(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("shims").join(id)
}

/// The shim binaries live next to berthd unless `BERTH_SHIM` says otherwise.
pub fn shim_binary() -> PathBuf {
    binary("BERTH_SHIM", "berth-shim")
}

pub fn container_helper_binary() -> PathBuf {
    binary("BERTH_CONTAINER", "berth-container")
}

fn binary(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Writes the shim's config into `dir`, for a later [`launch`]
/// (CreateContainer writes it, StartContainer launches).
pub fn write_config(dir: &Path, config: &ShimConfig) -> Result<()> {
    std::fs::create_dir_all(dir).context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join("config.pb"), config.encode_to_vec())
        .context(|| format!("write {}/config.pb", dir.display()))
}

/// The files a monitor leaves in its dir, which a new monitor there must
/// not be taken for (an earlier launch that was discarded).
const MONITOR_FILES: [&str; 4] = ["exit.pb", "shim.pid", "shim.sock", "console.sock"];

/// Removes what a monitor left in `dir`; its config and bundle stay.
pub fn remove_monitor_files(dir: &Path) -> Result<()> {
    for name in MONITOR_FILES {
        match std::fs::remove_file(dir.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Error::io(format!("remove {}/{name}", dir.display()), e));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether a shim process lives in `dir` (launching or serving): it holds
/// the dir's lock.
fn lives_in(dir: &Path) -> bool {
    let Ok(file) = std::fs::File::open(dir.join("shim.lock")) else {
        return false;
    };
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return false;
    }
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// Waits, up to `timeout`, until a shim whose launch is under way in `dir`
/// (berthd died during it) answers or is gone, so that what it makes can
/// be discarded.
pub fn wait_for_launch(dir: &Path, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while lives_in(dir) && !answers(dir) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `berth-shim start` on the config in `dir`, which returns once the
/// container exists (or failed to be created); returns the identity of the
/// monitor process it left running.
pub fn launch(dir: &Path, id: &str) -> Result<ProcessIdentity> {
    remove_monitor_files(dir)?;
    let output = std::process::Command::new(shim_binary())
        .no_inherited_fds()
        .arg("start")
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .output()
        .map_err(|e| Error::io(format!("run {}", shim_binary().display()), e))?;
    let mut out = output.stdout.as_slice();
    match read_frame::<ShimResponse>(&mut out) {
        Ok(resp) => into_result(&dir.join("shim.sock"), resp)?,
        Err(_) => {
            return Err(Error::Internal(format!(
                "shim for {id} failed to start ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    };
    // The monitor wrote its pid before answering and is alive now, so the
    // identity read here is the monitor's own.
    let pid =
        read_pid(dir).ok_or_else(|| Error::Internal(format!("shim for {id} left no pid file")))?;
    ProcessIdentity::of(pid).map_err(|e| Error::io(format!("identity of shim {pid} for {id}"), e))
}

fn read_pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("shim.pid"))
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
}

/// One request to the shim of `dir`, waiting up to `timeout` for the answer.
/// Blocking: call it from domain code, never from an async worker.
pub fn call(
    dir: &Path,
    request: shim_request::Request,
    timeout: Duration,
) -> Result<shim_response::Response> {
    let (mut stream, socket) = send_request(dir, request, timeout)?;
    let resp: ShimResponse = read_frame(&mut stream).map_err(|source| Error::ShimProtocol {
        socket: socket.clone(),
        what: "read the answer",
        source,
    })?;
    into_result(&socket, resp)
}

/// Connects to the shim of `dir` and sends `request`; answers are then
/// read within `read_timeout`.
fn send_request(
    dir: &Path,
    request: shim_request::Request,
    read_timeout: Duration,
) -> Result<(UnixStream, PathBuf)> {
    let socket = dir.join("shim.sock");
    let mut stream = connect_socket(&socket).map_err(|e| Error::ShimUnreachable {
        socket: socket.clone(),
        source: e,
    })?;
    stream.set_read_timeout(Some(read_timeout)).ok();
    stream.set_write_timeout(Some(Duration::from_secs(10))).ok();
    write_frame(
        &mut stream,
        &ShimRequest {
            request: Some(request),
        },
    )
    .map_err(|source| Error::ShimProtocol {
        socket: socket.clone(),
        what: "send the request",
        source,
    })?;
    Ok((stream, socket))
}

/// Whether a shim answers on the socket of `dir`: for the remains of a
/// create that never got a record (and so no recorded identity).
pub fn answers(dir: &Path) -> bool {
    connect_socket(&dir.join("shim.sock")).is_ok()
}

/// Connects to a shim socket. A socket address holds at most 107 bytes and
/// a long state dir makes `<state>/shims/<64 hex id>/shim.sock` longer:
/// such a path is reached through an `O_PATH` descriptor of its directory
/// (`/proc/self/fd/<fd>/shim.sock`), as the shim binds it from inside the
/// directory.
fn connect_socket(socket: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    if socket.as_os_str().len() < 100 {
        return UnixStream::connect(socket);
    }
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
        return UnixStream::connect(socket);
    };
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    let short = Path::new("/proc/self/fd")
        .join(dir.as_raw_fd().to_string())
        .join(name);
    UnixStream::connect(short)
}

fn into_result(socket: &Path, resp: ShimResponse) -> Result<shim_response::Response> {
    match resp.response {
        Some(shim_response::Response::Error(e)) => Err(Error::Shim {
            socket: socket.to_path_buf(),
            code: shim_error::Code::try_from(e.code).unwrap_or(shim_error::Code::Internal),
            message: e.message,
        }),
        Some(other) => Ok(other),
        None => Err(Error::Shim {
            socket: socket.to_path_buf(),
            code: shim_error::Code::Internal,
            message: "empty answer".into(),
        }),
    }
}

/// The exit the shim recorded, if the container has exited.
pub fn read_exit(dir: &Path) -> Option<ExitRecord> {
    let bytes = std::fs::read(dir.join("exit.pb")).ok()?;
    ExitRecord::decode(bytes.as_slice()).ok()
}

/// The identity of the shim whose pid file is in `dir`, for records made
/// before identities were recorded: trusted only if that process is a
/// berth-shim whose socket answers.
pub fn adopt_identity(dir: &Path) -> Option<ProcessIdentity> {
    let pid = read_pid(dir)?;
    let mut cmdline = Vec::new();
    std::fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|mut f| f.read_to_end(&mut cmdline))
        .ok()?;
    if !cmdline.windows(10).any(|w| w == b"berth-shim") || !answers(dir) {
        return None;
    }
    ProcessIdentity::of(pid).ok()
}

// ---- streaming sessions ----------------------------------------------------

/// How long the shim may take to start an exec'd process (its helper runs
/// one at a time, so this includes waiting behind other operations).
const STREAM_START_TIMEOUT: Duration = Duration::from_secs(60);

/// A terminal size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TermSize {
    pub rows: u16,
    pub cols: u16,
}

/// The exit code in the last answer of an exec session.
pub fn exec_exit(socket: &Path, resp: ShimResponse) -> Result<i32> {
    match into_result(socket, resp)? {
        shim_response::Response::ExecExited(x) => Ok(x.exit_code),
        other => Err(unexpected(socket, "ExecExited", &other)),
    }
}

/// A process started by [`exec_stream`]. Its stdio fds are berthd's alone
/// (the shim kept no copy): closing `stdin` gives the process EOF.
/// Dropping the session closes the control connection, which makes the shim
/// SIGKILL the process if it still runs.
#[derive(Debug)]
pub struct ExecSession {
    /// Host pid.
    pub pid: i32,
    /// Write end of the process's stdin (when asked for, without tty).
    pub stdin: Option<OwnedFd>,
    /// Read end of stdout; with tty the pty master (read output, write
    /// input, resize with `streaming::fdio::set_window_size`).
    pub stdout: OwnedFd,
    /// Read end of stderr; `None` with tty.
    pub stderr: Option<OwnedFd>,
    /// `stdout` is a pty master.
    pub pty: bool,
    control: UnixStream,
    socket: PathBuf,
}

impl ExecSession {
    /// Blocks until the process exits; its exit code (128 + signal when
    /// killed). The shim closes the session after it.
    pub fn wait_exit(&mut self) -> Result<i32> {
        self.control.set_read_timeout(None).ok();
        let resp: ShimResponse =
            read_frame(&mut self.control).map_err(|source| Error::ShimProtocol {
                socket: self.socket.clone(),
                what: "read the exit of an exec",
                source,
            })?;
        exec_exit(&self.socket, resp)
    }

    /// The control connection: readable once the exit is reported (for
    /// waiting from async code, e.g. `tokio::net::UnixStream::from_std`
    /// after `set_nonblocking(true)`, then [`read_frame`] the ExecExited).
    pub fn control(&self) -> &UnixStream {
        &self.control
    }
}

/// Starts `args` in the container of the shim at `dir` with its stdio
/// passed back: pipes (stdin only if `stdin`, else /dev/null), or with `tty`
/// a pty allocated in the container, of `size` from the start.
pub fn exec_stream(
    dir: &Path,
    args: Vec<String>,
    tty: bool,
    stdin: bool,
    size: Option<TermSize>,
) -> Result<ExecSession> {
    let size = size.unwrap_or(TermSize { rows: 0, cols: 0 });
    let request = shim_request::Request::ExecStream(ExecStreamRequest {
        args,
        tty,
        stdin,
        width: size.cols.into(),
        height: size.rows.into(),
    });
    let (control, resp, fds, socket) = start_session(dir, request)?;
    let started = match resp {
        shim_response::Response::ExecStarted(s) => s,
        other => return Err(unexpected(&socket, "ExecStarted", &other)),
    };
    let want = match (started.tty, stdin) {
        (true, _) => 1,
        (false, true) => 3,
        (false, false) => 2,
    };
    if fds.len() != want {
        return Err(bad_fds(&socket, want, fds.len()));
    }
    let mut fds = fds.into_iter();
    let stdout = fds.next().expect("counted");
    let (stderr, stdin) = if started.tty {
        (None, None)
    } else {
        (fds.next(), fds.next())
    };
    Ok(ExecSession {
        pid: started.pid,
        stdin,
        stdout,
        stderr,
        pty: started.tty,
        control,
        socket,
    })
}

/// Which stream an attach output chunk comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            output::STDOUT => Some(OutputStream::Stdout),
            output::STDERR => Some(OutputStream::Stderr),
            _ => None,
        }
    }
}

/// An attach to a container's stdio ([`attach`]). Dropping it (or the
/// output connection) ends it; with stdin_once the first attach that got
/// stdin closing makes the shim close the container's stdin.
#[derive(Debug)]
pub struct AttachSession {
    /// A dup of the container's stdin writer (granted stdin, no tty).
    pub stdin: Option<OwnedFd>,
    /// A dup of the container's pty master (tty containers): resize with
    /// `streaming::fdio::set_window_size`; write input to it only if `stdin_granted`. It
    /// shares its open file description with the shim, which reads it
    /// non-blocking: never clear O_NONBLOCK on it.
    pub pty_master: Option<OwnedFd>,
    /// The shim granted stdin (through `stdin`, or the pty master).
    pub stdin_granted: bool,
    output: UnixStream,
    decoder: output::Decoder,
    socket: PathBuf,
}

/// The parts of an [`AttachSession`], for async code: read `output` and
/// feed its bytes to `decoder` (which may already hold bytes).
#[derive(Debug)]
pub struct AttachParts {
    pub stdin: Option<OwnedFd>,
    pub pty_master: Option<OwnedFd>,
    pub stdin_granted: bool,
    /// Blocking; output frames `[u8 stream][u32 BE len][bytes]` until EOF
    /// (the container exited, or the shim dropped a client too slow).
    pub output: UnixStream,
    pub decoder: output::Decoder,
}

impl AttachSession {
    /// The next output chunk, blocking; `None` once the shim closed the
    /// connection.
    pub fn read_output(&mut self) -> Result<Option<(OutputStream, Vec<u8>)>> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.decoder.next_frame() {
                Ok(Some((b, data))) => {
                    let stream = OutputStream::from_byte(b).expect("decoder checks the byte");
                    return Ok(Some((stream, data)));
                }
                Ok(None) => {}
                Err(e) => return Err(protocol(&self.socket, "decode attach output", e)),
            }
            let n = match self.output.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Error::ShimProtocol {
                        socket: self.socket.clone(),
                        what: "read attach output",
                        source: FrameError::Io(e),
                    });
                }
            };
            if n == 0 {
                if self.decoder.has_partial() {
                    return Err(Error::ShimProtocol {
                        socket: self.socket.clone(),
                        what: "read attach output",
                        source: FrameError::Closed,
                    });
                }
                return Ok(None);
            }
            self.decoder.push(&buf[..n]);
        }
    }

    pub fn into_parts(self) -> AttachParts {
        AttachParts {
            stdin: self.stdin,
            pty_master: self.pty_master,
            stdin_granted: self.stdin_granted,
            output: self.output,
            decoder: self.decoder,
        }
    }
}

/// Attaches to the container of the shim at `dir`: its output from now on,
/// and its stdin if `stdin` and the container has one to give.
pub fn attach(dir: &Path, stdin: bool) -> Result<AttachSession> {
    let request = shim_request::Request::Attach(AttachRequest { stdin });
    let (output, resp, fds, socket) = start_session(dir, request)?;
    let started = match resp {
        shim_response::Response::AttachStarted(s) => s,
        other => return Err(unexpected(&socket, "AttachStarted", &other)),
    };
    let want = usize::from(started.tty || started.stdin);
    if fds.len() != want {
        return Err(bad_fds(&socket, want, fds.len()));
    }
    let fd = fds.into_iter().next();
    let (stdin, pty_master) = if started.tty { (None, fd) } else { (fd, None) };
    output.set_read_timeout(None).ok();
    Ok(AttachSession {
        stdin,
        pty_master,
        stdin_granted: started.stdin,
        output,
        decoder: output::Decoder::new(),
        socket,
    })
}

/// Sends a streaming request and reads its first answer with the fds that
/// come with it (close-on-exec), reading exactly that frame: what follows
/// on the connection is the session's.
fn start_session(
    dir: &Path,
    request: shim_request::Request,
) -> Result<(UnixStream, shim_response::Response, Vec<OwnedFd>, PathBuf)> {
    let (stream, socket) = send_request(dir, request, STREAM_START_TIMEOUT)?;
    let read_err = |source| Error::ShimProtocol {
        socket: socket.clone(),
        what: "read the answer",
        source,
    };
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    recv_exact_with_fds(&stream, &mut len, &mut fds).map_err(read_err)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(read_err(FrameError::TooLarge(len)));
    }
    let mut body = vec![0u8; len];
    recv_exact_with_fds(&stream, &mut body, &mut fds).map_err(read_err)?;
    let resp = ShimResponse::decode(body.as_slice()).map_err(|e| read_err(e.into()))?;
    let resp = into_result(&socket, resp)?;
    Ok((stream, resp, fds, socket))
}

/// Fills `buf` from the socket with recvmsg, collecting SCM_RIGHTS fds
/// (received close-on-exec).
fn recv_exact_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::result::Result<(), FrameError> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut got = 0;
    while got < buf.len() {
        let mut cmsg = nix::cmsg_space!([RawFd; 8]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf[got..])];
        let msg = match recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(FrameError::Io(e.into())),
        };
        let n = msg.bytes;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel just installed this fd for us.
                        fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(FrameError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "passed fds were truncated",
            )));
        }
        if n == 0 {
            return Err(if got == 0 {
                FrameError::Closed
            } else {
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()
            });
        }
        got += n;
    }
    Ok(())
}

fn protocol(socket: &Path, what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::ShimProtocol {
        socket: socket.to_path_buf(),
        what,
        source: FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            e.to_string(),
        )),
    }
}

fn unexpected(socket: &Path, want: &str, got: &shim_response::Response) -> Error {
    Error::Shim {
        socket: socket.to_path_buf(),
        code: shim_error::Code::Internal,
        message: format!("expected {want}, got {got:?}"),
    }
}

fn bad_fds(socket: &Path, want: usize, got: usize) -> Error {
    protocol(
        socket,
        "receive the session's fds",
        format!("expected {want} fds, got {got}"),
    )
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use berth_proto::shim::{AttachStarted, ExecExited, ExecStarted};
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    /// A fake shim on a socket in a temp dir answering one streaming request.
    fn fake_shim(
        answer: impl FnOnce(UnixStream, ShimRequest) + Send + 'static,
    ) -> (tempfile::TempDir, std::thread::JoinHandle<()>) {
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join("shim.sock")).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let req: ShimRequest = read_frame(&mut s).unwrap();
            answer(s, req);
        });
        (dir, h)
    }

    fn send_with_fds(s: &UnixStream, resp: &ShimResponse, fds: &[RawFd], extra: &[u8]) {
        use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
        let mut bytes = Vec::new();
        write_frame(&mut bytes, resp).unwrap();
        bytes.extend_from_slice(extra);
        let iov = [std::io::IoSlice::new(&bytes)];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let n = sendmsg::<()>(s.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None).unwrap();
        assert_eq!(n, bytes.len());
    }

    #[test]
    fn exec_stream_receives_fds_and_exit() {
        let (dir, h) = fake_shim(|mut s, req| {
            assert!(matches!(
                req.request,
                Some(shim_request::Request::ExecStream(ExecStreamRequest {
                    tty: false,
                    stdin: true,
                    ..
                }))
            ));
            let (r1, w1) = nix::unistd::pipe().unwrap();
            let (r2, _w2) = nix::unistd::pipe().unwrap();
            let (_r3, w3) = nix::unistd::pipe().unwrap();
            let resp = ShimResponse {
                response: Some(shim_response::Response::ExecStarted(ExecStarted {
                    pid: 42,
                    tty: false,
                })),
            };
            send_with_fds(
                &s,
                &resp,
                &[r1.as_raw_fd(), r2.as_raw_fd(), w3.as_raw_fd()],
                &[],
            );
            std::fs::File::from(w1).write_all(b"out").unwrap();
            let exited = ShimResponse {
                response: Some(shim_response::Response::ExecExited(ExecExited {
                    exit_code: 3,
                })),
            };
            write_frame(&mut s, &exited).unwrap();
        });
        let mut sess = exec_stream(dir.path(), vec!["cat".into()], false, true, None).unwrap();
        assert_eq!(sess.pid, 42);
        assert!(!sess.pty && sess.stdin.is_some() && sess.stderr.is_some());
        // SAFETY: fcntl on an owned fd.
        let flags = unsafe { libc::fcntl(sess.stdout.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(
            flags & libc::FD_CLOEXEC,
            0,
            "received fds are close-on-exec"
        );
        let mut out = String::new();
        std::fs::File::from(sess.stdout.try_clone().unwrap())
            .read_to_string(&mut out)
            .unwrap();
        assert_eq!(out, "out");
        assert_eq!(sess.wait_exit().unwrap(), 3);
        h.join().unwrap();
    }

    #[test]
    fn attach_keeps_output_that_follows_the_answer() {
        let (dir, h) = fake_shim(|mut s, _req| {
            let (_r, w) = nix::unistd::pipe().unwrap();
            let resp = ShimResponse {
                response: Some(shim_response::Response::AttachStarted(AttachStarted {
                    stdin: true,
                    tty: false,
                })),
            };
            let mut extra = Vec::new();
            output::encode(output::STDOUT, b"first", &mut extra);
            send_with_fds(&s, &resp, &[w.as_raw_fd()], &extra);
            let mut more = Vec::new();
            output::encode(output::STDERR, b"second", &mut more);
            s.write_all(&more).unwrap();
        });
        let mut a = attach(dir.path(), true).unwrap();
        assert!(a.stdin.is_some() && a.pty_master.is_none() && a.stdin_granted);
        assert_eq!(
            a.read_output().unwrap(),
            Some((OutputStream::Stdout, b"first".to_vec()))
        );
        assert_eq!(
            a.read_output().unwrap(),
            Some((OutputStream::Stderr, b"second".to_vec()))
        );
        h.join().unwrap();
        assert_eq!(a.read_output().unwrap(), None);
    }

    #[test]
    fn a_refused_stream_request_is_a_shim_error() {
        let (dir, h) = fake_shim(|mut s, _req| {
            let resp = ShimResponse {
                response: Some(shim_response::Response::Error(
                    berth_proto::shim::ShimError {
                        code: shim_error::Code::FailedPrecondition as i32,
                        message: "not running".into(),
                    },
                )),
            };
            write_frame(&mut s, &resp).unwrap();
        });
        let err = exec_stream(dir.path(), vec!["x".into()], true, false, None).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Shim {
                    code: shim_error::Code::FailedPrecondition,
                    ..
                }
            ),
            "{err:?}"
        );
        h.join().unwrap();
    }
}
