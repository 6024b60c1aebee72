//! Berth's plugins. Each exposes `add`, `del`, `check`, `status` and `gc`
//! over a [`Request`](crate::spec::Request); [`crate::invoke`] dispatches to
//! them and renders the bytes a plugin binary prints.

pub mod bridge;
pub mod host_local;
pub mod loopback;
pub mod portmap;

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

use crate::spec::{CniResult, Command, Error, ErrorResult, Request, Result};

/// Finds the executable `plugin` in `CNI_PATH`.
pub fn find_plugin(plugin: &str, req: &Request) -> Option<PathBuf> {
    if plugin.is_empty() || plugin.contains('/') || plugin == "." || plugin == ".." {
        return None;
    }
    req.path_dirs()
        .into_iter()
        .map(|d| d.join(plugin))
        .find(|p| crate::nft::is_executable(p))
}

/// Runs the IPAM (or any delegated) plugin `plugin` for `command` with the
/// same environment and config as `req`, as the spec's delegation describes.
/// Returns the parsed result for ADD, `None` otherwise.
///
/// When `plugin` is one of Berth's own (`host-local`) and `CNI_PATH` has
/// no binary of that name or Berth's own binary, it runs in-process
/// instead, with identical results and without a process per call.
pub fn delegate(plugin: &str, req: &Request, command: Command) -> Result<Option<CniResult>> {
    let path = find_plugin(plugin, req);
    if let Some(own) = crate::Plugin::from_name(plugin)
        && path.as_deref().is_none_or(crate::is_berth_plugin)
    {
        let mut sub = req.clone();
        sub.command = command;
        let out = crate::invoke(own, &sub).map_err(Error::from)?;
        return parse_output(plugin, command, &out);
    }
    let Some(path) = path else {
        return Err(Error::internal(format!(
            "failed to find plugin {plugin:?} in path {:?}",
            req.path
        )));
    };
    let mut child = std::process::Command::new(&path)
        .envs(req.env_vars(command))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::internal(format!("failed to run {}: {e}", path.display())))?;
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        // A plugin may exit without reading stdin; ignore EPIPE.
        let _ = stdin.write_all(&req.config);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::internal(format!("failed to run {}: {e}", path.display())))?;
    if !out.status.success() {
        if let Ok(e) = serde_json::from_slice::<ErrorResult>(&out.stdout) {
            return Err(Error::from(e));
        }
        // The 0.x/1.0 reference plugins omit cniVersion from errors.
        #[derive(serde::Deserialize)]
        struct Loose {
            code: u32,
            msg: String,
            #[serde(default)]
            details: String,
        }
        if let Ok(e) = serde_json::from_slice::<Loose>(&out.stdout) {
            return Err(Error {
                code: e.code,
                msg: e.msg,
                details: e.details,
            });
        }
        return Err(Error::internal(format!(
            "plugin {plugin} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    parse_output(plugin, command, &out.stdout)
}

fn parse_output(plugin: &str, command: Command, out: &[u8]) -> Result<Option<CniResult>> {
    if command != Command::Add {
        return Ok(None);
    }
    serde_json::from_slice(out)
        .map(Some)
        .map_err(|e| Error::internal(format!("plugin {plugin} returned an invalid result: {e}")))
}
