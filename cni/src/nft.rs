//! nftables through the `nft` command: scripts applied atomically with
//! `nft -f -`, rules found by their comment in `nft -j` listings.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::spec::{Error, ErrorCode, Result};

/// Directory for the plugins' host-wide lock files.
pub const LOCK_DIR: &str = "/run/berth-cni";

/// The `nft` executable: `$PATH`, then the usual sbin dirs.
pub fn nft_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(d));
    }
    dirs.into_iter()
        .map(|d| d.join("nft"))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn nft() -> Result<PathBuf> {
    nft_binary().ok_or_else(|| {
        Error::new(
            ErrorCode::PluginNotAvailable,
            "nft not found (install nftables)",
        )
    })
}

/// Applies a script in one transaction.
pub fn apply(script: &str) -> Result<()> {
    let mut child = Command::new(nft()?)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::internal(format!("failed to run nft: {e}")))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .map_err(|e| Error::internal(format!("failed to write to nft: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::internal(format!("failed to run nft: {e}")))?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "nft failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
        .with_details(script.to_string()));
    }
    Ok(())
}

/// A rule of a table, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub chain: String,
    pub handle: u64,
    pub comment: String,
}

/// The rules of `family table`, or `None` when the table does not exist.
pub fn rules(family: &str, table: &str) -> Result<Option<Vec<RuleRef>>> {
    let out = Command::new(nft()?)
        .args(["-j", "list", "table", family, table])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::internal(format!("failed to run nft: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("No such file or directory") || err.contains("does not exist") {
            return Ok(None);
        }
        return Err(Error::internal(format!(
            "nft list table {family} {table}: {}",
            err.trim()
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::internal(format!("nft -j output: {e}")))?;
    let mut rules = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(r) = item.get("rule") else { continue };
        rules.push(RuleRef {
            chain: r["chain"].as_str().unwrap_or_default().to_string(),
            handle: r["handle"].as_u64().unwrap_or_default(),
            comment: r["comment"].as_str().unwrap_or_default().to_string(),
        });
    }
    Ok(Some(rules))
}

/// Script lines deleting `rules` from `family table`.
pub fn delete_lines(family: &str, table: &str, rules: &[&RuleRef]) -> String {
    rules
        .iter()
        .map(|r| {
            format!(
                "delete rule {family} {table} {} handle {}\n",
                r.chain, r.handle
            )
        })
        .collect()
}

/// An exclusive host-wide lock (flock) serialising nftables read-modify-write
/// sequences of Berth's plugins. Released on drop.
pub struct HostLock {
    _file: File,
}

/// Takes the lock file `name` under [`LOCK_DIR`].
pub fn host_lock(name: &str) -> Result<HostLock> {
    std::fs::create_dir_all(LOCK_DIR)
        .map_err(|e| Error::internal(format!("failed to create {LOCK_DIR}: {e}")))?;
    let path = Path::new(LOCK_DIR).join(name);
    let file = flock_file(&path)?;
    Ok(HostLock { _file: file })
}

/// Opens (creating) `path` and takes an exclusive flock on it.
pub(crate) fn flock_file(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::internal(format!("failed to open lock {}: {e}", path.display())))?;
    loop {
        // SAFETY: flock on a valid, owned descriptor.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r == 0 {
            return Ok(file);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::internal(format!(
                "failed to lock {}: {e}",
                path.display()
            )));
        }
    }
}

/// A comment-safe, bounded form of a container id (nft comments hold at
/// most 128 bytes): ids up to 64 characters are kept, longer ones are cut and
/// suffixed with a hash of the whole id.
pub fn short_id(id: &str) -> String {
    if id.len() <= 64 {
        return id.to_string();
    }
    // FNV-1a, stable across builds.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in id.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{}-{h:016x}", &id[..47])
}
