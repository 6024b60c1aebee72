//! berthd's configuration: a TOML file where every key is optional.
//!
//! Unknown keys are refused (a typo must not silently fall back to a default),
//! and the error names the key and the line it sits on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/config.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Persistent data: metadata store, content store, snapshots.
    pub root_dir: PathBuf,
    /// Volatile state: sockets, pinned namespaces, shim state.
    pub state_dir: PathBuf,
    /// The CRI socket. Defaults to `<state_dir>/berth.sock` when unset.
    pub socket_path: Option<PathBuf>,
    pub log: LogConfig,
    pub cgroup: CgroupConfig,
    pub cni: CniConfig,
    pub registry: RegistryConfig,
    pub streaming: StreamingConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// ip:port of the Prometheus `/metrics` endpoint; empty (the default)
    /// serves none.
    pub address: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `berth_runtime=trace`, ...
    pub level: String,
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CgroupConfig {
    pub driver: CgroupDriver,
}

/// Only cgroupfs is implemented; `systemd` is accepted by the parser so the
/// refusal can say exactly that instead of "unknown variant".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CniConfig {
    /// Where the network config is read from (the lexically first valid
    /// `.conflist`, `.conf` or `.json`). The default is where a cluster's
    /// CNI daemonset writes its config.
    pub conf_dir: PathBuf,
    pub bin_dirs: Vec<PathBuf>,
    /// Also search the directory of the berthd binary for plugins, before
    /// `bin_dirs`: Berth's own plugins are built beside berthd. Off by
    /// default: an installed berthd's dir (`/usr/local/bin`, `/usr/sbin`)
    /// holds unrelated programs (iproute2's `bridge`, for one).
    pub search_berthd_dir: bool,
    /// Seconds a plugin may run before the pod's setup fails.
    pub plugin_timeout_secs: u64,
    /// Keep Berth's default conflist `<conf_dir>/10-berth.conflist` (bridge
    /// `default_bridge` with a host address, host-local IPAM on
    /// `default_subnet` with its data under `<state_dir>/cni-ipam`,
    /// portmap, loopback), rewritten at start from these keys, unless
    /// another network config in the conf dir comes first.
    pub write_default_conflist: bool,
    pub default_bridge: String,
    pub default_subnet: String,
    /// Without any network config, run pods that are not host-network with
    /// loopback only instead of refusing them. For tests and development
    /// without networking; kubelet never wants this.
    pub allow_loopback_only: bool,
    /// Run Berth's own plugins (recognised in the bin dirs) in-process,
    /// saving a fork+exec per plugin; other plugins are always executed.
    pub in_process: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registries reached over plain http. Loopback registries may always
    /// fall back to http, as with Docker and containerd.
    pub insecure: Vec<String>,
    /// Extra PEM CA bundles trusted for every registry.
    pub ca_files: Vec<PathBuf>,
    /// Mirrors per registry host, tried in order before the upstream.
    pub mirrors: BTreeMap<String, MirrorConfig>,
    /// Seconds without a byte received before a pull is abandoned.
    pub stall_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorConfig {
    /// Endpoints such as `http://127.0.0.1:5001`.
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamingConfig {
    /// Address of the exec/attach/port-forward server. Loopback by default:
    /// nothing listens on a non-loopback address unless an operator asks.
    pub address: String,
    /// PEM certificate chain and private key: when both are set the server
    /// speaks TLS only (URLs become `https://`).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Sessions served at once; one more is refused with 429.
    pub max_sessions: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root_dir: PathBuf::from("/var/lib/berth"),
            state_dir: PathBuf::from("/run/berth"),
            socket_path: None,
            log: LogConfig::default(),
            cgroup: CgroupConfig::default(),
            cni: CniConfig::default(),
            registry: RegistryConfig {
                stall_timeout_secs: 60,
                ..Default::default()
            },
            streaming: StreamingConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            driver: CgroupDriver::Cgroupfs,
        }
    }
}

impl Default for CniConfig {
    fn default() -> Self {
        CniConfig {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dirs: vec![PathBuf::from("/opt/cni/bin")],
            search_berthd_dir: false,
            plugin_timeout_secs: 60,
            write_default_conflist: false,
            default_bridge: "berth0".into(),
            default_subnet: "10.88.0.0/16".into(),
            allow_loopback_only: false,
            in_process: true,
        }
    }
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            address: "127.0.0.1:0".into(),
            tls_cert_file: None,
            tls_key_file: None,
            max_sessions: 256,
        }
    }
}

