//! Pod networking. For now: whether a usable CNI configuration exists, which
//! is what `Status` reports as NetworkReady.

use std::path::{Path, PathBuf};

/// The CNI config berthd would use: the lexically first file in `conf_dir`
/// that parses as a network list (`.conflist`) or a single network
/// (`.conf`, `.json`).
pub fn find_network_config(conf_dir: &Path) -> Result<PathBuf, String> {
    let entries = std::fs::read_dir(conf_dir)
        .map_err(|e| format!("cannot read CNI config dir {}: {e}", conf_dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("conflist" | "conf" | "json")
            )
        })
        .collect();
    files.sort();
    let mut problems = Vec::new();
    for file in files {
        match check_network_file(&file) {
            Ok(()) => return Ok(file),
            Err(e) => problems.push(format!("{}: {e}", file.display())),
        }
    }
    if problems.is_empty() {
        Err(format!(
            "no CNI network config found in {}",
            conf_dir.display()
        ))
    } else {
        Err(format!(
            "no valid CNI network config in {} ({})",
            conf_dir.display(),
            problems.join("; ")
        ))
    }
}

fn check_network_file(file: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(file).map_err(|e| e.to_string())?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("invalid JSON: {e}"))?;
    let is_list = file.extension().and_then(|e| e.to_str()) == Some("conflist");
    if doc
        .get("name")
        .and_then(|n| n.as_str())
        .is_none_or(str::is_empty)
    {
        return Err("missing \"name\"".into());
    }
    if is_list {
        let plugins = doc
            .get("plugins")
            .and_then(|p| p.as_array())
            .ok_or("missing \"plugins\" list")?;
        if plugins.is_empty() {
            return Err("empty \"plugins\" list".into());
        }
        if plugins
            .iter()
            .any(|p| p.get("type").and_then(|t| t.as_str()).is_none())
        {
            return Err("a plugin has no \"type\"".into());
        }
    } else if doc.get("type").and_then(|t| t.as_str()).is_none() {
        return Err("missing \"type\"".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_first_valid_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            find_network_config(dir.path())
                .unwrap_err()
                .contains("no CNI network config")
        );
        std::fs::write(dir.path().join("05-bad.conflist"), "{not json").unwrap();
        std::fs::write(
            dir.path().join("10-net.conflist"),
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"bridge"}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("20-x.conf"),
            r#"{"name":"x","type":"loopback"}"#,
        )
        .unwrap();
        assert_eq!(
            find_network_config(dir.path()).unwrap(),
            dir.path().join("10-net.conflist")
        );
    }

    #[test]
    fn invalid_only_reports_why() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("a.conflist"),
            r#"{"name":"n","plugins":[]}"#,
        )
        .unwrap();
        let err = find_network_config(dir.path()).unwrap_err();
        assert!(err.contains("empty \"plugins\""), "{err}");
    }
}
