//! seccomp: the runtime default profile and Localhost profiles.
//!
//! **RuntimeDefault** is a deny-list, not Docker's allow-list: every system
//! call is allowed except the ones below, which fail with `EPERM` (`clone3`
//! with `ENOSYS`, so that libc falls back to `clone`, whose flags the filter
//! can see). Like Docker's profile, a call stays allowed when the container
//! holds the capability that governs it (a container given `SYS_ADMIN` may
//! `mount`), so the filter only blocks what the capability set would not
//! already forbid, plus the kernel interfaces that are not namespaced at all:
//!
//! | denied | unless the container has |
//! |---|---|
//! | `kexec_load`, `kexec_file_load` | (never allowed) |
//! | `keyctl`, `add_key`, `request_key` (the kernel keyring is not namespaced) | (never) |
//! | `io_uring_setup`, `io_uring_enter`, `io_uring_register` (as Docker 25 and containerd 2) | (never) |
//! | `create_module`, `get_kernel_syms`, `query_module`, `nfsservctl`, `uselib`, `ustat`, `_sysctl`, `sysfs`, `vm86`, `vm86old` (obsolete) | (never) |
//! | `init_module`, `finit_module`, `delete_module` | `SYS_MODULE` |
//! | `reboot` | `SYS_BOOT` |
//! | `acct` | `SYS_PACCT` |
//! | `mount`, `umount`, `umount2`, `pivot_root`, `fsopen`, `fsconfig`, `fsmount`, `fspick`, `open_tree`, `move_mount`, `mount_setattr`, `swapon`, `swapoff`, `setns`, `quotactl`, `quotactl_fd`, `lookup_dcookie`, `name_to_handle_at`, `fanotify_init` | `SYS_ADMIN` |
//! | `unshare` and `clone` with `CLONE_NEWUSER` (unprivileged user namespaces); `clone3` (ENOSYS) | `SYS_ADMIN` |
//! | `bpf` | `SYS_ADMIN` or `BPF` |
//! | `perf_event_open` | `SYS_ADMIN` or `PERFMON` |
//! | `settimeofday`, `stime`, `clock_settime`, `clock_adjtime` | `SYS_TIME` |
//! | `iopl`, `ioperm` | `SYS_RAWIO` |
//! | `userfaultfd` | `SYS_PTRACE` |
//! | `syslog` | `SYSLOG` |
//! | `open_by_handle_at` | `DAC_READ_SEARCH` |
//! | `vhangup` | `SYS_TTY_CONFIG` |
//!
//! `ptrace`, `personality` and the NUMA calls stay allowed (Docker allows
//! `ptrace` on kernels >= 4.8). The filter covers the native architecture
//! and its 32-bit compat ABIs (x86_64: x86 and x32; aarch64: arm) so that a
//! 32-bit call cannot bypass it. The `clone` flag check assumes flags in
//! argument 0, which holds everywhere except s390x.
//!
//! **Localhost** profiles are JSON files in either the OCI `LinuxSeccomp`
//! format or Docker's (`archMap`, per-rule `name`, `includes`/`excludes` on
//! `caps`, `arches` and `minKernel`), turned into a plain OCI `LinuxSeccomp`
//! for this container's capabilities and this host's architecture, as
//! containerd does with `seccomp.LoadProfile`.

use std::collections::HashSet;
use std::path::Path;

use oci_spec::runtime::{
    Arch, Capability, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompArgBuilder,
    LinuxSeccompFilterFlag, LinuxSeccompOperator, LinuxSyscall,
};
use serde::Deserialize;

use crate::error::{Error, Result};

const CLONE_NEWUSER: u64 = 0x1000_0000;
const EPERM: u32 = 1;
const ENOSYS: u32 = 38;

/// One deny rule of the default profile.
struct Deny {
    names: &'static [&'static str],
    /// The rule is dropped when the container holds any of these.
    unless_any: &'static [Capability],
    errno: u32,
    /// Deny only when argument 0 has these flag bits set.
    arg0_flags: Option<u64>,
}

