//! Capabilities, masked and read-only paths, seccomp and AppArmor choices.

use std::collections::HashSet;
use std::str::FromStr;

use berth_cri::v1::security_profile::ProfileType;
use berth_cri::v1::{LinuxContainerSecurityContext, SecurityProfile};
use oci_spec::runtime::{Capability, LinuxCapabilities, LinuxSeccomp};

use super::seccomp;
use crate::error::{Error, Result};

/// Every capability, indexed by its kernel number (`CAP_CHOWN` = 0 ...).
pub(crate) const ALL_CAPS: [Capability; 41] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::DacReadSearch,
    Capability::Fowner,
    Capability::Fsetid,
    Capability::Kill,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setpcap,
    Capability::LinuxImmutable,
    Capability::NetBindService,
    Capability::NetBroadcast,
    Capability::NetAdmin,
    Capability::NetRaw,
    Capability::IpcLock,
    Capability::IpcOwner,
    Capability::SysModule,
    Capability::SysRawio,
    Capability::SysChroot,
    Capability::SysPtrace,
    Capability::SysPacct,
    Capability::SysAdmin,
    Capability::SysBoot,
    Capability::SysNice,
    Capability::SysResource,
    Capability::SysTime,
    Capability::SysTtyConfig,
    Capability::Mknod,
    Capability::Lease,
    Capability::AuditWrite,
    Capability::AuditControl,
    Capability::Setfcap,
    Capability::MacOverride,
    Capability::MacAdmin,
    Capability::Syslog,
    Capability::WakeAlarm,
    Capability::BlockSuspend,
    Capability::AuditRead,
    Capability::Perfmon,
    Capability::Bpf,
    Capability::CheckpointRestore,
];

/// containerd's (and Docker's) default set.
pub const DEFAULT_CAPS: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// Paths masked in every unprivileged container unless the CRI request
/// names its own list (containerd's defaults).
pub const DEFAULT_MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths mounted read-only in every unprivileged container unless the CRI
/// request names its own list.
pub const DEFAULT_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Parses a capability name as CRI sends it: "NET_ADMIN", "net_admin" or
/// "CAP_NET_ADMIN".
pub fn parse_capability(name: &str) -> Result<Capability> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    Capability::from_str(bare)
        .map_err(|_| Error::InvalidArgument(format!("unknown capability {name:?}")))
}

/// The capabilities in a `CapEff:`-style hex mask.
pub(crate) fn caps_from_mask(mask: u64) -> Vec<Capability> {
    ALL_CAPS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1u64 << i) != 0)
        .map(|(_, c)| *c)
        .collect()
}

fn is_all(name: &str) -> bool {
    name.trim().eq_ignore_ascii_case("ALL")
}

/// The process capabilities of a container, as containerd computes them:
/// start from the default set, then add ALL, drop ALL, add each, drop each
/// (so "drop ALL, add CHOWN" is CHOWN alone and "add ALL, drop CHOWN" is all
/// but CHOWN). Added capabilities go to the bounding, effective and
/// permitted sets; ambient ones also to inheritable and ambient. Privileged
/// containers get every capability berthd holds. Anything berthd itself does
/// not hold (`available`) is left out, or the kernel would refuse to start
/// the container.
pub(crate) fn capabilities(
    security: Option<&LinuxContainerSecurityContext>,
    available: &[Capability],
) -> Result<LinuxCapabilities> {
    let privileged = security.is_some_and(|s| s.privileged);
    let mut main: Vec<Capability> = DEFAULT_CAPS.to_vec();
    let mut ambient: Vec<Capability> = Vec::new();

    if privileged {
        main = ALL_CAPS.to_vec();
    } else if let Some(c) = security.and_then(|s| s.capabilities.as_ref()) {
        if c.add_capabilities.iter().any(|n| is_all(n)) {
            main = ALL_CAPS.to_vec();
        }
        if c.drop_capabilities.iter().any(|n| is_all(n)) {
            main.clear();
        }
        for name in c.add_capabilities.iter().filter(|n| !is_all(n)) {
            let cap = parse_capability(name)?;
            if !main.contains(&cap) {
                main.push(cap);
            }
        }
        for name in c.add_ambient_capabilities.iter() {
            if is_all(name) {
                return Err(Error::InvalidArgument(
                    "ambient capabilities cannot be \"ALL\"".into(),
                ));
            }
            let cap = parse_capability(name)?;
            if !main.contains(&cap) {
                main.push(cap);
            }
            if !ambient.contains(&cap) {
                ambient.push(cap);
            }
        }
        for name in c.drop_capabilities.iter().filter(|n| !is_all(n)) {
            let cap = parse_capability(name)?;
            main.retain(|c| *c != cap);
            ambient.retain(|c| *c != cap);
        }
    }

    let held = |c: &Capability| available.contains(c);
    let main: HashSet<Capability> = main.into_iter().filter(held).collect();
    let ambient: HashSet<Capability> = ambient.into_iter().filter(held).collect();
    let mut caps = LinuxCapabilities::default();
    caps.set_bounding(Some(main.clone()));
    caps.set_effective(Some(main.clone()));
    caps.set_permitted(Some(main));
    caps.set_inheritable(Some(ambient.clone()));
    caps.set_ambient(Some(ambient));
    Ok(caps)
}

