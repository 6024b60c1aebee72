//! Image volumes (CRI `Mount.image`, KEP-4639): the files of an image
//! kubelet already pulled, mounted read-only into a container. berthd mounts
//! the image's layers under the container's dir (so removing the container
//! unmounts them before deleting the dir), and the spec bind-mounts that,
//! or a subdirectory of it, into the container.

use std::path::{Component, Path, PathBuf};

use berth_cri::v1::ContainerConfig;

use crate::daemon::Daemon;
use crate::error::{Error, IoContext, Result};
use crate::oci::{self, ImageVolumeSource};
use crate::store::{ImageRecord, ImageVolume};
use crate::undo::Undo;

/// An image volume of a CreateContainer request, checked: its image is
/// present and its sub path well formed.
pub(super) struct Requested {
    /// Its index in `ContainerConfig.mounts`.
    index: usize,
    container_path: String,
    image: ImageRecord,
    /// Relative, without `..`; `None` for the image's root.
    sub_path: Option<PathBuf>,
}

impl Requested {
    /// The snapshots it mounts.
    pub(super) fn chain_ids(&self) -> &[String] {
        &self.image.chain_ids
    }

    /// What the container record keeps of it.
    pub(super) fn record(&self) -> ImageVolume {
        ImageVolume {
            container_path: self.container_path.clone(),
            image_id: self.image.id.clone(),
            chain_ids: self.image.chain_ids.clone(),
        }
    }
}

/// The image volumes `config` asks for, checked before anything exists.
pub(super) fn check(daemon: &Daemon, config: &ContainerConfig) -> Result<Vec<Requested>> {
    let mut out = Vec::new();
    for (index, m) in config.mounts.iter().enumerate() {
        if !oci::is_image_volume(m) {
            continue;
        }
        if !m.host_path.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "mount {}: an image volume has no host_path (got {:?})",
                m.container_path, m.host_path
            )));
        }
        let image = super::resolve_image(
            daemon,
            m.image.as_ref(),
            &format!("mount {}", m.container_path),
        )?;
        out.push(Requested {
            index,
            container_path: m.container_path.clone(),
            image,
            sub_path: check_sub_path(&m.container_path, &m.image_sub_path)?,
        });
    }
    Ok(out)
}

/// `image_sub_path`: relative and without `..` (symlinks are resolved
/// inside the image when it is mounted). `None` for the image's root.
fn check_sub_path(container_path: &str, sub_path: &str) -> Result<Option<PathBuf>> {
    let p = Path::new(sub_path);
    if p.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "mount {container_path}: image_sub_path {sub_path:?} must be relative to the image's root"
        )));
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(Error::InvalidArgument(format!(
                    "mount {container_path}: image_sub_path {sub_path:?} must not contain \"..\""
                )));
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Mounts each requested image read-only under the container's dir, at
/// `image-volumes/<index>`, registering each unmount on `undo`; returns
/// what the spec bind-mounts (the sub path resolved inside the image).
pub(super) fn mount(
    daemon: &Daemon,
    container_dir: &Path,
    requested: &[Requested],
    userns: Option<&oci::UserNamespaceInput>,
    undo: &mut Undo,
) -> Result<Vec<ImageVolumeSource>> {
    let mut out = Vec::with_capacity(requested.len());
    for r in requested {
        let target = container_dir
            .join("image-volumes")
            .join(r.index.to_string());
        std::fs::create_dir_all(&target).context(|| format!("create {}", target.display()))?;
        let mut lower = daemon.images.lower_dirs(&r.image);
        if let Some(userns) = userns {
            let under = container_dir
                .join("image-volumes")
                .join(format!("{}-lower", r.index));
            lower = super::idmap::layers(daemon.host.as_ref(), &under, &lower, userns)?;
        }
        daemon.host.mount_readonly_layers(&lower, &target)?;
        {
            let target = target.clone();
            let host = daemon.host.clone();
            undo.push(format!("unmount {}", target.display()), move || {
                host.unmount(&target)
            });
        }
        let source = match &r.sub_path {
            None => target,
            Some(sub) => resolve_sub_path(&target, sub, r)?,
        };
        out.push(ImageVolumeSource {
            index: r.index,
            source,
        });
    }
    Ok(out)
}

/// The host path of `sub` inside the mounted image at `root`, its symlinks
/// resolved inside the image (never out of it).
fn resolve_sub_path(root: &Path, sub: &Path, r: &Requested) -> Result<PathBuf> {
    oci::inroot::resolve(root, sub).map_err(|e| {
        let image = r.image.repo_tags.first().unwrap_or(&r.image.id);
        let why = match e.raw_os_error() {
            Some(libc::ENOENT | libc::ENOTDIR) => "does not exist in the image",
            Some(libc::ELOOP) => "is a symlink loop in the image",
            // Not the request's fault.
            _ => {
                return Error::io(
                    format!(
                        "resolve image_sub_path {:?} in {} ({image})",
                        sub.display(),
                        root.display()
                    ),
                    e,
                );
            }
        };
        Error::InvalidArgument(format!(
            "mount {}: image_sub_path {:?} {why} {image}",
            r.container_path,
            sub.display(),
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn sub_paths_are_relative_without_dotdot() {
        assert_eq!(check_sub_path("/v", "").unwrap(), None);
        assert_eq!(check_sub_path("/v", ".").unwrap(), None);
        assert_eq!(
            check_sub_path("/v", "./a//b/").unwrap(),
            Some(PathBuf::from("a/b"))
        );
        for bad in ["/etc", "..", "a/../b", "a/..", "../a"] {
            let err = check_sub_path("/v", bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad}: {err}");
            assert!(err.to_string().contains("image_sub_path"), "{err}");
        }
    }

    fn requested() -> Requested {
        Requested {
            index: 0,
            container_path: "/v".into(),
            image: ImageRecord {
                id: "sha256:1".into(),
                repo_tags: vec!["example.com/data:1".into()],
                ..Default::default()
            },
            sub_path: None,
        }
    }

    #[test]
    fn sub_paths_resolve_inside_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        let image = dir.path().join("image");
        std::fs::create_dir_all(image.join("data/sub")).unwrap();
        std::fs::create_dir_all(outside.join("secret")).unwrap();
        let image = std::fs::canonicalize(image).unwrap();
        symlink("/data", image.join("abs")).unwrap();
        symlink("../../../../data/sub", image.join("data/up")).unwrap();
        symlink(&outside, image.join("escape")).unwrap();
        let r = requested();
        let resolve = |p: &str| resolve_sub_path(&image, Path::new(p), &r);
        assert_eq!(resolve("data/sub").unwrap(), image.join("data/sub"));
        assert_eq!(resolve("abs/sub").unwrap(), image.join("data/sub"));
        // `..` in a symlink stops at the image's root.
        assert_eq!(resolve("data/up").unwrap(), image.join("data/sub"));
        // A symlink to a host dir names that dir inside the image: missing.
        let err = resolve("escape/secret").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(
            err.to_string().contains("does not exist in the image"),
            "{err}"
        );
        let err = resolve("missing").unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("example.com/data:1"), "{err}");
    }
}
