//! Container resource usage: the container's cgroup (read by
//! `berth_cgroup`), its CPU rate between two samples, and its writable layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use berth_cgroup::Cgroups;

use crate::image::{Usage, dir_usage};

/// What a cgroup has used, as the CRI stats of a container and of a pod
/// report it: the kernel's counters and the CPU rate since the previous
/// sample.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupUsage {
    pub timestamp_ns: i64,
    /// CPU use since the previous sample, in nanocores.
    pub cpu_nano_cores: Option<u64>,
    pub counters: berth_cgroup::CgroupStats,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub usage: CgroupUsage,
    pub writable_layer: Usage,
    pub writable_layer_path: PathBuf,
}

/// The previous CPU sample per container (keyed by its id) and per pod
/// (keyed by `sandbox::stats::sample_key`), for the nanocores rate.
#[derive(Default)]
pub struct CpuSamples(Mutex<HashMap<String, (i64, u64)>>);

impl CpuSamples {
    fn rate(&self, id: &str, now_ns: i64, usage_ns: u64) -> Option<u64> {
        let mut map = self.0.lock().unwrap();
        let previous = map.insert(id.to_string(), (now_ns, usage_ns));
        let (then, before) = previous?;
        let elapsed = now_ns.checked_sub(then).filter(|e| *e > 0)? as u128;
        let used = usage_ns.checked_sub(before)? as u128;
        Some((used * 1_000_000_000 / elapsed) as u64)
    }

    pub fn forget(&self, id: &str) {
        self.0.lock().unwrap().remove(id);
    }
}

/// The usage of cgroup `cgroups_path`, its CPU rate against the previous
/// sample stored under `sample_key`.
pub fn cgroup_usage(
    cgroups: &Cgroups,
    cgroups_path: &str,
    sample_key: &str,
    samples: &CpuSamples,
) -> CgroupUsage {
    let now = crate::timing::now_ns();
    let counters = cgroups.stats(cgroups_path);
    CgroupUsage {
        timestamp_ns: now,
        cpu_nano_cores: counters
            .cpu_usage_ns
            .and_then(|u| samples.rate(sample_key, now, u)),
        counters,
    }
}

pub fn read(
    cgroups: &Cgroups,
    cgroups_path: &str,
    id: &str,
    upper_dir: &Path,
    samples: &CpuSamples,
) -> Stats {
    Stats {
        usage: cgroup_usage(cgroups, cgroups_path, id, samples),
        writable_layer: dir_usage(upper_dir),
        writable_layer_path: upper_dir.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanocores_from_two_samples() {
        let samples = CpuSamples::default();
        assert_eq!(samples.rate("c", 1_000_000_000, 100), None);
        // Half a core over one second.
        assert_eq!(
            samples.rate("c", 2_000_000_000, 500_000_100),
            Some(500_000_000)
        );
        samples.forget("c");
        assert_eq!(samples.rate("c", 3_000_000_000, 600_000_000), None);
    }
}
