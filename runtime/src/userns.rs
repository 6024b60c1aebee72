//! User namespaces: a pod's uid/gid mappings as the CRI asks for them
//! (checked), the namespaces made with them, and idmapped mounts through
//! them. The pod's user namespace owns its network, IPC, UTS and PID
//! namespaces, so it is made first and they are made inside it; files keep
//! their on-disk owners and are shown through idmapped mounts (no chown).

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use berth_cri::v1::{IdMapping, NamespaceMode, PodSandboxConfig};

use crate::error::{Error, Result};

/// One line of a `uid_map` / `gid_map`: ids `container_id..+length` in the
/// namespace are `host_id..+length` outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    pub container_id: u32,
    pub host_id: u32,
    pub length: u32,
}

impl IdMap {
    fn from_cri(what: &str, m: &IdMapping) -> Result<IdMap> {
        let fits = |start: u32| start.checked_add(m.length).is_some();
        if m.length == 0 || !fits(m.container_id) || !fits(m.host_id) {
            return Err(Error::InvalidArgument(format!(
                "{what} mapping {}:{}:{} is empty or overflows 32-bit ids",
                m.container_id, m.host_id, m.length
            )));
        }
        Ok(IdMap {
            container_id: m.container_id,
            host_id: m.host_id,
            length: m.length,
        })
    }

    fn host_of(&self, id: u32) -> Option<u32> {
        (id >= self.container_id && id - self.container_id < self.length)
            .then(|| self.host_id + (id - self.container_id))
    }
}

/// A user namespace's uid and gid mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdMappings {
    pub uids: Vec<IdMap>,
    pub gids: Vec<IdMap>,
}

impl IdMappings {
    /// Mappings from the CRI, both lists non-empty and each line sound.
    pub fn from_cri(what: &str, uids: &[IdMapping], gids: &[IdMapping]) -> Result<IdMappings> {
        if uids.is_empty() || gids.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{what}: both uid and gid mappings are needed"
            )));
        }
        let lines = |kind: &str, list: &[IdMapping]| -> Result<Vec<IdMap>> {
            let maps = list
                .iter()
                .map(|m| IdMap::from_cri(&format!("{what}: {kind}"), m))
                .collect::<Result<Vec<_>>>()?;
            for (i, a) in maps.iter().enumerate() {
                for b in &maps[i + 1..] {
                    let apart = |x: u32, y: u32, lx: u32, ly: u32| x + lx <= y || y + ly <= x;
                    if !apart(a.container_id, b.container_id, a.length, b.length)
                        || !apart(a.host_id, b.host_id, a.length, b.length)
                    {
                        return Err(Error::InvalidArgument(format!(
                            "{what}: {kind} mappings overlap"
                        )));
                    }
                }
            }
            Ok(maps)
        };
        Ok(IdMappings {
            uids: lines("uid", uids)?,
            gids: lines("gid", gids)?,
        })
    }

    /// The host uid that container uid `id` is; `None` when unmapped.
    pub fn host_uid(&self, id: u32) -> Option<u32> {
        self.uids.iter().find_map(|m| m.host_of(id))
    }

    pub fn host_gid(&self, id: u32) -> Option<u32> {
        self.gids.iter().find_map(|m| m.host_of(id))
    }

    /// `/proc/PID/uid_map` text.
    fn map_text(maps: &[IdMap]) -> String {
        maps.iter()
            .map(|m| format!("{} {} {}\n", m.container_id, m.host_id, m.length))
            .collect()
    }
}

