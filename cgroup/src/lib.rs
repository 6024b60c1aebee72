//! Berth's one cgroup module, used by berthd and the shim alike.
//!
//! [`Cgroups`] is the host's cgroup tree at a root (`/sys/fs/cgroup` on a
//! real host, a temp dir in tests): which version it runs, which
//! hierarchies it has, and every operation Berth does on it: creating,
//! joining and removing cgroups ([`Cgroups::create`], [`Cgroups::add_process`],
//! [`Cgroups::remove`]), writing limits ([`resources`]), reading usage
//! ([`stats`]) and, for the shim, a container's processes and OOM kills
//! ([`monitor`]).
//!
//! Why hand-written file access rather than `cgroups-rs` or youki's
//! `libcgroups`: the create-time limits are applied by libcontainer, through
//! libcgroups, inside `berth-container`, where it fits. What remains here
//! is a few reads and writes per call, and it must (1) take its root as a
//! parameter so that every path, v1 and v2, is unit-tested on a temp dir
//! without root (libcgroups' v1 manager finds its hierarchies in
//! `/proc/self/mountinfo`, cgroups-rs in `/proc/self/cgroup`), (2) stay
//! small enough for the shim, whose whole PSS is about 250 KiB, and (3)
//! validate a CRI request before anything is created. The conversions
//! (shares → weight, memory+swap → `memory.swap.max`) are runc's and
//! libcgroups', so update and create agree.

pub mod monitor;
pub mod resources;
pub mod stats;

use std::path::{Path, PathBuf};

use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs};

pub use monitor::ContainerCgroup;
pub use resources::Resources;
pub use stats::{CgroupStats, Pressure, PressureLine};

/// Where the host mounts its cgroups.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// On cgroup v2, the leaf cgroup under a pod's cgroup that holds the pod's
/// infra process (as a pause container's cgroup does): v2 allows no
/// process in a cgroup whose children have controllers enabled.
pub const INFRA_LEAF: &str = "infra";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is wrong whatever the host's state: a bad path, key or
    /// value, or a controller this host lacks.
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// cgroup v1 controllers, one hierarchy each (or co-mounted), possibly
    /// beside a cgroup2 mount at `<root>/unified` holding no controller we
    /// manage (systemd's hybrid layout).
    V1,
    /// cgroup v2 only, mounted at the root.
    V2,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        }
    }
}

/// One mounted hierarchy: a v1 controller mount, or the v2 root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub dir: PathBuf,
    /// The controllers it carries (v1: from the mount's name, e.g.
    /// `cpu,cpuacct`; v2: the root's `cgroup.controllers`).
    pub controllers: Vec<String>,
}

/// The host's cgroup tree at a root.
#[derive(Debug, Clone)]
pub struct Cgroups {
    root: PathBuf,
    version: Version,
    hierarchies: Vec<Hierarchy>,
    /// A tree of plain directories ([`Cgroups::at`]): its files go with
    /// their directory on removal, as a cgroup's interface files do.
    plain: bool,
}

impl Cgroups {
    /// The tree mounted at `root`, its version told by the filesystem type.
    pub fn detect(root: &Path) -> Cgroups {
        let version = match statfs(root) {
            Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => Version::V2,
            _ => Version::V1,
        };
        Self::scan(root, version, true)
    }

    /// A tree of plain directories laid out as `version` lays them out (for
    /// tests: v1 wants a directory per hierarchy, v2 `cgroup.controllers`
    /// at the root).
    pub fn at(root: &Path, version: Version) -> Cgroups {
        Self::scan(root, version, false)
    }

