//! Safe, fast unpacking of one OCI image layer into a snapshot directory.
//!
//! The layer is an uncompressed tar stream (the caller decompresses it and
//! verifies its digest); the snapshot directory becomes an overlayfs lower
//! directory, so OCI whiteouts are translated into overlayfs ones:
//!
//! * `dir/.wh.name` becomes a 0/0 character device `dir/name`;
//! * `dir/.wh..wh..opq` sets `trusted.overlay.opaque=y` on `dir`.
//!
//! Every filesystem operation is done relative to directory file descriptors
//! that were opened one component at a time with `O_NOFOLLOW|O_DIRECTORY`
//! starting from the snapshot root, so an entry can never reach outside the
//! snapshot: paths with `..`, absolute paths, paths whose parent goes through
//! a symlink, and hardlinks whose target is unsafe are refused with
//! [`Error::BadImage`] naming the entry. Symlinks are created verbatim and
//! never followed.
//!
//! Ownership, modes (including setuid/setgid/sticky), `SCHILY.xattr.*` PAX
//! xattrs, hardlinks, device nodes, FIFOs and timestamps are preserved.
//! Directory times are applied at the very end, once their children exist.
//! No fsync is done: the caller syncs the filesystem once when done.

use std::ffi::{CStr, CString};
use std::fmt::Display;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, open, openat};
use nix::sys::stat::{
    FchmodatFlags, FileStat, Mode, SFlag, UtimensatFlags, fchmod, fchmodat, fstatat, futimens,
    makedev, mkdirat, mknodat, utimensat,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fchownat, linkat, symlinkat, unlinkat};
use tracing::{debug, warn};

use crate::error::{Error, Result};

/// What one [`unpack_layer`] call did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UnpackStats {
    /// Tar entries applied to the snapshot (PAX global headers not counted).
    pub entries: u64,
    /// Bytes of regular-file content written.
    pub bytes: u64,
}

/// Unpacks the tar stream `layer` into `dest`, an existing empty directory.
/// On error the caller removes `dest` entirely; nothing may have been written outside `dest`.
///
/// `layer` is read to its very end (past the tar end-of-archive marker).
pub fn unpack_layer<R: std::io::Read>(layer: R, dest: &std::path::Path) -> Result<UnpackStats> {
    let root = open(dest, DIR_FLAGS, Mode::empty()).map_err(|e| {
        Error::io(
            format!("opening snapshot directory {}", dest.display()),
            e.into(),
        )
    })?;
    let mut unpacker = Unpacker {
        dirs: DirCache::new(root),
        buf: vec![0; COPY_BUF_SIZE],
        dir_times: Vec::new(),
        stats: UnpackStats::default(),
    };
    let mut archive = tar::Archive::new(layer);
    let entries = archive
        .entries()
        .map_err(|e| Error::io("reading layer tar stream", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("reading layer tar stream", e))?;
        unpacker.unpack_entry(entry)?;
    }
    // Read the end-of-archive blocks and any padding too, so that a digest
    // computed by the caller while reading covers the whole blob.
    io::copy(&mut archive.into_inner(), &mut io::sink())
        .map_err(|e| Error::io("reading layer tar stream", e))?;
    unpacker.finish()?;
    Ok(unpacker.stats)
}

/// Size of the reused buffer file contents are streamed through.
const COPY_BUF_SIZE: usize = 256 * 1024;
/// An all-zero chunk at least this long is skipped with a seek (leaving a
/// hole) instead of being written.
const HOLE_MIN: usize = 4096;
/// Directories deeper than this are not kept open in the [`DirCache`] (only
/// the current one is), to bound the number of open descriptors.
const MAX_CACHED_DEPTH: usize = if cfg!(test) { 4 } else { 64 };

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

const WHITEOUT_PREFIX: &[u8] = b".wh.";
/// `.wh..wh..opq` with the `.wh.` prefix already stripped.
const OPAQUE_MARKER: &[u8] = b".wh..opq";
const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";
const PAX_XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

struct Unpacker {
    dirs: DirCache,
    buf: Vec<u8>,
    /// Directories whose times are applied at the end: normalized path
    /// (components joined by `/`), atime, mtime.
    dir_times: Vec<(Vec<u8>, TimeSpec, TimeSpec)>,
    stats: UnpackStats,
}

impl Unpacker {
    fn unpack_entry<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<()> {
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            debug!("skipping PAX global header in layer");
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        let comps = split_path(&raw).map_err(|why| bad(&raw, why))?;
        let meta = Meta::read(&mut entry, &raw)?;
        self.stats.entries += 1;

        let Some((&base, parent)) = comps.split_last() else {
            debug!(entry = %shown(&raw), "skipping layer entry for the snapshot root");
            return Ok(());
        };
        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            return self.whiteout(parent, hidden, &raw);
        }

