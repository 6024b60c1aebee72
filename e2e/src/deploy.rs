//! The operator path: the Berth node image that `deploy/image/files` lists,
//! built with the harness image builder ([`crate::images`]) and pushed with
//! skopeo; the same files as a plain tree; a temporary host root and a
//! private mount namespace in which that root is the host's; berthd started
//! the way `deploy/systemd/berthd.service` starts it; the manifests read
//! through Debian's python3-yaml; and a cached venv with the Kubernetes
//! schema validator from PyPI.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::images::{self, Compression, Entry, Image, ImageSettings, Platform};
use crate::process::OwnedChild;

/// The repository this crate was built from.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the repository")
        .to_path_buf()
}

/// Where a file of the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A built binary, by name (looked up in the bin dir).
    Bin(String),
    /// A file of the repository, relative to its root.
    Repo(PathBuf),
}

/// One line of `deploy/image/files`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFile {
    /// The path in the image, relative (`berth/bin/berthd`).
    pub path: String,
    pub mode: u32,
    pub source: Source,
}

impl ImageFile {
    /// The file the image gets, given the repository and the bin dir.
    pub fn source_path(&self, repo: &Path, bin_dir: &Path) -> PathBuf {
        match &self.source {
            Source::Bin(name) => bin_dir.join(name),
            Source::Repo(rel) => repo.join(rel),
        }
    }
}

/// The image's file list, `deploy/image/files` of `repo`.
pub fn image_files(repo: &Path) -> anyhow::Result<Vec<ImageFile>> {
    let list = repo.join("deploy/image/files");
    let text = std::fs::read_to_string(&list)
        .map_err(|e| anyhow::anyhow!("read {}: {e}", list.display()))?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [path, mode, source] = fields[..] else {
            anyhow::bail!(
                "{}:{}: want `<path> <mode> <source>`, got {line:?}",
                list.display(),
                n + 1
            );
        };
        let mode = u32::from_str_radix(mode, 8)
            .map_err(|e| anyhow::anyhow!("{}:{}: mode {mode:?}: {e}", list.display(), n + 1))?;
        anyhow::ensure!(
            !path.starts_with('/') && !path.split('/').any(|c| c == ".." || c.is_empty()),
            "{}:{}: {path:?} must be a plain relative path",
            list.display(),
            n + 1
        );
        let source = match source.strip_prefix("bin:") {
            Some(name) => Source::Bin(name.to_string()),
            None => Source::Repo(PathBuf::from(source)),
        };
        out.push(ImageFile {
            path: path.to_string(),
            mode,
            source,
        });
    }
    Ok(out)
}

/// The version written to `berth/VERSION` in the image.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The layer entries of the Berth files: every parent directory, then the
/// files of the list, then `berth/VERSION`.
pub fn berth_entries(repo: &Path, bin_dir: &Path) -> anyhow::Result<Vec<Entry>> {
    let files = image_files(repo)?;
    let mut dirs = std::collections::BTreeSet::new();
    for f in &files {
        let mut p = Path::new(&f.path).parent();
        while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(d.to_string_lossy().into_owned());
            p = d.parent();
        }
    }
    let mut entries: Vec<Entry> = dirs.iter().map(|d| Entry::dir(d)).collect();
    for f in &files {
        let src = f.source_path(repo, bin_dir);
        let data = std::fs::read(&src).map_err(|e| {
            anyhow::anyhow!(
                "read {} for {} ({e}){}",
                src.display(),
                f.path,
                if matches!(f.source, Source::Bin(_)) {
                    ": build the binaries first (cargo build --release --workspace --bins)"
                } else {
                    ""
                }
            )
        })?;
        entries.push(Entry::File {
            path: f.path.clone(),
            mode: f.mode,
            data,
        });
    }
    entries.push(Entry::file("berth/VERSION", format!("{VERSION}\n")));
    Ok(entries)
}

/// The node image: Debian's busybox-static (the shell berth-node runs
/// with), then the Berth files, for this machine's platform. Its default
/// command is `berth-node install`.
pub fn node_image(repo: &Path, bin_dir: &Path, compression: Compression) -> anyhow::Result<Image> {
    let base = images::busybox_layer_with(compression)?;
    let berth = images::build_layer_with(&berth_entries(repo, bin_dir)?, compression)?;
    Image::build(
        vec![base, berth],
        &ImageSettings {
            cmd: vec!["/berth/berth-node".into(), "install".into()],
            ..Default::default()
        },
        images::ManifestFormat::Oci,
        &Platform::host(),
    )
}

