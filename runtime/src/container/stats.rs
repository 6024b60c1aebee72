//! Container resource usage read from the container's cgroup (v1 or v2)
//! and its writable layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::cgroups::{self, CgroupMode};
use crate::image::{Usage, dir_usage};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub timestamp_ns: i64,
    /// Total CPU time in ns.
    pub cpu_usage_ns: Option<u64>,
    /// CPU use since the previous sample, in nanocores.
    pub cpu_nano_cores: Option<u64>,
    pub memory_usage: Option<u64>,
    pub memory_working_set: Option<u64>,
    pub memory_available: Option<u64>,
    pub memory_rss: Option<u64>,
    pub page_faults: Option<u64>,
    pub major_page_faults: Option<u64>,
    pub writable_layer: Usage,
    pub writable_layer_path: PathBuf,
}

/// The previous CPU sample per container, for the nanocores rate.
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

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn stat_map(path: &Path) -> HashMap<String, u64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The v1 hierarchy mounted for `controller` (e.g. "cpu,cpuacct" for cpuacct).
fn v1_hierarchy(controller: &str) -> Option<PathBuf> {
    cgroups::hierarchies(CgroupMode::Legacy)
        .into_iter()
        .find(|h| {
            h.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.split(',').any(|c| c == controller))
        })
}

pub fn read(
    mode: CgroupMode,
    cgroups_path: &str,
    id: &str,
    upper_dir: &Path,
    samples: &CpuSamples,
) -> Stats {
    let rel = cgroups_path.trim_start_matches('/');
    let now = crate::timing::now_ns();
    let mut s = Stats {
        timestamp_ns: now,
        writable_layer: dir_usage(upper_dir),
        writable_layer_path: upper_dir.to_path_buf(),
        ..Default::default()
    };
    let (limit, inactive_file) = match mode {
        CgroupMode::Legacy => {
            s.cpu_usage_ns =
                v1_hierarchy("cpuacct").and_then(|h| read_u64(&h.join(rel).join("cpuacct.usage")));
            let mem = v1_hierarchy("memory").map(|h| h.join(rel));
            let stat = mem
                .as_ref()
                .map(|m| stat_map(&m.join("memory.stat")))
                .unwrap_or_default();
            s.memory_usage = mem
                .as_ref()
                .and_then(|m| read_u64(&m.join("memory.usage_in_bytes")));
            s.memory_rss = stat.get("total_rss").or(stat.get("rss")).copied();
            s.page_faults = stat.get("total_pgfault").or(stat.get("pgfault")).copied();
            s.major_page_faults = stat
                .get("total_pgmajfault")
                .or(stat.get("pgmajfault"))
                .copied();
            let limit = mem
                .as_ref()
                .and_then(|m| read_u64(&m.join("memory.limit_in_bytes")));
            (
                limit,
                stat.get("total_inactive_file")
                    .or(stat.get("inactive_file"))
                    .copied(),
            )
        }
        CgroupMode::Unified => {
            let dir = Path::new(cgroups::CGROUP_ROOT).join(rel);
            s.cpu_usage_ns = stat_map(&dir.join("cpu.stat"))
                .get("usage_usec")
                .map(|us| us * 1000);
            let stat = stat_map(&dir.join("memory.stat"));
            s.memory_usage = read_u64(&dir.join("memory.current"));
            s.memory_rss = stat.get("anon").copied();
            s.page_faults = stat.get("pgfault").copied();
            s.major_page_faults = stat.get("pgmajfault").copied();
            (
                read_u64(&dir.join("memory.max")),
                stat.get("inactive_file").copied(),
            )
        }
    };
    if let Some(usage) = s.memory_usage {
        let working_set = usage.saturating_sub(inactive_file.unwrap_or(0));
        s.memory_working_set = Some(working_set);
        // v1 reports "no limit" as a huge page-aligned number.
        s.memory_available = limit
            .filter(|l| *l < (1 << 62))
            .map(|l| l.saturating_sub(working_set));
    }
    if let Some(usage) = s.cpu_usage_ns {
        s.cpu_nano_cores = samples.rate(id, now, usage);
    }
    s
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
