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
}
