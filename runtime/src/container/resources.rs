//! UpdateContainerResources: new limits written straight into the
//! container's cgroup (the same files libcontainer set at create).

use std::path::{Path, PathBuf};

use k8s_cri::v1::LinuxContainerResources;

use crate::cgroups::{self, CgroupMode};
use crate::error::{Error, Result};

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value)
        .map_err(|e| Error::io(format!("write {value:?} to {}", path.display()), e))
}

fn v1_dir(controller: &str, rel: &str) -> Option<PathBuf> {
    cgroups::hierarchies(CgroupMode::Legacy)
        .into_iter()
        .find(|h| {
            h.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.split(',').any(|c| c == controller))
        })
        .map(|h| h.join(rel))
}

/// cgroup v2's cpu.weight for v1-style shares, as runc converts them.
fn shares_to_weight(shares: i64) -> u64 {
    if shares <= 0 {
        return 100;
    }
    let shares = shares.clamp(2, 262_144) as u64;
    1 + ((shares - 2) * 9999) / 262_142
}

/// Applies the non-zero fields of `r` to the cgroup `cgroups_path`.
pub fn apply(mode: CgroupMode, cgroups_path: &str, r: &LinuxContainerResources) -> Result<()> {
    let rel = cgroups_path.trim_start_matches('/');
    if r.cpu_quota < -1 || r.cpu_period < 0 || r.cpu_shares < 0 || r.memory_limit_in_bytes < 0 {
        return Err(Error::InvalidArgument(
            "negative resource values are invalid".into(),
        ));
    }
    match mode {
        CgroupMode::Legacy => {
            if let Some(cpu) = v1_dir("cpu", rel) {
                if r.cpu_shares > 0 {
                    write(&cpu.join("cpu.shares"), &r.cpu_shares.to_string())?;
                }
                if r.cpu_period > 0 {
                    write(&cpu.join("cpu.cfs_period_us"), &r.cpu_period.to_string())?;
                }
                if r.cpu_quota != 0 {
                    write(&cpu.join("cpu.cfs_quota_us"), &r.cpu_quota.to_string())?;
                }
            }
            if let Some(cpuset) = v1_dir("cpuset", rel) {
                if !r.cpuset_cpus.is_empty() {
                    write(&cpuset.join("cpuset.cpus"), &r.cpuset_cpus)?;
                }
                if !r.cpuset_mems.is_empty() {
                    write(&cpuset.join("cpuset.mems"), &r.cpuset_mems)?;
                }
            }
            if r.memory_limit_in_bytes > 0
                && let Some(memory) = v1_dir("memory", rel)
            {
                let limit = r.memory_limit_in_bytes.to_string();
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                // memory+swap may never be below memory: raise it first when
                // growing, lower it after when shrinking.
                let swap = if r.memory_swap_limit_in_bytes > 0 {
                    r.memory_swap_limit_in_bytes.to_string()
                } else {
                    limit.clone()
                };
                if memsw.exists() {
                    let current: i64 = std::fs::read_to_string(&memsw)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .unwrap_or(i64::MAX);
                    if r.memory_limit_in_bytes > current {
                        write(&memsw, &swap)?;
                        write(&memory.join("memory.limit_in_bytes"), &limit)?;
                    } else {
                        write(&memory.join("memory.limit_in_bytes"), &limit)?;
                        write(&memsw, &swap)?;
                    }
                } else {
                    write(&memory.join("memory.limit_in_bytes"), &limit)?;
                }
            }
        }
        CgroupMode::Unified => {
            let dir = Path::new(cgroups::CGROUP_ROOT).join(rel);
            if r.cpu_shares > 0 {
                write(
                    &dir.join("cpu.weight"),
                    &shares_to_weight(r.cpu_shares).to_string(),
                )?;
            }
            if r.cpu_quota != 0 || r.cpu_period > 0 {
                let quota = if r.cpu_quota > 0 {
                    r.cpu_quota.to_string()
                } else {
                    "max".into()
                };
                let period = if r.cpu_period > 0 {
                    r.cpu_period
                } else {
                    100_000
                };
                write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
            }
            if !r.cpuset_cpus.is_empty() {
                write(&dir.join("cpuset.cpus"), &r.cpuset_cpus)?;
            }
            if !r.cpuset_mems.is_empty() {
                write(&dir.join("cpuset.mems"), &r.cpuset_mems)?;
            }
            if r.memory_limit_in_bytes > 0 {
                write(
                    &dir.join("memory.max"),
                    &r.memory_limit_in_bytes.to_string(),
                )?;
            }
            for (key, value) in &r.unified {
                if key.contains('/') || key.starts_with('.') {
                    return Err(Error::InvalidArgument(format!(
                        "unified key {key:?} is invalid"
                    )));
                }
                write(&dir.join(key), value)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10000);
    }
}
