//! Which cgroup hierarchy this host runs, detected once at start.

use std::path::{Path, PathBuf};

use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs};
use serde::Serialize;

use crate::error::{Error, Result};

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// cgroup v2 only, mounted at the root.
    Unified,
    /// cgroup v1 controllers, possibly beside a cgroup2 mount at
    /// `<root>/unified` that holds no controller we manage (systemd's hybrid).
    Legacy,
}

impl CgroupMode {
    pub fn detect(root: &Path) -> CgroupMode {
        match statfs(root) {
            Ok(fs) if fs.filesystem_type() == CGROUP2_SUPER_MAGIC => CgroupMode::Unified,
            _ => CgroupMode::Legacy,
        }
    }

    pub fn version(self) -> &'static str {
        match self {
            CgroupMode::Unified => "v2",
            CgroupMode::Legacy => "v1",
        }
    }
}

/// The hierarchy roots a cgroup path lives in: one per v1 controller
/// mount, or the unified root.
pub fn hierarchies(mode: CgroupMode) -> Vec<PathBuf> {
    if mode == CgroupMode::Unified {
        return vec![PathBuf::from(CGROUP_ROOT)];
    }
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(CGROUP_ROOT) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // Symlinks (cpu -> cpu,cpuacct) name a hierarchy twice.
        if entry.file_type().map(|t| t.is_symlink()).unwrap_or(true) {
            continue;
        }
        if statfs(&path).is_ok_and(|fs| fs.filesystem_type() == CGROUP_SUPER_MAGIC) {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn relative(path: &str) -> Result<&str> {
    let rel = path.trim_start_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(Error::InvalidArgument(format!(
            "cgroup path {path:?} is invalid"
        )));
    }
    Ok(rel)
}

/// On cgroup v2, the leaf cgroup under a pod's cgroup that holds the pod's
/// infra process (as a pause container's cgroup does): v2 allows no
/// process in a cgroup whose children have controllers enabled.
pub const INFRA_LEAF: &str = "infra";

/// The cgroup the infra process of the pod cgroup `pod` goes into: the pod
/// cgroup itself on v1, its [`INFRA_LEAF`] on v2.
pub fn infra_cgroup(mode: CgroupMode, pod: &str) -> String {
    match mode {
        CgroupMode::Legacy => pod.to_string(),
        CgroupMode::Unified => format!("{}/{INFRA_LEAF}", pod.trim_end_matches('/')),
    }
}

/// Enables in `dir`'s `cgroup.subtree_control` every controller `dir`
/// has (v2), so its children get them too. One write per controller: one
/// the kernel refuses (e.g. EBUSY when `dir` holds processes) does not
/// keep the others from being enabled.
fn enable_subtree_controllers(dir: &Path) {
    let Ok(available) = std::fs::read_to_string(dir.join("cgroup.controllers")) else {
        return;
    };
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let enabled: Vec<&str> = enabled.split_whitespace().collect();
    for controller in available.split_whitespace() {
        if enabled.contains(&controller) {
            continue;
        }
        if let Err(e) = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{controller}"))
        {
            tracing::warn!(cgroup = %dir.display(), controller, error = %e, "could not enable the controller for child cgroups");
        }
    }
}

/// Creates the cgroup `path` in every hierarchy; returns whether it did
/// not exist before (then it is ours to remove). On v2 every level between
/// the root and `path` hands its controllers down, so `path` has them all;
/// `path` itself enables none (it may be a leaf that takes processes; the
/// container runtime enables them when it creates a container below).
pub fn create_dir(mode: CgroupMode, path: &str) -> Result<bool> {
    let rel = relative(path)?;
    let mut created = false;
    for root in hierarchies(mode) {
        let target = root.join(rel);
        if target.is_dir() {
            continue;
        }
        // Create level by level: a new v1 cpuset cgroup is unusable until
        // it has cpus and mems, which we copy from its parent.
        let mut current = root.clone();
        for component in rel.split('/') {
            let next = current.join(component);
            if mode == CgroupMode::Unified && current != root {
                enable_subtree_controllers(&current);
            }
            if !next.is_dir() {
                std::fs::create_dir(&next)
                    .map_err(|e| Error::io(format!("create cgroup {}", next.display()), e))?;
                created = true;
                if mode == CgroupMode::Legacy {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        if let Ok(value) = std::fs::read_to_string(current.join(file)) {
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
pub fn add_process(mode: CgroupMode, path: &str, pid: i32) -> Result<()> {
    let rel = relative(path)?;
    for root in hierarchies(mode) {
        let procs = root.join(rel).join("cgroup.procs");
        if procs.exists() {
            std::fs::write(&procs, pid.to_string())
                .map_err(|e| Error::io(format!("add {pid} to {}", procs.display()), e))?;
        }
    }
    Ok(())
}

/// Removes the cgroup `path` (not its ancestors) from every hierarchy; on
/// v2 a pod cgroup's [`INFRA_LEAF`] goes first.
pub fn remove_dir(mode: CgroupMode, path: &str) -> Result<()> {
    let rel = relative(path)?;
    if mode == CgroupMode::Unified && !rel.ends_with(&format!("/{INFRA_LEAF}")) {
        let leaf = Path::new(CGROUP_ROOT).join(rel).join(INFRA_LEAF);
        if leaf.is_dir() {
            remove_dir(mode, &format!("{rel}/{INFRA_LEAF}"))?;
        }
    }
    for root in hierarchies(mode) {
        let target = root.join(rel);
        let mut attempt = 0;
        loop {
            match std::fs::remove_dir(&target) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                // Exiting processes leave the cgroup a moment after they die.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && attempt < 50 => {
                    attempt += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(Error::io(format!("remove cgroup {}", target.display()), e)),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_infra_process_gets_a_leaf_on_v2_only() {
        assert_eq!(infra_cgroup(CgroupMode::Legacy, "/k/pod1"), "/k/pod1");
        assert_eq!(
            infra_cgroup(CgroupMode::Unified, "/k/pod1/"),
            "/k/pod1/infra"
        );
    }

    #[test]
    fn a_plain_directory_is_legacy() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(CgroupMode::detect(dir.path()), CgroupMode::Legacy);
    }
}
