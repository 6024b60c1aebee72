//! The kernel and process boundary of the lifecycle code: mounts, pinned
//! namespaces, cgroups, the infra process, shims, the libcontainer helper
//! and CNI. Sandbox and container lifecycles (and their undo paths) call
//! only this trait, so they run against [`RealHost`] in berthd and against
//! the recording fake in unit tests, without root.

use crate::process::NoInheritedFds;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use berth_cri::v1::PodSandboxConfig;
use berth_proto::shim::{shim_request, shim_response};
use nix::mount::{MntFlags, MsFlags, mount, umount2};

use crate::container::shim;
use crate::error::{Error, Result};
use crate::network::Network;
use crate::process::ProcessIdentity;
use crate::sandbox::namespaces::{self, Kind, NamespaceSetup};

pub trait Host: Send + Sync + 'static {
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<()>;
    /// Mounts image layers (top first) read-only at `target`: an overlay
    /// of lower dirs only, or a read-only bind of a single layer (overlayfs
    /// without an upper dir needs two lower dirs).
    fn mount_readonly_layers(&self, lower: &[PathBuf], target: &Path) -> Result<()>;
    /// Unmounts `target`; fine if nothing is mounted there.
    fn unmount(&self, target: &Path) -> Result<()>;
    /// Unmounts every mount at or below `dir`, deepest first, and fails if
    /// one stays: a tree is removed only once nothing is mounted in it (a
    /// recursive delete would otherwise go into an image layer or a volume).
    fn unmount_all_under(&self, dir: &Path) -> Result<()>;
    /// Whether the filesystem of `dir` takes idmapped mounts (tried once,
    /// in a scratch dir under it).
    fn supports_idmapped_mounts(&self, dir: &Path) -> bool;
    /// Makes `path` (a dir berthd made) owned by `uid`:`gid`.
    fn give_to(&self, path: &Path, uid: u32, gid: u32) -> Result<()>;
    /// Mounts `source` at `target` (which exists), its files' owners shown
    /// through a user namespace's mappings; `recursive` takes submounts.
    fn idmapped_bind(
        &self,
        source: &Path,
        target: &Path,
        with: IdmapWith<'_>,
        recursive: bool,
    ) -> Result<()>;

    /// Creates the pod's namespaces and pins them under `dir`; on error
    /// nothing stays pinned.
    fn pin_namespaces(&self, dir: &Path, setup: NamespaceSetup) -> Result<Vec<(Kind, PathBuf)>>;
    /// Unpins a namespace; fine if it is not pinned.
    fn unpin_namespace(&self, path: &Path) -> Result<()>;
    fn is_pinned(&self, path: &Path) -> bool;

    /// Creates cgroup `path`; whether it did not exist before.
    fn create_cgroup(&self, path: &str) -> Result<bool>;
    fn remove_cgroup(&self, path: &str) -> Result<()>;
    fn add_to_cgroup(&self, path: &str, pid: i32) -> Result<()>;
    fn apply_resources(&self, path: &str, resources: &berth_cgroup::Resources) -> Result<()>;

    /// Starts the infra process of a shared PID namespace, inside the
    /// pinned user namespace `userns` when the pod has one.
    fn start_infra(&self, log: &Path, userns: Option<&Path>) -> Result<ProcessIdentity>;
    /// Kills the infra process if it is still the one identified.
    fn stop_infra(&self, infra: &ProcessIdentity);
    fn is_alive(&self, process: &ProcessIdentity) -> bool;

    /// Starts the shim whose config is in `dir` (it creates container
    /// `id`); returns its monitor's identity.
    fn launch_shim(&self, dir: &Path, id: &str) -> Result<ProcessIdentity>;
    fn call_shim(
        &self,
        dir: &Path,
        request: shim_request::Request,
        timeout: Duration,
    ) -> Result<shim_response::Response>;
    /// Whether a shim answers in `dir` (for remains without a record).
    fn shim_answers(&self, dir: &Path) -> bool;
    /// Deletes what libcontainer keeps of container `id` under `root`.
    fn delete_container(&self, root: &Path, id: &str) -> Result<()>;

    fn network_setup(
        &self,
        sandbox_id: &str,
        netns: &Path,
        config: &PodSandboxConfig,
    ) -> Result<Vec<String>>;
    /// Idempotent: without a cached ADD it does nothing.
    fn network_teardown(&self, sandbox_id: &str) -> Result<()>;
    /// What is wrong with a ready pod's network, if anything.
    fn network_check(&self, sandbox_id: &str, netns: &Path, pod_ips: &[String]) -> Option<String>;
}

