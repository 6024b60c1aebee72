//! berthd's side of the shim protocol: launching a shim, calling it, and
//! reading what it leaves in its directory.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use berth_proto::shim::{
    ExitRecord, ShimConfig, ShimRequest, ShimResponse, shim_error, shim_request, shim_response,
};
use berth_proto::{read_frame, write_frame};
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

/// Writes the shim's config and runs `berth-shim start`, which returns once
/// the container exists (or failed to be created); returns the identity of
/// the monitor process it left running.
pub fn launch(dir: &Path, config: &ShimConfig) -> Result<ProcessIdentity> {
    std::fs::create_dir_all(dir).context(|| format!("create {}", dir.display()))?;
    std::fs::write(dir.join("config.pb"), config.encode_to_vec())
        .context(|| format!("write {}/config.pb", dir.display()))?;
    let output = std::process::Command::new(shim_binary())
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
                "shim for {} failed to start ({}): {}",
                config.id,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    };
    // The monitor wrote its pid before answering and is alive now, so the
    // identity read here is the monitor's own.
    let pid = read_pid(dir)
        .ok_or_else(|| Error::Internal(format!("shim for {} left no pid file", config.id)))?;
    ProcessIdentity::of(pid)
        .map_err(|e| Error::io(format!("identity of shim {pid} for {}", config.id), e))
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
    let socket = dir.join("shim.sock");
    let mut stream = connect_socket(&socket).map_err(|e| Error::ShimUnreachable {
        socket: socket.clone(),
        source: e,
    })?;
    stream.set_read_timeout(Some(timeout)).ok();
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
    let resp: ShimResponse = read_frame(&mut stream).map_err(|source| Error::ShimProtocol {
        socket: socket.clone(),
        what: "read the answer",
        source,
    })?;
    into_result(&socket, resp)
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
