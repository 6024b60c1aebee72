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
///
/// A test that asks for no CNI (these options left empty, no
/// [`ConfigBase`]) gets `cni.allow_loopback_only = true`: its pods run
/// with loopback only, as scenario tests without networking expect. Any
/// `bin_dirs` or a config base leaves berthd's default (refuse pods
/// without a network); [`ConfigBase::cni`] can set the key either way.
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
    /// The `[cni]` keys these options set, with their TOML values.
    fn toml_keys(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.bin_dirs.is_empty() {
            let dirs: Vec<String> = self.bin_dirs.iter().map(|d| toml_path(d)).collect();
            out.push(("bin_dirs".into(), format!("[{}]", dirs.join(", "))));
        }
        if let Some(secs) = self.plugin_timeout_secs {
            out.push(("plugin_timeout_secs".into(), secs.to_string()));
        }
        if let Some(in_process) = self.in_process {
            out.push(("in_process".into(), in_process.to_string()));
        }
        out
    }
}

/// A path as a TOML string (a JSON string is a valid TOML basic string).
pub fn toml_path(path: &Path) -> String {
    serde_json::to_string(&path.display().to_string()).unwrap()
}

/// What a harness berthd's config starts from besides [`BerthdOptions`]
/// and [`CniOptions`]: a shipped config document and more `[cni]` keys.
/// The harness's own keys (`root_dir`, `state_dir`, `log.level`,
/// `cni.conf_dir` and the [`CniOptions`] ones) are set into the document,
/// replacing its values, so a test runs the shipped config on its
/// temporary dirs.
#[derive(Debug, Clone, Default)]
pub struct ConfigBase {
    /// A config document: `[table]` headers and one-line `key = value`
    /// entries (comments and blank lines are dropped), e.g.
    /// [`dev_config`]; empty for none.
    pub toml: String,
    /// `[cni]` keys with their TOML values, set last:
    /// `("default_bridge", "\"bn1f\"")`.
    pub cni: Vec<(String, String)>,
}

/// `deploy/dev.toml`: the config `scripts/run-berthd` starts berthd with.
pub fn dev_config_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/dev.toml")
}

/// The text of [`dev_config_path`].
pub fn dev_config() -> anyhow::Result<String> {
    let path = dev_config_path();
    std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("read {}: {e}", path.display()))
}

/// A flat TOML document edited by key: top-level entries, then tables in
/// order, each entry `(key, value as written)`.
#[derive(Debug, Default)]
struct FlatToml {
    top: Vec<(String, String)>,
    tables: Vec<(String, Vec<(String, String)>)>,
}

