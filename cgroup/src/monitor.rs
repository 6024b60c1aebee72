//! What the shim reads of its container's cgroup: the processes (for
//! `Kill{all}` and `Shutdown`) and the OOM-kill counter (for the
//! `OOMKilled` reason). The cgroup is created by libcontainer; the monitor
//! only reads it.

use std::path::{Path, PathBuf};

/// Where the container's cgroup lives, for the monitor's purposes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// Directory with `cgroup.procs` listing every process of the container.
    pub procs_dir: Option<PathBuf>,
    /// Memory cgroup directory (v1 memory controller dir, or the v2 dir).
    pub memory_dir: Option<PathBuf>,
}

impl ContainerCgroup {
    /// From the configured memory cgroup, else from `/proc/<pid>/cgroup`.
    pub fn locate(configured_memory: &str, pid: i32) -> Self {
        let proc_cgroup =
            std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        Self::from_proc_cgroup(
            configured_memory,
            &proc_cgroup,
            Path::new(crate::DEFAULT_ROOT),
        )
    }

    /// `proc_cgroup` is the content of `/proc/<pid>/cgroup`; `root` the
    /// cgroup mount root (`/sys/fs/cgroup`).
    pub fn from_proc_cgroup(configured_memory: &str, proc_cgroup: &str, root: &Path) -> Self {
        let mut v1: Option<(usize, PathBuf)> = None; // (preference, dir)
        let mut v2: Option<PathBuf> = None;
        for line in proc_cgroup.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(_), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if controllers.is_empty() {
                // The unified hierarchy: /sys/fs/cgroup itself on a pure v2
                // host, /sys/fs/cgroup/unified on a hybrid one.
                let base = if root.join("cgroup.controllers").exists() {
                    root.to_path_buf()
                } else {
                    root.join("unified")
                };
                v2 = Some(base.join(rel));
                continue;
            }
            // Prefer controllers every container is in.
            for (pref, name) in ["memory", "pids", "freezer", "cpu"].iter().enumerate() {
                if controllers.split(',').any(|c| c == *name) {
                    let mount = root.join(controllers);
                    let dir = if mount.exists() {
                        mount
                    } else {
                        root.join(name)
                    };
                    if v1.as_ref().is_none_or(|(p, _)| pref < *p) {
                        v1 = Some((pref, dir.join(rel)));
                    }
                }
            }
        }
        let v1_memory = v1
            .as_ref()
            .filter(|(pref, _)| *pref == 0)
            .map(|(_, d)| d.clone());
        let configured = (!configured_memory.is_empty()).then(|| PathBuf::from(configured_memory));
        let procs_dir = configured
            .clone()
            .or_else(|| v1.map(|(_, d)| d))
            .or_else(|| v2.clone());
        let memory_dir = configured.or(v1_memory).or(v2);
        ContainerCgroup {
            procs_dir,
            memory_dir,
        }
    }

    /// Pids in the container's cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let Some(dir) = &self.procs_dir else {
            return Vec::new();
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The number of OOM kills the memory cgroup recorded (v1:
    /// `memory.oom_control`, v2: `memory.events`).
    pub fn oom_kills(&self) -> Option<u64> {
        let dir = self.memory_dir.as_ref()?;
        ["memory.events", "memory.oom_control"]
            .iter()
            .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
            .and_then(|text| parse_oom_kill(&text))
    }
}

/// The `oom_kill N` counter of `memory.oom_control` / `memory.events`.
pub fn parse_oom_kill(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str =
        "12:pids:/berth/c1\n11:freezer:/berth/c1\n4:memory:/berth/c1\n1:name=systemd:/x\n0::/\n";

    #[test]
    fn v1_prefers_memory_controller() {
        let cg = ContainerCgroup::from_proc_cgroup("", HYBRID, Path::new("/nonexistent"));
        assert_eq!(
            cg.procs_dir,
            Some(PathBuf::from("/nonexistent/memory/berth/c1"))
        );
        assert_eq!(
            cg.memory_dir,
            Some(PathBuf::from("/nonexistent/memory/berth/c1"))
        );
    }

    #[test]
    fn configured_memory_cgroup_wins() {
        let cg =
            ContainerCgroup::from_proc_cgroup("/sys/fs/cgroup/memory/k/c", HYBRID, Path::new("/x"));
        assert_eq!(
            cg.procs_dir,
            Some(PathBuf::from("/sys/fs/cgroup/memory/k/c"))
        );
        assert_eq!(
            cg.memory_dir,
            Some(PathBuf::from("/sys/fs/cgroup/memory/k/c"))
        );
    }

    #[test]
    fn pure_v2() {
        let cg = ContainerCgroup::from_proc_cgroup("", "0::/berth/c2\n", Path::new("/nonexistent"));
        assert_eq!(
            cg.procs_dir,
            Some(PathBuf::from("/nonexistent/unified/berth/c2"))
        );
        assert_eq!(cg.memory_dir, cg.procs_dir);
    }

    #[test]
    fn oom_counter() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(parse_oom_kill(v1), Some(3));
        let v2 = "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(parse_oom_kill(v2), Some(1));
        assert_eq!(parse_oom_kill("oom_kill_disable 0\n"), None);
    }
}
