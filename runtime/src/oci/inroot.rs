//! Opening paths inside an untrusted root filesystem.
//!
//! An image may hold symlinks such as `/etc/passwd -> /etc/shadow` or
//! `/etc -> ../../../../etc`. berthd reads and creates files in a container's
//! rootfs *before* the container runs, from the host's mount namespace, so every
//! path is resolved as if the rootfs were `/`: with `openat2(RESOLVE_IN_ROOT)`
//! when the kernel has it (5.6+), otherwise by walking the path one component
//! at a time with `O_NOFOLLOW`, reading each symlink and restarting it from the
//! root (absolute target) or the current directory (relative target), and
//! never letting `..` climb above the root. Either way no path in the image can
//! name a file outside the rootfs.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{Mode, SFlag};

/// Symlinks followed at most while resolving one path (the kernel's limit).
const MAX_SYMLINKS: usize = 40;

/// Reads the regular file at `path` inside `root`, at most `limit` bytes.
/// `Ok(None)` when the file (or a directory on its way) does not exist,
/// resolves in a symlink loop (`/etc/passwd -> /etc/passwd` once confined
/// to the root), or is not a regular file (a FIFO, a device node or a
/// directory is never opened for reading).
pub(crate) fn read_file(root: &Path, path: &str, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let fd = match open(root, Path::new(path), OFlag::O_PATH) {
        Ok(fd) => fd,
        Err(Errno::ENOENT | Errno::ENOTDIR | Errno::ELOOP) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let st = nix::sys::stat::fstat(&fd)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Ok(None);
    }
    // Re-open the very inode the O_PATH descriptor names, for reading.
    let file = File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let mut out = Vec::new();
    file.take(limit).read_to_end(&mut out)?;
    Ok(Some(out))
}

/// The host path of what `path` names inside `root`, every symlink
/// resolved inside `root`: a path below `root` (or `root` itself), for a
/// caller that must hand a path, not a descriptor, to someone else (a bind
/// mount source). Only for a tree that cannot change meanwhile (a
/// read-only image mount): the path is not pinned once returned.
pub(crate) fn resolve(root: &Path, path: &Path) -> io::Result<std::path::PathBuf> {
    let fd = open(root, path, OFlag::O_PATH)?;
    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    let root = std::fs::canonicalize(root)?;
    if !real.starts_with(&root) {
        // RESOLVE_IN_ROOT and the walk never leave the root; a mount moved
        // under us could.
        return Err(io::Error::other(format!(
            "{} resolved to {}, outside {}",
            path.display(),
            real.display(),
            root.display()
        )));
    }
    Ok(real)
}

/// Creates the directory `path` inside `root` and any missing parent, like
/// `mkdir -p` run in a chroot (new directories are 0755, owned by berthd's
/// user, or by `owner` (uid, gid) when set). Existing symlinks on the way
/// are followed inside the root.
pub(crate) fn mkdir_all(root: &Path, path: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    let mut prefix = std::path::PathBuf::new();
    let mut parent = open(root, Path::new(""), OFlag::O_PATH | OFlag::O_DIRECTORY)?;
    for comp in path.components() {
        let name = match comp {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => continue,
            Component::ParentDir => OsStr::new(".."),
            Component::Normal(n) => n,
        };
        prefix.push(name);
        let dir_flags = OFlag::O_PATH | OFlag::O_DIRECTORY;
        parent = match open(root, &prefix, dir_flags) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                match nix::sys::stat::mkdirat(&parent, name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) => {
                        if let Some((uid, gid)) = owner {
                            nix::unistd::fchownat(
                                &parent,
                                name,
                                Some(nix::unistd::Uid::from_raw(uid)),
                                Some(nix::unistd::Gid::from_raw(gid)),
                                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                            )?;
                        }
                    }
                    Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                open(root, &prefix, dir_flags)?
            }
            Err(e) => return Err(e.into()),
        };
    }
    Ok(())
}

/// Opens `path` (absolute or relative: both are taken from `root`) with
/// every symlink resolved inside `root`. `flags` get `O_CLOEXEC` (and
/// `O_NOCTTY` unless `O_PATH`, which openat2 refuses to combine with it).
pub(crate) fn open(root: &Path, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let flags = if flags.contains(OFlag::O_PATH) {
        flags | OFlag::O_CLOEXEC
    } else {
        flags | OFlag::O_CLOEXEC | OFlag::O_NOCTTY
    };
    let rel = relative(path);
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match nix::fcntl::openat2(&root_fd, rel.as_os_str(), how) {
        // ENOSYS: a kernel before 5.6; EPERM: a seccomp filter around berthd
        // that does not know openat2.
        Err(Errno::ENOSYS | Errno::EPERM) => open_walking(root_fd, &rel, flags),
        other => other,
    }
}

/// `path` without its leading `/`, "." when empty.
fn relative(path: &Path) -> std::path::PathBuf {
    let rel: std::path::PathBuf = path
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_)))
        .collect();
    if rel.as_os_str().is_empty() {
        ".".into()
    } else {
        rel
    }
}

