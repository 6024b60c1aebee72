//! berth-shim: the per-container monitor.
//!
//! ```text
//! berth-shim start <shim_dir>   create the container from <shim_dir>/config.pb,
//!                               print one framed ShimResponse, leave the monitor running
//! berth-shim pause              PID 1 of a pod's shared PID namespace
//! berth-shim --version
//! ```

use std::path::Path;
use std::process::ExitCode;

const USAGE: &str = "usage: berth-shim start <shim_dir> | berth-shim pause | berth-shim --version";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--version"] | ["-V"] => {
            println!(
                "berth-shim {} (protocol frame limit {} bytes)",
                env!("CARGO_PKG_VERSION"),
                berth_proto::MAX_FRAME_LEN
            );
            ExitCode::SUCCESS
        }
        ["start", dir] => berth_shim::start::run(Path::new(dir)),
        ["pause"] => berth_shim::pause::run(),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
