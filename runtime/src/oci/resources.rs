//! `linux.resources` from the CRI `LinuxContainerResources`, and the
//! device rules.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use k8s_cri::v1::{ContainerConfig, LinuxContainerResources};
use oci_spec::runtime::{
    LinuxCpu, LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, LinuxHugepageLimit, LinuxMemory,
    LinuxResources,
};

use super::mounts::clean_container_path;
use crate::error::{Error, Result};

fn invalid(m: String) -> Error {
    Error::InvalidArgument(m)
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

/// A cgroup v2 file name such as "memory.high": one dot-separated name,
/// never a path.
fn check_unified_key(key: &str) -> Result<()> {
    let ok = !key.is_empty()
        && !key.starts_with('.')
        && key.contains('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "unified resource {key:?} is not a cgroup file name"
        )))
    }
}

/// The resources of the container; `swap` says whether the host accounts
/// swap (memory.memsw / memory.swap.max): only then is a swap limit set.
pub(crate) fn build(
    r: Option<&LinuxContainerResources>,
    devices: Vec<LinuxDeviceCgroup>,
    swap: bool,
) -> Result<LinuxResources> {
    let mut out = LinuxResources::default();
    out.set_devices(Some(devices));
    let Some(r) = r else { return Ok(out) };

    let mut cpu = LinuxCpu::default();
    let mut any_cpu = false;
    if r.cpu_period != 0 {
        let p = u64::try_from(r.cpu_period)
            .map_err(|_| invalid(format!("cpu_period {} is negative", r.cpu_period)))?;
        cpu.set_period(Some(p));
        any_cpu = true;
    }
    if r.cpu_quota != 0 {
        if r.cpu_quota < -1 {
            return Err(invalid(format!("cpu_quota {} is invalid", r.cpu_quota)));
        }
        cpu.set_quota(Some(r.cpu_quota));
        any_cpu = true;
    }
    if r.cpu_shares != 0 {
        let s = u64::try_from(r.cpu_shares)
            .map_err(|_| invalid(format!("cpu_shares {} is negative", r.cpu_shares)))?;
        cpu.set_shares(Some(s));
        any_cpu = true;
    }
    if !r.cpuset_cpus.is_empty() {
        check_cpuset("cpuset_cpus", &r.cpuset_cpus)?;
        cpu.set_cpus(Some(r.cpuset_cpus.clone()));
        any_cpu = true;
    }
    if !r.cpuset_mems.is_empty() {
        check_cpuset("cpuset_mems", &r.cpuset_mems)?;
        cpu.set_mems(Some(r.cpuset_mems.clone()));
        any_cpu = true;
    }
    if any_cpu {
        out.set_cpu(Some(cpu));
    }

    if r.memory_limit_in_bytes < 0 {
        return Err(invalid(format!(
            "memory_limit_in_bytes {} is negative",
            r.memory_limit_in_bytes
        )));
    }
    if r.memory_swap_limit_in_bytes < -1 {
        return Err(invalid(format!(
            "memory_swap_limit_in_bytes {} is invalid",
            r.memory_swap_limit_in_bytes
        )));
    }
    if r.memory_limit_in_bytes > 0 {
        let limit = r.memory_limit_in_bytes;
        let mut mem = LinuxMemory::default();
        mem.set_limit(Some(limit));
        if swap {
            // memory+swap, as OCI (and cgroup v1) count it. Without an
            // explicit value the container gets no swap at all.
            let total = if r.memory_swap_limit_in_bytes != 0 {
                r.memory_swap_limit_in_bytes
            } else {
                limit
            };
            if total != -1 && total < limit {
                return Err(invalid(format!(
                    "memory_swap_limit_in_bytes {total} is below memory_limit_in_bytes {limit}"
                )));
            }
            mem.set_swap(Some(total));
        }
        out.set_memory(Some(mem));
    }

    if !r.hugepage_limits.is_empty() {
        let mut limits = Vec::with_capacity(r.hugepage_limits.len());
        for h in &r.hugepage_limits {
            if h.page_size.is_empty() {
                return Err(invalid("hugepage limit without page_size".into()));
            }
            let limit = i64::try_from(h.limit)
                .map_err(|_| invalid(format!("hugepage limit {} is too big", h.limit)))?;
            let mut l = LinuxHugepageLimit::default();
            l.set_page_size(h.page_size.clone());
            l.set_limit(limit);
            limits.push(l);
        }
        out.set_hugepage_limits(Some(limits));
    }

    if !r.unified.is_empty() {
        for k in r.unified.keys() {
            check_unified_key(k)?;
        }
        out.set_unified(Some(
            r.unified
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        ));
    }
    Ok(out)
}