/// Writes the image's Berth files as a plain tree under `dest`
/// (`dest/berth/berth-node`, ...), with their modes.
pub fn write_tree(repo: &Path, bin_dir: &Path, dest: &Path) -> anyhow::Result<()> {
    for entry in berth_entries(repo, bin_dir)? {
        match entry {
            Entry::Dir { path, mode } => {
                let p = dest.join(path);
                std::fs::create_dir_all(&p)?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
            }
            Entry::File { path, mode, data } => {
                let p = dest.join(path);
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&p, data)?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
            }
            other => anyhow::bail!("unexpected entry in the Berth files: {other:?}"),
        }
    }
    Ok(())
}

/// Pushes `image` to `reference` (`host[:port]/repo:tag`) with skopeo from
/// an OCI layout in `work`; `insecure`: plain http / no TLS verification.
/// Credentials come from skopeo's own auth file (`skopeo login`).
pub fn push(image: &Image, reference: &str, work: &Path, insecure: bool) -> anyhow::Result<()> {
    let layout = work.join("berth-node-image");
    let _ = std::fs::remove_dir_all(&layout);
    image.write_layout(&layout, "berth")?;
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--quiet", "--preserve-digests"]);
    if insecure {
        cmd.arg("--dest-tls-verify=false");
    }
    cmd.arg(format!("oci:{}:berth", layout.display()))
        .arg(format!("docker://{reference}"));
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("run skopeo (install Debian's skopeo): {e}"));
    let _ = std::fs::remove_dir_all(&layout);
    let out = out?;
    anyhow::ensure!(
        out.status.success(),
        "skopeo copy to {reference} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

// ---- a temporary host root ----------------------------------------------

/// What a file-system entry under a host root looks like, to tell whether a
/// second install touched anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileState {
    /// `dir`, `file`, `symlink` or `other`.
    pub kind: &'static str,
    pub mode: u32,
    pub ino: u64,
    pub mtime: (i64, i64),
    pub len: u64,
    /// sha256 of a regular file's content.
    pub sha256: Option<String>,
}

/// Every entry under `root`, by path relative to it.
pub fn snapshot(root: &Path) -> anyhow::Result<BTreeMap<String, FileState>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, FileState>) -> anyhow::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p)?;
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                "dir"
            } else if ft.is_file() {
                "file"
            } else if ft.is_symlink() {
                "symlink"
            } else {
                "other"
            };
            let sha256 = ft
                .is_file()
                .then(|| std::fs::read(&p).map(|b| images::sha256_digest(&b)))
                .transpose()?;
            let rel = p.strip_prefix(root)?.to_string_lossy().into_owned();
            out.insert(
                rel,
                FileState {
                    kind,
                    mode: m.mode() & 0o7777,
                    ino: m.ino(),
                    mtime: (m.mtime(), m.mtime_nsec()),
                    len: m.len(),
                    sha256,
                },
            );
            if ft.is_dir() {
                walk(root, &p, out)?;
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out)?;
    Ok(out)
}

/// The regular files and symlinks under `root` (relative paths).
pub fn files_under(root: &Path) -> anyhow::Result<Vec<String>> {
    Ok(snapshot(root)?
        .into_iter()
        .filter(|(_, s)| s.kind != "dir")
        .map(|(p, _)| p)
        .collect())
}

/// The host directories a Berth install uses, each bound from the host root
/// in a [`MountNs`].
pub const HOST_DIRS: &[&str] = &[
    "/usr/local/bin",
    "/etc/berth",
    "/opt/cni/bin",
    "/etc/cni/net.d",
    "/etc/systemd/system",
    "/run/berth",
    "/var/lib/berth",
];

/// The parents that get an overlay in a [`MountNs`] so the dirs of
/// [`HOST_DIRS`] can be mount points without creating anything on the host.
const OVERLAID: &[&str] = &["/etc", "/usr/local", "/opt", "/var/lib", "/run"];