/// The user namespace whose mappings an idmapped mount shows.
#[derive(Debug, Clone, Copy)]
pub enum IdmapWith<'a> {
    /// A pinned namespace file (the pod's).
    Pinned(&'a Path),
    /// A namespace made for the mount with these mappings.
    Mappings(&'a crate::userns::IdMappings),
}

/// The host berthd runs on.
pub struct RealHost {
    pub cgroups: Arc<berth_cgroup::Cgroups>,
    pub network: Arc<Network>,
    /// For the CNI calls, which are async, made from blocking threads.
    pub rt: tokio::runtime::Handle,
}

impl Host for RealHost {
    fn mount_overlay(
        &self,
        lower: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<()> {
        if lower.is_empty() {
            return Err(Error::BadImage("image has no layers".into()));
        }
        let lowerdir = lower
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let options = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|e| {
            Error::io(
                format!("mount overlay rootfs at {}", target.display()),
                e.into(),
            )
        })
    }

    fn mount_readonly_layers(&self, lower: &[PathBuf], target: &Path) -> Result<()> {
        let failed = |what: &str, e: nix::errno::Errno| {
            Error::io(format!("{what} at {}", target.display()), e.into())
        };
        match lower {
            [] => Err(Error::BadImage("image has no layers".into())),
            [layer] => {
                mount(
                    Some(layer.as_path()),
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| failed("bind-mount the image layer", e))?;
                // A bind is made read-only only by a remount.
                let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
                    let _ = self.unmount(target);
                    return Err(failed("make the image layer read-only", e));
                }
                Ok(())
            }
            _ => {
                let lowerdir = lower
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":");
                mount(
                    Some("overlay"),
                    target,
                    Some("overlay"),
                    MsFlags::MS_RDONLY,
                    Some(format!("lowerdir={lowerdir}").as_str()),
                )
                .map_err(|e| failed("mount the image's read-only overlay", e))
            }
        }
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::io(format!("unmount {}", target.display()), e.into())),
        }
    }

    fn unmount_all_under(&self, dir: &Path) -> Result<()> {
        // Stacked mounts show one at a time; a few rounds take them all.
        for _ in 0..8 {
            let mut targets = mounts_under(dir)?;
            if targets.is_empty() {
                return Ok(());
            }
            targets.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
            for target in targets {
                self.unmount(&target)?;
            }
        }
        match mounts_under(dir)?.first() {
            None => Ok(()),
            Some(left) => Err(Error::Internal(format!(
                "{} is still mounted after unmounting everything under {}",
                left.display(),
                dir.display()
            ))),
        }
    }

    fn supports_idmapped_mounts(&self, dir: &Path) -> bool {
        crate::userns::probe_idmapped_mounts(dir)
    }

    fn give_to(&self, path: &Path, uid: u32, gid: u32) -> Result<()> {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| Error::io(format!("chown {} to {uid}:{gid}", path.display()), e))
    }

    fn idmapped_bind(
        &self,
        source: &Path,
        target: &Path,
        with: IdmapWith<'_>,
        recursive: bool,
    ) -> Result<()> {
        use std::os::fd::AsFd;
        let userns: std::os::fd::OwnedFd = match with {
            IdmapWith::Pinned(path) => std::fs::File::open(path)
                .map_err(|e| Error::io(format!("open {}", path.display()), e))?
                .into(),
            IdmapWith::Mappings(mappings) => crate::userns::open_with(mappings)?,
        };
        crate::userns::idmapped_bind(source, target, userns.as_fd(), recursive)
    }

    fn pin_namespaces(&self, dir: &Path, setup: NamespaceSetup) -> Result<Vec<(Kind, PathBuf)>> {
        namespaces::create(dir, setup)
    }

    fn unpin_namespace(&self, path: &Path) -> Result<()> {
        namespaces::unpin(path)
    }

    fn is_pinned(&self, path: &Path) -> bool {
        namespaces::is_pinned(path)
    }

    fn create_cgroup(&self, path: &str) -> Result<bool> {
        Ok(self.cgroups.create(path)?)
    }

    fn remove_cgroup(&self, path: &str) -> Result<()> {
        Ok(self.cgroups.remove(path)?)
    }

    fn add_to_cgroup(&self, path: &str, pid: i32) -> Result<()> {
        Ok(self.cgroups.add_process(path, pid)?)
    }

    fn apply_resources(&self, path: &str, resources: &berth_cgroup::Resources) -> Result<()> {
        Ok(self.cgroups.apply(path, resources)?)
    }

    fn start_infra(&self, log: &Path, userns: Option<&Path>) -> Result<ProcessIdentity> {
        crate::sandbox::infra::start(&shim::shim_binary(), log, userns)
    }

    fn stop_infra(&self, infra: &ProcessIdentity) {
        crate::sandbox::infra::stop(infra)
    }

    fn is_alive(&self, process: &ProcessIdentity) -> bool {
        process.is_alive()
    }

    fn launch_shim(&self, dir: &Path, id: &str) -> Result<ProcessIdentity> {
        shim::launch(dir, id)
    }

    fn call_shim(
        &self,
        dir: &Path,
        request: shim_request::Request,
        timeout: Duration,
    ) -> Result<shim_response::Response> {
        shim::call(dir, request, timeout)
    }

    fn shim_answers(&self, dir: &Path) -> bool {
        shim::answers(dir)
    }

    fn delete_container(&self, root: &Path, id: &str) -> Result<()> {
        let helper = shim::container_helper_binary();
        let out = std::process::Command::new(&helper)
            .no_inherited_fds()
            .arg("--root")
            .arg(root)
            .args(["delete", id])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|e| Error::io(format!("run {}", helper.display()), e))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::Internal(format!(
                "{} delete {id}: {}: {}",
                helper.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    fn network_setup(
        &self,
        sandbox_id: &str,
        netns: &Path,
        config: &PodSandboxConfig,
    ) -> Result<Vec<String>> {
        self.rt
            .block_on(self.network.setup(sandbox_id, netns, config))
    }

    fn network_teardown(&self, sandbox_id: &str) -> Result<()> {
        self.rt.block_on(self.network.teardown(sandbox_id))
    }

    fn network_check(&self, sandbox_id: &str, netns: &Path, pod_ips: &[String]) -> Option<String> {
        self.network.check(sandbox_id, netns, pod_ips)
    }
}

#[cfg(test)]
pub mod fake;

/// The mount points at or below `dir` in berthd's mount namespace.
fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::io("read /proc/self/mountinfo", e))?;
    Ok(parse_mount_points(&text)
        .into_iter()
        .filter(|p| p.starts_with(dir))
        .collect())
}