/// Which seccomp profile applies (None = unconfined).
#[allow(deprecated)] // seccomp_profile_path, still sent by older kubelets
pub(crate) fn seccomp(
    security: Option<&LinuxContainerSecurityContext>,
    bounding: &HashSet<Capability>,
) -> Result<Option<LinuxSeccomp>> {
    let Some(sc) = security else { return Ok(None) };
    if sc.privileged {
        return Ok(None);
    }
    if let Some(profile) = &sc.seccomp {
        return match profile_type(profile)? {
            ProfileType::Unconfined => Ok(None),
            ProfileType::RuntimeDefault => Ok(Some(seccomp::runtime_default(bounding))),
            ProfileType::Localhost => {
                seccomp::load_localhost(&profile.localhost_ref, bounding).map(Some)
            }
        };
    }
    match sc.seccomp_profile_path.as_str() {
        "" | "unconfined" => Ok(None),
        "runtime/default" | "docker/default" => Ok(Some(seccomp::runtime_default(bounding))),
        other => match other.strip_prefix("localhost/") {
            Some(path) => seccomp::load_localhost(path, bounding).map(Some),
            None => Err(Error::InvalidArgument(format!(
                "unknown seccomp profile {other:?}"
            ))),
        },
    }
}

fn profile_type(p: &SecurityProfile) -> Result<ProfileType> {
    ProfileType::try_from(p.profile_type).map_err(|_| {
        Error::InvalidArgument(format!("unknown security profile type {}", p.profile_type))
    })
}

/// The AppArmor profile to run under (None = unconfined, or AppArmor off).
/// berth ships no default AppArmor profile yet: RuntimeDefault is
/// unconfined. A Localhost profile needs AppArmor enabled on the host.
#[allow(deprecated)] // apparmor_profile, still sent by older kubelets
pub(crate) fn apparmor(
    security: Option<&LinuxContainerSecurityContext>,
    enabled: bool,
) -> Result<Option<String>> {
    let Some(sc) = security else { return Ok(None) };
    if sc.privileged {
        return Ok(None);
    }
    let name = if let Some(profile) = &sc.apparmor {
        match profile_type(profile)? {
            ProfileType::Unconfined | ProfileType::RuntimeDefault => return Ok(None),
            ProfileType::Localhost => {
                let r = profile.localhost_ref.as_str();
                r.strip_prefix("localhost/").unwrap_or(r).to_string()
            }
        }
    } else {
        match sc.apparmor_profile.as_str() {
            "" | "runtime/default" | "unconfined" => return Ok(None),
            other => match other.strip_prefix("localhost/") {
                Some(name) => name.to_string(),
                None => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown apparmor profile {other:?}"
                    )));
                }
            },
        }
    };
    if name.is_empty() {
        return Err(Error::InvalidArgument(
            "apparmor localhost profile name is empty".into(),
        ));
    }
    if !enabled {
        return Err(Error::FailedPrecondition(format!(
            "apparmor profile {name:?} requested but AppArmor is not enabled on this host"
        )));
    }
    Ok(Some(name))
}

