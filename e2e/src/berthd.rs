//! berthd started by the harness on a temporary root, state dir and socket.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::cri::CriClient;
use crate::process::OwnedChild;

/// Extra config for a harness berthd, as TOML appended to the generated file.
#[derive(Debug, Clone, Default)]
pub struct BerthdOptions {
    pub extra_toml: String,
}

/// Keys of the generated `[cni]` table besides `conf_dir` (which is always
/// `<tmp>/cni/net.d`, see [`Berthd::cni_conf_dir`]). `extra_toml` cannot
/// carry them: a second `[cni]` table is a TOML error.
#[derive(Debug, Clone, Default)]
pub struct CniOptions {
    /// `cni.bin_dirs`, searched in order; empty keeps berthd's default.
    pub bin_dirs: Vec<PathBuf>,
    /// `cni.plugin_timeout_secs`; `None` keeps berthd's default.
    pub plugin_timeout_secs: Option<u64>,
    /// `cni.in_process`; `None` keeps berthd's default (Berth's own plugins
    /// run in-process).
    pub in_process: Option<bool>,
}

impl CniOptions {
    /// The lines of the `[cni]` table these options add.
    fn toml_lines(&self) -> String {
        let mut out = String::new();
        if !self.bin_dirs.is_empty() {
            // A JSON string is a valid TOML basic string.
            let dirs: Vec<String> = self
                .bin_dirs
                .iter()
                .map(|d| serde_json::to_string(&d.display().to_string()).unwrap())
                .collect();
            out.push_str(&format!("bin_dirs = [{}]\n", dirs.join(", ")));
        }
        if let Some(secs) = self.plugin_timeout_secs {
            out.push_str(&format!("plugin_timeout_secs = {secs}\n"));
        }
        if let Some(in_process) = self.in_process {
            out.push_str(&format!("in_process = {in_process}\n"));
        }
        out
    }
}

pub struct Berthd {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub socket: PathBuf,
    child: Option<OwnedChild>,
    starts: u32,
}

/// The directory cargo put the workspace binaries in (next to `deps/`,
/// where the test binary runs from).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    if dir.ends_with("deps") {
        dir.parent().unwrap().to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn berthd_bin() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("BERTHD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("berthd"));
    anyhow::ensure!(
        bin.exists(),
        "{} not found: run `cargo build --workspace --bins` first",
        bin.display()
    );
    Ok(bin)
}

impl Berthd {
    /// Writes a config pointing every dir into a fresh temp dir and starts
    /// berthd, returning once it answers `Version` on its socket.
    pub async fn start(options: BerthdOptions) -> anyhow::Result<Berthd> {
        Self::start_with_cni(options, CniOptions::default()).await
    }

    /// [`Berthd::start`] with CNI plugin dirs and timeout in the generated
    /// `[cni]` table.
    pub async fn start_with_cni(
        options: BerthdOptions,
        cni_options: CniOptions,
    ) -> anyhow::Result<Berthd> {
        let dir = tempfile::Builder::new().prefix("berth-e2e-").tempdir()?;
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        let cni = dir.path().join("cni/net.d");
        std::fs::create_dir_all(&cni)?;
        let config_path = dir.path().join("config.toml");
        std::fs::write(
            &config_path,
            format!(
                "root_dir = \"{}\"\nstate_dir = \"{}\"\n{}\n[log]\nlevel = \"info,berth_runtime=debug\"\n\n[cni]\nconf_dir = \"{}\"\n{}",
                root.display(),
                state.display(),
                options.extra_toml,
                cni.display(),
                cni_options.toml_lines()
            ),
        )?;
        let mut d = Berthd {
            socket: state.join("berth.sock"),
            config_path,
            dir,
            child: None,
            starts: 0,
        };
        d.restart().await?;
        Ok(d)
    }

    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.path().join("cni/net.d")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("berthd.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.pid())
    }

    /// Starts berthd (again) with the same dirs; waits until it serves.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "berthd is still running");
        let mut child = spawn_berthd(&self.config_path, &self.log_path(), self.starts > 0)?;
        self.starts += 1;
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let mut exited = None;
        let mut up = false;
        while std::time::Instant::now() < deadline {
            if let Some(s) = child.try_status() {
                exited = Some(s);
                break;
            }
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(status) = exited {
            anyhow::bail!("berthd exited during start ({status}):\n{}", self.log());
        }
        anyhow::ensure!(
            up,
            "berthd did not open {} within 15 s:\n{}",
            self.socket.display(),
            self.log()
        );
        self.child = Some(child);
        let mut client = self.client().await?;
        client
            .runtime
            .version(k8s_cri::v1::VersionRequest::default())
            .await?;
        Ok(())
    }

    pub async fn client(&self) -> anyhow::Result<CriClient> {
        CriClient::connect(&self.socket).await
    }

    /// SIGTERM and wait: how an operator stops it.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.child
            .take()
            .and_then(|mut c| c.stop(Duration::from_secs(10)))
    }

    /// SIGKILL: how a crash looks.
    pub fn kill9(&mut self) -> Option<ExitStatus> {
        self.child.take().and_then(|mut c| c.kill9())
    }

    /// Runs berthd with these dirs plus `args` to completion (for refusals
    /// and subcommands); returns status and stderr.
    pub fn run_once(&self, args: &[&str]) -> anyhow::Result<(ExitStatus, String)> {
        let out = Command::new(berthd_bin()?)
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn root_dir(&self) -> PathBuf {
        self.dir.path().join("root")
    }
}

fn spawn_berthd(config: &Path, log: &Path, append: bool) -> anyhow::Result<OwnedChild> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(log)?;
    let mut cmd = Command::new(berthd_bin()?);
    cmd.arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    cmd.env_remove("RUST_LOG");
    OwnedChild::spawn("berthd", cmd)
}

impl Drop for Berthd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.stop(Duration::from_secs(10));
        }
        if std::thread::panicking() {
            eprintln!(
                "---- berthd log ({}) ----\n{}",
                self.log_path().display(),
                self.log()
            );
        }
    }
}