const DEFAULT_DENY: &[Deny] = &[
    Deny {
        names: &[
            "kexec_load",
            "kexec_file_load",
            "keyctl",
            "add_key",
            "request_key",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "create_module",
            "get_kernel_syms",
            "query_module",
            "nfsservctl",
            "uselib",
            "ustat",
            "_sysctl",
            "sysfs",
            "vm86",
            "vm86old",
        ],
        unless_any: &[],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["init_module", "finit_module", "delete_module"],
        unless_any: &[Capability::SysModule],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["reboot"],
        unless_any: &[Capability::SysBoot],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["acct"],
        unless_any: &[Capability::SysPacct],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &[
            "mount",
            "umount",
            "umount2",
            "pivot_root",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "open_tree",
            "move_mount",
            "mount_setattr",
            "swapon",
            "swapoff",
            "setns",
            "quotactl",
            "quotactl_fd",
            "lookup_dcookie",
            "name_to_handle_at",
            "fanotify_init",
        ],
        unless_any: &[Capability::SysAdmin],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["unshare", "clone"],
        unless_any: &[Capability::SysAdmin],
        errno: EPERM,
        arg0_flags: Some(CLONE_NEWUSER),
    },
    Deny {
        names: &["clone3"],
        unless_any: &[Capability::SysAdmin],
        errno: ENOSYS,
        arg0_flags: None,
    },
    Deny {
        names: &["bpf"],
        unless_any: &[Capability::SysAdmin, Capability::Bpf],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["perf_event_open"],
        unless_any: &[Capability::SysAdmin, Capability::Perfmon],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["settimeofday", "stime", "clock_settime", "clock_adjtime"],
        unless_any: &[Capability::SysTime],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["iopl", "ioperm"],
        unless_any: &[Capability::SysRawio],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["userfaultfd"],
        unless_any: &[Capability::SysPtrace],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["syslog"],
        unless_any: &[Capability::Syslog],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["open_by_handle_at"],
        unless_any: &[Capability::DacReadSearch],
        errno: EPERM,
        arg0_flags: None,
    },
    Deny {
        names: &["vhangup"],
        unless_any: &[Capability::SysTtyConfig],
        errno: EPERM,
        arg0_flags: None,
    },
];

/// The seccomp architectures of this build: native plus compat ABIs.
fn native_arches() -> Vec<Arch> {
    match std::env::consts::ARCH {
        "x86_64" => vec![Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32],
        "aarch64" => vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm],
        "x86" => vec![Arch::ScmpArchX86],
        "arm" => vec![Arch::ScmpArchArm],
        "riscv64" => vec![Arch::ScmpArchRiscv64],
        "powerpc64" => vec![Arch::ScmpArchPpc64le],
        "s390x" => vec![Arch::ScmpArchS390x, Arch::ScmpArchS390],
        "loongarch64" => vec![Arch::ScmpArchLoongarch64],
        _ => vec![],
    }
}

/// The profile berth applies for `RuntimeDefault`, for a container whose
/// bounding set is `caps`.
pub(crate) fn runtime_default(caps: &HashSet<Capability>) -> LinuxSeccomp {
    let mut syscalls = Vec::new();
    for rule in DEFAULT_DENY {
        if rule.unless_any.iter().any(|c| caps.contains(c)) {
            continue;
        }
        let mut s = LinuxSyscall::default();
        s.set_names(rule.names.iter().map(|n| n.to_string()).collect());
        s.set_action(LinuxSeccompAction::ScmpActErrno);
        s.set_errno_ret(Some(rule.errno));
        if let Some(flags) = rule.arg0_flags {
            // value = mask, valueTwo = expected bits (runc's reading);
            // both equal, so libcontainer 0.7, which swaps them, agrees.
            let arg = LinuxSeccompArgBuilder::default()
                .index(0usize)
                .value(flags)
                .value_two(flags)
                .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                .build()
                .expect("every field is set");
            s.set_args(Some(vec![arg]));
        }
        syscalls.push(s);
    }
    let mut profile = LinuxSeccomp::default();
    profile.set_default_action(LinuxSeccompAction::ScmpActAllow);
    let arches = native_arches();
    profile.set_architectures((!arches.is_empty()).then_some(arches));
    profile.set_syscalls(Some(syscalls));
    profile
}

// ---- Localhost profiles (OCI or Docker format) ----

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    default_action: Option<LinuxSeccompAction>,
    #[serde(default)]
    default_errno_ret: Option<u32>,
    #[serde(default)]
    architectures: Option<Vec<Arch>>,
    #[serde(default)]
    arch_map: Option<Vec<ArchMap>>,
    #[serde(default)]
    flags: Option<Vec<LinuxSeccompFilterFlag>>,
    #[serde(default)]
    listener_path: Option<std::path::PathBuf>,
    #[serde(default)]
    listener_metadata: Option<String>,
    #[serde(default)]
    syscalls: Option<Vec<Rule>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArchMap {
    architecture: Arch,
    #[serde(default)]
    sub_architectures: Vec<Arch>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    names: Vec<String>,
    action: LinuxSeccompAction,
    #[serde(default)]
    errno_ret: Option<u32>,
    #[serde(default)]
    args: Option<Vec<LinuxSeccompArg>>,
    #[serde(default)]
    includes: Filter,
    #[serde(default)]
    excludes: Filter,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filter {
    #[serde(default)]
    caps: Vec<String>,
    #[serde(default)]
    arches: Vec<String>,
    #[serde(default)]
    min_kernel: Option<String>,
}

/// The Go name of this architecture, as Docker profiles spell it.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

/// "major.minor" of a kernel release string; None if it does not parse.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn has_cap(caps: &HashSet<Capability>, name: &str) -> bool {
    super::security::parse_capability(name).is_ok_and(|c| caps.contains(&c))
}