        if kind.is_dir() || (kind.is_file() && raw.ends_with(b"/")) {
            let pfd = self.dirs.resolve_parent(parent, &raw)?;
            let fd = make_dir(pfd, base, &meta, &raw)?;
            self.dirs.push(base, fd);
            self.dir_times
                .push((comps.join(&b'/'), meta.atime, meta.mtime));
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            let pfd = self.dirs.resolve_parent(parent, &raw)?;
            let written = write_file(pfd, base, &mut entry, &meta, &raw, &mut self.buf)?;
            self.stats.bytes += written;
        } else if kind.is_symlink() {
            let target = entry.link_name_bytes().unwrap_or_default();
            if target.is_empty() {
                return Err(bad(&raw, "symlink without a target"));
            }
            if target.contains(&0) {
                return Err(bad(&raw, "symlink target contains a NUL byte"));
            }
            let pfd = self.dirs.resolve_parent(parent, &raw)?;
            make_symlink(pfd, base, &target, &meta, &raw)?;
        } else if kind.is_hard_link() {
            let target = entry.link_name_bytes().unwrap_or_default().into_owned();
            self.hardlink(&comps, &target, &raw)?;
        } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
            let (sflag, dev) = if kind.is_fifo() {
                (SFlag::S_IFIFO, 0)
            } else {
                let header = entry.header();
                let numbers = header
                    .device_major()
                    .and_then(|major| Ok(major.zip(header.device_minor()?)));
                let (major, minor) = match numbers {
                    Ok(Some(numbers)) => numbers,
                    Ok(None) => return Err(bad(&raw, "device entry without device numbers")),
                    Err(e) => return Err(bad(&raw, format!("invalid device numbers: {e}"))),
                };
                let sflag = if kind.is_block_special() {
                    SFlag::S_IFBLK
                } else {
                    SFlag::S_IFCHR
                };
                (sflag, makedev(major.into(), minor.into()))
            };
            let pfd = self.dirs.resolve_parent(parent, &raw)?;
            make_node(pfd, base, sflag, dev, &meta, &raw)?;
        } else {
            let byte = kind.as_byte();
            return Err(bad(
                &raw,
                format!(
                    "unsupported tar entry type {:?} ({:?})",
                    char::from(byte),
                    kind
                ),
            ));
        }
        Ok(())
    }

    /// `hidden` is the entry's base name without its `.wh.` prefix.
    fn whiteout(&mut self, parent: &[&[u8]], hidden: &[u8], raw: &[u8]) -> Result<()> {
        if hidden == OPAQUE_MARKER {
            let pfd = self.dirs.resolve_parent(parent, raw)?;
            return set_opaque(pfd).map_err(|e| io_err(raw, "marking directory opaque", e));
        }
        if hidden.starts_with(WHITEOUT_PREFIX) {
            // Other `.wh..wh.` names are aufs metadata (`.wh..wh.plnk`, ...).
            debug!(entry = %shown(raw), "skipping aufs metadata in layer");
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(bad(raw, "invalid whiteout name"));
        }
        let pfd = self.dirs.resolve_parent(parent, raw)?;
        match mknodat(pfd, hidden, SFlag::S_IFCHR, Mode::empty(), 0) {
            Ok(()) => Ok(()),
            // A whiteout only hides lower layers: an entry of this same layer
            // with that name stays (and hides the lower one by itself).
            Err(Errno::EEXIST) => {
                debug!(entry = %shown(raw), "whiteout of an entry of the same layer ignored");
                Ok(())
            }
            Err(e) => Err(io_err(raw, "creating whiteout device", e)),
        }
    }

    fn hardlink(&mut self, comps: &[&[u8]], target: &[u8], raw: &[u8]) -> Result<()> {
        let shown_target = shown(target);
        let target_comps = split_path(target)
            .map_err(|why| bad(raw, format!("hardlink target {shown_target:?}: {why}")))?;
        let Some((&target_base, target_parent)) = target_comps.split_last() else {
            return Err(bad(raw, "hardlink to the snapshot root"));
        };
        if target_comps == comps {
            return Err(bad(raw, "hardlink to itself"));
        }
        let (&base, parent) = comps
            .split_last()
            .ok_or_else(|| bad(raw, "hardlink at the snapshot root"))?;

        let target_dir = walk(self.dirs.root.as_fd(), target_parent).map_err(|e| {
            walk_error(
                raw,
                target_parent,
                e,
                &format!("hardlink target {shown_target:?}"),
            )
        })?;
        match fstatat(&target_dir, target_base, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_type(&st, libc::S_IFDIR) => {
                return Err(bad(
                    raw,
                    format!("hardlink target {shown_target:?} is a directory"),
                ));
            }
            Ok(_) => {}
            Err(Errno::ENOENT) => {
                return Err(bad(
                    raw,
                    format!("hardlink target {shown_target:?} does not exist"),
                ));
            }
            Err(e) => return Err(io_err(raw, "inspecting hardlink target", e)),
        }

        let pfd = self.dirs.resolve_parent(parent, raw)?;
        create_replacing(pfd, base, || {
            linkat(&target_dir, target_base, pfd, base, AtFlags::empty())
        })
        .map_err(|e| match e {
            // The replaced entry contained the target.
            Errno::ENOENT => bad(
                raw,
                format!("hardlink target {shown_target:?} does not exist"),
            ),
            e => io_err(raw, "creating hardlink", e),
        })
    }

    /// Applies the directories' times, now that all their children exist.
    fn finish(&mut self) -> Result<()> {
        let dir_times = std::mem::take(&mut self.dir_times);
        for (path, atime, mtime) in &dir_times {
            let comps: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
            let Some((&base, parent)) = comps.split_last() else {
                continue;
            };
            let pfd = match self.dirs.resolve(parent, false) {
                Ok(pfd) => pfd,
                Err(WalkError {
                    kind: WalkKind::Io(e),
                    ..
                }) => return Err(io_err(path, "setting directory times", e)),
                // Replaced later in the layer by something else.
                Err(_) => continue,
            };
            match fstatat(pfd, base, AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_type(&st, libc::S_IFDIR) => {}
                Ok(_) | Err(Errno::ENOENT) => continue,
                Err(e) => return Err(io_err(path, "setting directory times", e)),
            }
            utimensat(pfd, base, atime, mtime, UtimensatFlags::NoFollowSymlink)
                .map_err(|e| io_err(path, "setting directory times", e))?;
        }
        Ok(())
    }
}

/// Metadata of an entry, from its header and PAX records.
struct Meta {
    mode: u32,
    uid: Uid,
    gid: Gid,
    atime: TimeSpec,
    mtime: TimeSpec,
    xattrs: Vec<(CString, Vec<u8>)>,
}

impl Meta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>, raw: &[u8]) -> Result<Meta> {
        let header = entry.header();
        let mode = header
            .mode()
            .map_err(|e| bad(raw, format!("invalid mode: {e}")))?
            & 0o7777;
        let id = |value: io::Result<u64>, what: &str| -> Result<u32> {
            let value = value.map_err(|e| bad(raw, format!("invalid {what}: {e}")))?;
            match u32::try_from(value) {
                Ok(id) if id != u32::MAX => Ok(id),
                _ => Err(bad(raw, format!("{what} {value} out of range"))),
            }
        };
        let uid = Uid::from_raw(id(header.uid(), "uid")?);
        let gid = Gid::from_raw(id(header.gid(), "gid")?);
        let secs = header
            .mtime()
            .map_err(|e| bad(raw, format!("invalid mtime: {e}")))?;
        let mut mtime = TimeSpec::new(i64::try_from(secs).unwrap_or(i64::MAX), 0);
        let mut atime = None;
        let mut xattrs = Vec::new();

        let pax = entry
            .pax_extensions()
            .map_err(|e| bad(raw, format!("invalid PAX records: {e}")))?;
        for ext in pax.into_iter().flatten() {
            let ext = ext.map_err(|e| bad(raw, format!("invalid PAX record: {e}")))?;
            let key = ext.key_bytes();
            if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                let name = CString::new(name)
                    .ok()
                    .filter(|n| !n.is_empty())
                    .ok_or_else(|| bad(raw, "invalid xattr name"))?;
                xattrs.push((name, ext.value_bytes().to_vec()));
            } else if key == b"mtime" {
                mtime = parse_pax_time(ext.value_bytes())
                    .ok_or_else(|| bad(raw, "invalid PAX mtime"))?;
            } else if key == b"atime" {
                atime = Some(
                    parse_pax_time(ext.value_bytes())
                        .ok_or_else(|| bad(raw, "invalid PAX atime"))?,
                );
            } else if key.starts_with(b"GNU.sparse.") {
                return Err(bad(raw, "PAX-format sparse files are not supported"));
            }
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            atime: atime.unwrap_or(mtime),
            mtime,
            xattrs,
        })
    }

    fn mode(&self) -> Mode {
        Mode::from_bits_truncate(self.mode as libc::mode_t)
    }
}

/// Parses a PAX time (`secs[.fraction]`, possibly negative).
fn parse_pax_time(value: &[u8]) -> Option<TimeSpec> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (negative, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let mut secs: i64 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let mut nanos: i64 = 0;
    for i in 0..9 {
        let digit = frac.as_bytes().get(i).map_or(0, |b| i64::from(b - b'0'));
        nanos = nanos * 10 + digit;
    }
    if negative {
        secs = -secs;
        if nanos > 0 {
            secs -= 1;
            nanos = 1_000_000_000 - nanos;
        }
    }
    Some(TimeSpec::new(secs, nanos))
}

/// Splits an entry path into its components, dropping empty and `.` ones.
fn split_path(raw: &[u8]) -> std::result::Result<Vec<&[u8]>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path escapes the snapshot");
    }
    let mut comps = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path escapes the snapshot"),
            c if c.contains(&0) => return Err("path contains a NUL byte"),
            c => comps.push(c),
        }
    }
    Ok(comps)
}