/// A private mount namespace in which the directories of [`HOST_DIRS`] are
/// those of a temporary host root: what is installed or written at
/// `/usr/local/bin`, `/etc/berth`, ... inside lands in `<root>/usr/local/bin`,
/// `<root>/etc/berth`, ... and the host's own are never touched. Their
/// parents are overlays whose upper dirs are scratch space, so the mount
/// points need not exist on the host. A holder process keeps the namespace;
/// commands enter it with nsenter. Dropping it kills every process left in
/// it.
pub struct MountNs {
    holder: Option<OwnedChild>,
    pub root: PathBuf,
    /// The overlays' upper and work dirs, removed last.
    _scratch: tempfile::TempDir,
}

impl MountNs {
    /// Sets the namespace up over host root `root` (its dirs of
    /// [`HOST_DIRS`] are created).
    pub fn new(root: &Path) -> anyhow::Result<MountNs> {
        let scratch = tempfile::Builder::new()
            .prefix("berth-deploy-ns-")
            .tempdir()?;
        for d in HOST_DIRS {
            std::fs::create_dir_all(root.join(d.trim_start_matches('/')))?;
        }
        let s = scratch.path().display().to_string();
        let mut script = String::from("set -eu\n");
        for p in OVERLAID {
            script.push_str(&format!(
                "mkdir -p '{s}/upper{p}' '{s}/work{p}'\nmount -t overlay overlay -o 'lowerdir={p},upperdir={s}/upper{p},workdir={s}/work{p}' '{p}'\n"
            ));
        }
        for d in HOST_DIRS {
            script.push_str(&format!(
                "mkdir -p '{d}'\nmount --bind '{}{d}' '{d}'\n",
                root.display()
            ));
        }
        script.push_str(&format!("touch '{s}/ready'\nexec sleep 1000000\n"));
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(scratch.path().join("holder.log"))?);
        let mut holder = OwnedChild::spawn("mount namespace holder", cmd)?;
        let ready = scratch.path().join("ready");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.exists() {
            if let Some(status) = holder.try_status() {
                anyhow::bail!(
                    "setting up the mount namespace failed ({status}): {}",
                    std::fs::read_to_string(scratch.path().join("holder.log")).unwrap_or_default()
                );
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the mount namespace was not ready within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let ns = MountNs {
            holder: Some(holder),
            root: root.to_path_buf(),
            _scratch: scratch,
        };
        // Never go on unless every dir really is the temporary one.
        let marker = root.join("etc/berth/.berth-e2e-ns");
        std::fs::write(&marker, "")?;
        let seen = ns
            .command("test")
            .args(["-e", "/etc/berth/.berth-e2e-ns"])
            .status()?;
        std::fs::remove_file(&marker)?;
        anyhow::ensure!(
            seen.success(),
            "/etc/berth in the namespace is not {}",
            root.join("etc/berth").display()
        );
        Ok(ns)
    }

    pub fn holder_pid(&self) -> u32 {
        self.holder.as_ref().map(|h| h.pid()).unwrap_or(0)
    }

    fn ns_file(&self) -> String {
        format!("/proc/{}/ns/mnt", self.holder_pid())
    }

    /// `program` run inside the namespace (working dir `/`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--mount={}", self.ns_file()))
            .arg("--wd=/")
            .arg("--")
            .arg(program);
        cmd
    }

    /// The pids whose mount namespace is this one (the holder excluded).
    pub fn processes(&self) -> Vec<i32> {
        let Some(ino) = crate::pods::ns_inode(Path::new(&self.ns_file())) else {
            return Vec::new();
        };
        crate::pods::all_pids()
            .into_iter()
            .filter(|pid| *pid as u32 != self.holder_pid())
            .filter(|pid| {
                crate::pods::ns_inode(Path::new(&format!("/proc/{pid}/ns/mnt"))) == Some(ino)
            })
            .collect()
    }
}