fn rule(
    allow: bool,
    typ: Option<LinuxDeviceType>,
    major: Option<i64>,
    minor: Option<i64>,
    access: &str,
) -> LinuxDeviceCgroup {
    let mut r = LinuxDeviceCgroup::default();
    r.set_allow(allow);
    r.set_typ(typ);
    r.set_major(major);
    r.set_minor(minor);
    r.set_access(Some(access.to_string()));
    r
}

/// The CRI `devices` of the container (host device nodes made visible in
/// the container) and the cgroup rules: deny everything but the runtime's
/// standard devices (libcontainer adds /dev/null, zero, full, random,
/// urandom, tty, console, pts) and the requested ones; allow everything
/// when privileged.
pub(crate) fn devices(
    config: &ContainerConfig,
    privileged: bool,
) -> Result<(Vec<LinuxDevice>, Vec<LinuxDeviceCgroup>)> {
    let mut nodes = Vec::new();
    let mut rules = vec![rule(privileged, None, None, None, "rwm")];
    for d in &config.devices {
        let dest = clean_container_path("device container_path", &d.container_path)?;
        let perms = if d.permissions.is_empty() {
            "rwm"
        } else {
            d.permissions.as_str()
        };
        if !perms.bytes().all(|b| matches!(b, b'r' | b'w' | b'm')) {
            return Err(invalid(format!(
                "device {}: permissions {perms:?} are not a subset of \"rwm\"",
                d.host_path
            )));
        }
        let meta = std::fs::metadata(&d.host_path)
            .map_err(|e| invalid(format!("device host path {:?}: {e}", d.host_path)))?;
        let ft = meta.file_type();
        let typ = if ft.is_char_device() {
            LinuxDeviceType::C
        } else if ft.is_block_device() {
            LinuxDeviceType::B
        } else {
            return Err(invalid(format!(
                "device host path {:?} is not a device node",
                d.host_path
            )));
        };
        let rdev = meta.rdev();
        let (major, minor) = (
            nix::sys::stat::major(rdev) as i64,
            nix::sys::stat::minor(rdev) as i64,
        );
        let mut node = LinuxDevice::default();
        node.set_path(PathBuf::from(&dest));
        node.set_typ(typ);
        node.set_major(major);
        node.set_minor(minor);
        node.set_file_mode(Some(meta.mode() & 0o777));
        node.set_uid(Some(meta.uid()));
        node.set_gid(Some(meta.gid()));
        nodes.push(node);
        if !privileged {
            rules.push(rule(true, Some(typ), Some(major), Some(minor), perms));
        }
    }
    Ok((nodes, rules))
}

#[cfg(test)]
mod tests {
    use k8s_cri::v1::{Device, HugepageLimit};

    use super::*;

    fn res(f: impl FnOnce(&mut LinuxContainerResources)) -> LinuxContainerResources {
        let mut r = LinuxContainerResources::default();
        f(&mut r);
        r
    }

    #[test]
    fn full_mapping() {
        let r = res(|r| {
            r.cpu_period = 100_000;
            r.cpu_quota = 50_000;
            r.cpu_shares = 512;
            r.cpuset_cpus = "0-1,3".into();
            r.cpuset_mems = "0".into();
            r.memory_limit_in_bytes = 128 << 20;
            r.hugepage_limits = vec![HugepageLimit {
                page_size: "2MB".into(),
                limit: 4 << 20,
            }];
            r.unified = [("memory.high".to_string(), "100000000".to_string())].into();
        });
        let out = build(Some(&r), vec![], true).unwrap();
        let cpu = out.cpu().as_ref().unwrap();
        assert_eq!(
            (cpu.period(), cpu.quota(), cpu.shares()),
            (Some(100_000), Some(50_000), Some(512))
        );
        assert_eq!(
            (cpu.cpus().as_deref(), cpu.mems().as_deref()),
            (Some("0-1,3"), Some("0"))
        );
        let mem = out.memory().as_ref().unwrap();
        assert_eq!(
            (mem.limit(), mem.swap()),
            (Some(128 << 20), Some(128 << 20)),
            "no swap by default"
        );
        let h = &out.hugepage_limits().as_ref().unwrap()[0];
        assert_eq!((h.page_size().as_str(), h.limit()), ("2MB", 4 << 20));
        assert_eq!(out.unified().as_ref().unwrap()["memory.high"], "100000000");
    }

