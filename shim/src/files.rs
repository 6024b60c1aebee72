//! Files in the shim directory (`<shim_dir>`): what berthd reads back.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use berth_proto::shim::{ExitRecord, ShimConfig};
use prost::Message;

pub const CONFIG: &str = "config.pb";
pub const SOCKET: &str = "shim.sock";
pub const PID: &str = "shim.pid";
pub const EXIT: &str = "exit.pb";
pub const LOG: &str = "shim.log";
pub const CONSOLE_SOCKET: &str = "console.sock";
/// Locked (flock) by the shim for as long as it lives in the dir, from
/// before it creates the container: berthd's recovery tells a launch still
/// under way by it.
pub const LOCK: &str = "shim.lock";

pub fn read_config(dir: &Path) -> Result<ShimConfig, String> {
    let path = dir.join(CONFIG);
    let bytes = std::fs::read(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let cfg = ShimConfig::decode(bytes.as_slice())
        .map_err(|e| format!("decode {}: {e}", path.display()))?;
    if cfg.id.is_empty() {
        return Err(format!("{}: empty container id", path.display()));
    }
    if cfg.bundle.is_empty() {
        return Err(format!(
            "{}: empty bundle path for {}",
            path.display(),
            cfg.id
        ));
    }
    if cfg.runtime_root.is_empty() {
        return Err(format!(
            "{}: empty runtime root for {}",
            path.display(),
            cfg.id
        ));
    }
    Ok(cfg)
}

/// Writes `data` to `dir/name` atomically: a temporary file, then rename;
/// with `durable`, fsync of the file before the rename and of the directory
/// after it.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], durable: bool) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(data)?;
        if durable {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, dir.join(name))?;
    if durable && let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Takes the dir's lock; waits a little for a shim there that is exiting.
/// The lock lasts as long as the returned file is open in any process.
pub fn lock_dir(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(dir.join(LOCK))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(file);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn write_exit_record(dir: &Path, rec: &ExitRecord) -> io::Result<()> {
    write_atomic(dir, EXIT, &rec.encode_to_vec(), true)
}

/// The monitor's own diagnostics (`<shim_dir>/shim.log`); never the
/// container's output.
#[derive(Debug, Default)]
pub struct Diag {
    file: Option<File>,
}

impl Diag {
    pub fn open(dir: &Path) -> Self {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join(LOG))
            .ok();
        Diag { file }
    }

    pub fn log(&mut self, args: std::fmt::Arguments) {
        if let Some(f) = &mut self.file {
            let ts = crate::crilog::timestamp_now();
            let line = format!("{} {}\n", String::from_utf8_lossy(&ts), args);
            let _ = f.write_all(line.as_bytes());
        }
    }
}
