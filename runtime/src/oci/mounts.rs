//! The mounts of a container: the standard kernel filesystems, the pod's
//! /etc files, then the CRI mounts (which replace a default mount at the
//! same destination).

use std::path::{Component, Path, PathBuf};

use berth_cri::v1::{ContainerConfig, Mount as CriMount, MountPropagation};
use oci_spec::runtime::Mount;

use super::SandboxFiles;
use crate::error::{Error, Result};

fn mount(dest: &str, typ: &str, source: &str, options: &[&str]) -> Mount {
    let mut m = Mount::default();
    m.set_destination(PathBuf::from(dest));
    m.set_typ(Some(typ.to_string()));
    m.set_source(Some(PathBuf::from(source)));
    m.set_options(Some(options.iter().map(|s| s.to_string()).collect()));
    m
}

/// runc's and containerd's default mounts (without /run, which the CRI
/// plugin drops too). Privileged containers get /sys and /sys/fs/cgroup
/// read-write. `cgroup_binds` (cgroup v1): the container's cgroup in
/// each hierarchy, bind-mounted below a tmpfs at /sys/fs/cgroup instead
/// of a `cgroup` mount (see `berth_cgroup::Cgroups::v1_container_binds`).
pub(crate) fn defaults(privileged: bool, cgroup_binds: &[(String, PathBuf)]) -> Vec<Mount> {
    let sys_ro = if privileged { "rw" } else { "ro" };
    let mut mounts = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        ),
        // A per-container /dev/shm, even when the pod shares its IPC
        // namespace (SysV IPC is shared then, POSIX shm in /dev/shm is not).
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        ),
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_ro],
        ),
    ];
    if cgroup_binds.is_empty() {
        mounts.push(mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", sys_ro],
        ));
        return mounts;
    }
    // Writable so the binds' mount points can be made; a non-privileged
    // container's is made read-only afterwards (readonlyPaths).
    mounts.push(mount(
        "/sys/fs/cgroup",
        "tmpfs",
        "tmpfs",
        &["nosuid", "noexec", "nodev", "mode=755", "size=64k"],
    ));
    for (dest, source) in cgroup_binds {
        let mut m = mount(
            dest,
            "bind",
            "",
            &["bind", "nosuid", "noexec", "nodev", sys_ro],
        );
        m.set_source(Some(source.clone()));
        mounts.push(m);
    }
    mounts
}

/// Whether a CRI mount is an image volume (KEP-4639): an image, by name
/// or by id, instead of a host path.
pub(crate) fn is_image_volume(m: &CriMount) -> bool {
    m.image
        .as_ref()
        .is_some_and(|i| !i.image.is_empty() || !i.image_ref.is_empty())
}

/// Where berthd mounted the image of an image volume: the source of the
/// CRI mount at `index` of `ContainerConfig.mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageVolumeSource {
    pub index: usize,
    pub source: PathBuf,
}

/// Checks a container-side path: absolute, without `..`. Returns it
/// lexically cleaned (no `.`, no duplicate `/`).
pub(crate) fn clean_container_path(what: &str, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "{what} {path:?} must be an absolute path"
        )));
    }
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::InvalidArgument(format!(
                    "{what} {path:?} must not contain \"..\""
                )));
            }
        }
    }
    Ok(out)
}

fn depth(p: &Path) -> usize {
    p.components().count()
}

/// What `rootfsPropagation` the CRI mounts need: "shared" for a
/// bidirectional mount, "slave" for host-to-container (libcontainer's
/// spelling; it rejects runc's "rshared"/"rslave").
pub(crate) fn rootfs_propagation(config: &ContainerConfig) -> Option<&'static str> {
    // Image volumes are always private: they do not shape the rootfs.
    let props: Vec<_> = config
        .mounts
        .iter()
        .filter(|m| !is_image_volume(m))
        .map(|m| m.propagation)
        .collect();
    if props.contains(&(MountPropagation::PropagationBidirectional as i32)) {
        Some("shared")
    } else if props.contains(&(MountPropagation::PropagationHostToContainer as i32)) {
        Some("slave")
    } else {
        None
    }
}

