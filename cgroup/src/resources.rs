//! A container's limits: checked ([`Resources::validate`],
//! [`Cgroups::check`]) before anything is created, and written into a live
//! cgroup by [`Cgroups::apply`] (UpdateContainerResources; at create,
//! libcontainer writes the same files with the same conversions).

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Cgroups, Error, Result, Version};

/// Limits in the CRI's and OCI's terms (v1 units: shares, quota/period,
/// memory+swap); `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub cpu_shares: Option<u64>,
    /// -1: no limit.
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    pub memory_limit: Option<i64>,
    /// Memory plus swap, as the CRI, OCI and v1 count it; -1: no limit.
    pub memory_swap: Option<i64>,
    /// cgroup v2 files written verbatim: name → value.
    pub unified: BTreeMap<String, String>,
}

/// The kernel's bounds on `cpu.cfs_period_us` (1 ms to 1 s).
const CPU_PERIOD: std::ops::RangeInclusive<u64> = 1_000..=1_000_000;
/// Shares as runc clamps them.
const CPU_SHARES: std::ops::RangeInclusive<u64> = 2..=262_144;
/// Files of a cgroup that only the runtime may write: its processes, its
/// children's controllers, its type and life.
const RESERVED: &[&str] = &[
    "cgroup.procs",
    "cgroup.threads",
    "cgroup.subtree_control",
    "cgroup.type",
    "cgroup.kill",
    "cgroup.freeze",
];

fn invalid(message: String) -> Error {
    Error::Invalid(message)
}

fn needs_v2(unified: &BTreeMap<String, String>) -> Error {
    let keys: Vec<_> = unified.keys().map(|k| format!("{k:?}")).collect();
    invalid(format!(
        "unified resources {} need cgroup v2; this host runs cgroup v1",
        keys.join(", ")
    ))
}

/// cgroup v2's `cpu.weight` for v1 shares, as runc (since 1.3), crun and
/// libcgroups (which sets it at create) convert them: a quadratic in
/// log2(shares) that maps 2 → 1, 1024 → 100 (the defaults agree) and
/// 262144 → 10000. The same float expression as libcgroups', so create
/// and update agree to the unit.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares <= *CPU_SHARES.start() {
        return 1;
    }
    if shares >= *CPU_SHARES.end() {
        return 10_000;
    }
    let log_shares = (shares as f64).log2();
    let exponent = (log_shares * log_shares + 125.0 * log_shares) / 612.0 - 7.0 / 34.0;
    (10f64.powf(exponent).ceil() as u64).clamp(1, 10_000)
}

/// A cpuset list: "0-3,5,7-8".
fn check_cpuset(what: &str, s: &str) -> Result<()> {
    let ok = s.split(',').all(|part| {
        let mut ends = part.trim().splitn(2, '-');
        let first = ends.next().unwrap_or("");
        let valid =
            |n: &str| !n.is_empty() && n.len() <= 6 && n.bytes().all(|b| b.is_ascii_digit());
        match ends.next() {
            None => valid(first),
            Some(last) => {
                valid(first) && valid(last) && first.parse::<u32>().ok() <= last.parse::<u32>().ok()
            }
        }
    });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("{what} {s:?} is not a valid cpu list")))
    }
}

/// "max" or a non-negative number.
fn is_max_or_count(value: &str) -> bool {
    value == "max" || value.parse::<u64>().is_ok()
}