/// The user namespace a pod asks for: `Some` for mode POD (with its
/// mappings checked the way kubelet sends them: one uid and one gid line,
/// container id 0 mapped), `None` for NODE or nothing. CONTAINER and TARGET
/// modes, and a user namespace beside a host network, PID or IPC namespace
/// (which it could not own), are refused.
pub fn pod_mappings(config: &PodSandboxConfig) -> Result<Option<IdMappings>> {
    let opts = config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref());
    let Some(userns) = opts.and_then(|o| o.userns_options.as_ref()) else {
        return Ok(None);
    };
    match NamespaceMode::try_from(userns.mode) {
        Ok(NamespaceMode::Node) => return Ok(None),
        Ok(NamespaceMode::Pod) => {}
        Ok(mode) => {
            return Err(Error::InvalidArgument(format!(
                "user namespace mode {} is not supported (only POD and NODE)",
                mode.as_str_name()
            )));
        }
        Err(_) => {
            return Err(Error::InvalidArgument(format!(
                "unknown user namespace mode {}",
                userns.mode
            )));
        }
    }
    let o = opts.expect("userns options come from the namespace options");
    for (what, mode) in [("network", o.network), ("pid", o.pid), ("ipc", o.ipc)] {
        if mode == NamespaceMode::Node as i32 {
            return Err(Error::InvalidArgument(format!(
                "a pod with a user namespace cannot use the host {what} namespace"
            )));
        }
    }
    if userns.uids.len() != 1 || userns.gids.len() != 1 {
        return Err(Error::InvalidArgument(format!(
            "user namespace: exactly one uid and one gid mapping are supported, got {} and {}",
            userns.uids.len(),
            userns.gids.len()
        )));
    }
    let mappings = IdMappings::from_cri("user namespace", &userns.uids, &userns.gids)?;
    if mappings.host_uid(0).is_none() || mappings.host_gid(0).is_none() {
        return Err(Error::InvalidArgument(
            "user namespace: container id 0 must be mapped".into(),
        ));
    }
    Ok(Some(mappings))
}

/// A child process in a new user namespace with `mappings` (and in new
/// namespaces of `also`, created inside it), kept until dropped so that its
/// `/proc/PID/ns/*` can be opened or pinned.
pub struct Holder {
    pub pid: libc::pid_t,
    /// Closing it lets the child exit.
    release: Option<OwnedFd>,
}