    #[test]
    fn swap_rules() {
        let r = res(|r| {
            r.memory_limit_in_bytes = 100;
            r.memory_swap_limit_in_bytes = 300;
        });
        assert_eq!(
            build(Some(&r), vec![], true)
                .unwrap()
                .memory()
                .unwrap()
                .swap(),
            Some(300)
        );
        assert_eq!(
            build(Some(&r), vec![], false)
                .unwrap()
                .memory()
                .unwrap()
                .swap(),
            None,
            "no swap accounting"
        );
        let r = res(|r| {
            r.memory_limit_in_bytes = 100;
            r.memory_swap_limit_in_bytes = 50;
        });
        assert!(build(Some(&r), vec![], true).is_err());
        let r = res(|r| {
            r.memory_limit_in_bytes = 100;
            r.memory_swap_limit_in_bytes = -1;
        });
        assert_eq!(
            build(Some(&r), vec![], true)
                .unwrap()
                .memory()
                .unwrap()
                .swap(),
            Some(-1)
        );
    }

    #[test]
    fn unset_fields_stay_unset() {
        let out = build(Some(&LinuxContainerResources::default()), vec![], true).unwrap();
        assert!(out.cpu().is_none() && out.memory().is_none() && out.hugepage_limits().is_none());
        assert!(out.unified().is_none() && out.pids().is_none());
    }

    #[test]
    fn invalid_values() {
        for r in [
            res(|r| r.cpuset_cpus = "0-a".into()),
            res(|r| r.cpuset_cpus = "3-1".into()),
            res(|r| r.cpuset_mems = ",".into()),
            res(|r| r.cpu_shares = -2),
            res(|r| r.cpu_period = -1),
            res(|r| r.memory_limit_in_bytes = -5),
            res(|r| r.unified = [("../../escape".to_string(), "1".to_string())].into()),
            res(|r| r.unified = [("memory/high".to_string(), "1".to_string())].into()),
        ] {
            assert!(
                matches!(
                    build(Some(&r), vec![], true),
                    Err(Error::InvalidArgument(_))
                ),
                "{r:?}"
            );
        }
    }

    #[test]
    fn device_rules() {
        let (nodes, rules) = devices(&ContainerConfig::default(), false).unwrap();
        assert!(nodes.is_empty());
        assert_eq!(rules.len(), 1);
        assert!(!rules[0].allow() && rules[0].access().as_deref() == Some("rwm"));
        let (_, rules) = devices(&ContainerConfig::default(), true).unwrap();
        assert!(rules[0].allow(), "privileged: every device");

        let config = ContainerConfig {
            devices: vec![Device {
                container_path: "/dev/mynull".into(),
                host_path: "/dev/null".into(),
                permissions: "rw".into(),
            }],
            ..Default::default()
        };
        let (nodes, rules) = devices(&config, false).unwrap();
        assert_eq!(
            (nodes[0].typ(), nodes[0].major(), nodes[0].minor()),
            (LinuxDeviceType::C, 1, 3)
        );
        assert_eq!(nodes[0].path(), &PathBuf::from("/dev/mynull"));
        assert!(rules[1].allow());
        assert_eq!(
            (
                rules[1].major(),
                rules[1].minor(),
                rules[1].access().as_deref()
            ),
            (Some(1), Some(3), Some("rw"))
        );

        for (c, h, p) in [
            ("/dev/x", "/etc/passwd", ""),
            ("/dev/x", "/dev/null", "rx"),
            ("dev/x", "/dev/null", ""),
        ] {
            let config = ContainerConfig {
                devices: vec![Device {
                    container_path: c.into(),
                    host_path: h.into(),
                    permissions: p.into(),
                }],
                ..Default::default()
            };
            assert!(
                matches!(devices(&config, false), Err(Error::InvalidArgument(_))),
                "{c} {h} {p}"
            );
        }
    }
}