/// A unified key: one cgroup file name such as "memory.high", never a
/// path, never a file only the runtime writes; its value in the format the
/// file takes where Berth knows it (limits and weights), else one line of
/// text.
fn check_unified(key: &str, value: &str) -> Result<()> {
    let name_ok = key.len() <= 64
        && key
            .split_once('.')
            .is_some_and(|(controller, file)| !controller.is_empty() && !file.is_empty())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if !name_ok {
        return Err(invalid(format!(
            "unified resource {key:?} is not a cgroup file name"
        )));
    }
    if RESERVED.contains(&key) {
        return Err(invalid(format!(
            "unified resource {key:?} is managed by the runtime"
        )));
    }
    let value = value.trim();
    let value_ok = match key {
        "memory.max"
        | "memory.high"
        | "memory.low"
        | "memory.min"
        | "memory.swap.max"
        | "memory.swap.high"
        | "pids.max"
        | "cgroup.max.descendants"
        | "cgroup.max.depth" => is_max_or_count(value),
        "cpu.weight" => value
            .parse::<u64>()
            .is_ok_and(|w| (1..=10_000).contains(&w)),
        "cpu.weight.nice" => value.parse::<i64>().is_ok_and(|n| (-20..=19).contains(&n)),
        "cpu.max" => {
            let mut parts = value.split_whitespace();
            let quota = parts.next().is_some_and(is_max_or_count);
            let period = parts
                .next()
                .is_none_or(|p| p.parse::<u64>().is_ok_and(|p| CPU_PERIOD.contains(&p)));
            quota && period && parts.next().is_none()
        }
        _ => !value.is_empty() && value.len() <= 4096 && !value.contains('\n'),
    };
    if value_ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "unified resource {key:?}: value {value:?} is invalid"
        )))
    }
}

impl Resources {
    /// What is wrong with these limits on any host.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = self.cpu_period
            && !CPU_PERIOD.contains(&p)
        {
            return Err(invalid(format!(
                "cpu_period {p} is out of range (1000 to 1000000 µs)"
            )));
        }
        if let Some(q) = self.cpu_quota
            && q != -1
            && q < 1000
        {
            return Err(invalid(format!(
                "cpu_quota {q} is invalid (-1, or at least 1000 µs)"
            )));
        }
        if let Some(cpus) = &self.cpuset_cpus {
            check_cpuset("cpuset_cpus", cpus)?;
        }
        if let Some(mems) = &self.cpuset_mems {
            check_cpuset("cpuset_mems", mems)?;
        }
        if let Some(m) = self.memory_limit
            && m <= 0
        {
            return Err(invalid(format!("memory_limit_in_bytes {m} is invalid")));
        }
        if let Some(total) = self.memory_swap {
            if total < -1 || total == 0 {
                return Err(invalid(format!(
                    "memory_swap_limit_in_bytes {total} is invalid"
                )));
            }
            match self.memory_limit {
                None => {
                    return Err(invalid(
                        "memory_swap_limit_in_bytes needs memory_limit_in_bytes".into(),
                    ));
                }
                Some(limit) if total != -1 && total < limit => {
                    return Err(invalid(format!(
                        "memory_swap_limit_in_bytes {total} is below memory_limit_in_bytes {limit}"
                    )));
                }
                Some(_) => {}
            }
        }
        for (key, value) in &self.unified {
            check_unified(key, value)?;
        }
        Ok(())
    }
}

impl Cgroups {
    /// Whether these limits can be applied to a cgroup below `parent` on
    /// this host: `unified` only on v2, each key a file of a controller the
    /// parent hands down; a cpuset only with a cpuset controller.
    pub fn check(&self, parent: &str, r: &Resources) -> Result<()> {
        r.validate()?;
        if (r.cpuset_cpus.is_some() || r.cpuset_mems.is_some()) && !self.has_controller("cpuset") {
            return Err(invalid(
                "cpuset_cpus/cpuset_mems: this host has no cpuset controller".into(),
            ));
        }
        if r.unified.is_empty() {
            return Ok(());
        }
        if self.version == Version::V1 {
            return Err(needs_v2(&r.unified));
        }
        // The nearest existing cgroup at or above `parent`: its
        // controllers are what a new child gets.
        let rel = crate::relative(parent)?;
        let mut dir = self.root.join(rel);
        while !dir.is_dir() && dir != self.root {
            dir.pop();
        }
        let is_root = dir == self.root;
        let controllers = crate::read_words(&dir.join("cgroup.controllers"));
        for key in r.unified.keys() {
            let (controller, _) = key.split_once('.').unwrap_or((key, ""));
            if controller != "cgroup" && !controllers.iter().any(|c| c == controller) {
                return Err(invalid(format!(
                    "unified resource {key:?}: the {controller} controller is not available here"
                )));
            }
            // Below the root every cgroup has the same interface files.
            if !is_root && !dir.join(key).exists() {
                return Err(invalid(format!(
                    "unified resource {key:?}: no such cgroup file"
                )));
            }
        }
        Ok(())
    }