impl Config {
    /// Parses a config document; `origin` names it in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<Config> {
        let config: Config = toml::from_str(text).map_err(|e| Error::Config {
            origin: origin.to_string(),
            message: describe_toml_error(text, &e),
        })?;
        config.validate(origin)?;
        Ok(config)
    }

    /// Loads `path`. A missing file is only fine for the default path: an
    /// operator who names a file expects it to be read.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let (path, explicit) = match path {
            Some(p) => (p, true),
            None => (Path::new(DEFAULT_CONFIG_PATH), false),
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                Ok(Config::default())
            }
            Err(e) => Err(Error::Config {
                origin: path.display().to_string(),
                message: format!("cannot read: {e}"),
            }),
        }
    }

    pub fn default_toml() -> String {
        let mut text = String::from(
            "# Berth daemon configuration. Every key is optional; these are the defaults.\n\
             # socket_path defaults to <state_dir>/berth.sock.\n\n",
        );
        text.push_str(
            &toml::to_string_pretty(&Config::default()).expect("default config serializes"),
        );
        text
    }

    pub fn socket_path(&self) -> PathBuf {
        self.socket_path
            .clone()
            .unwrap_or_else(|| self.state_dir.join("berth.sock"))
    }

    pub fn store_path(&self) -> PathBuf {
        self.root_dir.join("meta.redb")
    }

    /// Where the default conflist keeps host-local's allocations: under
    /// the state dir, so they go at reboot with the pods they belong to.
    pub fn default_ipam_dir(&self) -> PathBuf {
        self.state_dir.join("cni-ipam")
    }

    /// `cni.bin_dirs` with berthd's own directory first when
    /// `cni.search_berthd_dir` is set (`berthd_dir`: where the running
    /// binary is, `None` if unknown).
    pub fn cni_bin_dirs(&self, berthd_dir: Option<&Path>) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if self.cni.search_berthd_dir
            && let Some(dir) = berthd_dir
        {
            dirs.push(dir.to_path_buf());
        }
        for dir in &self.cni.bin_dirs {
            if !dirs.contains(dir) {
                dirs.push(dir.clone());
            }
        }
        dirs
    }

    fn validate(&self, origin: &str) -> Result<()> {
        let bad = |message: String| Error::Config {
            origin: origin.to_string(),
            message,
        };
        if self.cgroup.driver == CgroupDriver::Systemd {
            return Err(bad(
                "cgroup.driver = \"systemd\" is not supported yet; use \"cgroupfs\"".into(),
            ));
        }
        for (key, dir) in [("root_dir", &self.root_dir), ("state_dir", &self.state_dir)] {
            if !dir.is_absolute() {
                return Err(bad(format!(
                    "{key} must be an absolute path, got {}",
                    dir.display()
                )));
            }
        }
        if let Some(sock) = &self.socket_path
            && !sock.is_absolute()
        {
            return Err(bad(format!(
                "socket_path must be an absolute path, got {}",
                sock.display()
            )));
        }
        if self
            .streaming
            .address
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err(bad(format!(
                "streaming.address must be ip:port, got {:?}",
                self.streaming.address
            )));
        }
        if !self.metrics.address.is_empty()
            && self
                .metrics
                .address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(bad(format!(
                "metrics.address must be ip:port or empty (off), got {:?}",
                self.metrics.address
            )));
        }
        match (&self.streaming.tls_cert_file, &self.streaming.tls_key_file) {
            (None, None) => {}
            (Some(cert), Some(key)) if cert.is_absolute() && key.is_absolute() => {}
            (Some(_), Some(_)) => {
                return Err(bad(
                    "streaming.tls_cert_file and streaming.tls_key_file must be absolute paths"
                        .into(),
                ));
            }
            _ => {
                return Err(bad(
                    "streaming.tls_cert_file and streaming.tls_key_file must be set together"
                        .into(),
                ));
            }
        }
        if self.streaming.max_sessions == 0 {
            return Err(bad("streaming.max_sessions must be at least 1".into()));
        }
        if !self.cni.conf_dir.is_absolute() {
            return Err(bad(format!(
                "cni.conf_dir must be an absolute path, got {}",
                self.cni.conf_dir.display()
            )));
        }
        if let Some(dir) = self.cni.bin_dirs.iter().find(|d| !d.is_absolute()) {
            return Err(bad(format!(
                "cni.bin_dirs must be absolute paths, got {}",
                dir.display()
            )));
        }
        let bridge = &self.cni.default_bridge;
        if bridge.is_empty()
            || bridge.len() > 15
            || bridge
                .chars()
                .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(bad(format!(
                "cni.default_bridge must be an interface name (1-15 of a-z, 0-9, -, _, .), got {bridge:?}"
            )));
        }
        if !is_cidr(&self.cni.default_subnet) {
            return Err(bad(format!(
                "cni.default_subnet must be a subnet such as \"10.88.0.0/16\", got {:?}",
                self.cni.default_subnet
            )));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            bad(format!(
                "log.level {:?} is not a valid filter: {e}",
                self.log.level
            ))
        })?;
        Ok(())
    }
}

/// `addr/prefix` with a prefix that fits the address family.
fn is_cidr(text: &str) -> bool {
    let Some((addr, prefix)) = text.split_once('/') else {
        return false;
    };
    let Ok(prefix) = prefix.parse::<u8>() else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => prefix <= 32,
        Ok(std::net::IpAddr::V6(_)) => prefix <= 128,
        Err(_) => false,
    }
}