/// An entry name for messages: lossy UTF-8, bounded in length.
fn shown(raw: &[u8]) -> String {
    const MAX: usize = 512;
    let s = String::from_utf8_lossy(raw);
    if s.len() <= MAX {
        return s.into_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn bad(raw: &[u8], why: impl Display) -> Error {
    Error::BadImage(format!("layer entry {:?}: {why}", shown(raw)))
}

fn io_err(raw: &[u8], what: impl Display, e: Errno) -> Error {
    Error::io(format!("layer entry {:?}: {what}", shown(raw)), e.into())
}

fn is_type(st: &FileStat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

fn is_whiteout(st: &FileStat) -> bool {
    is_type(st, libc::S_IFCHR) && st.st_rdev == 0
}

fn set_opaque(dir: BorrowedFd<'_>) -> nix::Result<()> {
    // SAFETY: valid descriptor, NUL-terminated name, value pointer and length match.
    let rc = unsafe {
        libc::fsetxattr(
            dir.as_raw_fd(),
            OPAQUE_XATTR.as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    Errno::result(rc).map(drop)
}

/// Why walking a directory path failed, and at which component.
#[derive(Debug)]
struct WalkError {
    depth: usize,
    kind: WalkKind,
}

#[derive(Debug)]
enum WalkKind {
    Missing,
    Symlink,
    NotDir,
    Io(Errno),
}

fn walk_error(raw: &[u8], comps: &[&[u8]], err: WalkError, what: &str) -> Error {
    let upto = comps.get(..=err.depth).unwrap_or(comps).join(&b'/');
    let at = shown(&upto);
    match err.kind {
        WalkKind::Symlink => bad(raw, format!("{what} goes through symlink {at:?}")),
        WalkKind::NotDir => bad(raw, format!("{what} goes through non-directory {at:?}")),
        WalkKind::Missing => bad(raw, format!("{what} does not exist ({at:?} is missing)")),
        WalkKind::Io(e) => io_err(raw, format!("opening directory {at:?}"), e),
    }
}

/// Opens the directory `name` in `dir` without following symlinks. With
/// `create`, a missing directory is created (0755, root-owned), and a
/// whiteout device of this layer is replaced by an opaque directory.
fn open_child(
    dir: BorrowedFd<'_>,
    name: &[u8],
    create: bool,
) -> std::result::Result<OwnedFd, WalkKind> {
    let mut opaque = false;
    match openat(dir, name, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => return Ok(fd),
        Err(Errno::ENOENT) if create => {}
        Err(Errno::ENOENT) => return Err(WalkKind::Missing),
        Err(Errno::ELOOP) => return Err(WalkKind::Symlink),
        Err(Errno::ENOTDIR) => {
            let st = fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(WalkKind::Io)?;
            if is_type(&st, libc::S_IFLNK) {
                return Err(WalkKind::Symlink);
            }
            if !(create && is_whiteout(&st)) {
                return Err(WalkKind::NotDir);
            }
            unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).map_err(WalkKind::Io)?;
            opaque = true;
        }
        Err(e) => return Err(WalkKind::Io(e)),
    }
    mkdirat(dir, name, Mode::from_bits_truncate(0o755)).map_err(WalkKind::Io)?;
    let fd = openat(dir, name, DIR_FLAGS, Mode::empty()).map_err(WalkKind::Io)?;
    // Explicit: the umask and a setgid parent would change what mkdir made.
    fchown(&fd, Some(Uid::from_raw(0)), Some(Gid::from_raw(0))).map_err(WalkKind::Io)?;
    fchmod(&fd, Mode::from_bits_truncate(0o755)).map_err(WalkKind::Io)?;
    if opaque {
        set_opaque(fd.as_fd()).map_err(WalkKind::Io)?;
    }
    Ok(fd)
}

/// Opens the directory `comps` below `root`, creating nothing.
fn walk(root: BorrowedFd<'_>, comps: &[&[u8]]) -> std::result::Result<OwnedFd, WalkError> {
    let mut fd = root.try_clone_to_owned().map_err(|e| WalkError {
        depth: 0,
        kind: WalkKind::Io(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))),
    })?;
    for (depth, comp) in comps.iter().enumerate() {
        fd = open_child(fd.as_fd(), comp, false).map_err(|kind| WalkError { depth, kind })?;
    }
    Ok(fd)
}

/// The chain of directories of the last resolved path, kept open so that
/// consecutive entries of the same (or a nearby) directory are resolved
/// without walking from the root again.
///
/// While an entry is written, it holds exactly the entry's parent chain
/// (never the entry itself or anything below it), so replacing an entry can
/// never invalidate a cached descriptor. A directory entry is pushed onto it
/// only once written, as its children usually follow.
struct DirCache {
    root: OwnedFd,
    /// Components of the current directory.
    names: Vec<Vec<u8>>,
    /// `fds[i]` is the directory `names[..=i]`, for the first
    /// `MAX_CACHED_DEPTH` levels.
    fds: Vec<OwnedFd>,
    /// The current directory, when deeper than `MAX_CACHED_DEPTH`.
    leaf: Option<OwnedFd>,
}

impl DirCache {
    fn new(root: OwnedFd) -> Self {
        DirCache {
            root,
            names: Vec::new(),
            fds: Vec::new(),
            leaf: None,
        }
    }

    /// The parent directory of an entry, created if missing.
    fn resolve_parent(&mut self, parent: &[&[u8]], raw: &[u8]) -> Result<BorrowedFd<'_>> {
        match self.resolve(parent, true) {
            Ok(fd) => Ok(fd),
            Err(e) => Err(walk_error(raw, parent, e, "path")),
        }
    }

    /// Makes `comps` the current directory and returns it.
    fn resolve(
        &mut self,
        comps: &[&[u8]],
        create: bool,
    ) -> std::result::Result<BorrowedFd<'_>, WalkError> {
        let common = self
            .names
            .iter()
            .zip(comps)
            .take_while(|(have, want)| have.as_slice() == **want)
            .count();
        if common == self.names.len() && common == comps.len() {
            // Same directory as the previous entry.
            return Ok(self.current());
        }
        if let Err(e) = self.walk_to(comps, common, create) {
            self.names.clear();
            self.fds.clear();
            self.leaf = None;
            return Err(e);
        }
        Ok(self.current())
    }

    fn walk_to(
        &mut self,
        comps: &[&[u8]],
        common: usize,
        create: bool,
    ) -> std::result::Result<(), WalkError> {
        self.names.truncate(common);
        self.fds.truncate(common);
        self.leaf = None;
        // Start from the deepest open directory: re-walk the levels between
        // it and `common` (only when deeper than MAX_CACHED_DEPTH), then the
        // new ones.
        let mut walked: Option<OwnedFd> = None;
        for (depth, &comp) in comps.iter().enumerate().skip(self.fds.len()) {
            let dir = match &walked {
                Some(fd) => fd.as_fd(),
                None => self.fds.last().map_or(self.root.as_fd(), AsFd::as_fd),
            };
            let fd = open_child(dir, comp, create).map_err(|kind| WalkError { depth, kind })?;
            if depth >= common {
                self.names.push(comp.to_vec());
            }
            if depth < MAX_CACHED_DEPTH {
                self.fds.push(fd);
            } else {
                walked = Some(fd);
            }
        }
        self.leaf = walked;
        Ok(())
    }

    fn current(&self) -> BorrowedFd<'_> {
        match &self.leaf {
            Some(fd) => fd.as_fd(),
            None => self.fds.last().map_or(self.root.as_fd(), AsFd::as_fd),
        }
    }

    /// Descends into `name`, a directory just created in the current one.
    fn push(&mut self, name: &[u8], fd: OwnedFd) {
        if self.names.len() < MAX_CACHED_DEPTH {
            self.fds.push(fd);
        } else {
            self.leaf = Some(fd);
        }
        self.names.push(name.to_vec());
    }
}