/// The mount point (fifth field) of each `/proc/self/mountinfo` line, with
/// the kernel's octal escapes (`\040` for a space) decoded.
fn parse_mount_points(text: &str) -> Vec<PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    text.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| {
            let raw = field.as_bytes();
            let mut out = Vec::with_capacity(raw.len());
            let mut i = 0;
            while i < raw.len() {
                let octal = raw
                    .get(i + 1..i + 4)
                    .filter(|d| raw[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
                match octal {
                    Some(d) => {
                        out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                        i += 4;
                    }
                    None => {
                        out.push(raw[i]);
                        i += 1;
                    }
                }
            }
            PathBuf::from(std::ffi::OsString::from_vec(out))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_with_their_escapes_decoded() {
        let text = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
95 22 0:50 / /var/lib/berth/containers/c1/rootfs rw shared:50 - overlay overlay rw,lowerdir=a
96 22 0:51 / /var/lib/berth/containers/c1/my\\040dir rw - tmpfs tmpfs rw
";
        assert_eq!(
            parse_mount_points(text),
            vec![
                PathBuf::from("/"),
                PathBuf::from("/var/lib/berth/containers/c1/rootfs"),
                PathBuf::from("/var/lib/berth/containers/c1/my dir"),
            ]
        );
    }
}