impl Drop for MountNs {
    fn drop(&mut self) {
        for pid in self.processes() {
            eprintln!(
                "deploy harness: killing {pid} left in the mount namespace: {}",
                crate::pods::cmdline(pid).unwrap_or_default()
            );
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        drop(self.holder.take());
    }
}

// ---- the systemd unit ---------------------------------------------------

/// A systemd unit file: its settings by section, in order.
#[derive(Debug, Clone, Default)]
pub struct Unit {
    pub sections: BTreeMap<String, Vec<(String, String)>>,
}

impl Unit {
    pub fn parse(text: &str) -> anyhow::Result<Unit> {
        let mut unit = Unit::default();
        let mut section = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = Some(name.to_string());
                unit.sections.entry(name.to_string()).or_default();
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("line {}: not `Key=value`: {line:?}", n + 1))?;
            let section = section
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("line {}: a setting before any section", n + 1))?;
            unit.sections
                .get_mut(section)
                .unwrap()
                .push((key.trim().to_string(), value.trim().to_string()));
        }
        Ok(unit)
    }

    pub fn load(path: &Path) -> anyhow::Result<Unit> {
        Unit::parse(&std::fs::read_to_string(path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// The last value of `key` in `section`.
    pub fn get(&self, section: &str, key: &str) -> Option<&str> {
        self.sections
            .get(section)?
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// `ExecStart=` split into words (the unit uses no quoting).
    pub fn exec_start(&self) -> anyhow::Result<Vec<String>> {
        let line = self
            .get("Service", "ExecStart")
            .ok_or_else(|| anyhow::anyhow!("the unit has no ExecStart"))?;
        anyhow::ensure!(
            !line.contains(['"', '\'', '$', '%']),
            "ExecStart uses quoting or specifiers, which this harness does not expand: {line}"
        );
        Ok(line.split_whitespace().map(String::from).collect())
    }
}

/// A berthd started inside a [`MountNs`] the way systemd starts the unit:
/// its `RuntimeDirectory`/`StateDirectory` created with their modes, its
/// `ExecStart` with a clean environment, `LimitNOFILE` and `OOMScoreAdjust`
/// applied, output to a log file (the journal's stand-in). Stopping it
/// signals the main process only, as `KillMode=process` does.
pub struct UnitProcess {
    child: Option<OwnedChild>,
    pub log_path: PathBuf,
    /// Settings of the unit this machine did not let the harness apply.
    pub not_applied: Vec<String>,
}

impl UnitProcess {
    pub fn start(ns: &MountNs, unit: &Unit, log_path: &Path) -> anyhow::Result<UnitProcess> {
        anyhow::ensure!(
            unit.get("Service", "Type").unwrap_or("simple") == "simple",
            "only Type=simple units are started by this harness"
        );
        for (key, base) in [("RuntimeDirectory", "run"), ("StateDirectory", "var/lib")] {
            if let Some(name) = unit.get("Service", key) {
                let mode = unit
                    .get("Service", &format!("{key}Mode"))
                    .map(|m| u32::from_str_radix(m, 8))
                    .transpose()?
                    .unwrap_or(0o755);
                let dir = ns.root.join(base).join(name);
                std::fs::create_dir_all(&dir)?;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
            }
        }
        let mut nofile: Option<u64> = unit
            .get("Service", "LimitNOFILE")
            .map(|v| v.parse())
            .transpose()?;
        let mut oom: Option<i32> = unit
            .get("Service", "OOMScoreAdjust")
            .map(|v| v.parse())
            .transpose()?;
        // Raising the hard NOFILE limit and lowering oom_score_adj need
        // CAP_SYS_RESOURCE, which systemd has; a sandbox may not.
        let mut not_applied = Vec::new();
        if !has_cap_sys_resource() {
            let mut hard = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes into the struct it is given.
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) };
            if let Some(n) = nofile.filter(|n| *n > hard.rlim_max) {
                not_applied.push(format!(
                    "LimitNOFILE={n} (without CAP_SYS_RESOURCE: the hard limit {} instead)",
                    hard.rlim_max
                ));
                nofile = Some(hard.rlim_max);
            }
            if let Some(adj) = oom.take() {
                not_applied.push(format!("OOMScoreAdjust={adj} (needs CAP_SYS_RESOURCE)"));
            }
        }
        let argv = unit.exec_start()?;
        let mut cmd = ns.command(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)?;
        cmd.stdout(log.try_clone()?).stderr(log);
        // SAFETY: setrlimit and open/write/close are async-signal-safe; the
        // closure touches only its own copies.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(n) = nofile {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(adj) = oom {
                    let mut buf = [0u8; 16];
                    let text = {
                        use std::io::Write;
                        let mut cur = std::io::Cursor::new(&mut buf[..]);
                        let _ = write!(cur, "{adj}");
                        cur.position() as usize
                    };
                    let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let n = libc::write(fd, buf.as_ptr().cast(), text);
                    libc::close(fd);
                    if n < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = OwnedChild::spawn("berthd (as its unit)", cmd)?;
        Ok(UnitProcess {
            child: Some(child),
            log_path: log_path.to_path_buf(),
            not_applied,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.pid())
    }

    /// Whether the main process has exited (and how).
    pub fn try_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_status())
    }

    /// Waits until `socket` (a host path) accepts connections.
    pub fn wait_ready(&mut self, socket: &Path, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                anyhow::bail!("berthd exited during start ({status}):\n{}", self.log());
            }
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "berthd did not open {} within {timeout:?}:\n{}",
                socket.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `systemctl stop` with `KillMode=process`: SIGTERM to the main
    /// process alone, then wait (SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.child.take().and_then(|mut c| c.stop(grace))
    }

    /// Waits for the main process to exit by itself (someone else stopped
    /// it), up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.wait_timeout(timeout)?;
        self.child = None;
        Some(status)
    }
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff).
pub fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