/// Removes `name` from `dir`, recursively for a directory, following no symlink.
fn remove_at(dir: BorrowedFd<'_>, name: &[u8]) -> nix::Result<()> {
    match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Err(Errno::EISDIR) => {
            let fd = openat(dir, name, DIR_FLAGS, Mode::empty())?;
            for child in list_dir(fd.as_fd())? {
                remove_at(fd.as_fd(), &child)?;
            }
            unlinkat(dir, name, UnlinkatFlags::RemoveDir)
        }
        other => other,
    }
}

/// The names in a directory, without `.` and `..`.
fn list_dir(dir: BorrowedFd<'_>) -> nix::Result<Vec<Vec<u8>>> {
    let fd = dir
        .try_clone_to_owned()
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    // SAFETY: on success the stream owns the descriptor (released from
    // `fd` right after) and is closed below; on failure `fd` still owns it.
    let stream = unsafe { libc::fdopendir(fd.as_raw_fd()) };
    if stream.is_null() {
        return Err(Errno::last());
    }
    let _ = fd.into_raw_fd();
    let mut names = Vec::new();
    let result = loop {
        Errno::clear();
        // SAFETY: `stream` is a valid open directory stream.
        let ent = unsafe { libc::readdir(stream) };
        if ent.is_null() {
            match Errno::last_raw() {
                0 => break Ok(()),
                e => break Err(Errno::from_raw(e)),
            }
        }
        // SAFETY: `d_name` of a returned entry is NUL-terminated.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    };
    // SAFETY: `stream` is valid and not used afterwards.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

/// Runs `create`; if `name` already exists, removes it and runs `create` again.
fn create_replacing<T>(
    dir: BorrowedFd<'_>,
    name: &[u8],
    mut create: impl FnMut() -> nix::Result<T>,
) -> nix::Result<T> {
    match create() {
        Err(Errno::EEXIST) => {
            remove_at(dir, name)?;
            create()
        }
        other => other,
    }
}

fn make_dir(pfd: BorrowedFd<'_>, base: &[u8], meta: &Meta, raw: &[u8]) -> Result<OwnedFd> {
    let fail = |what: &'static str| move |e| io_err(raw, what, e);
    let mut opaque = false;
    match mkdirat(pfd, base, Mode::from_bits_truncate(0o700)) {
        Ok(()) => {}
        Err(Errno::EEXIST) => {
            let st = fstatat(pfd, base, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(fail("inspecting existing entry"))?;
            if !is_type(&st, libc::S_IFDIR) {
                // A directory replacing a whiteout of the same layer must
                // still hide the lower layers' directory.
                opaque = is_whiteout(&st);
                remove_at(pfd, base).map_err(fail("replacing existing entry"))?;
                mkdirat(pfd, base, Mode::from_bits_truncate(0o700))
                    .map_err(fail("creating directory"))?;
            }
        }
        Err(e) => return Err(fail("creating directory")(e)),
    }
    let fd = openat(pfd, base, DIR_FLAGS, Mode::empty()).map_err(fail("opening directory"))?;
    if opaque {
        set_opaque(fd.as_fd()).map_err(fail("marking directory opaque"))?;
    }
    fchown(&fd, Some(meta.uid), Some(meta.gid)).map_err(fail("changing owner"))?;
    fchmod(&fd, meta.mode()).map_err(fail("changing mode"))?;
    set_xattrs(XattrTarget::Fd(fd.as_fd()), &meta.xattrs, raw)?;
    Ok(fd)
}

/// Creates a regular file and streams the entry's content into it; returns
/// the number of bytes of content.
fn write_file<R: Read>(
    pfd: BorrowedFd<'_>,
    base: &[u8],
    entry: &mut tar::Entry<'_, R>,
    meta: &Meta,
    raw: &[u8],
    buf: &mut [u8],
) -> Result<u64> {
    let fail = |what: &'static str| move |e| io_err(raw, what, e);
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = create_replacing(pfd, base, || {
        openat(pfd, base, flags, Mode::from_bits_truncate(0o600))
    })
    .map_err(fail("creating file"))?;
    let mut file = File::from(fd);

    let size = entry.size();
    let mut total: u64 = 0;
    let mut ends_in_hole = false;
    loop {
        let n = fill(entry, buf)
            .map_err(|e| Error::io(format!("reading layer entry {:?}", shown(raw)), e))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        let written = if n >= HOLE_MIN && is_zero(chunk) {
            ends_in_hole = true;
            file.seek(SeekFrom::Current(n as i64)).map(drop)
        } else {
            ends_in_hole = false;
            file.write_all(chunk)
        };
        written.map_err(|e| Error::io(format!("layer entry {:?}: writing", shown(raw)), e))?;
        total += n as u64;
    }
    if total != size {
        return Err(Error::io(
            format!("reading layer entry {:?}", shown(raw)),
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("layer ends after {total} of {size} bytes of the file"),
            ),
        ));
    }
    if ends_in_hole {
        file.set_len(total)
            .map_err(|e| Error::io(format!("layer entry {:?}: writing", shown(raw)), e))?;
    }

    // chown clears setuid/setgid and file capabilities: mode, then xattrs after it.
    fchown(&file, Some(meta.uid), Some(meta.gid)).map_err(fail("changing owner"))?;
    fchmod(&file, meta.mode()).map_err(fail("changing mode"))?;
    set_xattrs(XattrTarget::Fd(file.as_fd()), &meta.xattrs, raw)?;
    futimens(&file, &meta.atime, &meta.mtime).map_err(fail("setting times"))?;
    Ok(total)
}

/// Reads until `buf` is full or the reader is exhausted.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn is_zero(chunk: &[u8]) -> bool {
    chunk
        .chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, b| acc | b) == 0)
}

fn make_symlink(
    pfd: BorrowedFd<'_>,
    base: &[u8],
    target: &[u8],
    meta: &Meta,
    raw: &[u8],
) -> Result<()> {
    create_replacing(pfd, base, || symlinkat(target, pfd, base))
        .map_err(|e| io_err(raw, "creating symlink", e))?;
    // A symlink has no mode of its own.
    finish_in_dir(pfd, base, meta, raw, false)
}

/// Creates a device node or a FIFO (never opened).
fn make_node(
    pfd: BorrowedFd<'_>,
    base: &[u8],
    kind: SFlag,
    dev: libc::dev_t,
    meta: &Meta,
    raw: &[u8],
) -> Result<()> {
    let perm = Mode::from_bits_truncate((meta.mode & 0o777) as libc::mode_t);
    create_replacing(pfd, base, || mknodat(pfd, base, kind, perm, dev))
        .map_err(|e| io_err(raw, "creating node", e))?;
    finish_in_dir(pfd, base, meta, raw, true)
}

