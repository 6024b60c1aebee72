//! The pod's shared namespaces, created without any process: a throwaway
//! thread unshares them, configures them (hostname, loopback, sysctls) and
//! bind-mounts its `/proc/thread-self/ns/*` files under the sandbox's state
//! dir, which keeps them alive after the thread is gone.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Net,
    Ipc,
    Uts,
    /// Pinned only for a pod with a user namespace, which owns the others.
    User,
}

impl Kind {
    /// Every kind a pod may pin, for removal and recovery.
    pub const ALL: [Kind; 4] = [Kind::Net, Kind::Ipc, Kind::Uts, Kind::User];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Net => "net",
            Kind::Ipc => "ipc",
            Kind::Uts => "uts",
            Kind::User => "user",
        }
    }

    fn flag(self) -> CloneFlags {
        match self {
            Kind::Net => CloneFlags::CLONE_NEWNET,
            Kind::Ipc => CloneFlags::CLONE_NEWIPC,
            Kind::Uts => CloneFlags::CLONE_NEWUTS,
            Kind::User => CloneFlags::CLONE_NEWUSER,
        }
    }
}

/// What to create and how to set it up.
#[derive(Debug, Clone, Default)]
pub struct NamespaceSetup {
    pub kinds: Vec<Kind>,
    pub hostname: Option<String>,
    /// `(key, value)` sysctls, already validated against the namespaces.
    pub sysctls: Vec<(String, String)>,
    /// A user namespace with these mappings, made first and pinned as
    /// `<dir>/user`; the other kinds are made inside it.
    pub user: Option<crate::userns::IdMappings>,
}

/// Creates the namespaces and pins them as `<dir>/<kind>`. On error nothing
/// stays mounted.
pub fn create(dir: &Path, setup: NamespaceSetup) -> Result<Vec<(Kind, PathBuf)>> {
    if setup.kinds.is_empty() && setup.user.is_none() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    if let Some(mappings) = &setup.user {
        return create_in_user_namespace(dir, mappings, &setup);
    }
    let dir = dir.to_path_buf();
    // A thread of its own: unsharing changes only this thread's namespaces,
    // and the thread is never reused for anything else.
    std::thread::Builder::new()
        .name("berth-netns".into())
        .spawn(move || create_in_thread(&dir, &setup))
        .map_err(|e| Error::io("spawn namespace thread", e))?
        .join()
        .map_err(|_| Error::Internal("namespace thread panicked".into()))?
}

fn flags(kinds: &[Kind]) -> CloneFlags {
    kinds.iter().fold(CloneFlags::empty(), |f, k| f | k.flag())
}

/// A multi-threaded process cannot enter a new user namespace, so a forked
/// holder makes it and the other namespaces inside it; they are pinned from
/// its `/proc/PID/ns`, then set up from a thread that enters them.
fn create_in_user_namespace(
    dir: &Path,
    mappings: &crate::userns::IdMappings,
    setup: &NamespaceSetup,
) -> Result<Vec<(Kind, PathBuf)>> {
    let holder = crate::userns::Holder::spawn(mappings, flags(&setup.kinds).bits())?;
    let mut pinned: Vec<(Kind, PathBuf)> = Vec::new();
    for kind in std::iter::once(Kind::User).chain(setup.kinds.iter().copied()) {
        match pin(&holder.ns_path(kind.name()), &dir.join(kind.name())) {
            Ok(path) => pinned.push((kind, path)),
            Err(e) => {
                unpin_all(&pinned);
                return Err(e);
            }
        }
    }
    drop(holder);
    let to_enter: Vec<(Kind, PathBuf)> = pinned
        .iter()
        .filter(|(k, _)| *k != Kind::User)
        .cloned()
        .collect();
    let setup = setup.clone();
    let configured = std::thread::Builder::new()
        .name("berth-netns".into())
        .spawn(move || -> Result<()> {
            for (kind, path) in &to_enter {
                let file = std::fs::File::open(path)
                    .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
                nix::sched::setns(&file, kind.flag()).map_err(|source| Error::Kernel {
                    op: "enter the pod namespace",
                    path: path.clone(),
                    source,
                })?;
            }
            configure(&setup)
        })
        .map_err(|e| Error::io("spawn namespace thread", e))?
        .join()
        .map_err(|_| Error::Internal("namespace thread panicked".into()))
        .and_then(|r| r);
    if let Err(e) = configured {
        unpin_all(&pinned);
        return Err(e);
    }
    Ok(pinned)
}

