//! A container in a pod's user namespace sees the image's and the volumes'
//! files through idmapped mounts (nothing is chowned): each image layer is
//! mounted idmapped under `<container dir>/lower/N` (an image volume's
//! under `<container dir>/image-volumes/<index>-lower/N`) and the overlay
//! is built on those (an overlay cannot be idmapped itself); each bind
//! mount's source is mounted idmapped under `<container dir>/mounts/N` and
//! the spec points there. All of them sit in the container dir, so its
//! removal unmounts them first.

use std::path::{Path, PathBuf};

use berth_cri::v1::ContainerConfig;
use oci_spec::runtime::Spec;

use crate::error::{Error, IoContext, Result};
use crate::host::{Host, IdmapWith};
use crate::oci::UserNamespaceInput;
use crate::userns::IdMappings;

/// The image's layer dirs (top first), mounted idmapped for the pod's user
/// namespace as `<under>/N`; what to build the overlay on.
pub fn layers(
    host: &dyn Host,
    under: &Path,
    lower: &[PathBuf],
    userns: &UserNamespaceInput,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::with_capacity(lower.len());
    for (i, layer) in lower.iter().enumerate() {
        let target = under.join(i.to_string());
        std::fs::create_dir_all(&target).context(|| format!("create {}", target.display()))?;
        host.idmapped_bind(layer, &target, IdmapWith::Pinned(&userns.path), false)?;
        out.push(target);
    }
    Ok(out)
}

/// Gives the overlay's upper dir to the namespace's root, so that root in
/// the container owns `/`.
pub fn give_upper(host: &dyn Host, upper: &Path, userns: &UserNamespaceInput) -> Result<()> {
    let (uid, gid) = root_of(&userns.mappings);
    host.give_to(upper, uid, gid)
}

/// The host ids of root in the namespace (checked to be mapped at RunPodSandbox).
fn root_of(mappings: &IdMappings) -> (u32, u32) {
    (
        mappings.host_uid(0).unwrap_or(u32::MAX),
        mappings.host_gid(0).unwrap_or(u32::MAX),
    )
}

/// The container's setup runs as the namespace's root, which is nobody to
/// the host's files, and reaches the rootfs, its mount sources (all in the
/// container dir) and the pod's namespace files by path: every directory
/// above them must be searchable by others.
pub fn check_reachable(container_dir: &Path, userns: &UserNamespaceInput) -> Result<()> {
    check_searchable(container_dir)?;
    match userns.path.parent() {
        Some(ns_dir) => check_searchable(ns_dir),
        None => Ok(()),
    }
}

/// Every directory from `/` down to `dir` is searchable by others.
fn check_searchable(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for ancestor in dir.ancestors() {
        if ancestor.as_os_str().is_empty() {
            continue;
        }
        let mode = std::fs::metadata(ancestor)
            .context(|| format!("stat {}", ancestor.display()))?
            .permissions()
            .mode();
        if mode & 0o001 == 0 {
            return Err(Error::FailedPrecondition(format!(
                "{} (mode {:o}) is not searchable by others, so a container in a user \
                 namespace cannot reach its rootfs below it: chmod o+x it",
                ancestor.display(),
                mode & 0o7777
            )));
        }
    }
    Ok(())
}

/// Points each bind mount of `spec` that needs it at an idmapped mount of
/// its source: those of a container in a pod user namespace (the pod's
/// mappings), and CRI mounts with mappings of their own (those). Cgroup,
/// /dev, /proc and /sys binds are the kernel's and stay as they are, and
/// image volumes (in the container dir) are idmapped already.
pub fn mounts(
    host: &dyn Host,
    container_dir: &Path,
    config: &ContainerConfig,
    userns: Option<&UserNamespaceInput>,
    spec: &mut Spec,
) -> Result<()> {
    let mut own: Vec<(PathBuf, IdMappings)> = Vec::new();
    for m in &config.mounts {
        if m.uid_mappings.is_empty() && m.gid_mappings.is_empty() {
            continue;
        }
        let what = format!("mount {}", m.container_path);
        own.push((
            crate::oci::clean_container_path("mount container_path", &m.container_path)?,
            IdMappings::from_cri(&what, &m.uid_mappings, &m.gid_mappings)?,
        ));
    }
    if userns.is_none() && own.is_empty() {
        return Ok(());
    }
    let mut mounts = spec.mounts().clone().unwrap_or_default();
    let mut made = 0usize;
    for m in mounts.iter_mut() {
        if m.typ().as_deref() != Some("bind") {
            continue;
        }
        let Some(source) = m.source().clone() else {
            continue;
        };
        if ["/sys", "/proc", "/dev"]
            .iter()
            .any(|k| source.starts_with(k))
            || source.starts_with(container_dir)
        {
            continue;
        }
        let explicit = own.iter().find(|(dest, _)| dest == m.destination());
        let with = match (explicit, userns) {
            (Some((_, maps)), _) => IdmapWith::Mappings(maps),
            (None, Some(u)) => IdmapWith::Pinned(&u.path),
            (None, None) => continue,
        };
        let options = m.options().clone().unwrap_or_default();
        if options.iter().any(|o| o == "rslave" || o == "rshared") {
            return Err(Error::InvalidArgument(format!(
                "mount {}: HOST_TO_CONTAINER and BIDIRECTIONAL propagation cannot reach an \
                 idmapped mount (a pod with a user namespace, or a mount with id mappings)",
                m.destination().display()
            )));
        }
        let target = container_dir.join("mounts").join(made.to_string());
        made += 1;
        let parent = target.parent().expect("has a parent");
        std::fs::create_dir_all(parent).context(|| format!("create {}", parent.display()))?;
        if source.is_dir() {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(drop)
        }
        .context(|| format!("create {}", target.display()))?;
        host.idmapped_bind(&source, &target, with, options.iter().any(|o| o == "rbind"))?;
        m.set_source(Some(target));
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}