/// Owner, then mode (chown clears setuid bits), xattrs and times of an
/// entry just created in `pfd`, never following it if it is a symlink.
fn finish_in_dir(
    pfd: BorrowedFd<'_>,
    base: &[u8],
    meta: &Meta,
    raw: &[u8],
    set_mode: bool,
) -> Result<()> {
    let fail = |what: &'static str| move |e| io_err(raw, what, e);
    fchownat(
        pfd,
        base,
        Some(meta.uid),
        Some(meta.gid),
        AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(fail("changing owner"))?;
    if set_mode {
        // Not a symlink: the caller just created a node.
        fchmodat(pfd, base, meta.mode(), FchmodatFlags::FollowSymlink)
            .map_err(fail("changing mode"))?;
    }
    set_xattrs(
        XattrTarget::Path {
            dir: pfd,
            name: base,
        },
        &meta.xattrs,
        raw,
    )?;
    utimensat(
        pfd,
        base,
        &meta.atime,
        &meta.mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(fail("setting times"))
}

enum XattrTarget<'a> {
    /// An open regular file or directory.
    Fd(BorrowedFd<'a>),
    /// An entry that must not be opened (symlink, node): set through
    /// `/proc/self/fd/<dir>/<name>` with `lsetxattr`, which follows only the
    /// magic link of the (already safely opened) parent.
    Path { dir: BorrowedFd<'a>, name: &'a [u8] },
}

fn set_xattrs(target: XattrTarget<'_>, xattrs: &[(CString, Vec<u8>)], raw: &[u8]) -> Result<()> {
    if xattrs.is_empty() {
        return Ok(());
    }
    enum Resolved<'a> {
        Fd(BorrowedFd<'a>),
        Path(CString),
    }
    let target = match target {
        XattrTarget::Fd(fd) => Resolved::Fd(fd),
        XattrTarget::Path { dir, name } => {
            let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
            path.extend_from_slice(name);
            Resolved::Path(CString::new(path).map_err(|_| bad(raw, "path contains a NUL byte"))?)
        }
    };
    for (key, value) in xattrs {
        let key_bytes = key.to_bytes();
        if key_bytes.starts_with(b"trusted.overlay.") || key_bytes.starts_with(b"user.overlay.") {
            warn!(entry = %shown(raw), xattr = %key.to_string_lossy(),
                "ignoring overlayfs xattr from layer");
            continue;
        }
        // SAFETY: valid descriptor or NUL-terminated path, NUL-terminated
        // name, value pointer and length from the same slice.
        let rc = unsafe {
            match &target {
                Resolved::Fd(fd) => libc::fsetxattr(
                    fd.as_raw_fd(),
                    key.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                ),
                Resolved::Path(path) => libc::lsetxattr(
                    path.as_ptr(),
                    key.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                ),
            }
        };
        match Errno::result(rc) {
            Ok(_) => {}
            Err(e @ (Errno::EOPNOTSUPP | Errno::EPERM)) => {
                debug!(entry = %shown(raw), xattr = %key.to_string_lossy(), error = %e,
                    "filesystem refused xattr; skipped");
            }
            Err(e) => {
                return Err(io_err(
                    raw,
                    format!("setting xattr {:?}", key.to_string_lossy()),
                    e,
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    use std::path::{Path, PathBuf};
    use std::time::Instant;
    use tar::{EntryType, Header};

    const MTIME: u64 = 1_600_000_000;

    /// Builds layers in memory, writing names raw so malicious ones are possible.
    struct Layer(tar::Builder<Vec<u8>>);

    impl Layer {
        fn new() -> Self {
            Layer(tar::Builder::new(Vec::new()))
        }

        fn header(kind: EntryType, path: &[u8], mode: u32) -> Header {
            let mut h = Header::new_gnu();
            h.set_entry_type(kind);
            h.as_old_mut().name[..path.len()].copy_from_slice(path);
            h.set_mode(mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(MTIME);
            h.set_size(0);
            h
        }

        fn append(&mut self, mut h: Header, data: &[u8]) -> &mut Self {
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.0.append(&h, data).unwrap();
            self
        }

        fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
            let h = Self::header(EntryType::Regular, path.as_bytes(), mode);
            self.append(h, data)
        }

        fn owned_file(&mut self, path: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
            let mut h = Self::header(EntryType::Regular, path.as_bytes(), mode);
            h.set_uid(uid);
            h.set_gid(gid);
            self.append(h, b"owned")
        }

        fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
            let h = Self::header(EntryType::Directory, path.as_bytes(), mode);
            self.append(h, b"")
        }

        fn link(&mut self, kind: EntryType, path: &str, target: &[u8]) -> &mut Self {
            let mut h = Self::header(kind, path.as_bytes(), 0o777);
            h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
            self.append(h, b"")
        }

        fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.link(EntryType::Symlink, path, target.as_bytes())
        }

        fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
            self.link(EntryType::Link, path, target.as_bytes())
        }

        fn node(&mut self, kind: EntryType, path: &str, mode: u32, dev: (u32, u32)) -> &mut Self {
            let mut h = Self::header(kind, path.as_bytes(), mode);
            h.set_device_major(dev.0).unwrap();
            h.set_device_minor(dev.1).unwrap();
            self.append(h, b"")
        }

        fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
            self.0
                .append_pax_extensions(records.iter().map(|(k, v)| (*k, *v)))
                .unwrap();
            self
        }

        fn bytes(&mut self) -> Vec<u8> {
            let builder = std::mem::replace(&mut self.0, tar::Builder::new(Vec::new()));
            builder.into_inner().unwrap()
        }
    }

    /// A temporary directory holding the snapshot directory `snap`.
    struct Snap {
        tmp: tempfile::TempDir,
        snap: PathBuf,
    }

    impl Snap {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let snap = tmp.path().join("snap");
            std::fs::create_dir(&snap).unwrap();
            Snap { tmp, snap }
        }

        fn unpack(&self, layer: &mut Layer) -> Result<UnpackStats> {
            unpack_layer(&layer.bytes()[..], &self.snap)
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.snap.join(rel)
        }

        fn meta(&self, rel: &str) -> std::fs::Metadata {
            std::fs::symlink_metadata(self.path(rel)).unwrap()
        }

        fn exists(&self, rel: &str) -> bool {
            std::fs::symlink_metadata(self.path(rel)).is_ok()
        }

        /// Names directly in the temporary directory.
        fn tmp_names(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(self.tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        }

        /// Unpacks a layer that must be refused with a message containing
        /// `needle`, and checks nothing was written next to the snapshot.
        fn assert_refused(&self, layer: &mut Layer, needle: &str) -> String {
            let before = self.tmp_names();
            match self.unpack(layer) {
                Err(Error::BadImage(msg)) => {
                    assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
                    assert_eq!(self.tmp_names(), before, "something appeared outside");
                    msg
                }
                other => panic!("expected BadImage containing {needle:?}, got {other:?}"),
            }
        }
    }

    fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
        let path = CString::new(path.as_os_str().as_bytes()).unwrap();
        let name = CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: valid C strings and buffer.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| {
            buf.truncate(n as usize);
            buf
        })
    }

    fn mode(meta: &std::fs::Metadata) -> u32 {
        meta.mode() & 0o7777
    }

    #[test]
    fn regular_files_with_content_modes_and_owners() {
        let snap = Snap::new();
        let stats = snap
            .unpack(
                Layer::new()
                    .file("hello.txt", 0o644, b"hello world")
                    .file("bin/tool", 0o755, b"#!/bin/sh\n")
                    .file("bin/su", 0o4755, b"setuid")
                    .file("bin/wall", 0o2755, b"setgid")
                    .file("empty", 0o600, b"")
                    .owned_file("home/user/owned", 0o640, 1000, 2000),
            )
            .unwrap();
        assert_eq!(stats.entries, 6);
        assert_eq!(stats.bytes, 11 + 10 + 6 + 6 + 5);
        assert_eq!(
            std::fs::read(snap.path("hello.txt")).unwrap(),
            b"hello world"
        );
        assert_eq!(mode(&snap.meta("hello.txt")), 0o644);
        assert_eq!(mode(&snap.meta("bin/tool")), 0o755);
        assert_eq!(mode(&snap.meta("bin/su")), 0o4755);
        assert_eq!(mode(&snap.meta("bin/wall")), 0o2755);
        assert_eq!(snap.meta("empty").len(), 0);
        assert_eq!(mode(&snap.meta("empty")), 0o600);
        let owned = snap.meta("home/user/owned");
        assert_eq!((owned.uid(), owned.gid()), (1000, 2000));
        assert_eq!(mode(&owned), 0o640);
        let su = snap.meta("bin/su");
        assert_eq!((su.uid(), su.gid()), (0, 0));
    }

    #[test]
    fn setuid_survives_non_root_owner() {
        let snap = Snap::new();
        let mut layer = Layer::new();
        let mut h = Layer::header(EntryType::Regular, b"suid", 0o6755);
        h.set_uid(1000);
        h.set_gid(2000);
        layer.append(h, b"x");
        snap.unpack(&mut layer).unwrap();
        let meta = snap.meta("suid");
        assert_eq!((meta.uid(), meta.gid(), mode(&meta)), (1000, 2000, 0o6755));
    }

    #[test]
    fn directories_and_missing_parents() {
        let snap = Snap::new();
        let mut layer = Layer::new();
        layer
            .dir("etc", 0o755)
            .dir("tmp", 0o1777)
            .dir("opt/app", 0o700)
            .file("usr/share/doc/pkg/README", 0o644, b"doc");
        let mut g = Layer::header(EntryType::Directory, b"g", 0o2775);
        g.set_gid(1000);
        layer.append(g, b"").file("g/sub/file", 0o644, b"x");
        snap.unpack(&mut layer).unwrap();
        assert!(snap.meta("etc").is_dir());
        assert_eq!(mode(&snap.meta("tmp")), 0o1777);
        assert_eq!(mode(&snap.meta("opt/app")), 0o700);
        for implicit in [
            "opt",
            "usr",
            "usr/share",
            "usr/share/doc",
            "usr/share/doc/pkg",
        ] {
            let meta = snap.meta(implicit);
            assert!(meta.is_dir(), "{implicit}");
            assert_eq!(
                (mode(&meta), meta.uid(), meta.gid()),
                (0o755, 0, 0),
                "{implicit}"
            );
        }
        // Not influenced by the setgid parent.
        let sub = snap.meta("g/sub");
        assert_eq!((mode(&sub), sub.uid(), sub.gid()), (0o755, 0, 0));
        assert_eq!(
            std::fs::read(snap.path("usr/share/doc/pkg/README")).unwrap(),
            b"doc"
        );
    }

    #[test]
    fn dot_slash_and_trailing_slash_paths_are_normal() {
        let snap = Snap::new();
        let stats = snap
            .unpack(
                Layer::new()
                    .dir("./", 0o755)
                    .dir("./etc/", 0o755)
                    .file("./etc/./hosts", 0o644, b"127.0.0.1")
                    .dir("var/", 0o755)
                    .file("var//log", 0o644, b"l"),
            )
            .unwrap();
        assert_eq!(stats.entries, 5);
        assert_eq!(std::fs::read(snap.path("etc/hosts")).unwrap(), b"127.0.0.1");
        assert!(snap.meta("var").is_dir());
        assert!(snap.meta("var/log").is_file());
    }

    #[test]
    fn deep_paths_beyond_the_cached_depth() {
        let snap = Snap::new();
        let mut layer = Layer::new();
        let deep: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
        for depth in 1..=deep.len() {
            let dir = deep[..depth].join("/");
            layer
                .dir(&dir, 0o755)
                .file(&format!("{dir}/f"), 0o644, dir.as_bytes());
        }
        // Back up and down again, and into a sibling at depth.
        layer
            .file("d0/d1/d2/d3/d4/d5/again", 0o644, b"a")
            .file("d0/d1/d2/d3/d4/d5/other/x", 0o644, b"x")
            .file("d0/d1/d2/d3/d4/d5/d6/d7/y", 0o644, b"y");
        snap.unpack(&mut layer).unwrap();
        for depth in 1..=deep.len() {
            let dir = deep[..depth].join("/");
            assert_eq!(
                std::fs::read(snap.path(&format!("{dir}/f"))).unwrap(),
                dir.as_bytes()
            );
        }
        assert!(snap.exists("d0/d1/d2/d3/d4/d5/again"));
        assert!(snap.exists("d0/d1/d2/d3/d4/d5/other/x"));
        assert!(snap.exists("d0/d1/d2/d3/d4/d5/d6/d7/y"));
    }

    #[test]
    fn symlinks_are_created_verbatim_and_owned() {
        let snap = Snap::new();
        let mut layer = Layer::new();
        layer
            .symlink("etc-passwd", "/etc/passwd")
            .symlink("up", "../../..")
            .symlink("dangling", "does/not/exist");
        let mut h = Layer::header(EntryType::Symlink, b"owned-link", 0o777);
        h.as_old_mut().linkname[..6].copy_from_slice(b"target");
        h.set_uid(1000);
        h.set_gid(2000);
        layer.append(h, b"");
        snap.unpack(&mut layer).unwrap();
        let read = |p: &str| std::fs::read_link(snap.path(p)).unwrap();
        assert_eq!(read("etc-passwd"), Path::new("/etc/passwd"));
        assert_eq!(read("up"), Path::new("../../.."));
        assert_eq!(read("dangling"), Path::new("does/not/exist"));
        let meta = snap.meta("owned-link");
        assert!(meta.file_type().is_symlink());
        assert_eq!((meta.uid(), meta.gid()), (1000, 2000));
    }

    #[test]
    fn hardlinks_share_the_inode() {
        let snap = Snap::new();
        snap.unpack(
            Layer::new()
                .file("usr/bin/perl5.36", 0o755, b"perl")
                .hardlink("usr/bin/perl", "usr/bin/perl5.36")
                .hardlink("./perl-at-root", "./usr/bin/perl5.36"),
        )
        .unwrap();
        let a = snap.meta("usr/bin/perl5.36");
        let b = snap.meta("usr/bin/perl");
        let c = snap.meta("perl-at-root");
        assert_eq!(a.ino(), b.ino());
        assert_eq!(a.ino(), c.ino());
        assert_eq!(a.nlink(), 3);
        assert_eq!(std::fs::read(snap.path("usr/bin/perl")).unwrap(), b"perl");
    }

    #[test]
    fn device_nodes_and_fifo() {
        let snap = Snap::new();
        snap.unpack(
            Layer::new()
                .node(EntryType::Char, "dev/null", 0o666, (1, 3))
                .node(EntryType::Block, "dev/loop0", 0o660, (7, 0))
                .node(EntryType::Fifo, "run/fifo", 0o620, (0, 0)),
        )
        .unwrap();
        let null = snap.meta("dev/null");
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), makedev(1, 3));
        assert_eq!(mode(&null), 0o666);
        let lo = snap.meta("dev/loop0");
        assert!(lo.file_type().is_block_device());
        assert_eq!(lo.rdev(), makedev(7, 0));
        assert_eq!(mode(&lo), 0o660);
        let fifo = snap.meta("run/fifo");
        assert!(fifo.file_type().is_fifo());
        assert_eq!(mode(&fifo), 0o620);
    }

    #[test]
    fn xattrs_from_pax_records() {
        let snap = Snap::new();
        let mut layer = Layer::new();
        layer
            .pax(&[("SCHILY.xattr.user.berth", b"hello")])
            .file("file", 0o644, b"data")
            .pax(&[("SCHILY.xattr.user.berth", b"dir-value")])
            .dir("dir", 0o755)
            .pax(&[("SCHILY.xattr.trusted.overlay.opaque", b"y")])
            .dir("sneaky", 0o755)
            .pax(&[("SCHILY.xattr.trusted.berth", b"t")])
            .symlink("link", "file");
        snap.unpack(&mut layer).unwrap();
        assert_eq!(
            getxattr(&snap.path("file"), "user.berth").unwrap(),
            b"hello"
        );
        assert_eq!(
            getxattr(&snap.path("dir"), "user.berth").unwrap(),
            b"dir-value"
        );
        // Only whiteouts may produce overlayfs xattrs.
        assert_eq!(
            getxattr(&snap.path("sneaky"), "trusted.overlay.opaque"),
            None
        );
        assert_eq!(getxattr(&snap.path("link"), "trusted.berth").unwrap(), b"t");
        assert_eq!(getxattr(&snap.path("file"), "trusted.berth"), None);
    }

    #[test]
    fn mtimes_of_files_symlinks_and_directories() {
        let snap = Snap::new();
        let mut layer = Layer::new();
        let mut d = Layer::header(EntryType::Directory, b"d", 0o755);
        d.set_mtime(1_400_000_000);
        layer.append(d, b"");
        let mut f = Layer::header(EntryType::Regular, b"d/file", 0o644);
        f.set_mtime(1_500_000_000);
        layer.append(f, b"content");
        layer
            .file("d/sub/child", 0o644, b"c")
            .pax(&[("mtime", b"1500000000.25")])
            .file("d/precise", 0o644, b"p");
        let mut l = Layer::header(EntryType::Symlink, b"d/link", 0o777);
        l.as_old_mut().linkname[..4].copy_from_slice(b"file");
        l.set_mtime(1_300_000_000);
        layer.append(l, b"");
        snap.unpack(&mut layer).unwrap();
        assert_eq!(snap.meta("d").mtime(), 1_400_000_000);
        assert_eq!(snap.meta("d/file").mtime(), 1_500_000_000);
        let precise = snap.meta("d/precise");
        assert_eq!(
            (precise.mtime(), precise.mtime_nsec()),
            (1_500_000_000, 250_000_000)
        );
        assert_eq!(snap.meta("d/link").mtime(), 1_300_000_000);
        assert_eq!(snap.meta("d/sub/child").mtime(), MTIME as i64);
    }

    #[test]
    fn pax_times_parse() {
        let t = |s: &str| parse_pax_time(s.as_bytes()).map(|t| (t.tv_sec(), t.tv_nsec()));
        assert_eq!(t("12"), Some((12, 0)));
        assert_eq!(t("12.5"), Some((12, 500_000_000)));
        assert_eq!(t("12.0000000019"), Some((12, 1)));
        assert_eq!(t("-1.5"), Some((-2, 500_000_000)));
        assert_eq!(t("x"), None);
        assert_eq!(t("+1"), None);
        assert_eq!(t(""), None);
    }

    #[test]
    fn whiteout_becomes_char_device() {
        let snap = Snap::new();
        snap.unpack(
            Layer::new()
                .dir("etc", 0o755)
                .file("etc/.wh.passwd", 0o644, b"")
                .file(".wh.top", 0o644, b"")
                .file("var/lib/.wh.gone", 0o644, b""),
        )
        .unwrap();
        for path in ["etc/passwd", "top", "var/lib/gone"] {
            let meta = snap.meta(path);
            assert!(meta.file_type().is_char_device(), "{path}");
            assert_eq!(meta.rdev(), 0, "{path}");
        }
        assert!(!snap.exists("etc/.wh.passwd"));
        assert!(!snap.exists(".wh.top"));
        assert!(!snap.exists("var/lib/.wh.gone"));
    }

    #[test]
    fn opaque_whiteout_sets_xattr() {
        let snap = Snap::new();
        snap.unpack(
            Layer::new()
                .dir("kept", 0o755)
                .file("kept/sibling", 0o644, b"s")
                .file("kept/.wh..wh..opq", 0o644, b"")
                .file("implicit/.wh..wh..opq", 0o644, b""),
        )
        .unwrap();
        assert_eq!(
            getxattr(&snap.path("kept"), "trusted.overlay.opaque").unwrap(),
            b"y"
        );
        assert!(snap.exists("kept/sibling"));
        assert!(!snap.exists("kept/.wh..wh..opq"));
        assert!(snap.meta("implicit").is_dir());
        assert_eq!(
            getxattr(&snap.path("implicit"), "trusted.overlay.opaque").unwrap(),
            b"y"
        );
        assert!(!snap.exists("implicit/.wh..wh..opq"));
    }

    #[test]
    fn duplicate_entries_replace_earlier_ones() {
        let snap = Snap::new();
        snap.unpack(
            Layer::new()
                // file -> file
                .file("f", 0o644, b"one")
                .file("f", 0o600, b"two")
                // dir with children -> file
                .dir("d", 0o755)
                .file("d/child", 0o644, b"c")
                .symlink("d/escape", "/etc")
                .file("d", 0o644, b"now a file")
                // file -> dir
                .file("e", 0o644, b"e")
                .dir("e", 0o700)
                // dir -> dir keeps children, updates metadata
                .dir("k", 0o755)
                .file("k/child", 0o644, b"k")
                .dir("k", 0o711)
                // symlink -> file does not write through the symlink
                .symlink("s", "/etc/hostname")
                .file("s", 0o644, b"s")
                // hardlink replacing a file
                .file("target", 0o644, b"t")
                .file("h", 0o644, b"h")
                .hardlink("h", "target")
                // whiteout then directory of the same layer: opaque dir
                .file(".wh.w", 0o644, b"")
                .dir("w", 0o755)
                // entry then whiteout of it in the same layer: entry stays
                .file("x", 0o644, b"x")
                .file(".wh.x", 0o644, b""),
        )
        .unwrap();
        assert_eq!(std::fs::read(snap.path("f")).unwrap(), b"two");
        assert_eq!(mode(&snap.meta("f")), 0o600);
        assert_eq!(std::fs::read(snap.path("d")).unwrap(), b"now a file");
        assert!(snap.meta("e").is_dir());
        assert_eq!(mode(&snap.meta("e")), 0o700);
        assert_eq!(mode(&snap.meta("k")), 0o711);
        assert_eq!(std::fs::read(snap.path("k/child")).unwrap(), b"k");
        assert!(snap.meta("s").is_file());
        assert_eq!(std::fs::read(snap.path("s")).unwrap(), b"s");
        assert_eq!(snap.meta("h").ino(), snap.meta("target").ino());
        assert!(snap.meta("w").is_dir());
        assert_eq!(
            getxattr(&snap.path("w"), "trusted.overlay.opaque").unwrap(),
            b"y"
        );
        assert_eq!(std::fs::read(snap.path("x")).unwrap(), b"x");
    }

    #[test]
    fn gnu_sparse_file_is_expanded_with_holes() {
        let snap = Snap::new();
        let real_size: u64 = 4 * 1024 * 1024 + 512;
        let mut h = Layer::header(EntryType::GNUSparse, b"sparse", 0o644);
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.sparse[0].set_offset(0);
            gnu.sparse[0].set_length(512);
            gnu.sparse[1].set_offset(4 * 1024 * 1024);
            gnu.sparse[1].set_length(512);
            gnu.set_real_size(real_size);
        }
        let mut data = vec![b'A'; 512];
        data.extend(vec![b'B'; 512]);
        let mut layer = Layer::new();
        layer.append(h, &data);
        let stats = snap.unpack(&mut layer).unwrap();
        assert_eq!(stats.bytes, real_size);
        let content = std::fs::read(snap.path("sparse")).unwrap();
        assert_eq!(content.len() as u64, real_size);
        assert!(content[..512].iter().all(|b| *b == b'A'));
        assert!(content[512..4 * 1024 * 1024].iter().all(|b| *b == 0));
        assert!(content[4 * 1024 * 1024..].iter().all(|b| *b == b'B'));
        assert!(snap.meta("sparse").blocks() * 512 < real_size / 2);
    }

    #[test]
    fn refuses_dotdot_escape() {
        let snap = Snap::new();
        let msg = snap.assert_refused(
            Layer::new().file("../escape", 0o644, b"evil"),
            "path escapes the snapshot",
        );
        assert!(msg.contains("\"../escape\""), "{msg}");
        assert!(!snap.tmp.path().join("escape").exists());
    }

    #[test]
    fn refuses_deep_dotdot_escape() {
        let snap = Snap::new();
        snap.assert_refused(
            Layer::new().file("../../etc/evil", 0o644, b"evil"),
            "layer entry \"../../etc/evil\": path escapes the snapshot",
        );
    }

    #[test]
    fn refuses_absolute_path() {
        let snap = Snap::new();
        let outside = snap.tmp.path().join("abs");
        let msg = snap.assert_refused(
            Layer::new().file(outside.to_str().unwrap(), 0o644, b"evil"),
            "absolute path",
        );
        assert!(msg.contains(outside.to_str().unwrap()), "{msg}");
        assert!(!outside.exists());
        snap.assert_refused(Layer::new().file("/abs", 0o644, b"evil"), "\"/abs\"");
    }

    #[test]
    fn refuses_dotdot_inside_path() {
        let snap = Snap::new();
        snap.assert_refused(
            Layer::new()
                .dir("a", 0o755)
                .file("a/../../x", 0o644, b"evil"),
            "\"a/../../x\": path escapes the snapshot",
        );
        assert!(!snap.tmp.path().join("x").exists());
        // Even a harmless-looking one.
        snap.assert_refused(Layer::new().file("a/../b", 0o644, b"x"), "escapes");
    }

    #[test]
    fn refuses_parent_symlink_to_dotdot() {
        let snap = Snap::new();
        snap.assert_refused(
            Layer::new()
                .symlink("link", "..")
                .file("link/x", 0o644, b"evil"),
            "\"link/x\": path goes through symlink \"link\"",
        );
        assert!(!snap.tmp.path().join("x").exists());
    }

    #[test]
    fn refuses_parent_symlink_to_outside() {
        let snap = Snap::new();
        let outside = snap.tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        snap.assert_refused(
            Layer::new()
                .symlink("link", outside.to_str().unwrap())
                .file("link/x", 0o644, b"evil"),
            "goes through symlink",
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // Also deeper, through an implicit directory, and for a directory entry.
        snap.assert_refused(
            Layer::new()
                .symlink("a/link", outside.to_str().unwrap())
                .dir("a/link/sub", 0o755),
            "goes through symlink \"a/link\"",
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn refuses_whiteout_through_symlink() {
        let snap = Snap::new();
        let outside = snap.tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        snap.assert_refused(
            Layer::new()
                .symlink("link", outside.to_str().unwrap())
                .file("link/.wh.victim", 0o644, b""),
            "goes through symlink",
        );
        snap.assert_refused(
            Layer::new()
                .symlink("link", outside.to_str().unwrap())
                .file("link/.wh..wh..opq", 0o644, b""),
            "goes through symlink",
        );
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert_eq!(getxattr(&outside, "trusted.overlay.opaque"), None);
    }

    #[test]
    fn refuses_hardlink_to_dotdot_target() {
        let snap = Snap::new();
        std::fs::write(snap.tmp.path().join("outside"), b"secret").unwrap();
        snap.assert_refused(
            Layer::new().hardlink("h", "../outside"),
            "hardlink target \"../outside\": path escapes the snapshot",
        );
        assert!(!snap.exists("h"));
    }

    #[test]
    fn refuses_hardlink_to_absolute_target() {
        let snap = Snap::new();
        snap.assert_refused(
            Layer::new().hardlink("h", "/etc/passwd"),
            "hardlink target \"/etc/passwd\": absolute path",
        );
        assert!(!snap.exists("h"));
    }

    #[test]
    fn refuses_hardlink_through_symlink() {
        let snap = Snap::new();
        snap.assert_refused(
            Layer::new()
                .symlink("etc", "/etc")
                .hardlink("passwd", "etc/passwd"),
            "hardlink target \"etc/passwd\" goes through symlink \"etc\"",
        );
        assert!(!snap.exists("passwd"));
        snap.assert_refused(
            Layer::new()
                .file("d/f", 0o644, b"f")
                .symlink("s", "d")
                .hardlink("h", "s/f"),
            "goes through symlink \"s\"",
        );
        assert!(!snap.exists("h"));
    }

    #[test]
    fn refuses_hardlink_to_missing_target() {
        let snap = Snap::new();
        snap.assert_refused(
            Layer::new().hardlink("h", "nope"),
            "\"h\": hardlink target \"nope\" does not exist",
        );
        snap.assert_refused(Layer::new().hardlink("h", "no/such/dir"), "does not exist");
        snap.assert_refused(Layer::new().hardlink("h", "h"), "hardlink to itself");
        assert!(!snap.exists("h"));
    }

    #[test]
    fn refuses_hardlink_to_directory() {
        let snap = Snap::new();
        snap.assert_refused(
            Layer::new().dir("d", 0o755).hardlink("h", "d"),
            "hardlink target \"d\" is a directory",
        );
        assert!(!snap.exists("h"));
    }

    #[test]
    fn refuses_unsupported_entries() {
        let snap = Snap::new();
        snap.assert_refused(
            Layer::new().append(Layer::header(EntryType::new(b'V'), b"volume", 0o644), b""),
            "unsupported tar entry type 'V'",
        );
        snap.assert_refused(
            Layer::new()
                .pax(&[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")])
                .file("GNUSparseFile.0/f", 0o644, b""),
            "PAX-format sparse files are not supported",
        );
        snap.assert_refused(
            Layer::new().file("f", 0o644, b"x").file("f/g", 0o644, b"y"),
            "goes through non-directory \"f\"",
        );
    }

    #[test]
    fn truncated_layer_is_an_error() {
        let snap = Snap::new();
        let mut bytes = Layer::new().file("big", 0o644, &[7u8; 10_000]).bytes();
        bytes.truncate(512 + 5000);
        let err = unpack_layer(&bytes[..], &snap.snap).unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "{err:?}");
    }

    #[test]
    fn reads_the_stream_to_its_end() {
        let snap = Snap::new();
        let mut bytes = Layer::new().file("f", 0o644, b"x").bytes();
        bytes.extend_from_slice(&[0u8; 10 * 1024]);
        let mut reader = &bytes[..];
        unpack_layer(&mut reader, &snap.snap).unwrap();
        assert!(reader.is_empty());
    }

    #[test]
    fn throughput_50mb() {
        const FILE_SIZE: usize = 10 * 1024 * 1024;
        let mut layer = Layer::new();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut data = vec![0u8; FILE_SIZE];
        for i in 0..5 {
            for chunk in data.chunks_mut(8) {
                // xorshift64
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
            }
            layer.file(&format!("data/blob{i}"), 0o644, &data);
        }
        for i in 0..200 {
            layer.file(&format!("data/small/{i}"), 0o644, &data[..4096 + i]);
        }
        let bytes = layer.bytes();
        let snap = Snap::new();
        let start = Instant::now();
        let stats = unpack_layer(&bytes[..], &snap.snap).unwrap();
        let elapsed = start.elapsed();
        let mb = stats.bytes as f64 / (1024.0 * 1024.0);
        eprintln!(
            "unpacked {} entries, {mb:.1} MiB in {elapsed:?}: {:.0} MiB/s",
            stats.entries,
            mb / elapsed.as_secs_f64()
        );
        assert_eq!(stats.entries, 205);
        assert_eq!(std::fs::read(snap.path("data/blob4")).unwrap(), data);
    }
}
