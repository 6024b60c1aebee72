//! Types from the CNI specification (1.0 / 1.1).

use serde::{Deserialize, Serialize};

/// Spec versions a Berth plugin accepts, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// Well-known error codes from the spec's "Error" section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnvironment = 4,
    IoFailure = 5,
    DecodeFailure = 6,
    InvalidConfig = 7,
    TryAgainLater = 11,
    PluginNotAvailable = 50,
    LimitedConnectivity = 51,
}

/// The JSON a plugin prints on stdout when it fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl ErrorResult {
    pub fn new(version: &str, code: ErrorCode, msg: impl Into<String>) -> Self {
        ErrorResult {
            cni_version: version.to_string(),
            code: code as u32,
            msg: msg.into(),
            details: String::new(),
        }
    }
}

impl std::fmt::Display for ErrorResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

/// The answer to the VERSION command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionResult {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    #[serde(rename = "supportedVersions")]
    pub supported_versions: Vec<String>,
}

impl VersionResult {
    pub fn current() -> Self {
        VersionResult {
            cni_version: SUPPORTED_VERSIONS.last().unwrap().to_string(),
            supported_versions: SUPPORTED_VERSIONS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Whether a plugin speaking our versions can take a config of `version`.
pub fn is_supported(version: &str) -> bool {
    SUPPORTED_VERSIONS.contains(&version)
}

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// Generic plugin failure code (the reference plugins use 999 too).
pub const CODE_INTERNAL: u32 = 999;

/// A plugin failure; becomes an [`ErrorResult`] on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl Error {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Error {
            code: code as u32,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// A failure without a spec-assigned code (code 999).
    pub fn internal(msg: impl Into<String>) -> Self {
        Error {
            code: CODE_INTERNAL,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn config(msg: impl Into<String>) -> Self {
        Error::new(ErrorCode::InvalidConfig, msg)
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// Prefixes the message (e.g. with the plugin name).
    pub fn context(mut self, what: &str) -> Self {
        self.msg = format!("{what}: {}", self.msg);
        self
    }

    pub fn to_result(&self, version: &str) -> ErrorResult {
        ErrorResult {
            cni_version: version.to_string(),
            code: self.code,
            msg: self.msg.clone(),
            details: self.details.clone(),
        }
    }
}

impl From<ErrorResult> for Error {
    fn from(e: ErrorResult) -> Self {
        Error {
            code: e.code,
            msg: e.msg,
            details: e.details,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn as_str(&self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

impl std::str::FromStr for Command {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => {
                return Err(Error::new(
                    ErrorCode::InvalidEnvironment,
                    format!("unknown CNI_COMMAND: {other:?}"),
                ));
            }
        })
    }
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One plugin invocation: the `CNI_*` variables and the config from stdin.
/// Built from the process environment by the binaries, or directly by berthd
/// for in-process calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    /// `CNI_CONTAINERID`
    pub container_id: String,
    /// `CNI_NETNS` (a path to a network namespace file)
    pub netns: String,
    /// `CNI_IFNAME`
    pub ifname: String,
    /// `CNI_ARGS`, raw (`K1=V1;K2=V2`)
    pub args: String,
    /// `CNI_PATH`, raw (colon separated directories)
    pub path: String,
    /// The network configuration JSON (stdin).
    pub config: Vec<u8>,
}

impl Request {
    pub fn new(command: Command, config: impl Into<Vec<u8>>) -> Self {
        Request {
            command,
            container_id: String::new(),
            netns: String::new(),
            ifname: String::new(),
            args: String::new(),
            path: String::new(),
            config: config.into(),
        }
    }

    /// Reads the `CNI_*` variables through `get` (e.g. `std::env::var`) and
    /// validates the ones the command needs.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>, config: Vec<u8>) -> Result<Self> {
        let command: Command = get("CNI_COMMAND")
            .ok_or_else(|| Error::new(ErrorCode::InvalidEnvironment, "CNI_COMMAND is not set"))?
            .parse()?;
        let req = Request {
            command,
            container_id: get("CNI_CONTAINERID").unwrap_or_default(),
            netns: get("CNI_NETNS").unwrap_or_default(),
            ifname: get("CNI_IFNAME").unwrap_or_default(),
            args: get("CNI_ARGS").unwrap_or_default(),
            path: get("CNI_PATH").unwrap_or_default(),
            config,
        };
        req.validate()?;
        Ok(req)
    }

    /// Checks the variables the spec requires for the command.
    pub fn validate(&self) -> Result<()> {
        let env_err = |m: String| Err(Error::new(ErrorCode::InvalidEnvironment, m));
        let needs_id = matches!(self.command, Command::Add | Command::Del | Command::Check);
        if needs_id {
            if self.container_id.is_empty() {
                return env_err("CNI_CONTAINERID is not set".into());
            }
            if !valid_container_id(&self.container_id) {
                return env_err(format!(
                    "invalid CNI_CONTAINERID {:?}: must start with an alphanumeric and contain only alphanumerics, '_', '.', '-'",
                    self.container_id
                ));
            }
            if self.ifname.is_empty() {
                return env_err("CNI_IFNAME is not set".into());
            }
            if let Err(m) = valid_ifname(&self.ifname) {
                return env_err(m);
            }
        }
        if matches!(self.command, Command::Add | Command::Check) && self.netns.is_empty() {
            return env_err("CNI_NETNS is not set".into());
        }
        Ok(())
    }

    /// The `CNI_*` variables for delegating this request (with `command`).
    pub fn env_vars(&self, command: Command) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", command.as_str().to_string()),
            ("CNI_CONTAINERID", self.container_id.clone()),
            ("CNI_NETNS", self.netns.clone()),
            ("CNI_IFNAME", self.ifname.clone()),
            ("CNI_ARGS", self.args.clone()),
            ("CNI_PATH", self.path.clone()),
        ]
    }

    /// `CNI_ARGS` split into pairs.
    pub fn cni_args(&self) -> Vec<(String, String)> {
        self.args
            .split(';')
            .filter(|kv| !kv.is_empty())
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `CNI_PATH` split into directories.
    pub fn path_dirs(&self) -> Vec<std::path::PathBuf> {
        self.path
            .split(':')
            .filter(|p| !p.is_empty())
            .map(std::path::PathBuf::from)
            .collect()
    }
}

/// The spec's container id rule: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub fn valid_container_id(id: &str) -> bool {
    let mut chars = id.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// The spec's interface name rule (Linux `IFNAMSIZ`).
pub fn valid_ifname(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("interface name is empty".into());
    }
    if name.len() > 15 {
        return Err(format!(
            "interface name {name:?} is longer than 15 characters"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("interface name {name:?} is . or .."));
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "interface name {name:?} contains / or : or whitespace"
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Network configuration
// ---------------------------------------------------------------------------

/// The keys every plugin's configuration shares.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<serde_json::Value>,
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: Option<serde_json::Value>,
    /// CNI 1.1 GC: the attachments that must be kept.
    #[serde(rename = "cni.dev/valid-attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// A (container id, ifname) pair from `cni.dev/valid-attachments`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
}

/// Parses the JSON of the config: syntax errors are a decode failure (6),
/// mismatching keys an invalid config (7).
pub fn parse_config<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| {
        if e.is_syntax() || e.is_eof() {
            Error::new(
                ErrorCode::DecodeFailure,
                format!("failed to parse network config: {e}"),
            )
        } else {
            Error::config(format!("invalid network config: {e}"))
        }
    })
}

impl NetConf {
    /// Parses and checks the shared keys (name and a supported version).
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let conf: NetConf = parse_config(bytes)?;
        if conf.cni_version.is_empty() {
            return Err(Error::new(
                ErrorCode::IncompatibleVersion,
                "cniVersion is missing from the network config",
            ));
        }
        if !is_supported(&conf.cni_version) {
            return Err(Error::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "unsupported CNI version {:?}; supported: {}",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        Ok(conf)
    }

    /// The previous result in a chain, parsed.
    pub fn prev_result(&self) -> Result<Option<CniResult>> {
        match &self.prev_result {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| Error::config(format!("invalid prevResult: {e}"))),
        }
    }
}

/// Best-effort version of a config, for error output.
pub fn config_version(bytes: &[u8]) -> String {
    #[derive(Deserialize)]
    struct V {
        #[serde(rename = "cniVersion", default)]
        cni_version: String,
    }
    match serde_json::from_slice::<V>(bytes) {
        Ok(v) if !v.cni_version.is_empty() => v.cni_version,
        _ => SUPPORTED_VERSIONS.last().unwrap().to_string(),
    }
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

use crate::ip::IpNet;
use std::net::IpAddr;

/// The success result of ADD (spec 1.0 / 1.1 shape; 0.4.0 adds `version` to
/// each IP, see [`CniResult::to_json`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default, skip_serializing_if = "Dns::is_empty")]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// CNI 1.1
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    /// CNI 1.1
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub socket_path: String,
    /// CNI 1.1
    #[serde(rename = "pciID", default, skip_serializing_if = "String::is_empty")]
    pub pci_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Only in 0.x results ("4" or "6").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// CNI 1.1
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// CNI 1.1
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    /// CNI 1.1
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    /// CNI 1.1
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// CNI 1.1
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u8>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Self {
        Route {
            dst,
            gw,
            mtu: None,
            advmss: None,
            priority: None,
            table: None,
            scope: None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_empty()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

impl CniResult {
    /// The result as JSON in the shape of spec `version`: 0.4.0 carries
    /// `version` on each IP; 1.0.0 drops it and the 1.1-only fields.
    pub fn to_json(&self, version: &str) -> serde_json::Value {
        let mut r = self.clone();
        r.cni_version = version.to_string();
        let legacy = version.starts_with("0.");
        let v11 = !legacy && version != "1.0.0";
        for ip in &mut r.ips {
            ip.version = if legacy {
                Some(if ip.address.is_ipv4() { "4" } else { "6" }.to_string())
            } else {
                None
            };
        }
        if !v11 {
            for i in &mut r.interfaces {
                i.mtu = None;
                i.socket_path.clear();
                i.pci_id.clear();
            }
            for rt in &mut r.routes {
                rt.mtu = None;
                rt.advmss = None;
                rt.priority = None;
                rt.table = None;
                rt.scope = None;
            }
        }
        serde_json::to_value(&r).expect("result serializes")
    }

    pub fn to_bytes(&self, version: &str) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(&self.to_json(version)).expect("result serializes");
        out.push(b'\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_matches_spec_shape() {
        let e = ErrorResult::new("1.0.0", ErrorCode::InvalidConfig, "bad subnet");
        let v: serde_json::Value = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"1.0.0","code":7,"msg":"bad subnet"})
        );
    }

    #[test]
    fn version_result_lists_versions() {
        let v = VersionResult::current();
        assert_eq!(v.cni_version, "1.1.0");
        assert!(is_supported("1.0.0"));
        assert!(!is_supported("0.3.1"));
    }

    #[test]
    fn request_validation() {
        let vars = |m: &'static [(&'static str, &'static str)]| {
            move |k: &str| m.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        let ok = Request::from_vars(
            vars(&[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "abc-1"),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=p"),
                ("CNI_PATH", "/a:/b"),
            ]),
            b"{}".to_vec(),
        )
        .unwrap();
        assert_eq!(ok.cni_args()[1], ("K8S_POD_NAME".into(), "p".into()));
        assert_eq!(ok.path_dirs().len(), 2);
        let e = Request::from_vars(vars(&[("CNI_COMMAND", "ADD")]), vec![]).unwrap_err();
        assert_eq!(e.code, 4);
        let e = Request::from_vars(
            vars(&[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "-bad"),
                ("CNI_IFNAME", "eth0"),
            ]),
            vec![],
        )
        .unwrap_err();
        assert_eq!(e.code, 4);
        assert!(Request::from_vars(vars(&[("CNI_COMMAND", "VERSION")]), vec![]).is_ok());
        assert!(valid_ifname("eth0").is_ok());
        assert!(valid_ifname("a/b").is_err());
        assert!(valid_ifname("0123456789abcdef").is_err());
    }

    #[test]
    fn netconf_errors_have_spec_codes() {
        assert_eq!(NetConf::parse(b"{not json").unwrap_err().code, 6);
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"0.2.0","name":"n"}"#)
                .unwrap_err()
                .code,
            1
        );
        assert_eq!(NetConf::parse(br#"{"cniVersion":5}"#).unwrap_err().code, 7);
        assert!(NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"bridge"}"#).is_ok());
    }

    #[test]
    fn result_versions() {
        let r: CniResult = serde_json::from_value(serde_json::json!({
            "cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/x", "mtu": 1400}],
            "ips": [{"version": "4", "address": "10.1.0.2/24", "gateway": "10.1.0.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1", "priority": 5}],
            "dns": {"nameservers": ["10.96.0.10"]}
        }))
        .unwrap();
        let v1 = r.to_json("1.0.0");
        assert_eq!(v1["cniVersion"], "1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        assert!(v1["interfaces"][0].get("mtu").is_none());
        assert!(v1["routes"][0].get("priority").is_none());
        let v11 = r.to_json("1.1.0");
        assert_eq!(v11["interfaces"][0]["mtu"], 1400);
        assert_eq!(v11["routes"][0]["priority"], 5);
        let v04 = r.to_json("0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(v04["ips"][0]["interface"], 0);
        assert_eq!(v04["dns"]["nameservers"][0], "10.96.0.10");
    }
}