impl Holder {
    /// Forks the holder. berthd is multi-threaded: the child makes only raw
    /// syscalls (unshare, read, write, _exit), on memory prepared before.
    pub fn spawn(mappings: &IdMappings, also: libc::c_int) -> Result<Holder> {
        let (ready_rd, ready_wr) = pipe()?;
        let (go_rd, go_wr) = pipe()?;
        // SAFETY: the child only calls async-signal-safe functions.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Error::io(
                "fork a user namespace holder",
                std::io::Error::last_os_error(),
            ));
        }
        if pid == 0 {
            // SAFETY: raw syscalls on fds this process owns.
            unsafe {
                let mut byte = 0u8;
                // The parent's ends: the child must see EOF once the parent
                // closes `go`.
                libc::close(go_wr.as_raw_fd());
                libc::close(ready_rd.as_raw_fd());
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    libc::_exit(1);
                }
                libc::write(ready_wr.as_raw_fd(), b"u".as_ptr().cast(), 1);
                if libc::read(go_rd.as_raw_fd(), (&raw mut byte).cast(), 1) != 1 {
                    libc::_exit(2);
                }
                if also != 0 && libc::unshare(also) != 0 {
                    libc::_exit(3);
                }
                libc::write(ready_wr.as_raw_fd(), b"n".as_ptr().cast(), 1);
                while libc::read(go_rd.as_raw_fd(), (&raw mut byte).cast(), 1) > 0 {}
                libc::_exit(0);
            }
        }
        drop(ready_wr);
        drop(go_rd);
        let mut holder = Holder {
            pid,
            release: Some(go_wr),
        };
        holder.wait_byte(&ready_rd, "create a user namespace")?;
        for (file, maps) in [("uid_map", &mappings.uids), ("gid_map", &mappings.gids)] {
            let path = format!("/proc/{pid}/{file}");
            std::fs::write(&path, IdMappings::map_text(maps))
                .map_err(|e| Error::io(format!("write {path}"), e))?;
        }
        let go = holder.release.as_ref().expect("set above");
        // SAFETY: write of one byte from a static buffer.
        if unsafe { libc::write(go.as_raw_fd(), b"g".as_ptr().cast(), 1) } != 1 {
            return Err(Error::io(
                "wake the user namespace holder",
                std::io::Error::last_os_error(),
            ));
        }
        holder.wait_byte(&ready_rd, "create namespaces inside the user namespace")?;
        Ok(holder)
    }

    fn wait_byte(&mut self, fd: &OwnedFd, what: &str) -> Result<()> {
        let mut byte = 0u8;
        // SAFETY: read of one byte into a local.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&raw mut byte).cast(), 1) };
        if n == 1 {
            return Ok(());
        }
        let status = self.reap();
        Err(Error::Internal(format!(
            "{what}: the holder process failed (wait status {status:#x})"
        )))
    }

    /// Lets the child exit and reaps it; its wait status.
    fn reap(&mut self) -> i32 {
        drop(self.release.take());
        let mut status = 0;
        if self.pid > 0 {
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(self.pid, &mut status, 0) };
            self.pid = 0;
        }
        status
    }

    /// `/proc/PID/ns/<name>` of the holder.
    pub fn ns_path(&self, name: &str) -> String {
        format!("/proc/{}/ns/{name}", self.pid)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.reap();
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::io("pipe", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// An fd of a new user namespace with `mappings`, for idmapped mounts (the
/// namespace lives as long as the fd or a mount made with it).
pub fn open_with(mappings: &IdMappings) -> Result<OwnedFd> {
    let holder = Holder::spawn(mappings, 0)?;
    let path = holder.ns_path("user");
    std::fs::File::open(&path)
        .map(OwnedFd::from)
        .map_err(|e| Error::io(format!("open {path}"), e))
}

/// Tries an idmapped mount in a scratch dir under `dir` (created if
/// missing) and removes it again.
pub fn probe_idmapped_mounts(dir: &Path) -> bool {
    let scratch = dir.join(format!(".idmap-probe-{}", std::process::id()));
    let (source, target) = (scratch.join("source"), scratch.join("target"));
    let made = std::fs::create_dir_all(&source).and_then(|_| std::fs::create_dir_all(&target));
    let works = made.is_ok()
        && open_with(&IdMappings {
            uids: vec![IdMap {
                container_id: 0,
                host_id: 65534,
                length: 1,
            }],
            gids: vec![IdMap {
                container_id: 0,
                host_id: 65534,
                length: 1,
            }],
        })
        .and_then(|ns| {
            use std::os::fd::AsFd;
            idmapped_bind(&source, &target, ns.as_fd(), false)
        })
        .inspect_err(|e| tracing::debug!(error = %e, "idmapped mount probe"))
        .is_ok();
    if works {
        let _ = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir(&target);
    let _ = std::fs::remove_dir(&source);
    let _ = std::fs::remove_dir(&scratch);
    works
}

// From <linux/mount.h> and <linux/fcntl.h>.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Mounts `source` at `target` (which exists) showing its files' owners
/// through `userns`'s mappings: a file owned by host id 0 shows as the host
/// id container id 0 maps to. `recursive` takes the submounts too. A
/// filesystem that cannot be idmapped is FailedPrecondition.
pub fn idmapped_bind(
    source: &Path,
    target: &Path,
    userns: BorrowedFd<'_>,
    recursive: bool,
) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| Error::InvalidArgument(format!("path {} contains NUL", p.display())))
    };
    let (src, dst) = (c(source)?, c(target)?);
    let empty = c"";
    let rec = if recursive { AT_RECURSIVE } else { 0 };
    // SAFETY: plain syscalls on valid C strings; the tree fd is owned below.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | rec,
        )
    };
    if tree < 0 {
        return Err(Error::io(
            format!("clone the mount of {}", source.display()),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: open_tree returned a new fd.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as i32) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_IDMAP,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    // SAFETY: attr is a valid mount_attr of the size passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | rec,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::EPERM) | Some(libc::ENOSYS) => {
                Error::FailedPrecondition(format!(
                    "{} cannot be mounted idmapped for a user namespace (its filesystem does \
                     not support idmapped mounts): {e}",
                    source.display()
                ))
            }
            _ => Error::io(format!("idmap the mount of {}", source.display()), e),
        });
    }
    // SAFETY: moves the detached tree onto an existing path.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(Error::io(
            format!(
                "mount idmapped {} at {}",
                source.display(),
                target.display()
            ),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_cri::v1::{
        LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceOption, UserNamespace,
    };

    fn m(c: u32, h: u32, l: u32) -> IdMapping {
        IdMapping {
            container_id: c,
            host_id: h,
            length: l,
        }
    }

    fn pod(mode: NamespaceMode, uids: Vec<IdMapping>, gids: Vec<IdMapping>) -> PodSandboxConfig {
        PodSandboxConfig {
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        userns_options: Some(UserNamespace {
                            mode: mode as i32,
                            uids,
                            gids,
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn err(config: &PodSandboxConfig) -> String {
        match pod_mappings(config) {
            Err(Error::InvalidArgument(msg)) => msg,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn a_pod_mapping_is_checked_as_kubelet_sends_it() {
        let ok = pod(
            NamespaceMode::Pod,
            vec![m(0, 1000, 100000)],
            vec![m(0, 1000, 100000)],
        );
        let maps = pod_mappings(&ok).unwrap().unwrap();
        assert_eq!(maps.host_uid(0), Some(1000));
        assert_eq!(maps.host_uid(99999), Some(100999));
        assert_eq!(maps.host_uid(100000), None);
        assert_eq!(maps.host_gid(5), Some(1005));
        assert_eq!(
            IdMappings::map_text(&maps.uids),
            "0 1000 100000\n".to_string()
        );

        assert!(
            pod_mappings(&PodSandboxConfig::default())
                .unwrap()
                .is_none()
        );
        assert!(
            pod_mappings(&pod(NamespaceMode::Node, vec![], vec![]))
                .unwrap()
                .is_none()
        );
        let two = vec![m(0, 1000, 10), m(10, 5000, 10)];
        assert!(err(&pod(NamespaceMode::Pod, two, vec![m(0, 1000, 20)])).contains("exactly one"));
        assert!(
            err(&pod(
                NamespaceMode::Pod,
                vec![m(1, 1000, 10)],
                vec![m(0, 1000, 10)]
            ))
            .contains("container id 0")
        );
        assert!(err(&pod(NamespaceMode::Container, vec![], vec![])).contains("CONTAINER"));
        assert!(err(&pod(NamespaceMode::Target, vec![], vec![])).contains("TARGET"));
        assert!(
            err(&pod(
                NamespaceMode::Pod,
                vec![m(0, u32::MAX - 5, 10)],
                vec![m(0, 1000, 10)]
            ))
            .contains("overflows")
        );
        let mut host_net = ok.clone();
        host_net
            .linux
            .as_mut()
            .unwrap()
            .security_context
            .as_mut()
            .unwrap()
            .namespace_options
            .as_mut()
            .unwrap()
            .network = NamespaceMode::Node as i32;
        assert!(err(&host_net).contains("host network"));
    }

    #[test]
    fn mount_mappings_may_have_several_lines_that_do_not_overlap() {
        let maps = IdMappings::from_cri(
            "mount /data",
            &[m(0, 1000, 10), m(10, 5000, 10)],
            &[m(0, 1000, 20)],
        )
        .unwrap();
        assert_eq!(maps.host_uid(12), Some(5002));
        assert!(
            IdMappings::from_cri("m", &[m(0, 1000, 10), m(5, 9000, 10)], &[m(0, 1, 1)]).is_err()
        );
        assert!(IdMappings::from_cri("m", &[m(0, 1000, 10)], &[]).is_err());
        assert!(IdMappings::from_cri("m", &[m(0, 1000, 0)], &[m(0, 1, 1)]).is_err());
    }
}