/// Files below /proc a volume may cover (what lxcfs provides, as runc
/// allows).
const PROC_FILES_ALLOWED: &[&str] = &[
    "/proc/cpuinfo",
    "/proc/diskstats",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/swaps",
    "/proc/uptime",
    "/proc/loadavg",
    "/proc/slabinfo",
];

/// A CRI mount may not cover the root, /proc or /sys (nor reach into
/// /proc, where a mount can hide what confines the container): the
/// runtime's own setup needs them as they are.
fn check_destination(dest: &Path) -> Result<()> {
    let covers = dest == Path::new("/")
        || dest == Path::new("/sys")
        || (dest.starts_with("/proc") && !PROC_FILES_ALLOWED.iter().any(|f| dest == Path::new(f)));
    if covers {
        return Err(Error::InvalidArgument(format!(
            "mount container_path {} would cover what the runtime sets up (/, /proc, /sys)",
            dest.display()
        )));
    }
    Ok(())
}

/// Every mount of the container, in mount order. `image_volumes`: where
/// the images of the CRI mounts that are image volumes are mounted.
pub(crate) fn build(
    config: &ContainerConfig,
    files: &SandboxFiles,
    privileged: bool,
    readonly_rootfs: bool,
    cgroup_binds: &[(String, PathBuf)],
    image_volumes: &[ImageVolumeSource],
) -> Result<Vec<Mount>> {
    // The CRI mounts first, validated, so that they can override.
    let mut cri = Vec::with_capacity(config.mounts.len());
    for (index, m) in config.mounts.iter().enumerate() {
        let dest = clean_container_path("mount container_path", &m.container_path)?;
        check_destination(&dest)?;
        if is_image_volume(m) {
            let source = image_volumes
                .iter()
                .find(|v| v.index == index)
                .ok_or_else(|| {
                    Error::Internal(format!(
                        "the image of volume {} was not mounted",
                        dest.display()
                    ))
                })?;
            // Read-only whatever was asked: the image's files are shared by
            // every container (and image) that uses its layers.
            let mut options = vec!["rbind".to_string(), "rprivate".into(), "ro".into()];
            if m.recursive_read_only {
                options.push("rro".into());
            }
            let mut out = Mount::default();
            out.set_destination(dest);
            out.set_typ(Some("bind".to_string()));
            out.set_source(Some(source.source.clone()));
            out.set_options(Some(options));
            cri.push(out);
            continue;
        }
        if m.host_path.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "mount {}: host_path is empty",
                dest.display()
            )));
        }
        // The CRI says a symlinked host path is followed: mount its target.
        let source = std::fs::canonicalize(&m.host_path).map_err(|e| {
            Error::InvalidArgument(format!(
                "mount {}: host path {:?} does not exist: {e}",
                dest.display(),
                m.host_path
            ))
        })?;
        let propagation = MountPropagation::try_from(m.propagation).map_err(|_| {
            Error::InvalidArgument(format!(
                "mount {}: unknown propagation {}",
                dest.display(),
                m.propagation
            ))
        })?;
        let mut options = vec!["rbind".to_string()];
        options.push(
            match propagation {
                MountPropagation::PropagationPrivate => "rprivate",
                MountPropagation::PropagationHostToContainer => "rslave",
                MountPropagation::PropagationBidirectional => "rshared",
            }
            .to_string(),
        );
        if m.recursive_read_only {
            if !m.readonly {
                return Err(Error::InvalidArgument(format!(
                    "mount {}: recursive_read_only needs readonly",
                    dest.display()
                )));
            }
            if propagation != MountPropagation::PropagationPrivate {
                return Err(Error::InvalidArgument(format!(
                    "mount {}: recursive_read_only needs PROPAGATION_PRIVATE",
                    dest.display()
                )));
            }
        }
        options.push(if m.readonly { "ro" } else { "rw" }.to_string());
        if m.recursive_read_only {
            options.push("rro".to_string());
        }
        let mut out = Mount::default();
        out.set_destination(dest);
        out.set_typ(Some("bind".to_string()));
        out.set_source(Some(source));
        out.set_options(Some(options));
        cri.push(out);
    }
    let overridden = |dest: &Path| cri.iter().any(|m| m.destination() == dest);
    let dev_overridden = overridden(Path::new("/dev"));
    let cgroup_overridden = overridden(Path::new("/sys/fs/cgroup"));

    let mut mounts: Vec<Mount> = defaults(privileged, cgroup_binds)
        .into_iter()
        .filter(|m| !overridden(m.destination()))
        .filter(|m| !(dev_overridden && m.destination().starts_with("/dev")))
        .filter(|m| !(cgroup_overridden && m.destination().starts_with("/sys/fs/cgroup")))
        .collect();

    // The pod's /etc files: read-write unless the rootfs is read-only, as
    // containerd mounts them.
    let rw = if readonly_rootfs { "ro" } else { "rw" };
    for (dest, source) in [
        ("/etc/hosts", &files.hosts),
        ("/etc/resolv.conf", &files.resolv_conf),
        ("/etc/hostname", &files.hostname),
    ] {
        if let Some(source) = source
            && !overridden(Path::new(dest))
        {
            let mut m = Mount::default();
            m.set_destination(PathBuf::from(dest));
            m.set_typ(Some("bind".to_string()));
            m.set_source(Some(source.clone()));
            m.set_options(Some(vec!["rbind".into(), "rprivate".into(), rw.into()]));
            mounts.push(m);
        }
    }

    // Parents before children (stable, so equal depths keep CRI order).
    cri.sort_by_key(|m| depth(m.destination()));
    mounts.extend(cri);
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use berth_cri::v1::Mount as CriMount;

    use super::*;

    fn cri_mount(container: &str, host: &str, readonly: bool, prop: MountPropagation) -> CriMount {
        CriMount {
            container_path: container.into(),
            host_path: host.into(),
            readonly,
            propagation: prop as i32,
            ..Default::default()
        }
    }

    fn opts(m: &Mount) -> Vec<String> {
        m.options().clone().unwrap_or_default()
    }

    fn find<'a>(ms: &'a [Mount], dest: &str) -> Option<&'a Mount> {
        ms.iter().find(|m| m.destination() == Path::new(dest))
    }

    #[test]
    fn defaults_and_sandbox_files() {
        let files = SandboxFiles {
            hosts: Some("/run/berth/s/hosts".into()),
            resolv_conf: Some("/run/berth/s/resolv.conf".into()),
            hostname: None,
        };
        let ms = build(&ContainerConfig::default(), &files, false, false, &[], &[]).unwrap();
        let dests: Vec<_> = ms
            .iter()
            .map(|m| m.destination().display().to_string())
            .collect();
        assert_eq!(
            dests,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/sys/fs/cgroup",
                "/etc/hosts",
                "/etc/resolv.conf"
            ]
        );
        assert!(opts(find(&ms, "/sys").unwrap()).contains(&"ro".into()));
        assert_eq!(
            opts(find(&ms, "/etc/hosts").unwrap()),
            ["rbind", "rprivate", "rw"]
        );
        let ms = build(&ContainerConfig::default(), &files, true, true, &[], &[]).unwrap();
        assert!(
            opts(find(&ms, "/sys").unwrap()).contains(&"rw".into()),
            "privileged: rw /sys"
        );
        assert!(opts(find(&ms, "/sys/fs/cgroup").unwrap()).contains(&"rw".into()));
        assert_eq!(
            opts(find(&ms, "/etc/hosts").unwrap()),
            ["rbind", "rprivate", "ro"],
            "read-only rootfs"
        );
    }

    #[test]
    fn cri_mounts_options_and_order() {
        let host = tempfile::tempdir().unwrap();
        let h = host.path().to_str().unwrap();
        let config = ContainerConfig {
            mounts: vec![
                cri_mount(
                    "/data/sub",
                    h,
                    false,
                    MountPropagation::PropagationBidirectional,
                ),
                cri_mount("/data", h, true, MountPropagation::PropagationPrivate),
                cri_mount(
                    "/slave",
                    h,
                    false,
                    MountPropagation::PropagationHostToContainer,
                ),
            ],
            ..Default::default()
        };
        let ms = build(&config, &SandboxFiles::default(), false, false, &[], &[]).unwrap();
        let data = ms
            .iter()
            .position(|m| m.destination() == Path::new("/data"))
            .unwrap();
        let sub = ms
            .iter()
            .position(|m| m.destination() == Path::new("/data/sub"))
            .unwrap();
        assert!(data < sub, "parents first");
        assert_eq!(opts(&ms[data]), ["rbind", "rprivate", "ro"]);
        assert_eq!(opts(&ms[sub]), ["rbind", "rshared", "rw"]);
        assert_eq!(
            opts(find(&ms, "/slave").unwrap()),
            ["rbind", "rslave", "rw"]
        );
        assert_eq!(ms[data].typ().as_deref(), Some("bind"));
        assert_eq!(
            ms[data].source().as_deref(),
            Some(std::fs::canonicalize(h).unwrap().as_path())
        );
        assert_eq!(rootfs_propagation(&config), Some("shared"));
        assert_eq!(rootfs_propagation(&ContainerConfig::default()), None);
    }

    #[test]
    fn cri_mount_overrides_a_default() {
        let host = tempfile::tempdir().unwrap();
        let h = host.path().to_str().unwrap();
        let files = SandboxFiles {
            hosts: Some("/pod/hosts".into()),
            ..Default::default()
        };
        let config = ContainerConfig {
            mounts: vec![
                cri_mount("/dev/shm/", h, false, MountPropagation::PropagationPrivate),
                cri_mount("/etc/hosts", h, true, MountPropagation::PropagationPrivate),
            ],
            ..Default::default()
        };
        let ms = build(&config, &files, false, false, &[], &[]).unwrap();
        let shm: Vec<_> = ms
            .iter()
            .filter(|m| m.destination() == Path::new("/dev/shm"))
            .collect();
        assert_eq!(shm.len(), 1);
        assert_eq!(shm[0].typ().as_deref(), Some("bind"));
        let hosts: Vec<_> = ms
            .iter()
            .filter(|m| m.destination() == Path::new("/etc/hosts"))
            .collect();
        assert_eq!(hosts.len(), 1);
        assert_ne!(hosts[0].source().as_deref(), Some(Path::new("/pod/hosts")));

        // A /dev mount drops every default under /dev.
        let config = ContainerConfig {
            mounts: vec![cri_mount(
                "/dev",
                h,
                false,
                MountPropagation::PropagationPrivate,
            )],
            ..Default::default()
        };
        let ms = build(&config, &SandboxFiles::default(), false, false, &[], &[]).unwrap();
        assert_eq!(
            ms.iter()
                .filter(|m| m.destination().starts_with("/dev"))
                .count(),
            1
        );
    }

    #[test]
    fn bad_cri_mounts_are_refused() {
        let host = tempfile::tempdir().unwrap();
        let h = host.path().to_str().unwrap();
        for (container, hostp) in [
            ("relative", h),
            ("/a/../../etc", h),
            ("/ok", "/nonexistent/berth/x"),
            ("/ok", ""),
            ("/", h),
            ("/proc", h),
            ("//proc/", h),
            ("/proc/sys/kernel", h),
            ("/proc/self", h),
            ("/sys", h),
        ] {
            let config = ContainerConfig {
                mounts: vec![cri_mount(
                    container,
                    hostp,
                    false,
                    MountPropagation::PropagationPrivate,
                )],
                ..Default::default()
            };
            let err = build(&config, &SandboxFiles::default(), false, false, &[], &[]).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{container} {hostp}: {err}"
            );
        }
        // lxcfs-style files below /proc, and paths below /sys, may be covered.
        for container in ["/proc/meminfo", "/sys/fs/bpf"] {
            let config = ContainerConfig {
                mounts: vec![cri_mount(
                    container,
                    h,
                    false,
                    MountPropagation::PropagationPrivate,
                )],
                ..Default::default()
            };
            build(&config, &SandboxFiles::default(), false, false, &[], &[]).unwrap();
        }
        // recursive read-only needs readonly and private propagation.
        for (ro, prop) in [
            (false, MountPropagation::PropagationPrivate),
            (true, MountPropagation::PropagationHostToContainer),
        ] {
            let mut m = cri_mount("/x", h, ro, prop);
            m.recursive_read_only = true;
            let config = ContainerConfig {
                mounts: vec![m],
                ..Default::default()
            };
            assert!(matches!(
                build(&config, &SandboxFiles::default(), false, false, &[], &[]),
                Err(Error::InvalidArgument(_))
            ));
        }
        let mut m = cri_mount("/x", h, true, MountPropagation::PropagationPrivate);
        m.recursive_read_only = true;
        let config = ContainerConfig {
            mounts: vec![m],
            ..Default::default()
        };
        let ms = build(&config, &SandboxFiles::default(), false, false, &[], &[]).unwrap();
        assert_eq!(
            opts(find(&ms, "/x").unwrap()),
            ["rbind", "rprivate", "ro", "rro"]
        );
    }

    #[test]
    fn image_volumes_are_read_only_binds_of_their_mounted_image() {
        let image = |path: &str, readonly: bool| CriMount {
            container_path: path.into(),
            readonly,
            propagation: MountPropagation::PropagationBidirectional as i32,
            image: Some(berth_cri::v1::ImageSpec {
                image: "example.com/data:1".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let config = ContainerConfig {
            mounts: vec![image("/data", false), image("/ro", true)],
            ..Default::default()
        };
        let sources = [
            ImageVolumeSource {
                index: 0,
                source: "/var/lib/berth/containers/c1/image-volumes/0".into(),
            },
            ImageVolumeSource {
                index: 1,
                source: "/var/lib/berth/containers/c1/image-volumes/1/sub".into(),
            },
        ];
        let ms = build(
            &config,
            &SandboxFiles::default(),
            false,
            false,
            &[],
            &sources,
        )
        .unwrap();
        for (dest, source) in [("/data", &sources[0]), ("/ro", &sources[1])] {
            let m = find(&ms, dest).unwrap();
            assert_eq!(opts(m), ["rbind", "rprivate", "ro"], "{dest}");
            assert_eq!(m.source().as_deref(), Some(source.source.as_path()));
        }
        // Their propagation does not make the rootfs shared.
        assert_eq!(rootfs_propagation(&config), None);
        // An image volume berthd did not mount is a bug, not a bind of "".
        let err = build(
            &config,
            &SandboxFiles::default(),
            false,
            false,
            &[],
            &sources[..1],
        )
        .unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{err}");
    }

    #[test]
    fn symlinked_host_path_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("real")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("real"), dir.path().join("link")).unwrap();
        let config = ContainerConfig {
            mounts: vec![cri_mount(
                "/v",
                dir.path().join("link").to_str().unwrap(),
                false,
                MountPropagation::PropagationPrivate,
            )],
            ..Default::default()
        };
        let ms = build(&config, &SandboxFiles::default(), false, false, &[], &[]).unwrap();
        let real = std::fs::canonicalize(dir.path().join("real")).unwrap();
        assert_eq!(
            find(&ms, "/v").unwrap().source().as_deref(),
            Some(real.as_path())
        );
    }

    #[test]
    fn container_paths() {
        assert_eq!(
            clean_container_path("p", "/a//b/./c/").unwrap(),
            PathBuf::from("/a/b/c")
        );
        assert!(clean_container_path("p", "a/b").is_err());
        assert!(clean_container_path("p", "/a/..").is_err());
    }
}