    fn scan(root: &Path, version: Version, mounted: bool) -> Cgroups {
        let hierarchies = match version {
            Version::V2 => vec![Hierarchy {
                dir: root.to_path_buf(),
                controllers: read_words(&root.join("cgroup.controllers")),
            }],
            Version::V1 => {
                let mut out = Vec::new();
                for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
                    let dir = entry.path();
                    // Symlinks (cpu -> cpu,cpuacct) name a hierarchy twice.
                    if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                        continue;
                    }
                    let is_v1_mount = if mounted {
                        statfs(&dir).is_ok_and(|fs| fs.filesystem_type() == CGROUP_SUPER_MAGIC)
                    } else {
                        dir.file_name() != Some("unified".as_ref())
                    };
                    if !is_v1_mount {
                        continue;
                    }
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let controllers = name
                        .split(',')
                        .map(|c| c.strip_prefix("name=").unwrap_or(c).to_string())
                        .collect();
                    out.push(Hierarchy { dir, controllers });
                }
                out.sort_by(|a, b| a.dir.cmp(&b.dir));
                out
            }
        };
        Cgroups {
            root: root.to_path_buf(),
            version,
            hierarchies,
            plain: !mounted,
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn hierarchies(&self) -> &[Hierarchy] {
        &self.hierarchies
    }

    /// Whether the host has `controller` at all.
    pub fn has_controller(&self, controller: &str) -> bool {
        self.hierarchy(controller).is_some()
    }

    /// The hierarchy that carries `controller`.
    fn hierarchy(&self, controller: &str) -> Option<&Hierarchy> {
        self.hierarchies
            .iter()
            .find(|h| h.controllers.iter().any(|c| c == controller))
    }

    /// The directory of cgroup `path` where `controller`'s files are: the
    /// controller's v1 hierarchy, or the unified tree.
    pub fn dir(&self, controller: &str, path: &str) -> Result<Option<PathBuf>> {
        let rel = relative(path)?;
        Ok(match self.version {
            Version::V2 => Some(self.root.join(rel)),
            Version::V1 => self.hierarchy(controller).map(|h| h.dir.join(rel)),
        })
    }

    /// The cgroup a pod's infra process goes into: the pod cgroup itself on
    /// v1, its [`INFRA_LEAF`] on v2.
    pub fn infra_path(&self, pod: &str) -> String {
        match self.version {
            Version::V1 => pod.to_string(),
            Version::V2 => format!("{}/{INFRA_LEAF}", pod.trim_end_matches('/')),
        }
    }

    /// Creates the cgroup `path` in every hierarchy; returns whether it did
    /// not exist before (then it is the caller's to remove). On v2 every
    /// level between the root and `path` hands its controllers down, so
    /// `path` has them all; `path` itself enables none (it may be a leaf
    /// that takes processes; the container runtime enables them when it
    /// creates a cgroup below).
    pub fn create(&self, path: &str) -> Result<bool> {
        let rel = relative(path)?;
        let mut created = false;
        for h in &self.hierarchies {
            if h.dir.join(rel).is_dir() {
                continue;
            }
            // Level by level: a new v1 cpuset cgroup is unusable until it
            // has cpus and mems, which it takes from its parent.
            let mut current = h.dir.clone();
            for component in rel.split('/') {
                let next = current.join(component);
                if self.version == Version::V2 && current != self.root {
                    enable_subtree_controllers(&current);
                }
                if !next.is_dir() {
                    std::fs::create_dir(&next)
                        .map_err(|e| Error::io(format!("create cgroup {}", next.display()), e))?;
                    created = true;
                    if self.version == Version::V1 {
                        for file in ["cpuset.cpus", "cpuset.mems"] {
                            if let Ok(value) = std::fs::read_to_string(current.join(file)) {
                                // Best effort: a cpuset hierarchy refuses
                                // nothing its parent has.
                                let _ = std::fs::write(next.join(file), value.trim());
                            }
                        }
                    }
                }
                current = next;
            }
        }
        Ok(created)
    }

    /// Moves `pid` into the cgroup `path` of every hierarchy.
    pub fn add_process(&self, path: &str, pid: i32) -> Result<()> {
        let rel = relative(path)?;
        for h in &self.hierarchies {
            let procs = h.dir.join(rel).join("cgroup.procs");
            if procs.exists() {
                std::fs::write(&procs, pid.to_string())
                    .map_err(|e| Error::io(format!("add {pid} to {}", procs.display()), e))?;
            }
        }
        Ok(())
    }

    /// Removes the cgroup `path` (not its ancestors) from every hierarchy,
    /// with every cgroup below it: a v2 pod cgroup's [`INFRA_LEAF`], and
    /// whatever a privileged container made inside its own cgroup.
    pub fn remove(&self, path: &str) -> Result<()> {
        let rel = relative(path)?;
        for h in &self.hierarchies {
            remove_tree(&h.dir.join(rel), self.plain)?;
        }
        Ok(())
    }

    /// Removes every cgroup below `path`, keeping `path`: what a privileged
    /// container made inside its own cgroup, before libcontainer (which
    /// removes only the container's cgroup itself) deletes the container.
    pub fn remove_below(&self, path: &str) -> Result<()> {
        let rel = relative(path)?;
        for h in &self.hierarchies {
            remove_children(&h.dir.join(rel), self.plain)?;
        }
        Ok(())
    }

    /// On v1, the container's view of its cgroups as bind mounts:
    /// (destination in the container, host directory) per hierarchy with a
    /// controller, the container's own cgroup `path` at
    /// `/sys/fs/cgroup/<hierarchy>` (named hierarchies such as systemd's
    /// hold no cgroup of the container). Empty on v2, where a cgroup2 mount
    /// in the container's cgroup namespace shows the same.
    ///
    /// Why not libcontainer's `cgroup` mount type on v1: it mounts every
    /// hierarchy writable whatever the spec says, and it reads
    /// `/proc/<its own pid>` before the container's /proc exists, which in
    /// a pod's shared PID namespace is the host's /proc and a wrong or
    /// missing process.
    pub fn v1_container_binds(&self, path: &str) -> Result<Vec<(String, PathBuf)>> {
        if self.version == Version::V2 {
            return Ok(Vec::new());
        }
        let rel = relative(path)?;
        Ok(self
            .hierarchies
            .iter()
            .filter(|h| {
                h.controllers
                    .iter()
                    .any(|c| V1_CONTROLLERS.contains(&c.as_str()))
            })
            .filter_map(|h| {
                let name = h.dir.file_name()?.to_string_lossy().into_owned();
                Some((format!("/sys/fs/cgroup/{name}"), h.dir.join(rel)))
            })
            .collect())
    }

    /// Whether the kernel accounts swap per cgroup (v1
    /// `memory.memsw.limit_in_bytes`, v2 `memory.swap.max`), looked for in
    /// the memory root and its first level (the v2 root has no
    /// `memory.swap.max`).
    pub fn swap_accounted(&self) -> bool {
        let (dir, file) = match self.version {
            Version::V1 => match self.hierarchy("memory") {
                Some(h) => (&h.dir, "memory.memsw.limit_in_bytes"),
                None => return false,
            },
            Version::V2 => (&self.root, "memory.swap.max"),
        };
        dir.join(file).exists()
            || std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join(file).exists())
    }
}