/// Turns a parsed profile into the OCI form for a container with `caps`
/// on a host running `kernel` ("major.minor...").
fn finish(
    profile: Profile,
    caps: &HashSet<Capability>,
    kernel: &str,
    origin: &str,
) -> Result<LinuxSeccomp> {
    let bad = |m: String| Error::InvalidArgument(format!("seccomp profile {origin}: {m}"));
    let default_action = profile
        .default_action
        .ok_or_else(|| bad("defaultAction is missing".into()))?;
    if profile
        .architectures
        .as_ref()
        .is_some_and(|a| !a.is_empty())
        && profile.arch_map.as_ref().is_some_and(|m| !m.is_empty())
    {
        return Err(bad("both architectures and archMap are set".into()));
    }
    let architectures = match profile.arch_map {
        Some(map) if !map.is_empty() => {
            let native = native_arches();
            map.into_iter()
                .find(|m| native.first() == Some(&m.architecture))
                .map(|m| {
                    std::iter::once(m.architecture)
                        .chain(m.sub_architectures)
                        .collect::<Vec<_>>()
                })
        }
        _ => profile.architectures.filter(|a| !a.is_empty()),
    };
    let kernel = kernel_version(kernel);
    let arch = go_arch();

    let mut syscalls = Vec::new();
    for rule in profile.syscalls.unwrap_or_default() {
        let inc = &rule.includes;
        let exc = &rule.excludes;
        if !inc.arches.is_empty() && !inc.arches.iter().any(|a| a == arch) {
            continue;
        }
        if exc.arches.iter().any(|a| a == arch) {
            continue;
        }
        if !inc.caps.iter().all(|c| has_cap(caps, c)) {
            continue;
        }
        if exc.caps.iter().any(|c| has_cap(caps, c)) {
            continue;
        }
        if let Some(min) = inc.min_kernel.as_deref() {
            let want =
                kernel_version(min).ok_or_else(|| bad(format!("invalid minKernel {min:?}")))?;
            if kernel.is_some_and(|k| k < want) {
                continue;
            }
        }
        let mut names = rule.names;
        if let Some(n) = rule.name.filter(|n| !n.is_empty()) {
            names.insert(0, n);
        }
        if names.is_empty() {
            return Err(bad("a syscall rule has no name".into()));
        }
        let mut s = LinuxSyscall::default();
        s.set_names(names);
        s.set_action(rule.action);
        s.set_errno_ret(rule.errno_ret);
        s.set_args(rule.args.filter(|a| !a.is_empty()));
        syscalls.push(s);
    }

    let mut out = LinuxSeccomp::default();
    out.set_default_action(default_action);
    out.set_default_errno_ret(profile.default_errno_ret);
    out.set_architectures(architectures);
    out.set_flags(profile.flags.filter(|f| !f.is_empty()));
    out.set_listener_path(profile.listener_path);
    out.set_listener_metadata(profile.listener_metadata);
    out.set_syscalls((!syscalls.is_empty()).then_some(syscalls));
    Ok(out)
}

/// Parses a profile (OCI or Docker JSON) for a container with `caps`.
pub(crate) fn parse_profile(
    json: &[u8],
    caps: &HashSet<Capability>,
    origin: &str,
) -> Result<LinuxSeccomp> {
    let profile: Profile = serde_json::from_slice(json)
        .map_err(|e| Error::InvalidArgument(format!("seccomp profile {origin}: {e}")))?;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    finish(profile, caps, &kernel, origin)
}