/// (masked paths, read-only paths) for the spec; both empty when privileged.
pub(crate) fn masked_and_readonly_paths(
    security: Option<&LinuxContainerSecurityContext>,
) -> (Vec<String>, Vec<String>) {
    if security.is_some_and(|s| s.privileged) {
        return (Vec::new(), Vec::new());
    }
    let or_default = |given: Option<&Vec<String>>, default: &[&str]| match given {
        Some(v) if !v.is_empty() => v.clone(),
        _ => default.iter().map(|s| s.to_string()).collect(),
    };
    (
        or_default(security.map(|s| &s.masked_paths), &DEFAULT_MASKED_PATHS),
        or_default(security.map(|s| &s.readonly_paths), &DEFAULT_READONLY_PATHS),
    )
}

#[cfg(test)]
mod tests {
    use berth_cri::v1::Capability as CriCaps;

    use super::*;

    fn with_caps(add: &[&str], drop: &[&str], ambient: &[&str]) -> LinuxContainerSecurityContext {
        LinuxContainerSecurityContext {
            capabilities: Some(CriCaps {
                add_capabilities: add.iter().map(|s| s.to_string()).collect(),
                drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
                add_ambient_capabilities: ambient.iter().map(|s| s.to_string()).collect(),
            }),
            ..Default::default()
        }
    }

    fn set(caps: &[Capability]) -> HashSet<Capability> {
        caps.iter().copied().collect()
    }

    #[test]
    fn capability_names() {
        assert_eq!(parse_capability("NET_ADMIN").unwrap(), Capability::NetAdmin);
        assert_eq!(
            parse_capability("cap_net_admin").unwrap(),
            Capability::NetAdmin
        );
        assert_eq!(
            parse_capability("CAP_SYS_TTY_CONFIG").unwrap(),
            Capability::SysTtyConfig
        );
        assert_eq!(parse_capability("SYSLOG").unwrap(), Capability::Syslog);
        assert_eq!(
            parse_capability("CHECKPOINT_RESTORE").unwrap(),
            Capability::CheckpointRestore
        );
        assert!(matches!(
            parse_capability("NOPE"),
            Err(Error::InvalidArgument(_))
        ));
        for (i, c) in ALL_CAPS.iter().enumerate() {
            assert_eq!(caps_from_mask(1 << i), vec![*c]);
        }
        assert_eq!(
            caps_from_mask(0x1fffeffffff).len(),
            40,
            "all but SYS_RESOURCE"
        );
    }