/// The v1 controllers (the kernel's list); anything else is a named
/// hierarchy.
const V1_CONTROLLERS: &[&str] = &[
    "blkio",
    "cpu",
    "cpuacct",
    "cpuset",
    "devices",
    "freezer",
    "hugetlb",
    "memory",
    "misc",
    "net_cls",
    "net_prio",
    "perf_event",
    "pids",
    "rdma",
];

/// A cgroup path as the CRI gives it ("/kubepods/pod1/c1"), relative to a
/// hierarchy root; `..`, `.` and empty components are refused.
pub fn relative(path: &str) -> Result<&str> {
    let rel = path.trim_start_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(Error::Invalid(format!("cgroup path {path:?} is invalid")));
    }
    Ok(rel)
}

fn read_words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Enables in `dir`'s `cgroup.subtree_control` every controller `dir`
/// has (v2), so its children get them too. One write per controller: one
/// the kernel refuses (e.g. EBUSY when `dir` holds processes) does not
/// keep the others from being enabled; a container's cgroup that then
/// lacks a controller shows it in its limits, which the tests check.
fn enable_subtree_controllers(dir: &Path) {
    let enabled = read_words(&dir.join("cgroup.subtree_control"));
    for controller in read_words(&dir.join("cgroup.controllers")) {
        if !enabled.contains(&controller) {
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"));
        }
    }
}