// ---- manifests ----------------------------------------------------------

/// Debian's python3 (with python3-yaml, see scripts/deps.sh).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// Every YAML document of `path` as JSON, through python3-yaml's safe
/// loader (empty documents left out).
pub fn yaml_documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let out = Command::new(SYSTEM_PYTHON)
        .args([
            "-c",
            "import json, sys, yaml\njson.dump([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None], sys.stdout)",
        ])
        .arg(path)
        .output()
        .map_err(|e| anyhow::anyhow!("run {SYSTEM_PYTHON}: {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "{}: not YAML, or python3-yaml is missing (scripts/deps.sh installs it): {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The one document of a YAML file.
pub fn yaml_document(path: &Path) -> anyhow::Result<Value> {
    let mut docs = yaml_documents(path)?;
    anyhow::ensure!(
        docs.len() == 1,
        "{}: {} documents, want one",
        path.display(),
        docs.len()
    );
    Ok(docs.remove(0))
}

/// The PyPI package the manifests are validated with, pinned.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// The `kubernetes-validate` command from a venv cached beside the build
/// (`<target>/berth-e2e-cache/`), installed from PyPI the first time.
/// `Err` says why it could not be had (PyPI unreachable, no venv module).
pub fn kubernetes_validate() -> anyhow::Result<PathBuf> {
    let target = crate::berthd::bin_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let venv = target
        .join("berth-e2e-cache")
        .join(KUBERNETES_VALIDATE.replace("==", "-"));
    let bin = venv.join("bin/kubernetes-validate");
    // Written once pip succeeded: a venv without it is a broken attempt.
    let complete = venv.join(".complete");
    if complete.exists() && bin.exists() {
        return Ok(bin);
    }
    let _ = std::fs::remove_dir_all(&venv);
    std::fs::create_dir_all(venv.parent().unwrap())?;
    let made = Command::new(SYSTEM_PYTHON)
        .args(["-m", "venv"])
        .arg(&venv)
        .output()?;
    anyhow::ensure!(
        made.status.success(),
        "python3 -m venv failed (install python3-venv): {}",
        String::from_utf8_lossy(&made.stderr)
    );
    let pip = Command::new(venv.join("bin/pip"))
        .args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--timeout",
            "30",
            KUBERNETES_VALIDATE,
        ])
        .stdin(Stdio::null())
        .output()?;
    if !pip.status.success() {
        let _ = std::fs::remove_dir_all(&venv);
        let err = String::from_utf8_lossy(&pip.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        anyhow::bail!(
            "pip install {KUBERNETES_VALIDATE} failed (is PyPI reachable?): {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        );
    }
    anyhow::ensure!(bin.exists(), "pip installed no {}", bin.display());
    std::fs::write(&complete, "")?;
    Ok(bin)
}

// ---- a stand-in for the host's systemd ----------------------------------

/// The `systemctl` a [`FakeSystemdHost`] puts first on PATH: what
/// berth-node asks of systemd, for berthd.service, with the unit's
/// semantics (ExecStart in the background with its RuntimeDirectory and
/// StateDirectory, `KillMode=process`: stop is SIGTERM to the main process
/// alone). Every call is appended to `$FAKE_SYSTEMD_DIR/calls`.
const FAKE_SYSTEMCTL: &str = r#"#!/bin/sh
set -eu
state=$FAKE_SYSTEMD_DIR
echo "$*" >>"$state/calls"
unit=/etc/systemd/system/berthd.service
now=0
args=""
for a in "$@"; do
    case $a in
        --quiet) ;;
        --now) now=1 ;;
        *) args="$args $a" ;;
    esac