    #[test]
    fn defaults_add_drop_and_all() {
        let all = ALL_CAPS.to_vec();
        let c = capabilities(None, &all).unwrap();
        assert_eq!(c.bounding().clone().unwrap(), set(&DEFAULT_CAPS));
        assert_eq!(c.effective(), c.bounding());
        assert_eq!(c.permitted(), c.bounding());
        assert_eq!(c.inheritable().clone().unwrap(), HashSet::new());

        let c = capabilities(Some(&with_caps(&["NET_ADMIN"], &["NET_RAW"], &[])), &all).unwrap();
        let b = c.bounding().clone().unwrap();
        assert!(b.contains(&Capability::NetAdmin) && !b.contains(&Capability::NetRaw));
        assert_eq!(b.len(), DEFAULT_CAPS.len());

        let c = capabilities(Some(&with_caps(&["CHOWN"], &["ALL"], &[])), &all).unwrap();
        assert_eq!(c.bounding().clone().unwrap(), set(&[Capability::Chown]));

        let c = capabilities(Some(&with_caps(&["ALL"], &["CHOWN"], &[])), &all).unwrap();
        assert_eq!(c.bounding().as_ref().unwrap().len(), ALL_CAPS.len() - 1);
        assert!(!c.bounding().as_ref().unwrap().contains(&Capability::Chown));

        let c = capabilities(Some(&with_caps(&[], &["all"], &[])), &all).unwrap();
        assert!(c.bounding().as_ref().unwrap().is_empty());

        // Ambient: all five sets.
        let c = capabilities(Some(&with_caps(&[], &[], &["NET_ADMIN"])), &all).unwrap();
        for s in [
            c.bounding(),
            c.effective(),
            c.permitted(),
            c.inheritable(),
            c.ambient(),
        ] {
            assert!(s.as_ref().unwrap().contains(&Capability::NetAdmin));
        }

        assert!(matches!(
            capabilities(Some(&with_caps(&["BOGUS"], &[], &[])), &all),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn never_more_than_berthd_holds() {
        let held = caps_from_mask(0x1fffeffffff); // this VM: no SYS_RESOURCE
        let c = capabilities(Some(&with_caps(&["ALL"], &[], &[])), &held).unwrap();
        assert!(
            !c.bounding()
                .as_ref()
                .unwrap()
                .contains(&Capability::SysResource)
        );
        assert_eq!(c.bounding().as_ref().unwrap().len(), 40);
        let priv_ = LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        };
        let c = capabilities(Some(&priv_), &held).unwrap();
        assert_eq!(c.bounding().as_ref().unwrap().len(), 40);
    }

    #[test]
    #[allow(deprecated)]
    fn seccomp_choices() {
        let b = set(&DEFAULT_CAPS);
        assert!(
            seccomp(None, &b).unwrap().is_none(),
            "nil profile is unconfined"
        );
        let mut sc = LinuxContainerSecurityContext {
            seccomp: Some(SecurityProfile {
                profile_type: ProfileType::Unconfined as i32,
                localhost_ref: String::new(),
            }),
            ..Default::default()
        };
        assert!(seccomp(Some(&sc), &b).unwrap().is_none());
        sc.seccomp = Some(SecurityProfile::default()); // RuntimeDefault
        assert!(seccomp(Some(&sc), &b).unwrap().is_some());
        sc.privileged = true;
        assert!(
            seccomp(Some(&sc), &b).unwrap().is_none(),
            "privileged ignores seccomp"
        );
        let sc = LinuxContainerSecurityContext {
            seccomp_profile_path: "runtime/default".into(),
            ..Default::default()
        };
        assert!(seccomp(Some(&sc), &b).unwrap().is_some());
        let sc = LinuxContainerSecurityContext {
            seccomp_profile_path: "bogus".into(),
            ..Default::default()
        };
        assert!(seccomp(Some(&sc), &b).is_err());
    }

    #[test]
    #[allow(deprecated)]
    fn apparmor_choices() {
        let mut sc = LinuxContainerSecurityContext {
            apparmor: Some(SecurityProfile {
                profile_type: ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            }),
            ..Default::default()
        };
        assert_eq!(apparmor(Some(&sc), true).unwrap(), None);
        sc.apparmor = Some(SecurityProfile {
            profile_type: ProfileType::Localhost as i32,
            localhost_ref: "localhost/p1".into(),
        });
        assert_eq!(apparmor(Some(&sc), true).unwrap().as_deref(), Some("p1"));
        assert!(matches!(
            apparmor(Some(&sc), false),
            Err(Error::FailedPrecondition(_))
        ));
        let sc = LinuxContainerSecurityContext {
            apparmor_profile: "localhost/p2".into(),
            ..Default::default()
        };
        assert_eq!(apparmor(Some(&sc), true).unwrap().as_deref(), Some("p2"));
    }

    #[test]
    fn masked_paths_default_explicit_privileged() {
        let (m, r) = masked_and_readonly_paths(None);
        assert_eq!(m.len(), DEFAULT_MASKED_PATHS.len());
        assert_eq!(r, DEFAULT_READONLY_PATHS.to_vec());
        let sc = LinuxContainerSecurityContext {
            masked_paths: vec!["/bin/ls".into()],
            readonly_paths: vec!["/tmp".into()],
            ..Default::default()
        };
        assert_eq!(
            masked_and_readonly_paths(Some(&sc)),
            (vec!["/bin/ls".into()], vec!["/tmp".into()])
        );
        let sc = LinuxContainerSecurityContext {
            privileged: true,
            masked_paths: vec!["/x".into()],
            ..Default::default()
        };
        assert_eq!(masked_and_readonly_paths(Some(&sc)), (vec![], vec![]));
    }
}