/// Removes `dir` and every cgroup below it, deepest first. A process still
/// in one (left by a container that moved it into a child cgroup) is
/// killed: the cgroup's owner is gone. A cgroup whose last process is
/// exiting stays busy for a moment after the process died: EBUSY is
/// retried for up to half a second.
fn remove_tree(dir: &Path, plain: bool) -> Result<()> {
    remove_children(dir, plain)?;
    if plain {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            std::fs::remove_file(entry.path())
                .map_err(|e| Error::io(format!("remove {}", entry.path().display()), e))?;
        }
    } else {
        kill_members(dir);
    }
    let mut attempt = 0;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 50 => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(Error::io(format!("remove cgroup {}", dir.display()), e)),
        }
    }
}

/// Removes every cgroup below `dir` (a missing `dir` has none), keeping
/// `dir` itself.
fn remove_children(dir: &Path, plain: bool) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("list cgroup {}", dir.display()), e)),
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path(), plain)?;
        }
    }
    Ok(())
}

/// SIGKILLs every process in the cgroup `dir` (its `cgroup.procs`, in the
/// reader's PID namespace).
fn kill_members(dir: &Path) {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        if pid > 0 {
            // SAFETY: kill(2) with a positive pid touches no memory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Test trees: a v1 host with cpu,cpuacct, memory, pids and cpuset
/// hierarchies, or a v2 root with the usual controllers.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn v1() -> (tempfile::TempDir, Cgroups) {
        let dir = tempfile::tempdir().unwrap();
        for h in ["cpu,cpuacct", "memory", "pids", "cpuset", "unified"] {
            std::fs::create_dir(dir.path().join(h)).unwrap();
        }
        std::fs::write(dir.path().join("cpuset/cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(dir.path().join("cpuset/cpuset.mems"), "0\n").unwrap();
        std::fs::write(dir.path().join("memory/memory.memsw.limit_in_bytes"), "").unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", dir.path().join("cpu")).unwrap();
        let cgroups = Cgroups::at(dir.path(), Version::V1);
        (dir, cgroups)
    }

    pub fn v2() -> (tempfile::TempDir, Cgroups) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("cgroup.controllers"),
            "cpu io memory pids\n",
        )
        .unwrap();
        let cgroups = Cgroups::at(dir.path(), Version::V2);
        (dir, cgroups)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{v1, v2};
    use super::*;

    #[test]
    fn v1_hierarchies_skip_symlinks_and_the_unified_mount() {
        let (dir, cg) = v1();
        let names: Vec<_> = cg
            .hierarchies()
            .iter()
            .map(|h| {
                h.dir
                    .strip_prefix(dir.path())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(names, ["cpu,cpuacct", "cpuset", "memory", "pids"]);
        assert!(cg.has_controller("cpuacct") && !cg.has_controller("hugetlb"));
        assert_eq!(
            cg.dir("cpu", "/k/c1").unwrap(),
            Some(dir.path().join("cpu,cpuacct/k/c1"))
        );
        assert_eq!(cg.dir("hugetlb", "/k/c1").unwrap(), None);
        assert!(cg.swap_accounted());
    }

    #[test]
    fn v2_is_one_tree() {
        let (dir, cg) = v2();
        assert_eq!(cg.hierarchies().len(), 1);
        assert!(cg.has_controller("memory") && !cg.has_controller("cpuset"));
        assert_eq!(
            cg.dir("memory", "k/c1").unwrap(),
            Some(dir.path().join("k/c1"))
        );
        assert!(!cg.swap_accounted());
        std::fs::create_dir(dir.path().join("k")).unwrap();
        std::fs::write(dir.path().join("k/memory.swap.max"), "max\n").unwrap();
        assert!(cg.swap_accounted());
    }

    #[test]
    fn bad_paths_are_refused() {
        let (_dir, cg) = v2();
        for bad in ["", "/", "/a/../b", "a//b", "./a"] {
            assert!(matches!(cg.create(bad), Err(Error::Invalid(_))), "{bad:?}");
            assert!(matches!(cg.remove(bad), Err(Error::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn create_copies_cpusets_on_v1_and_remove_takes_the_subtree() {
        let (dir, cg) = v1();
        assert!(cg.create("/k/pod1").unwrap());
        assert!(!cg.create("/k/pod1").unwrap(), "a second create finds it");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cpuset/k/pod1/cpuset.cpus")).unwrap(),
            "0-1"
        );
        for h in ["cpu,cpuacct", "memory", "pids"] {
            assert!(dir.path().join(h).join("k/pod1").is_dir(), "{h}");
        }
        // Children a privileged container made.
        std::fs::create_dir_all(dir.path().join("memory/k/pod1/c1/x/y")).unwrap();
        std::fs::create_dir_all(dir.path().join("pids/k/pod1/c1/z")).unwrap();
        cg.remove_below("/k/pod1/c1").unwrap();
        assert!(dir.path().join("memory/k/pod1/c1").is_dir());
        assert!(!dir.path().join("memory/k/pod1/c1/x").exists());
        assert!(!dir.path().join("pids/k/pod1/c1/z").exists());
        std::fs::create_dir_all(dir.path().join("memory/k/pod1/c1/x/y")).unwrap();
        cg.remove("/k/pod1").unwrap();
        for h in ["cpu,cpuacct", "memory", "pids", "cpuset"] {
            assert!(!dir.path().join(h).join("k/pod1").exists(), "{h}");
            assert!(dir.path().join(h).join("k").is_dir(), "the parent stays");
        }
        cg.remove("/k/pod1").unwrap();
    }

    #[test]
    fn create_hands_controllers_down_on_v2() {
        let (dir, cg) = v2();
        std::fs::create_dir(dir.path().join("k")).unwrap();
        std::fs::write(dir.path().join("k/cgroup.controllers"), "cpu memory").unwrap();
        std::fs::write(dir.path().join("k/cgroup.subtree_control"), "cpu").unwrap();
        assert!(cg.create("/k/pod1/c1").unwrap());
        // A plain file records the last write; the kernel's would add.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("k/cgroup.subtree_control")).unwrap(),
            "+memory"
        );
        assert_eq!(cg.infra_path("/k/pod1/"), "/k/pod1/infra");
        cg.create(&cg.infra_path("/k/pod1")).unwrap();
        cg.remove("/k/pod1").unwrap();
        assert!(!dir.path().join("k/pod1").exists());
    }

    #[test]
    fn add_process_writes_cgroup_procs_where_it_exists() {
        let (dir, cg) = v1();
        cg.create("/k/p").unwrap();
        std::fs::write(dir.path().join("memory/k/p/cgroup.procs"), "").unwrap();
        cg.add_process("/k/p", 42).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("memory/k/p/cgroup.procs")).unwrap(),
            "42"
        );
        assert!(!dir.path().join("pids/k/p/cgroup.procs").exists());
        assert_eq!(cg.infra_path("/k/p"), "/k/p");
    }

    #[test]
    fn v1_containers_see_their_cgroup_through_binds() {
        let (dir, _) = v1();
        std::fs::create_dir(dir.path().join("systemd")).unwrap();
        let cg = Cgroups::at(dir.path(), Version::V1);
        let binds = cg.v1_container_binds("/k/c1").unwrap();
        let want: Vec<(String, PathBuf)> = ["cpu,cpuacct", "cpuset", "memory", "pids"]
            .iter()
            .map(|h| {
                (
                    format!("/sys/fs/cgroup/{h}"),
                    dir.path().join(h).join("k/c1"),
                )
            })
            .collect();
        assert_eq!(binds, want, "no bind of the named systemd hierarchy");
        assert!(cg.v1_container_binds("../x").is_err());
        assert!(v2().1.v1_container_binds("/k/c1").unwrap().is_empty());
    }

    #[test]
    fn detect_reads_the_filesystem_type() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Cgroups::detect(dir.path()).version(), Version::V1);
    }
}
