//! Which cgroup hierarchy this host runs, detected once at start.

use std::path::Path;

use nix::sys::statfs::{CGROUP2_SUPER_MAGIC, statfs};
use serde::Serialize;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_legacy() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(CgroupMode::detect(dir.path()), CgroupMode::Legacy);
    }
}