    /// Writes the set fields of `r` into the live cgroup `path`.
    pub fn apply(&self, path: &str, r: &Resources) -> Result<()> {
        r.validate()?;
        match self.version {
            Version::V1 => self.apply_v1(path, r),
            Version::V2 => self.apply_v2(path, r),
        }
    }

    fn apply_v1(&self, path: &str, r: &Resources) -> Result<()> {
        if !r.unified.is_empty() {
            return Err(needs_v2(&r.unified));
        }
        if let Some(cpu) = self.dir("cpu", path)? {
            if let Some(shares) = r.cpu_shares {
                let shares = shares.clamp(*CPU_SHARES.start(), *CPU_SHARES.end());
                write(&cpu, "cpu.shares", &shares.to_string())?;
            }
            if let Some(period) = r.cpu_period {
                write(&cpu, "cpu.cfs_period_us", &period.to_string())?;
            }
            if let Some(quota) = r.cpu_quota {
                write(&cpu, "cpu.cfs_quota_us", &quota.to_string())?;
            }
        }
        if let Some(cpuset) = self.dir("cpuset", path)? {
            if let Some(cpus) = &r.cpuset_cpus {
                write(&cpuset, "cpuset.cpus", cpus)?;
            }
            if let Some(mems) = &r.cpuset_mems {
                write(&cpuset, "cpuset.mems", mems)?;
            }
        }
        if let (Some(limit), Some(memory)) = (r.memory_limit, self.dir("memory", path)?) {
            let memsw = memory.join("memory.memsw.limit_in_bytes");
            if !memsw.exists() {
                return write(&memory, "memory.limit_in_bytes", &limit.to_string());
            }
            // Without a swap limit the container gets no swap.
            let total = r.memory_swap.unwrap_or(limit);
            // memory+swap may never be below memory: raise it first when
            // growing, lower it after when shrinking.
            let current_total: i64 = std::fs::read_to_string(&memsw)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(i64::MAX);
            let total_first = total == -1 || total > current_total;
            if total_first {
                write(&memory, "memory.memsw.limit_in_bytes", &total.to_string())?;
            }
            write(&memory, "memory.limit_in_bytes", &limit.to_string())?;
            if !total_first {
                write(&memory, "memory.memsw.limit_in_bytes", &total.to_string())?;
            }
        }
        Ok(())
    }

