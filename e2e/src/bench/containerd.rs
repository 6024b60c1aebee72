//! containerd + runc as the benchmark's reference: Debian's packages,
//! installed when missing, started by the benchmark on its own root, state
//! dir and socket, with the CRI plugin pulling from the harness registry
//! (plain HTTP mirror), a pause image built by the harness, and a bridge
//! CNI network of its own.
//!
//! Network safety: before containerd may create a bridge with pod
//! addresses, `net-guard on` must succeed (private ranges cannot leave
//! through the default route); once the first sandbox runs, the route to
//! the pod subnet must go through the benchmark's bridge. The benchmark
//! itself never sends anything to a pod.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cri::CriClient;
use crate::images::{BUSYBOX_BIN, Entry, Image, ImageSettings, build_layer};
use crate::process::OwnedChild;

use super::host;

/// The bridge the benchmark's CNI config makes.
pub const BRIDGE: &str = "bench0";
/// Its subnet: a private /16 like Berth's default pod network, chosen so
/// as not to meet containerd's, podman's or docker's defaults.
pub const SUBNET: &str = "10.231.0.0/16";
/// An address inside [`SUBNET`] whose route must go through [`BRIDGE`].
pub const PROBE_ADDR: &str = "10.231.0.10";
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const SHIM: &str = "containerd-shim-runc-v2";
/// Debian's containerd 1.6 keeps shim sockets and runc state here
/// whatever its root and state dirs are.
const RUN_CONTAINERD: &str = "/run/containerd";
/// libcni's result cache (containerd does not move it).
const VAR_LIB_CNI: &str = "/var/lib/cni";

/// The net-guard script: `$BERTH_NET_GUARD`, else the shared tools dir.
pub fn net_guard_path() -> PathBuf {
    std::env::var_os("BERTH_NET_GUARD")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/tools/net-guard"))
}

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
        || !Path::new(CNI_BIN_DIR).join("bridge").exists()
        || !Path::new(CNI_BIN_DIR).join("host-local").exists()
        || !Path::new(CNI_BIN_DIR).join("loopback").exists();
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

/// A containerd started by the benchmark. Dropping it stops containerd,
/// kills shims it left, unmounts what it left under its dirs and deletes
/// the bridge.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub root: PathBuf,
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
  address = ""

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
            cni_bin = CNI_BIN_DIR,
            cni_conf = d.join("cni/net.d").display(),
            reg = registry_addr,
        )
    }

    /// The bridge network: host-local IPAM over [`SUBNET`], the bridge
    /// holding the gateway address, no masquerading (nothing leaves).
    fn conflist(&self) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "berth-bench",
            "plugins": [{
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "dataDir": self.dir.path().join("cni-ipam").display().to_string(),
                },
            }],
        })
        .to_string()
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
        let guard = net_guard_path();
        let out = Command::new(&guard)
            .arg("on")
            .output()
            .map_err(|e| anyhow::anyhow!("run {} on: {e}", guard.display()))?;
        anyhow::ensure!(
            out.status.success(),
            "{} on failed: {}{}",
            guard.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A bridge of this name is a leftover of an earlier, killed run.
        if host::link_exists(BRIDGE) {
            host::ip(&["link", "del", BRIDGE])?;
        }
        let addrs = host::ip(&["-o", "-4", "addr", "show"])?;
        anyhow::ensure!(
            !addrs.contains(" 10.231."),
            "an interface already has an address in {SUBNET}: {addrs}"
        );

        let dir = tempfile::Builder::new()
            .prefix("berth-bench-containerd-")
            .tempdir()?;
        std::fs::create_dir_all(dir.path().join("cni/net.d"))?;
        let mut c = Containerd {
            socket: dir.path().join("containerd.sock"),
            root: dir.path().join("root"),
            dir,
            child: None,
            run_containerd_existed: Path::new(RUN_CONTAINERD).exists(),
            var_lib_cni_existed: Path::new(VAR_LIB_CNI).exists(),
        };
        let cfg = c.dir.path().join("config.toml");
        std::fs::write(&cfg, c.config(registry_addr, pause))?;
        std::fs::write(
            c.dir.path().join("cni/net.d/10-berth-bench.conflist"),
            c.conflist(),
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
                .version(k8s_cri::v1::VersionRequest::default())
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

    /// The route to the pod subnet must go through the benchmark's bridge
    /// (checked once a sandbox runs, so the bridge exists).
    pub fn check_route(&self) -> anyhow::Result<()> {
        let dev = host::route_dev(PROBE_ADDR)?;
        anyhow::ensure!(
            dev == BRIDGE,
            "the route to {PROBE_ADDR} goes through {dev}, not {BRIDGE}"
        );
        Ok(())
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
        let n = host::unmount_under(self.dir.path());
        if n > 0 {
            notes.push(format!("unmounted {n} leftover mounts"));
        }
        if host::link_exists(BRIDGE) {
            let _ = host::ip(&["link", "del", BRIDGE]);
        }
        if !self.run_containerd_existed {
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
