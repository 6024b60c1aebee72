//! Container resource usage: the container's cgroup (read by
//! `berth_cgroup`), its CPU rate between two samples, and its writable layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

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
    layers: &LayerUsage,
) -> Stats {
    Stats {
        usage: cgroup_usage(cgroups, cgroups_path, id, samples),
        writable_layer: layers.get(id, upper_dir),
        writable_layer_path: upper_dir.to_path_buf(),
    }
}

/// `read` applied to every item, on up to as many threads as there are
/// CPUs (a list of stats is mostly kernel time in cgroup files: it scales
/// with cores). Few items are read on the calling thread. Order is kept.
pub fn read_many<T: Send, R: Send>(items: Vec<T>, read: impl Fn(T) -> R + Sync) -> Vec<R> {
    const PER_THREAD_AT_LEAST: usize = 8;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4)
        .min(items.len() / PER_THREAD_AT_LEAST)
        .max(1);
    if threads == 1 {
        return items.into_iter().map(read).collect();
    }
    let per_thread = items.len().div_ceil(threads);
    let mut chunks: Vec<Vec<T>> = Vec::with_capacity(threads);
    let mut items = items.into_iter();
    loop {
        let chunk: Vec<T> = items.by_ref().take(per_thread).collect();
        if chunk.is_empty() {
            break;
        }
        chunks.push(chunk);
    }
    let read = &read;
    std::thread::scope(|scope| {
        let mut rest = chunks.into_iter();
        let first = rest.next().unwrap_or_default();
        let handles: Vec<_> = rest
            .map(|chunk| scope.spawn(move || chunk.into_iter().map(read).collect::<Vec<R>>()))
            .collect();
        let mut out: Vec<R> = first.into_iter().map(read).collect();
        for handle in handles {
            match handle.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

/// How old a writable layer's reported usage may be before it is measured
/// again. kubelet asks for stats every 10 s; cAdvisor refreshes its disk
/// usage about once a minute.
pub const LAYER_USAGE_MAX_AGE: Duration = Duration::from_secs(10);

/// The writable layers' usage, measured by walking the upper dir at most
/// once per [`LAYER_USAGE_MAX_AGE`] and container. A stale value is
/// answered as it is while one background thread walks the dir again, so
/// a stats call never waits on a layer with many files (except for the
/// very first sample of a container). A reported value is thus at most
/// the max age plus the time between two stats calls old.
pub struct LayerUsage {
    entries: Arc<Mutex<HashMap<String, LayerEntry>>>,
    max_age: Duration,
    refresher: OnceLock<Mutex<Sender<(String, PathBuf)>>>,
}

struct LayerEntry {
    usage: Usage,
    measured: Instant,
    refreshing: bool,
}

impl Default for LayerUsage {
    fn default() -> Self {
        LayerUsage::with_max_age(LAYER_USAGE_MAX_AGE)
    }
}

impl LayerUsage {
    pub fn with_max_age(max_age: Duration) -> Self {
        LayerUsage {
            entries: Default::default(),
            max_age,
            refresher: OnceLock::new(),
        }
    }

    /// The usage of `upper_dir`, the writable layer of container `id`.
    pub fn get(&self, id: &str, upper_dir: &Path) -> Usage {
        {
            let mut entries = self.entries.lock().unwrap();
            if let Some(entry) = entries.get_mut(id) {
                if entry.measured.elapsed() > self.max_age && !entry.refreshing {
                    entry.refreshing = true;
                    self.refresh_later(id, upper_dir);
                }
                return entry.usage;
            }
        }
        let usage = dir_usage(upper_dir);
        self.entries.lock().unwrap().insert(
            id.to_string(),
            LayerEntry {
                usage,
                measured: Instant::now(),
                refreshing: false,
            },
        );
        usage
    }

    /// Drops a removed container's entry (a refresh in flight for it is
    /// then thrown away).
    pub fn forget(&self, id: &str) {
        self.entries.lock().unwrap().remove(id);
    }

    fn refresh_later(&self, id: &str, upper_dir: &Path) {
        let sender = self.refresher.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<(String, PathBuf)>();
            let entries = Arc::downgrade(&self.entries);
            let spawned = std::thread::Builder::new()
                .name("layer-usage".into())
                .spawn(move || {
                    for (id, dir) in rx {
                        let usage = dir_usage(&dir);
                        let Some(entries) = entries.upgrade() else { return };
                        if let Some(entry) = entries.lock().unwrap().get_mut(&id) {
                            *entry = LayerEntry {
                                usage,
                                measured: Instant::now(),
                                refreshing: false,
                            };
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the layer usage thread; layer usage stays as first measured");
            }
            Mutex::new(tx)
        });
        // A send fails only when the thread could not start: the entry then
        // stays marked and keeps its value.
        let _ = sender
            .lock()
            .unwrap()
            .send((id.to_string(), upper_dir.to_path_buf()));
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

    #[test]
    fn read_many_keeps_order_on_several_threads() {
        let items: Vec<u32> = (0..100).collect();
        let main = std::thread::current().id();
        let out = read_many(items, |i| (i * 2, std::thread::current().id() != main));
        assert_eq!(
            out.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            (0..100).map(|i| i * 2).collect::<Vec<_>>()
        );
        if std::thread::available_parallelism().map_or(1, |n| n.get()) > 1 {
            assert!(out.iter().any(|(_, other)| *other), "no other thread read");
        }
        assert_eq!(read_many(vec![1, 2, 3], |i| i + 1), vec![2, 3, 4]);
        assert!(read_many(Vec::<u8>::new(), |i| i).is_empty());
    }

    fn wait_for(mut done: impl FnMut() -> bool) -> bool {
        for _ in 0..200 {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn layer_usage_is_measured_once_then_refreshed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 64 << 10]).unwrap();
        let layers = LayerUsage::with_max_age(Duration::from_millis(50));
        let first = layers.get("c", dir.path());
        assert_eq!(first.inodes, 1);
        assert!(first.bytes >= 64 << 10, "{first:?}");

        // Within the max age the first value is answered without a walk.
        std::fs::write(dir.path().join("b"), vec![1u8; 64 << 10]).unwrap();
        assert_eq!(layers.get("c", dir.path()), first);

        // Once stale, the old value comes back once and the walk runs
        // behind it.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(layers.get("c", dir.path()), first);
        assert!(
            wait_for(|| layers.get("c", dir.path()).inodes == 2),
            "the layer was never measured again"
        );

        layers.forget("c");
        std::fs::write(dir.path().join("c"), b"x").unwrap();
        assert_eq!(layers.get("c", dir.path()).inodes, 3);
    }
}