/// toml's own message already carries line and column and the offending key;
/// we add the line number in words so it survives single-line log formats.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().to_string();
    match err.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
            format!("line {line}: {message} (at `{snippet}`)")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", "test").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.socket_path(), PathBuf::from("/run/berth/berth.sock"));
        assert_eq!(c.store_path(), PathBuf::from("/var/lib/berth/meta.redb"));
    }

    #[test]
    fn default_toml_round_trips() {
        let c = Config::parse(&Config::default_toml(), "default").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn overrides_apply() {
        let c = Config::parse(
            "root_dir = \"/tmp/r\"\n[log]\nformat = \"json\"\n[registry.mirrors.\"registry.k8s.io\"]\nendpoints = [\"http://127.0.0.1:5001\"]\n",
            "test",
        )
        .unwrap();
        assert_eq!(c.root_dir, PathBuf::from("/tmp/r"));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(c.log.level, "info");
        assert_eq!(
            c.registry.mirrors["registry.k8s.io"].endpoints,
            vec!["http://127.0.0.1:5001".to_string()]
        );
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = Config::parse("root_dir = \"/x\"\n\n[log]\nlevle = \"debug\"\n", "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("levle"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("f.toml"), "{err}");
    }

    #[test]
    fn systemd_driver_refused_clearly() {
        let err = Config::parse("[cgroup]\ndriver = \"systemd\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("systemd"), "{err}");
    }

    #[test]
    fn relative_dirs_refused() {
        assert!(Config::parse("root_dir = \"var/lib\"\n", "t").is_err());
        let err = Config::parse("[cni]\nconf_dir = \"net.d\"\n", "t")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cni.conf_dir"), "{err}");
        assert!(Config::parse("[cni]\nbin_dirs = [\"bin\"]\n", "t").is_err());
    }

    #[test]
    fn default_network_keys_checked() {
        for (key, value) in [
            ("default_bridge", "\"\""),
            ("default_bridge", "\"a-bridge-name-too-long\""),
            ("default_bridge", "\"br/0\""),
            ("default_subnet", "\"10.88.0.0\""),
            ("default_subnet", "\"10.88.0.0/33\""),
            ("default_subnet", "\"berth/16\""),
        ] {
            let err = Config::parse(&format!("[cni]\n{key} = {value}\n"), "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key} = {value}: {err}");
        }
        let c = Config::parse(
            "[cni]\ndefault_bridge = \"bn1f\"\ndefault_subnet = \"fd00:1::/64\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(c.cni.default_bridge, "bn1f");
    }

    #[test]
    fn berthd_dir_searched_first_only_when_asked() {
        let mut c = Config::default();
        let beside = Path::new("/work/target/release");
        assert_eq!(
            c.cni_bin_dirs(Some(beside)),
            vec![PathBuf::from("/opt/cni/bin")]
        );
        c.cni.search_berthd_dir = true;
        assert_eq!(
            c.cni_bin_dirs(Some(beside)),
            vec![beside.to_path_buf(), PathBuf::from("/opt/cni/bin")]
        );
        c.cni.bin_dirs = vec![beside.to_path_buf()];
        assert_eq!(c.cni_bin_dirs(Some(beside)), vec![beside.to_path_buf()]);
        assert_eq!(c.cni_bin_dirs(None), vec![beside.to_path_buf()]);
    }

    #[test]
    fn dev_config_parses_and_networks() {
        let text = include_str!("../../deploy/dev.toml");
        let c = Config::parse(text, "deploy/dev.toml").unwrap();
        assert!(c.cni.write_default_conflist && c.cni.search_berthd_dir);
        assert!(!c.cni.allow_loopback_only);
        assert_ne!(c.cni.conf_dir, Config::default().cni.conf_dir);
        assert!(c.cni.conf_dir.starts_with(&c.root_dir), "{c:?}");
        let metrics: std::net::SocketAddr = c.metrics.address.parse().unwrap();
        assert!(metrics.ip().is_loopback(), "{c:?}");
    }

    #[test]
    fn metrics_address_off_by_default_and_checked() {
        assert_eq!(Config::default().metrics.address, "");
        for bad in ["\"9470\"", "\"localhost:9470\"", "\"127.0.0.1\""] {
            let err = Config::parse(&format!("[metrics]\naddress = {bad}\n"), "t")
                .unwrap_err()
                .to_string();
            assert!(err.contains("metrics.address"), "{bad}: {err}");
        }
        let c = Config::parse("[metrics]\naddress = \"0.0.0.0:9470\"\n", "t").unwrap();
        assert_eq!(c.metrics.address, "0.0.0.0:9470");
    }

    #[test]
    fn deploy_config_is_the_default() {
        let text = include_str!("../../deploy/config.toml");
        assert_eq!(
            Config::parse(text, "deploy/config.toml").unwrap(),
            Config::default()
        );
    }
}