fn unpin_all(pinned: &[(Kind, PathBuf)]) {
    for (_, p) in pinned {
        let _ = unpin(p);
    }
}

/// Bind-mounts namespace file `source` at `target` (created), which keeps
/// the namespace alive; on error nothing is left.
fn pin(source: &str, target: &Path) -> Result<PathBuf> {
    std::fs::File::create(target)
        .map_err(|e| Error::io(format!("create {}", target.display()), e))?;
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|source| {
        let _ = std::fs::remove_file(target);
        Error::Kernel {
            op: "pin the namespace at",
            path: target.to_path_buf(),
            source,
        }
    })?;
    Ok(target.to_path_buf())
}

fn create_in_thread(dir: &Path, setup: &NamespaceSetup) -> Result<Vec<(Kind, PathBuf)>> {
    unshare(flags(&setup.kinds)).map_err(|source| Error::Kernel {
        op: "unshare the pod namespaces under",
        path: dir.to_path_buf(),
        source,
    })?;
    configure(setup)?;
    let mut pinned: Vec<(Kind, PathBuf)> = Vec::new();
    for kind in &setup.kinds {
        let source = format!("/proc/thread-self/ns/{}", kind.name());
        match pin(&source, &dir.join(kind.name())) {
            Ok(path) => pinned.push((*kind, path)),
            Err(e) => {
                unpin_all(&pinned);
                return Err(e);
            }
        }
    }
    Ok(pinned)
}

/// Hostname, loopback and sysctls, on a thread that is in the pod's
/// namespaces.
fn configure(setup: &NamespaceSetup) -> Result<()> {
    if setup.kinds.contains(&Kind::Uts)
        && let Some(h) = &setup.hostname
    {
        nix::unistd::sethostname(h)
            .map_err(|e| Error::InvalidArgument(format!("set hostname {h:?}: {e}")))?;
    }
    if setup.kinds.contains(&Kind::Net) {
        loopback_up()?;
    }
    for (key, value) in &setup.sysctls {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        std::fs::write(&path, value)
            .map_err(|e| Error::InvalidArgument(format!("sysctl {key}={value}: {e}")))?;
    }
    Ok(())
}

/// Runs `f` on a short-lived thread that entered the network namespace
/// pinned at `netns`, so berthd's own threads never change namespace. What
/// `f` makes there (a socket) keeps that namespace; what it reads through
/// `/proc/thread-self` is that namespace's.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    thread_name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = std::fs::File::open(netns)
        .map_err(|e| Error::io(format!("open {}", netns.display()), e))?;
    let netns_path = netns.to_path_buf();
    std::thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || -> Result<T> {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| Error::Kernel {
                op: "enter the network namespace",
                path: netns_path,
                source,
            })?;
            f()
        })
        .map_err(|e| Error::io(format!("spawn the {thread_name} thread"), e))?
        .join()
        .map_err(|_| Error::Internal(format!("the {thread_name} thread panicked")))?
}

/// The IP addresses on the interfaces of the network namespace pinned at
/// `netns`, read from a thread that enters it.
pub fn addresses(netns: &Path) -> Result<Vec<String>> {
    in_netns(netns, "berth-netns-read", || {
        let addrs = nix::ifaddrs::getifaddrs()
            .map_err(|e| Error::Internal(format!("list addresses: {e}")))?;
        Ok(addrs
            .filter_map(|a| {
                let addr = a.address?;
                if let Some(v4) = addr.as_sockaddr_in() {
                    Some(v4.ip().to_string())
                } else {
                    addr.as_sockaddr_in6().map(|v6| v6.ip().to_string())
                }
            })
            .collect())
    })
}

/// One interface's counters, as `/proc/net/dev` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterfaceCounters {
    pub name: String,
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub rx_errors: u64,
    pub rx_dropped: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
    pub tx_errors: u64,
    pub tx_dropped: u64,
}

