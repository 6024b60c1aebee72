//! What the kernel accounts to a cgroup: CPU time and throttling, memory,
//! processes; v1 (`cpuacct`, `memory`, `pids` hierarchies) and v2
//! (`cpu.stat`, `memory.current`, `memory.stat`, `pids.current`).

use std::collections::HashMap;
use std::path::Path;

use crate::{Cgroups, Version};

/// One reading; a field the kernel does not offer here stays `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupStats {
    /// Total CPU time, ns.
    pub cpu_usage_ns: Option<u64>,
    /// User and system CPU time, ns.
    pub cpu_user_ns: Option<u64>,
    pub cpu_system_ns: Option<u64>,
    /// CFS enforcement periods elapsed (only counted under a quota).
    pub cpu_periods: Option<u64>,
    pub cpu_throttled_periods: Option<u64>,
    pub cpu_throttled_ns: Option<u64>,
    pub memory_usage: Option<u64>,
    /// Usage minus inactive file pages, as cAdvisor computes it.
    pub memory_working_set: Option<u64>,
    pub memory_rss: Option<u64>,
    /// Page cache (v1 `cache`, v2 `file`).
    pub memory_cache: Option<u64>,
    /// The highest usage seen (v1 `max_usage_in_bytes`, v2 `memory.peak`
    /// where the kernel has it).
    pub memory_max_usage: Option<u64>,
    /// Times usage hit the limit (v1 `failcnt`, v2 `memory.events` max).
    pub memory_failcnt: Option<u64>,
    /// The memory limit, when there is one.
    pub memory_limit: Option<u64>,
    /// OOM kills in the cgroup (`oom_kill` of v1 `memory.oom_control`, v2
    /// `memory.events`).
    pub oom_kills: Option<u64>,
    pub page_faults: Option<u64>,
    pub major_page_faults: Option<u64>,
    pub swap_usage: Option<u64>,
    /// The swap limit alone (v2 `memory.swap.max`; v1 memory+swap minus
    /// memory), when there is one.
    pub swap_limit: Option<u64>,
    pub pids: Option<u64>,
    /// Pressure stall information (v2 `cpu.pressure`, `memory.pressure`,
    /// `io.pressure`; v1 has none).
    pub cpu_pressure: Option<Pressure>,
    pub memory_pressure: Option<Pressure>,
    pub io_pressure: Option<Pressure>,
}

/// One `*.pressure` file: the share of time some, or all, of the cgroup's
/// tasks stalled on the resource.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pressure {
    pub some: PressureLine,
    /// Absent for CPU on kernels before 5.13.
    pub full: Option<PressureLine>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PressureLine {
    /// Averages over 10, 60 and 300 s, in hundredths of a percent (the
    /// kernel prints two decimals).
    pub avg10_centi: u32,
    pub avg60_centi: u32,
    pub avg300_centi: u32,
    /// Total stall time, µs.
    pub total_us: u64,
}

