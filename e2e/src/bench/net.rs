//! The pod network both runtimes get: a bridge CNI network with host-local
//! IPAM on a private /16, Debian's reference plugins, and the machine's
//! safety rules around it.
//!
//! Network safety: before a runtime may create a bridge with pod
//! addresses, `net-guard on` must succeed (private ranges cannot leave
//! through the default route); once the first sandbox runs, the route to
//! the pod subnet must go through the benchmark's bridge. The benchmark
//! itself never sends anything to a pod. Runtimes are measured one after
//! the other, so they use the same bridge name and subnet in turn.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::host;

/// The bridge the benchmark's CNI config makes.
pub const BRIDGE: &str = "bench0";
/// Its subnet: a private /16 like Berth's default pod network, chosen so
/// as not to meet containerd's, podman's, docker's or Berth's defaults.
pub const SUBNET: &str = "10.231.0.0/16";
/// An address inside [`SUBNET`] whose route must go through [`BRIDGE`].
pub const PROBE_ADDR: &str = "10.231.0.10";
/// Debian's containernetworking-plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The net-guard script: `$BERTH_NET_GUARD`, else the shared tools dir
/// (`/work/shared/tools`, or `shared/tools` beside the workspace).
pub fn net_guard_path() -> PathBuf {
    crate::net::net_guard_path()
}

/// Runs `net-guard on`; fails when it cannot.
pub fn guard_on() -> anyhow::Result<()> {
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
    Ok(())
}

/// Everything before a runtime may get the bridge config: the guard on,
/// the reference plugins there, no leftover bridge, no address of the
/// subnet on the host.
pub fn prepare() -> anyhow::Result<()> {
    guard_on()?;
    for plugin in ["bridge", "host-local", "loopback"] {
        anyhow::ensure!(
            Path::new(CNI_BIN_DIR).join(plugin).exists(),
            "{CNI_BIN_DIR}/{plugin} is missing: install containernetworking-plugins"
        );
    }
    // A bridge of this name is a leftover of an earlier, killed run.
    remove_bridge()?;
    let addrs = host::ip(&["-o", "-4", "addr", "show"])?;
    anyhow::ensure!(
        !addrs.contains(" 10.231."),
        "an interface already has an address in {SUBNET}: {addrs}"
    );
    Ok(())
}

/// The network list: bridge (gateway address on the bridge, no
/// masquerading: nothing is meant to leave) with host-local IPAM keeping
/// its state in `ipam_dir`, then loopback.
pub fn conflist(ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "berth-bench",
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET}]],
                    "dataDir": ipam_dir.display().to_string(),
                },
            },
            {"type": "loopback"},
        ],
    })
    .to_string()
}

/// Writes [`conflist`] as `<conf_dir>/10-berth-bench.conflist`.
pub fn write_conflist(conf_dir: &Path, ipam_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(conf_dir)?;
    std::fs::write(conf_dir.join("10-berth-bench.conflist"), conflist(ipam_dir))?;
    Ok(())
}

/// The route to the pod subnet must go through the benchmark's bridge
/// (checked once a sandbox runs, so the bridge exists).
pub fn check_route() -> anyhow::Result<()> {
    let dev = host::route_dev(PROBE_ADDR)?;
    anyhow::ensure!(
        dev == BRIDGE,
        "the route to {PROBE_ADDR} goes through {dev}, not {BRIDGE}"
    );
    Ok(())
}

/// Deletes the bridge if it exists.
pub fn remove_bridge() -> anyhow::Result<()> {
    if host::link_exists(BRIDGE) {
        host::ip(&["link", "del", BRIDGE])?;
    }
    Ok(())
}
