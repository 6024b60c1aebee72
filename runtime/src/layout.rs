//! Where berthd keeps what, in one place: every path of the on-disk layout
//! is derived here from the root dir (persistent) and the state dir
//! (tmpfs, gone at reboot).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    pub root_dir: PathBuf,
    pub state_dir: PathBuf,
}

impl Layout {
    pub fn new(root_dir: &Path, state_dir: &Path) -> Layout {
        Layout {
            root_dir: root_dir.to_path_buf(),
            state_dir: state_dir.to_path_buf(),
        }
    }

    /// `<root>/meta.redb`: the records berthd restarts from.
    pub fn store(&self) -> PathBuf {
        self.root_dir.join("meta.redb")
    }

    /// `<root>/containers`: one dir per container (rootfs, upper, work).
    pub fn containers(&self) -> PathBuf {
        self.root_dir.join("containers")
    }

    pub fn container(&self, id: &str) -> PathBuf {
        self.containers().join(id)
    }

    /// `<state>/shims`: one dir per container's shim (config.pb, shim.sock,
    /// shim.pid, exit.pb, bundle/).
    pub fn shims(&self) -> PathBuf {
        self.state_dir.join("shims")
    }

    pub fn shim(&self, id: &str) -> PathBuf {
        self.shims().join(id)
    }

    /// `<state>/sandboxes`: one dir per sandbox (pinned namespaces, hosts,
    /// resolv.conf, hostname, breadcrumbs).
    pub fn sandboxes(&self) -> PathBuf {
        self.state_dir.join("sandboxes")
    }

    pub fn sandbox(&self, id: &str) -> PathBuf {
        self.sandboxes().join(id)
    }

    /// `<state>/cni`: cached CNI ADD results, `<sandbox id>.json`.
    pub fn cni_cache(&self) -> PathBuf {
        self.state_dir.join("cni")
    }

    /// `<state>/runtime`: libcontainer's state.
    pub fn runtime_root(&self) -> PathBuf {
        self.state_dir.join("runtime")
    }
}