done
set -- $args
main_alive() {
    pid=$(cat "$state/main.pid" 2>/dev/null) || return 1
    [ -n "$(tr -d '\000' <"/proc/$pid/cmdline" 2>/dev/null)" ]
}
start() {
    main_alive && return 0
    exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
    mkdir -p /run/berth /var/lib/berth
    chmod 0711 /run/berth /var/lib/berth
    setsid $exec_start >>"$state/berthd.log" 2>&1 </dev/null &
    echo $! >"$state/main.pid"
}
stop() {
    main_alive || return 0
    kill -TERM "$pid"
    while main_alive; do sleep 0.1; done
}
case $1 in
    daemon-reload | enable) ;;
    disable) if [ "$now" = 1 ]; then stop; fi ;;
    start) start ;;
    stop) stop ;;
    restart) stop; start ;;
    is-active) main_alive ;;
    *) echo "fake systemctl: $1 is not emulated" >&2; exit 1 ;;
esac
"#;

/// A host whose PID 1 "is systemd", inside a [`MountNs`]: a new PID
/// namespace (with its own /proc) whose init has `/run/systemd/system`,
/// and a stand-in `systemctl` ([`FAKE_SYSTEMCTL`]) first on PATH. Commands
/// run "from a pod" ([`FakeSystemdHost::command`]) see PID 1 as that init,
/// so berth-node's `nsenter --target 1 ... systemctl` reaches the stand-in.
/// Dropping it kills the PID namespace.
pub struct FakeSystemdHost {
    unshare: Option<OwnedChild>,
    init_pid: i32,
    pub dir: PathBuf,
}

impl FakeSystemdHost {
    /// `dir` (on a path every namespace sees, such as /tmp) holds the
    /// stand-in systemctl and its state.
    pub fn new(ns: &MountNs, dir: &Path) -> anyhow::Result<FakeSystemdHost> {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::write(bin.join("systemctl"), FAKE_SYSTEMCTL)?;
        std::fs::set_permissions(
            bin.join("systemctl"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        let mut cmd = ns.command("unshare");
        cmd.args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            "sh",
            "-c",
            "mkdir -p /run/systemd/system && exec sleep 1000000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("unshare.log"))?);
        let unshare = OwnedChild::spawn("fake systemd host", cmd)?;
        let parent = unshare.pid();
        let deadline = Instant::now() + Duration::from_secs(10);
        let init_pid = loop {
            let children =
                std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
                    .unwrap_or_default();
            if let Some(pid) = children
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok())
                && std::path::Path::new(&format!("/proc/{pid}/root/run/systemd/system")).is_dir()
                && crate::pods::cmdline(pid).is_some_and(|c| c.starts_with("sleep"))
            {
                break pid;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the fake systemd host did not come up within 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(FakeSystemdHost {
            unshare: Some(unshare),
            init_pid,
            dir: dir.to_path_buf(),
        })
    }

    /// `program` run in the host's PID and mount namespaces, as from a
    /// hostPID pod, with the stand-in systemctl first on PATH.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--target={}", self.init_pid))
            .args(["--mount", "--pid", "--wd=/", "--"])
            .arg(program)
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    self.dir.join("bin").display()
                ),
            )
            .env("FAKE_SYSTEMD_DIR", &self.dir);
        cmd
    }

    /// The systemctl calls so far, one a line, and forgets them.
    pub fn take_calls(&self) -> Vec<String> {
        let path = self.dir.join("calls");
        let calls = std::fs::read_to_string(&path).unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        calls.lines().map(String::from).collect()
    }

    /// berthd's main pid as the stand-in recorded it (a pid of the fake
    /// host's PID namespace).
    pub fn main_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("main.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// berthd's output (the journal's stand-in).
    pub fn journal(&self) -> String {
        std::fs::read_to_string(self.dir.join("berthd.log")).unwrap_or_default()
    }
}

impl Drop for FakeSystemdHost {
    fn drop(&mut self) {
        // SIGKILL to a PID namespace's init ends every process in it.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.init_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        drop(self.unshare.take());
    }
}
