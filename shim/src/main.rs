//! berth-shim: the per-container monitor.
//!
//! The container lifecycle (namespaces, cgroups, stdio, CRI log, exit status)
//! arrives with the pod sandboxes and containers work; until then the binary
//! answers `--version` and refuses every other invocation with a clear
//! message rather than pretending to run a container.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") | Some("-V") => {
            println!(
                "berth-shim {} (protocol frame limit {} bytes)",
                env!("CARGO_PKG_VERSION"),
                berth_proto::MAX_FRAME_LEN
            );
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "berth-shim: running containers is not implemented yet; only --version is supported"
            );
            ExitCode::from(2)
        }
    }
}
