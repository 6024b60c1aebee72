//! containerd + runc as the benchmark's reference: Debian's packages,
//! installed when missing, started by the benchmark on its own root, state
//! dir and socket, with the CRI plugin pulling from the harness registry
//! (plain HTTP mirror), a pause image built by the harness, and the
//! benchmark's bridge CNI network ([`super::net`], with its safety checks).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cri::CriClient;
use crate::images::{BUSYBOX_BIN, Entry, Image, ImageSettings, build_layer};
use crate::process::OwnedChild;

use super::{host, net};

const SHIM: &str = "containerd-shim-runc-v2";
/// Debian's containerd 1.6 keeps shim sockets and runc state here
/// whatever its root and state dirs are.
const RUN_CONTAINERD: &str = "/run/containerd";
/// libcni's result cache (containerd does not move it).
const VAR_LIB_CNI: &str = "/var/lib/cni";

fn on_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
        || ["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(bin).is_file())
}

/// Installs Debian's `containerd`, `runc` and `containernetworking-plugins`
/// when one of them is missing. A service start during the install is
/// refused (policy-rc.d) so no system containerd comes up.
pub fn ensure_installed() -> anyhow::Result<()> {
    let missing = !on_path("containerd")
        || !on_path("runc")
        || !on_path(SHIM)
        || ["bridge", "host-local", "loopback"]
            .iter()
            .any(|p| !Path::new(net::CNI_BIN_DIR).join(p).exists());
    if !missing {
        return Ok(());
    }
    eprintln!("berth-bench: installing containerd, runc, containernetworking-plugins (apt-get)");
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let made_policy = !policy.exists();
    if made_policy {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(
            policy,
            "#!/bin/sh\n# berth-bench: no service starts during install\nexit 101\n",
        )?;
        std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
    }
    let install = || {
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "containerd",
                "runc",
                "containernetworking-plugins",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
    };
    let mut ok = install().is_ok_and(|s| s.success());
    if !ok {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        ok = install().is_ok_and(|s| s.success());
    }
    if made_policy {
        let _ = std::fs::remove_file(policy);
    }
    anyhow::ensure!(
        ok,
        "apt-get install containerd runc containernetworking-plugins failed"
    );
    Ok(())
}

/// `containerd --version`: the version field (`1.6.20~ds1`).
pub fn version() -> anyhow::Result<String> {
    let out = Command::new("containerd").arg("--version").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .map(String::from)
        .ok_or_else(|| anyhow::anyhow!("unexpected `containerd --version`: {text}"))
}

/// The pause image: busybox-static as `/bin/sleep`, entrypoint
/// `/bin/sleep 2147483647` (a process that stays alive and does nothing,
/// as the real pause does; the sandbox is stopped with SIGKILL).
pub fn pause_image() -> anyhow::Result<Image> {
    let busybox = std::fs::read(BUSYBOX_BIN)
        .map_err(|e| anyhow::anyhow!("read {BUSYBOX_BIN} ({e}): install busybox-static"))?;
    let layer = build_layer(&[
        Entry::dir("bin"),
        Entry::exec("bin/busybox", busybox),
        Entry::symlink("bin/sleep", "busybox"),
    ])?;
    Ok(Image::new(
        vec![layer],
        &ImageSettings {
            entrypoint: vec!["/bin/sleep".into(), "2147483647".into()],
            ..Default::default()
        },
    ))
}

/// The path of containerd's Prometheus endpoint.
pub const METRICS_PATH: &str = "/v1/metrics";

/// `127.0.0.1:PORT` with a port nothing listened on a moment ago.
fn free_loopback_addr() -> anyhow::Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// A containerd started by the benchmark. Dropping it stops containerd,
/// kills shims it left, unmounts what it left under its dirs and deletes
/// the bridge.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub root: PathBuf,
    /// `127.0.0.1:PORT` of its Prometheus endpoint (`/v1/metrics`), on a
    /// port that was free when the config was written.
    pub metrics_addr: String,
    child: Option<OwnedChild>,
    run_containerd_existed: bool,
    var_lib_cni_existed: bool,
}