/// Parses a `*.pressure` file: `some avg10=0.12 avg60=… avg300=… total=N`
/// and the same for `full`.
pub fn pressure(text: &str) -> Option<Pressure> {
    let line = |l: &str| {
        let mut out = PressureLine::default();
        for field in l.split_whitespace().skip(1) {
            let (key, value) = field.split_once('=')?;
            let centi = || -> Option<u32> {
                let (whole, frac) = value.split_once('.').unwrap_or((value, "0"));
                let frac = format!("{frac:0<2}");
                Some(whole.parse::<u32>().ok()? * 100 + frac.get(..2)?.parse::<u32>().ok()?)
            };
            match key {
                "avg10" => out.avg10_centi = centi()?,
                "avg60" => out.avg60_centi = centi()?,
                "avg300" => out.avg300_centi = centi()?,
                "total" => out.total_us = value.parse().ok()?,
                _ => {}
            }
        }
        Some(out)
    };
    let mut some = None;
    let mut full = None;
    for l in text.lines() {
        if l.starts_with("some ") {
            some = line(l);
        } else if l.starts_with("full ") {
            full = line(l);
        }
    }
    Some(Pressure { some: some?, full })
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A flat-keyed file ("key value" per line) such as `memory.stat`.
pub fn flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

impl Cgroups {
    /// The usage of cgroup `path`; all `None` for a cgroup that is gone.
    pub fn stats(&self, path: &str) -> CgroupStats {
        match self.version {
            Version::V1 => self.stats_v1(path),
            Version::V2 => self.stats_v2(path),
        }
    }

    fn stats_v1(&self, path: &str) -> CgroupStats {
        let dir = |controller| self.dir(controller, path).ok().flatten();
        let mut s = CgroupStats::default();
        if let Some(cpuacct) = dir("cpuacct") {
            s.cpu_usage_ns = read_u64(&cpuacct.join("cpuacct.usage"));
            s.cpu_user_ns = read_u64(&cpuacct.join("cpuacct.usage_user"));
            s.cpu_system_ns = read_u64(&cpuacct.join("cpuacct.usage_sys"));
        }
        if let Some(cpu) = dir("cpu") {
            let text = std::fs::read_to_string(cpu.join("cpu.stat")).unwrap_or_default();
            let stat = flat_keyed(&text);
            s.cpu_periods = stat.get("nr_periods").copied();
            s.cpu_throttled_periods = stat.get("nr_throttled").copied();
            s.cpu_throttled_ns = stat.get("throttled_time").copied();
        }
        if let Some(memory) = dir("memory") {
            let text = std::fs::read_to_string(memory.join("memory.stat")).unwrap_or_default();
            let stat = flat_keyed(&text);
            // Hierarchical totals when the kernel gives them.
            let get = |name: &str| {
                stat.get(format!("total_{name}").as_str())
                    .or(stat.get(name))
                    .copied()
            };
            s.memory_usage = read_u64(&memory.join("memory.usage_in_bytes"));
            s.memory_rss = get("rss");
            s.memory_cache = get("cache");
            s.memory_max_usage = read_u64(&memory.join("memory.max_usage_in_bytes"));
            s.memory_failcnt = read_u64(&memory.join("memory.failcnt"));
            let oom =
                std::fs::read_to_string(memory.join("memory.oom_control")).unwrap_or_default();
            s.oom_kills = flat_keyed(&oom).get("oom_kill").copied();
            s.page_faults = get("pgfault");
            s.major_page_faults = get("pgmajfault");
            s.swap_usage = get("swap");
            // v1 reports "no limit" as a huge page-aligned number.
            let finite = |file: &str| read_u64(&memory.join(file)).filter(|l| *l < (1 << 62));
            let limit = finite("memory.limit_in_bytes");
            s.swap_limit = finite("memory.memsw.limit_in_bytes")
                .zip(limit)
                .map(|(total, l)| total.saturating_sub(l));
            s.memory_limit = limit;
            s.set_working_set(get("inactive_file"));
        }
        if let Some(pids) = dir("pids") {
            s.pids = read_u64(&pids.join("pids.current"));
        }
        s
    }

    fn stats_v2(&self, path: &str) -> CgroupStats {
        let Ok(Some(dir)) = self.dir("", path) else {
            return CgroupStats::default();
        };
        let mut s = CgroupStats::default();
        let cpu = std::fs::read_to_string(dir.join("cpu.stat")).unwrap_or_default();
        let cpu = flat_keyed(&cpu);
        s.cpu_usage_ns = cpu.get("usage_usec").map(|us| us * 1000);
        s.cpu_user_ns = cpu.get("user_usec").map(|us| us * 1000);
        s.cpu_system_ns = cpu.get("system_usec").map(|us| us * 1000);
        s.cpu_periods = cpu.get("nr_periods").copied();
        s.cpu_throttled_periods = cpu.get("nr_throttled").copied();
        s.cpu_throttled_ns = cpu.get("throttled_usec").map(|us| us * 1000);
        let text = std::fs::read_to_string(dir.join("memory.stat")).unwrap_or_default();
        let stat = flat_keyed(&text);
        s.memory_usage = read_u64(&dir.join("memory.current"));
        s.memory_rss = stat.get("anon").copied();
        s.memory_cache = stat.get("file").copied();
        s.memory_max_usage = read_u64(&dir.join("memory.peak"));
        let events = std::fs::read_to_string(dir.join("memory.events")).unwrap_or_default();
        let events = flat_keyed(&events);
        s.memory_failcnt = events.get("max").copied();
        s.oom_kills = events.get("oom_kill").copied();
        s.page_faults = stat.get("pgfault").copied();
        s.major_page_faults = stat.get("pgmajfault").copied();
        s.swap_usage = read_u64(&dir.join("memory.swap.current"));
        s.swap_limit = read_u64(&dir.join("memory.swap.max"));
        // "max" does not parse: no limit.
        let limit = read_u64(&dir.join("memory.max"));
        s.memory_limit = limit;
        s.set_working_set(stat.get("inactive_file").copied());
        s.pids = read_u64(&dir.join("pids.current"));
        let psi = |file: &str| {
            std::fs::read_to_string(dir.join(file))
                .ok()
                .and_then(|t| pressure(&t))
        };
        s.cpu_pressure = psi("cpu.pressure");
        s.memory_pressure = psi("memory.pressure");
        s.io_pressure = psi("io.pressure");
        s
    }
}

impl CgroupStats {
    /// What is left of the swap limit, when there is one.
    pub fn swap_available(&self) -> Option<u64> {
        self.swap_limit
            .zip(self.swap_usage)
            .map(|(limit, used)| limit.saturating_sub(used))
    }

    /// The memory limit minus the working set, when there is a limit.
    pub fn memory_available(&self) -> Option<u64> {
        self.memory_limit
            .zip(self.memory_working_set)
            .map(|(limit, working_set)| limit.saturating_sub(working_set))
    }

    fn set_working_set(&mut self, inactive_file: Option<u64>) {
        self.memory_working_set = self
            .memory_usage
            .map(|usage| usage.saturating_sub(inactive_file.unwrap_or(0)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{v1, v2};

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join(file), text).unwrap();
    }

    #[test]
    fn v2_stats() {
        let (root, cg) = v2();
        let c = root.path().join("k/c1");
        write(
            &c,
            "cpu.stat",
            "usage_usec 1500\nnr_periods 9\nnr_throttled 4\nthrottled_usec 20\n",
        );
        write(&c, "memory.current", "10000\n");
        write(&c, "memory.max", "max\n");
        write(
            &c,
            "memory.stat",
            "anon 6000\nfile 4000\ninactive_file 3000\npgfault 7\npgmajfault 1\n",
        );
        write(&c, "memory.swap.current", "0\n");
        write(&c, "memory.swap.max", "4096\n");
        write(&c, "pids.current", "3\n");
        write(
            &c,
            "memory.events",
            "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n",
        );
        write(&c, "memory.peak", "12000\n");
        write(
            &c,
            "memory.pressure",
            "some avg10=1.50 avg60=0.25 avg300=12.07 total=3456\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=12\n",
        );
        let s = cg.stats("/k/c1");
        assert_eq!((s.cpu_user_ns, s.cpu_system_ns), (None, None));
        assert_eq!(s.cpu_periods, Some(9));
        assert_eq!(s.memory_cache, Some(4000));
        assert_eq!(s.memory_max_usage, Some(12000));
        assert_eq!((s.memory_failcnt, s.oom_kills), (Some(5), Some(1)));
        assert_eq!(s.memory_limit, None);
        let memory = s.memory_pressure.expect("memory.pressure read");
        assert_eq!(
            memory.some,
            PressureLine {
                avg10_centi: 150,
                avg60_centi: 25,
                avg300_centi: 1207,
                total_us: 3456
            }
        );
        assert_eq!(memory.full.unwrap().total_us, 12);
        assert_eq!(s.cpu_pressure, None, "no cpu.pressure here");
        assert_eq!(s.cpu_usage_ns, Some(1_500_000));
        assert_eq!(s.cpu_throttled_periods, Some(4));
        assert_eq!(s.cpu_throttled_ns, Some(20_000));
        assert_eq!(s.memory_usage, Some(10000));
        assert_eq!(s.memory_working_set, Some(7000));
        assert_eq!(s.memory_available(), None, "no limit");
        assert_eq!(s.memory_rss, Some(6000));
        assert_eq!((s.page_faults, s.major_page_faults), (Some(7), Some(1)));
        assert_eq!((s.swap_usage, s.swap_limit), (Some(0), Some(4096)));
        assert_eq!(s.pids, Some(3));
        write(&c, "memory.max", "20000\n");
        assert_eq!(cg.stats("/k/c1").memory_available(), Some(13000));
        assert_eq!(cg.stats("/k/c1").memory_limit, Some(20000));
        assert_eq!(cg.stats("/k/gone"), CgroupStats::default());
    }

    #[test]
    fn v1_stats_prefer_hierarchical_totals() {
        let (root, cg) = v1();
        let p = root.path();
        write(&p.join("cpu,cpuacct/k/c1"), "cpuacct.usage", "123456\n");
        write(
            &p.join("cpu,cpuacct/k/c1"),
            "cpu.stat",
            "nr_periods 5\nnr_throttled 2\nthrottled_time 99\n",
        );
        let m = p.join("memory/k/c1");
        write(&m, "memory.usage_in_bytes", "10000\n");
        write(&m, "memory.limit_in_bytes", "9223372036854771712\n");
        write(&m, "memory.memsw.limit_in_bytes", "9223372036854771712\n");
        write(
            &m,
            "memory.stat",
            "rss 1\ninactive_file 1\ntotal_rss 5000\ntotal_inactive_file 2000\ntotal_pgfault 8\ntotal_pgmajfault 2\ntotal_swap 0\ntotal_cache 3000\n",
        );
        write(&p.join("pids/k/c1"), "pids.current", "2\n");
        write(
            &p.join("cpu,cpuacct/k/c1"),
            "cpuacct.usage_user",
            "100000\n",
        );
        write(&p.join("cpu,cpuacct/k/c1"), "cpuacct.usage_sys", "23456\n");
        write(&m, "memory.max_usage_in_bytes", "11000\n");
        write(&m, "memory.failcnt", "3\n");
        write(
            &m,
            "memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        let s = cg.stats("k/c1");
        assert_eq!(
            (s.cpu_user_ns, s.cpu_system_ns),
            (Some(100000), Some(23456))
        );
        assert_eq!(s.cpu_periods, Some(5));
        assert_eq!(
            (s.memory_max_usage, s.memory_failcnt),
            (Some(11000), Some(3))
        );
        assert_eq!((s.oom_kills, s.memory_limit), (Some(2), None));
        assert_eq!(s.memory_cache, Some(3000));
        assert_eq!(s.cpu_usage_ns, Some(123456));
        assert_eq!(s.cpu_throttled_periods, Some(2));
        assert_eq!(s.cpu_throttled_ns, Some(99));
        assert_eq!(s.memory_working_set, Some(8000));
        assert_eq!(s.memory_available(), None, "the huge number is no limit");
        assert_eq!((s.swap_usage, s.swap_limit), (Some(0), None));
        assert_eq!(s.memory_rss, Some(5000));
        assert_eq!((s.page_faults, s.major_page_faults), (Some(8), Some(2)));
        assert_eq!(s.pids, Some(2));
    }
}