impl FlatToml {
    fn parse(text: &str) -> anyhow::Result<FlatToml> {
        let mut doc = FlatToml::default();
        let mut table: Option<usize> = None;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let n = n + 1;
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            anyhow::ensure!(
                !line.starts_with("[["),
                "line {n}: arrays of tables are not supported: {raw}"
            );
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                let name = name.trim().to_string();
                anyhow::ensure!(
                    !doc.tables.iter().any(|(t, _)| *t == name),
                    "line {n}: table [{name}] appears twice"
                );
                doc.tables.push((name, Vec::new()));
                table = Some(doc.tables.len() - 1);
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                anyhow::bail!("line {n}: not `key = value`: {raw}");
            };
            let (key, value) = (key.trim().to_string(), value.trim().to_string());
            anyhow::ensure!(
                !value.starts_with("\"\"\"")
                    && !value.starts_with("\x27\x27\x27")
                    && (!value.starts_with('[') || value.ends_with(']'))
                    && (!value.starts_with('{') || value.ends_with('}')),
                "line {n}: only one-line values are supported: {raw}"
            );
            let entries = match table {
                Some(i) => &mut doc.tables[i].1,
                None => &mut doc.top,
            };
            entries.push((key, value));
        }
        Ok(doc)
    }

    /// Sets `key` of `table` (`None`: top level), in place if it is there.
    fn set(&mut self, table: Option<&str>, key: &str, value: String) {
        let entries = match table {
            None => &mut self.top,
            Some(name) => {
                let i = match self.tables.iter().position(|(t, _)| t == name) {
                    Some(i) => i,
                    None => {
                        self.tables.push((name.to_string(), Vec::new()));
                        self.tables.len() - 1
                    }
                };
                &mut self.tables[i].1
            }
        };
        match entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => entries.push((key.to_string(), value)),
        }
    }

    /// The value of `key` in `table` (`None`: top level), as written.
    fn get(&self, table: Option<&str>, key: &str) -> Option<&str> {
        let entries = match table {
            None => &self.top,
            Some(name) => &self.tables.iter().find(|(t, _)| t == name)?.1,
        };
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The document with `between` (more TOML) after the top-level keys.
    fn render(&self, between: &str) -> String {
        let mut out = String::new();
        for (k, v) in &self.top {
            out.push_str(&format!("{k} = {v}\n"));
        }
        out.push_str(between);
        for (name, entries) in &self.tables {
            out.push_str(&format!("\n[{name}]\n"));
            for (k, v) in entries {
                out.push_str(&format!("{k} = {v}\n"));
            }
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
    options: BerthdOptions,
    cni_options: CniOptions,
    base: ConfigBase,
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
        Self::start_from(ConfigBase::default(), options, cni_options).await
    }

    /// [`Berthd::start_with_cni`] on a config base (a shipped config file,
    /// more `[cni]` keys).
    pub async fn start_from(
        base: ConfigBase,
        options: BerthdOptions,
        cni_options: CniOptions,
    ) -> anyhow::Result<Berthd> {
        let dir = tempfile::Builder::new().prefix("berth-e2e-").tempdir()?;
        // Searchable like /var/lib and /run, where berthd's dirs normally
        // live: a container in a user namespace reaches its rootfs and its
        // pod's namespace files by path, as nobody to the host's files.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )?;
        let state = dir.path().join("state");
        std::fs::create_dir_all(dir.path().join("cni/net.d"))?;
        let mut d = Berthd {
            socket: state.join("berth.sock"),
            config_path: dir.path().join("config.toml"),
            dir,
            child: None,
            starts: 0,
            options,
            cni_options,
            base,
        };
        std::fs::write(&d.config_path, d.render_config()?)?;
        d.restart().await?;
        Ok(d)
    }

    /// The config file's text for the options and base it was given.
    fn render_config(&self) -> anyhow::Result<String> {
        let mut doc = FlatToml::parse(&self.base.toml)?;
        doc.set(None, "root_dir", toml_path(&self.root_dir()));
        doc.set(None, "state_dir", toml_path(&self.state_dir()));
        doc.set(Some("log"), "level", "\"info,berth_runtime=debug\"".into());
        let asked_for_cni = !self.cni_options.bin_dirs.is_empty() || !self.base.toml.is_empty();
        if !asked_for_cni {
            doc.set(Some("cni"), "allow_loopback_only", "true".into());
        }
        doc.set(Some("cni"), "conf_dir", toml_path(&self.cni_conf_dir()));
        // A base that serves metrics (dev.toml's fixed port) gets a port of
        // its own: other berthds may run at the same time.
        if doc
            .get(Some("metrics"), "address")
            .is_some_and(|a| a != "\"\"")
        {
            doc.set(Some("metrics"), "address", "\"127.0.0.1:0\"".into());
        }
        for (k, v) in self
            .cni_options
            .toml_keys()
            .into_iter()
            .chain(self.base.cni.iter().cloned())
        {
            doc.set(Some("cni"), &k, v);
        }
        let mut between = self.options.extra_toml.clone();
        if !between.is_empty() && !between.ends_with('\n') {
            between.push('\n');
        }
        Ok(doc.render(&between))
    }

    /// Stops berthd, rewrites its config from `base` (same dirs, same
    /// options) and starts it again; reconnect clients afterwards.
    pub async fn reconfigure(&mut self, base: ConfigBase) -> anyhow::Result<()> {
        self.stop();
        self.base = base;
        std::fs::write(&self.config_path, self.render_config()?)?;
        self.restart().await
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
            .version(berth_cri::v1::VersionRequest::default())
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

/// The address berthd's `/metrics` endpoint is bound to, from verbose
/// `Status` (key `metricsAddress`); `None` while metrics are off. Panics
/// when Status fails or lacks the key: the harness cannot go on then.
pub async fn metrics_address(client: &CriClient) -> Option<std::net::SocketAddr> {
    let status = client
        .clone()
        .runtime
        .status(berth_cri::v1::StatusRequest { verbose: true })
        .await
        .expect("verbose Status")
        .into_inner();
    let raw = status
        .info
        .get("metricsAddress")
        .unwrap_or_else(|| panic!("verbose Status has no metricsAddress: {:?}", status.info));
    let address: String = serde_json::from_str(raw)
        .unwrap_or_else(|e| panic!("metricsAddress {raw:?} is not a JSON string: {e}"));
    if address.is_empty() {
        return None;
    }
    Some(
        address
            .parse()
            .unwrap_or_else(|e| panic!("metricsAddress {address:?}: {e}")),
    )
}

/// GET `path` from the metrics endpoint at `addr`: (HTTP status, body).
pub async fn scrape_path(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let path = path.to_string();
    let response =
        tokio::task::spawn_blocking(move || crate::http::get(&addr.to_string(), &path, &[]))
            .await??;
    Ok((
        response.status,
        String::from_utf8_lossy(&response.body).into_owned(),
    ))
}

/// The text of one `/metrics` scrape; panics unless it answered 200.
pub async fn scrape(addr: std::net::SocketAddr) -> String {
    let (status, body) = scrape_path(addr, "/metrics")
        .await
        .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}"));
    assert_eq!(status, 200, "GET http://{addr}/metrics: {body}");
    body
}

/// The value of the sample `series` (name with its labels, exactly as the
/// exposition writes them, e.g. `berth_shims`) in `text`.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