/// The fallback for `openat2(RESOLVE_IN_ROOT)`: a component-by-component
/// walk that follows symlinks itself.
pub(crate) fn open_walking(root_fd: OwnedFd, path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    // stack[0] is the root; stack[i] the directory reached after i steps.
    let mut stack: Vec<OwnedFd> = vec![root_fd];
    let mut pending: Vec<OsString> = Vec::new(); // reversed: pop() gives the next
    push_components(&mut pending, path.as_os_str());
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let dir = stack.last().expect("the root is never popped");
        let fd = nix::fcntl::openat(
            dir,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        let st = nix::sys::stat::fstat(&fd)?;
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFLNK {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(Errno::ELOOP);
            }
            let target = nix::fcntl::readlinkat(dir, name.as_os_str())?;
            if target.as_bytes().starts_with(b"/") {
                stack.truncate(1);
            }
            push_components(&mut pending, &target);
            continue;
        }
        if pending.is_empty() {
            // The last component: open it for real, refusing a symlink
            // swapped in since the check.
            return nix::fcntl::openat(
                dir,
                name.as_os_str(),
                flags | OFlag::O_NOFOLLOW,
                Mode::empty(),
            );
        }
        if kind != SFlag::S_IFDIR {
            return Err(Errno::ENOTDIR);
        }
        stack.push(fd);
    }
    // The path named the root itself (or climbed back to a directory).
    let dir = stack.last().expect("the root is never popped");
    nix::fcntl::openat(dir.as_fd(), ".", flags, Mode::empty())
}

/// Pushes the components of `path` onto `pending` so that `pop()` yields
/// them in order; "." and empty components are dropped.
fn push_components(pending: &mut Vec<OsString>, path: &OsStr) {
    let parts: Vec<&[u8]> = path
        .as_bytes()
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    for part in parts.into_iter().rev() {
        pending.push(OsStr::from_bytes(part).to_os_string());
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn root_fd(root: &Path) -> OwnedFd {
        nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .unwrap()
    }

    fn read_walking(root: &Path, path: &str) -> nix::Result<String> {
        let fd = open_walking(root_fd(root), Path::new(path), OFlag::O_RDONLY)?;
        let mut s = String::new();
        File::from(fd).read_to_string(&mut s).unwrap();
        Ok(s)
    }

    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("etc/sub")).unwrap();
        std::fs::write(root.join("etc/passwd"), "inside\n").unwrap();
        symlink("/etc/passwd", root.join("etc/abs")).unwrap();
        symlink("../../../../../etc/passwd", root.join("etc/sub/rel")).unwrap();
        symlink("/etc", root.join("etclink")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        symlink("/proc/self/root/etc/passwd", root.join("magic")).unwrap();
        dir
    }

    #[test]
    fn walking_resolves_symlinks_inside_the_root() {
        let dir = fixture();
        let root = dir.path();
        assert_eq!(read_walking(root, "/etc/passwd").unwrap(), "inside\n");
        assert_eq!(read_walking(root, "etc/abs").unwrap(), "inside\n");
        assert_eq!(read_walking(root, "/etc/sub/rel").unwrap(), "inside\n");
        assert_eq!(read_walking(root, "/etclink/passwd").unwrap(), "inside\n");
        assert_eq!(
            read_walking(root, "/../../etc/./passwd").unwrap(),
            "inside\n"
        );
        assert_eq!(read_walking(root, "/loop1").unwrap_err(), Errno::ELOOP);
        assert_eq!(
            read_walking(root, "/etc/passwd/x").unwrap_err(),
            Errno::ENOTDIR
        );
        // /proc/self/root inside the rootfs does not exist: not the host's.
        assert_eq!(read_walking(root, "/magic").unwrap_err(), Errno::ENOENT);
    }

    #[test]
    fn read_file_stays_inside_the_root() {
        let dir = fixture();
        let root = dir.path();
        let read = |p: &str| {
            read_file(root, p, 1 << 20)
                .unwrap()
                .map(|b| String::from_utf8(b).unwrap())
        };
        assert_eq!(read("/etc/abs").as_deref(), Some("inside\n"));
        assert_eq!(read("/etc/sub/rel").as_deref(), Some("inside\n"));
        assert_eq!(read("/magic"), None);
        assert_eq!(read("/etc/missing"), None);
        assert_eq!(read("/etc"), None, "a directory is not read");
        assert_eq!(read_file(root, "/etc/passwd", 3).unwrap().unwrap(), b"ins");
    }

    #[test]
    fn read_file_never_opens_a_fifo() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("etc")).unwrap();
        nix::unistd::mkfifo(
            &dir.path().join("etc/passwd"),
            Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        assert_eq!(read_file(dir.path(), "/etc/passwd", 100).unwrap(), None);
    }

    #[test]
    fn resolve_names_a_path_inside_the_root() {
        let dir = fixture();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(
            resolve(&root, Path::new("etc/abs")).unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve(&root, Path::new("etclink/sub")).unwrap(),
            root.join("etc/sub")
        );
        assert_eq!(resolve(&root, Path::new("")).unwrap(), root);
        assert_eq!(
            resolve(&root, Path::new("magic")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn mkdir_all_creates_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // An absolute symlink resolves inside the root.
        std::fs::create_dir_all(root.join("data")).unwrap();
        symlink("/data", root.join("work")).unwrap();
        mkdir_all(&root, Path::new("/work/a/b"), None).unwrap();
        assert!(root.join("data/a/b").is_dir());
        // A symlink to a host directory dangles inside the root: refused,
        // and nothing is created on the host.
        symlink(&outside, root.join("escape")).unwrap();
        assert!(mkdir_all(&root, Path::new("/escape/a"), None).is_err());
        assert!(!outside.join("a").exists());
        mkdir_all(&root, Path::new("/x/../y/./z"), None).unwrap();
        assert!(root.join("y/z").is_dir());
        mkdir_all(&root, Path::new("/"), None).unwrap();
    }
}