/// Loads the Localhost profile at `path` (absolute, on the host).
pub(crate) fn load_localhost(path: &str, caps: &HashSet<Capability>) -> Result<LinuxSeccomp> {
    if !Path::new(path).is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "seccomp localhost profile {path:?} must be an absolute path"
        )));
    }
    let json = std::fs::read(path).map_err(|e| {
        Error::InvalidArgument(format!("cannot load seccomp profile {path:?}: {e}"))
    })?;
    parse_profile(&json, caps, &format!("{path:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[Capability]) -> HashSet<Capability> {
        list.iter().copied().collect()
    }

    fn denied(p: &LinuxSeccomp) -> Vec<String> {
        p.syscalls()
            .iter()
            .flatten()
            .flat_map(|s| s.names().clone())
            .collect()
    }

    #[test]
    fn default_profile_denies_by_capability() {
        let p = runtime_default(&caps(&[Capability::Chown]));
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        let d = denied(&p);
        for name in [
            "kexec_load",
            "init_module",
            "mount",
            "umount2",
            "keyctl",
            "add_key",
            "bpf",
            "unshare",
            "clone3",
        ] {
            assert!(d.contains(&name.to_string()), "{name} must be denied");
        }
        assert!(!d.contains(&"ptrace".to_string()));
        let clone = p
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .find(|s| s.names().contains(&"clone".into()))
            .unwrap();
        let arg = clone.args().as_ref().unwrap()[0];
        assert_eq!(
            (arg.index(), arg.value(), arg.op()),
            (0, CLONE_NEWUSER, LinuxSeccompOperator::ScmpCmpMaskedEq)
        );
        let clone3 = p
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .find(|s| s.names() == &["clone3"])
            .unwrap();
        assert_eq!(clone3.errno_ret(), Some(ENOSYS));

        let p = runtime_default(&caps(&[Capability::SysAdmin, Capability::SysModule]));
        let d = denied(&p);
        assert!(!d.contains(&"mount".to_string()));
        assert!(!d.contains(&"init_module".to_string()));
        assert!(!d.contains(&"bpf".to_string()));
        assert!(d.contains(&"kexec_load".to_string()), "never allowed");
        assert!(d.contains(&"keyctl".to_string()), "never allowed");
    }

    #[test]
    fn oci_format_profile() {
        let json = br#"{"defaultAction":"SCMP_ACT_ALLOW","architectures":["SCMP_ARCH_X86_64"],
            "syscalls":[{"names":["chmod","fchmod","fchmodat"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#;
        let p = parse_profile(json, &HashSet::new(), "t").unwrap();
        assert_eq!(p.default_action(), LinuxSeccompAction::ScmpActAllow);
        assert_eq!(
            p.architectures().as_deref(),
            Some(&[Arch::ScmpArchX86_64][..])
        );
        let s = &p.syscalls().as_ref().unwrap()[0];
        assert_eq!(s.names(), &["chmod", "fchmod", "fchmodat"]);
        assert_eq!(
            (s.action(), s.errno_ret()),
            (LinuxSeccompAction::ScmpActErrno, Some(1))
        );
    }

    #[test]
    fn docker_format_profile() {
        let json = br#"{
            "defaultAction": "SCMP_ACT_ERRNO",
            "defaultErrnoRet": 1,
            "archMap": [
                {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}
            ],
            "syscalls": [
                {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
                {"name": "sethostname", "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["mount"], "action": "SCMP_ACT_ALLOW", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
                {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
                {"names": ["new_call"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "99.0"}},
                {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
                 "args": [{"index": 0, "value": 2114060288, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]}
            ]
        }"#;
        let p = parse_profile(json, &caps(&[Capability::Chown]), "t").unwrap();
        assert_eq!(p.default_errno_ret(), Some(1));
        let names = denied(&p);
        assert!(names.contains(&"read".to_string()));
        assert!(
            !names.contains(&"sethostname".to_string()),
            "needs SYS_ADMIN"
        );
        assert!(
            names.contains(&"mount".to_string()),
            "excluded only with SYS_ADMIN"
        );
        assert!(!names.contains(&"new_call".to_string()), "kernel too old");
        assert_eq!(
            names.contains(&"arch_prctl".to_string()),
            go_arch() == "amd64"
        );
        let clone = p
            .syscalls()
            .as_ref()
            .unwrap()
            .iter()
            .find(|s| s.names() == &["clone"])
            .unwrap();
        assert_eq!(clone.args().as_ref().unwrap()[0].value(), 2114060288);
        if std::env::consts::ARCH == "x86_64" {
            assert_eq!(
                p.architectures().as_deref(),
                Some(&[Arch::ScmpArchX86_64, Arch::ScmpArchX86, Arch::ScmpArchX32][..])
            );
        }

        let p = parse_profile(json, &caps(&[Capability::SysAdmin]), "t").unwrap();
        let names = denied(&p);
        assert!(names.contains(&"sethostname".to_string()));
        assert!(!names.contains(&"mount".to_string()));
    }

    #[test]
    fn bad_profiles_are_invalid_arguments() {
        for json in [
            &b"not json"[..],
            br#"{"syscalls":[]}"#,
            br#"{"defaultAction":"SCMP_ACT_NOPE"}"#,
        ] {
            assert!(matches!(
                parse_profile(json, &HashSet::new(), "t"),
                Err(Error::InvalidArgument(_))
            ));
        }
        assert!(matches!(
            load_localhost("relative.json", &HashSet::new()),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            load_localhost("/nonexistent/profile.json", &HashSet::new()),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(kernel_version("4.8"), Some((4, 8)));
        assert_eq!(kernel_version("x"), None);
    }
}