/// The counters of every interface of the network namespace pinned at
/// `netns`: through `/proc/PID/net/dev` of the first of `members` (pids of
/// the pod's processes) that is in that namespace, else from a thread that
/// enters it (a thread and a setns per pod are what made a list of pod
/// stats slow).
pub fn interface_counters(netns: &Path, members: &[i32]) -> Result<Vec<InterfaceCounters>> {
    use std::os::unix::fs::MetadataExt;
    if let Ok(pinned) = std::fs::metadata(netns) {
        for pid in members.iter().filter(|p| **p > 0) {
            let same = |m: std::fs::Metadata| m.dev() == pinned.dev() && m.ino() == pinned.ino();
            if !std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(same) {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/dev")) else {
                continue;
            };
            // Checked again after the read: the pid may have been reused
            // meanwhile by a process elsewhere.
            if std::fs::metadata(format!("/proc/{pid}/ns/net")).is_ok_and(same) {
                return Ok(parse_net_dev(&text));
            }
        }
    }
    in_netns(netns, "berth-netstats", || {
        let path = "/proc/thread-self/net/dev";
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {path}"), e))?;
        Ok(parse_net_dev(&text))
    })
}

/// Parses `/proc/net/dev`: two header lines, then
/// `name: rx_bytes rx_packets rx_errs rx_drop rx_fifo rx_frame rx_compressed
/// rx_multicast tx_bytes tx_packets tx_errs tx_drop ...` per interface. Lines that
/// do not parse are skipped.
pub fn parse_net_dev(text: &str) -> Vec<InterfaceCounters> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.split_once(':')?;
            let name = name.trim();
            let fields: Vec<u64> = rest
                .split_whitespace()
                .map(|f| f.parse().ok())
                .collect::<Option<_>>()?;
            if name.is_empty() || fields.len() < 16 {
                return None;
            }
            Some(InterfaceCounters {
                name: name.to_string(),
                rx_bytes: fields[0],
                rx_packets: fields[1],
                rx_errors: fields[2],
                rx_dropped: fields[3],
                tx_bytes: fields[8],
                tx_packets: fields[9],
                tx_errors: fields[10],
                tx_dropped: fields[11],
            })
        })
        .collect()
}

/// Unmounts and removes a pinned namespace file; fine if already gone.
pub fn unpin(path: &Path) -> Result<()> {
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(source) => {
            return Err(Error::Kernel {
                op: "unmount",
                path: path.to_path_buf(),
                source,
            });
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// Whether `path` is a pinned namespace (an nsfs bind mount).
pub fn is_pinned(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|fs| fs.filesystem_type().0 as libc::c_long == NSFS_MAGIC)
}

const NSFS_MAGIC: libc::c_long = 0x6e736673;

/// `ip link set lo up`, with the classic ioctl: no netlink needed for one flag.
fn loopback_up() -> Result<()> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::Internal(format!("socket for loopback: {e}")))?;
    use std::os::fd::AsRawFd;
    // SAFETY: ifreq is plain data; the ioctls read and write only it.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(Error::io(
                "read loopback flags",
                std::io::Error::last_os_error(),
            ));
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(Error::io(
                "bring loopback up",
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_is_parsed_per_interface() {
        let text = "\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     140       2    0    0    0     0          0         0      140       2    0    0    0     0       0          0
  eth0:   12345      67    3    5    0     0          0         1     6789      45    4    6    0     0       0          0
net1:1 2 0 0 0 0 0 0 3 4 0 0 0 0 0 0
  bad: 1 2 3
";
        assert_eq!(
            parse_net_dev(text),
            vec![
                InterfaceCounters {
                    name: "lo".into(),
                    rx_bytes: 140,
                    rx_packets: 2,
                    tx_bytes: 140,
                    tx_packets: 2,
                    ..Default::default()
                },
                InterfaceCounters {
                    name: "eth0".into(),
                    rx_bytes: 12345,
                    rx_packets: 67,
                    rx_errors: 3,
                    rx_dropped: 5,
                    tx_bytes: 6789,
                    tx_packets: 45,
                    tx_errors: 4,
                    tx_dropped: 6,
                },
                InterfaceCounters {
                    name: "net1".into(),
                    rx_bytes: 1,
                    rx_packets: 2,
                    tx_bytes: 3,
                    tx_packets: 4,
                    ..Default::default()
                },
            ]
        );
    }
}