impl Containerd {
    /// Config version 2 (containerd 1.6/1.7).
    fn config(&self, registry_addr: &str, pause: &str) -> String {
        let d = self.dir.path();
        format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  address = ""
  level = "warn"

[metrics]
  address = "{metrics}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  enable_selinux = false

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1

  [plugins."io.containerd.grpc.v1.cri".registry.mirrors."{reg}"]
    endpoint = ["http://{reg}"]
"#,
            root = self.root.display(),
            state = d.join("state").display(),
            sock = self.socket.display(),
            opt = d.join("opt").display(),
            cni_bin = net::CNI_BIN_DIR,
            cni_conf = d.join("cni/net.d").display(),
            reg = registry_addr,
            metrics = self.metrics_addr,
        )
    }

    /// Checks the network is safe, writes the configs, starts containerd
    /// and waits until it answers `Version`.
    pub async fn start(registry_addr: &str, pause: &str) -> anyhow::Result<Containerd> {
        let version = version()?;
        anyhow::ensure!(
            version.starts_with("1.6") || version.starts_with("1.7"),
            "containerd {version}: the benchmark writes config version 2 (containerd 1.6/1.7)"
        );
        // Network safety first: private ranges must not leave the machine.
        net::prepare()?;

        let dir = tempfile::Builder::new()
            .prefix("berth-bench-containerd-")
            .tempdir()?;
        std::fs::create_dir_all(dir.path().join("cni/net.d"))?;
        let mut c = Containerd {
            socket: dir.path().join("containerd.sock"),
            root: dir.path().join("root"),
            metrics_addr: free_loopback_addr()?,
            dir,
            child: None,
            run_containerd_existed: Path::new(RUN_CONTAINERD).exists(),
            var_lib_cni_existed: Path::new(VAR_LIB_CNI).exists(),
        };
        let cfg = c.dir.path().join("config.toml");
        std::fs::write(&cfg, c.config(registry_addr, pause))?;
        net::write_conflist(
            &c.dir.path().join("cni/net.d"),
            &c.dir.path().join("cni-ipam"),
        )?;
        let log = std::fs::File::create(c.log_path())?;
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = OwnedChild::spawn("containerd", cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_status() {
                anyhow::bail!("containerd exited during start ({s}):\n{}", c.log_tail());
            }
            if std::os::unix::net::UnixStream::connect(&c.socket).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "containerd did not open its socket within 30 s:\n{}",
                    c.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.child = Some(child);
        let mut client = c.client().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match client
                .runtime
                .version(berth_cri::v1::VersionRequest::default())
                .await
            {
                Ok(_) => break,
                Err(e) if Instant::now() >= deadline => {
                    anyhow::bail!("containerd CRI does not answer: {e}\n{}", c.log_tail())
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        Ok(c)
    }

    pub async fn client(&self) -> anyhow::Result<CriClient> {
        CriClient::connect(&self.socket).await
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.pid() as i32)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Shim processes of this containerd.
    pub fn shims(&self) -> Vec<i32> {
        host::processes_matching(SHIM, &self.socket.display().to_string())
    }

    /// Stops containerd and removes whatever it left: shims (and their
    /// children), mounts under its dirs, the bridge, empty dirs it made
    /// under /run/containerd. Idempotent.
    pub fn shutdown(&mut self) -> Vec<String> {
        let mut notes = Vec::new();
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(10));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.shims().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let shims = self.shims();
        if !shims.is_empty() {
            let tree = host::ProcessTree::snapshot();
            let all: BTreeSet<i32> = shims.iter().flat_map(|s| tree.subtree(*s)).collect();
            notes.push(format!("killed {} leftover shim processes", all.len()));
            host::kill_all(&all.into_iter().collect::<Vec<_>>());
            std::thread::sleep(Duration::from_millis(200));
        }
        // runc state of this containerd's tasks (when their shims were
        // killed rather than told to delete them).
        let tasks = self
            .dir
            .path()
            .join("state/io.containerd.runtime.v2.task/k8s.io");
        let ids: Vec<String> = std::fs::read_dir(&tasks)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        for id in &ids {
            let runc = Path::new(RUN_CONTAINERD).join("runc/k8s.io").join(id);
            if runc.exists() {
                let _ = std::fs::remove_dir_all(&runc);
            }
        }
        let n = host::unmount_under(self.dir.path());
        if n > 0 {
            notes.push(format!("unmounted {n} leftover mounts"));
        }
        // libcni's cached results for this network's attachments.
        if let Ok(entries) = std::fs::read_dir(Path::new(VAR_LIB_CNI).join("results")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                // containerd's own loopback network is `cni-loopback`; with
                // no other containerd around (no /run/containerd before
                // this one), every such entry is this one's.
                let ours = name.starts_with("berth-bench-")
                    || (name.starts_with("cni-loopback-") && !self.run_containerd_existed)
                    || ids.iter().any(|id| name == format!("cni-loopback-{id}-lo"));
                if ours {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = net::remove_bridge();
        if !self.run_containerd_existed {
            // Shim sockets nobody listens on any more (ours: the directory
            // did not exist before this containerd).
            if let Ok(entries) = std::fs::read_dir(Path::new(RUN_CONTAINERD).join("s")) {
                for e in entries.flatten() {
                    if std::os::unix::net::UnixStream::connect(e.path()).is_err() {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
            host::remove_empty_dirs(Path::new(RUN_CONTAINERD));
        }
        if !self.var_lib_cni_existed {
            host::remove_empty_dirs(Path::new(VAR_LIB_CNI));
        }
        notes
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for n in self.shutdown() {
            eprintln!("berth-bench: containerd cleanup: {n}");
        }
    }
}