    fn apply_v2(&self, path: &str, r: &Resources) -> Result<()> {
        let dir = self.root.join(crate::relative(path)?);
        if let Some(shares) = r.cpu_shares {
            write(&dir, "cpu.weight", &shares_to_weight(shares).to_string())?;
        }
        if r.cpu_quota.is_some() || r.cpu_period.is_some() {
            // cpu.max holds both; an unset half keeps its current value.
            let current = std::fs::read_to_string(dir.join("cpu.max")).unwrap_or_default();
            let mut current = current.split_whitespace();
            let (old_quota, old_period) = (current.next(), current.next());
            let quota = match r.cpu_quota {
                Some(q) if q > 0 => q.to_string(),
                Some(_) => "max".into(),
                None => old_quota.unwrap_or("max").to_string(),
            };
            let period = match r.cpu_period {
                Some(p) => p.to_string(),
                None => old_period.unwrap_or("100000").to_string(),
            };
            write(&dir, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(cpus) = &r.cpuset_cpus {
            write(&dir, "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = &r.cpuset_mems {
            write(&dir, "cpuset.mems", mems)?;
        }
        if let Some(limit) = r.memory_limit {
            let swap = dir.join("memory.swap.max");
            // v2 limits swap alone: memory+swap minus memory, as
            // libcgroups converts it; no swap limit means no swap.
            let swap_value = match r.memory_swap {
                Some(-1) => "max".to_string(),
                Some(total) => (total - limit).to_string(),
                None => "0".to_string(),
            };
            write(&dir, "memory.max", &limit.to_string())?;
            if swap.exists() {
                write(&dir, "memory.swap.max", &swap_value)?;
            }
        }
        for (key, value) in &r.unified {
            if !dir.join(key).exists() {
                return Err(invalid(format!(
                    "unified resource {key:?}: no such cgroup file"
                )));
            }
            write(&dir, key, value.trim())?;
        }
        Ok(())
    }
}

/// Writes `value` into `dir/file`; EINVAL (the kernel refusing the value)
/// is the request's fault.
fn write(dir: &Path, file: &str, value: &str) -> Result<()> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|e| {
        if e.raw_os_error() == Some(libc::EINVAL) {
            invalid(format!("{file}: the kernel refuses {value:?}"))
        } else {
            Error::io(format!("write {value:?} to {}", path.display()), e)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{v1, v2};

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    fn unified(pairs: &[(&str, &str)]) -> Resources {
        Resources {
            unified: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn weights_as_runc_converts_them() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(512), 59);
        assert_eq!(shares_to_weight(1024), 100);
        assert_eq!(shares_to_weight(262_144), 10000);
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(u64::MAX), 10000);
    }

    #[test]
    fn out_of_range_values_are_refused() {
        let bad = [
            Resources {
                cpu_period: Some(10),
                ..Default::default()
            },
            Resources {
                cpu_quota: Some(-5),
                ..Default::default()
            },
            Resources {
                cpu_quota: Some(10),
                ..Default::default()
            },
            Resources {
                memory_limit: Some(-1),
                ..Default::default()
            },
            Resources {
                memory_limit: Some(1 << 20),
                memory_swap: Some(1 << 10),
                ..Default::default()
            },
            Resources {
                memory_swap: Some(1 << 30),
                ..Default::default()
            },
            Resources {
                cpuset_cpus: Some("0-x".into()),
                ..Default::default()
            },
            Resources {
                cpuset_mems: Some("3-1".into()),
                ..Default::default()
            },
        ];
        for r in bad {
            assert!(matches!(r.validate(), Err(Error::Invalid(_))), "{r:?}");
        }
        let good = Resources {
            cpu_quota: Some(-1),
            cpu_period: Some(100_000),
            cpu_shares: Some(1),
            memory_limit: Some(1 << 26),
            memory_swap: Some(-1),
            cpuset_cpus: Some("0-1,3".into()),
            ..Default::default()
        };
        good.validate().unwrap();
    }

    #[test]
    fn unified_keys_and_values_are_checked() {
        for (key, value) in [
            ("../memory.max", "1"),
            ("memory.max/../../x", "1"),
            ("memory", "1"),
            (".memory", "1"),
            ("cgroup.procs", "1"),
            ("cgroup.subtree_control", "+cpu"),
            ("memory.max", "-5"),
            ("memory.max", "lots"),
            ("cpu.weight", "0"),
            ("cpu.max", "max 10"),
            ("io.max", "a\nb"),
            ("io.max", ""),
        ] {
            let err = unified(&[(key, value)]).validate().unwrap_err();
            assert!(
                err.to_string().contains(&format!("{key:?}")),
                "{key}: {err}"
            );
        }
        unified(&[
            ("memory.high", "max"),
            ("cpu.max", "50000 100000"),
            ("cpu.weight", "100"),
            ("io.weight", "default 100"),
            ("cgroup.max.depth", "3"),
        ])
        .validate()
        .unwrap();
    }

    #[test]
    fn check_wants_the_controller_and_the_file() {
        let (dir, cg) = v2();
        std::fs::create_dir_all(dir.path().join("k/pod")).unwrap();
        std::fs::write(dir.path().join("k/pod/cgroup.controllers"), "cpu memory").unwrap();
        std::fs::write(dir.path().join("k/pod/memory.high"), "max").unwrap();
        cg.check("/k/pod", &unified(&[("memory.high", "1000000")]))
            .unwrap();
        let err = cg
            .check("/k/pod", &unified(&[("pids.max", "10")]))
            .unwrap_err();
        assert!(err.to_string().contains("pids"), "{err}");
        let err = cg
            .check("/k/pod", &unified(&[("memory.nosuch", "1")]))
            .unwrap_err();
        assert!(err.to_string().contains("no such cgroup file"), "{err}");
        // A parent not made yet: the root's controllers decide.
        cg.check("/k2/pod", &unified(&[("pids.max", "10")]))
            .unwrap();
        let err = cg
            .check("/k2/pod", &unified(&[("hugetlb.2MB.max", "0")]))
            .unwrap_err();
        assert!(err.to_string().contains("hugetlb"), "{err}");
        let cpuset = Resources {
            cpuset_cpus: Some("0".into()),
            ..Default::default()
        };
        assert!(cg.check("/k/pod", &cpuset).is_err(), "no cpuset controller");

        let (_dir, v1) = v1();
        assert!(
            v1.check("/k/pod", &unified(&[("memory.high", "1")]))
                .is_err()
        );
        v1.check("/k/pod", &cpuset).unwrap();
    }

    #[test]
    fn v2_update_converts_shares_quota_and_swap() {
        let (dir, cg) = v2();
        let c = dir.path().join("k/c1");
        std::fs::create_dir_all(&c).unwrap();
        for f in ["cpu.weight", "memory.max", "memory.swap.max", "memory.high"] {
            std::fs::write(c.join(f), "").unwrap();
        }
        std::fs::write(c.join("cpu.max"), "max 100000\n").unwrap();
        let mut r = Resources {
            cpu_shares: Some(512),
            cpu_quota: Some(20_000),
            memory_limit: Some(64 << 20),
            memory_swap: Some(128 << 20),
            ..unified(&[("memory.high", "50331648")])
        };
        cg.apply("/k/c1", &r).unwrap();
        assert_eq!(read(&c.join("cpu.weight")), "59");
        assert_eq!(read(&c.join("cpu.max")), "20000 100000");
        assert_eq!(read(&c.join("memory.max")), (64 << 20).to_string());
        assert_eq!(read(&c.join("memory.swap.max")), (64 << 20).to_string());
        assert_eq!(read(&c.join("memory.high")), "50331648");

        r = Resources {
            cpu_period: Some(50_000),
            memory_limit: Some(32 << 20),
            ..Default::default()
        };
        cg.apply("/k/c1", &r).unwrap();
        assert_eq!(read(&c.join("cpu.max")), "20000 50000", "the quota stays");
        assert_eq!(read(&c.join("memory.swap.max")), "0", "no swap by default");
        r.memory_swap = Some(-1);
        r.cpu_quota = Some(-1);
        cg.apply("/k/c1", &r).unwrap();
        assert_eq!(read(&c.join("memory.swap.max")), "max");
        assert_eq!(read(&c.join("cpu.max")), "max 50000");

        let err = cg
            .apply("/k/c1", &unified(&[("memory.low", "1")]))
            .unwrap_err();
        assert!(err.to_string().contains("no such cgroup file"), "{err}");
    }

    #[test]
    fn v1_update_orders_memory_and_memsw() {
        let (dir, cg) = v1();
        cg.create("/k/c1").unwrap();
        let mem = dir.path().join("memory/k/c1");
        std::fs::write(mem.join("memory.memsw.limit_in_bytes"), "100").unwrap();
        std::fs::write(mem.join("memory.limit_in_bytes"), "100").unwrap();
        let r = Resources {
            cpu_shares: Some(1),
            cpu_quota: Some(20_000),
            cpu_period: Some(100_000),
            cpuset_cpus: Some("1".into()),
            memory_limit: Some(64 << 20),
            memory_swap: Some(128 << 20),
            ..Default::default()
        };
        cg.apply("/k/c1", &r).unwrap();
        let cpu = dir.path().join("cpu,cpuacct/k/c1");
        assert_eq!(read(&cpu.join("cpu.shares")), "2", "clamped as runc does");
        assert_eq!(read(&cpu.join("cpu.cfs_quota_us")), "20000");
        assert_eq!(read(&cpu.join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(&dir.path().join("cpuset/k/c1/cpuset.cpus")), "1");
        assert_eq!(
            read(&mem.join("memory.limit_in_bytes")),
            (64 << 20).to_string()
        );
        assert_eq!(
            read(&mem.join("memory.memsw.limit_in_bytes")),
            (128 << 20).to_string()
        );
        assert!(
            cg.apply("/k/c1", &unified(&[("memory.high", "1")]))
                .is_err()
        );
    }
}
