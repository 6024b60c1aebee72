//! `linux.resources` from the CRI `LinuxContainerResources`, and the
//! device rules.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::PathBuf;

use berth_cri::v1::{ContainerConfig, LinuxContainerResources};
use oci_spec::runtime::{
    LinuxCpu, LinuxDevice, LinuxDeviceCgroup, LinuxDeviceType, LinuxHugepageLimit, LinuxMemory,
    LinuxResources,
};

use super::mounts::clean_container_path;
use crate::error::{Error, Result};

fn invalid(m: String) -> Error {
    Error::InvalidArgument(m)
}

/// The resources of the container; `swap` says whether the host accounts
/// swap (memory.memsw / memory.swap.max): only then is a swap limit set.
/// The values are checked by the cgroup module (`from_cri`).
pub(crate) fn build(
    r: Option<&LinuxContainerResources>,
    devices: Vec<LinuxDeviceCgroup>,
    swap: bool,
) -> Result<LinuxResources> {
    let mut out = LinuxResources::default();
    out.set_devices(Some(devices));
    let Some(cri) = r else { return Ok(out) };
    let r = crate::container::resources::from_cri(cri)?;

    if r.cpu_period.is_some()
        || r.cpu_quota.is_some()
        || r.cpu_shares.is_some()
        || r.cpuset_cpus.is_some()
        || r.cpuset_mems.is_some()
    {
        let mut cpu = LinuxCpu::default();
        cpu.set_period(r.cpu_period);
        cpu.set_quota(r.cpu_quota);
        cpu.set_shares(r.cpu_shares);
        cpu.set_cpus(r.cpuset_cpus.clone());
        cpu.set_mems(r.cpuset_mems.clone());
        out.set_cpu(Some(cpu));
    }

    if let Some(limit) = r.memory_limit {
        let mut mem = LinuxMemory::default();
        mem.set_limit(Some(limit));
        if swap {
            // memory+swap, as OCI (and cgroup v1) count it. Without an
            // explicit value the container gets no swap at all.
            mem.set_swap(Some(r.memory_swap.unwrap_or(limit)));
        }
        out.set_memory(Some(mem));
    }

    if !cri.hugepage_limits.is_empty() {
        let mut limits = Vec::with_capacity(cri.hugepage_limits.len());
        for h in &cri.hugepage_limits {
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
        out.set_unified(Some(r.unified.into_iter().collect::<HashMap<_, _>>()));
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
    use berth_cri::v1::{Device, HugepageLimit};

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
