//! berth-bench: Berth and containerd+runc measured side by side over CRI.
//! See `berth-bench --help` and the `berth_e2e::bench` module.

use std::process::ExitCode;

use berth_e2e::bench::{self, BenchOptions};
use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let opts = BenchOptions::parse();
    // Everything the run set up is owned by the `run` future: on Ctrl-C or
    // SIGTERM it is dropped, which stops the daemons and removes what they
    // left.
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("berth-bench: cannot watch SIGTERM: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = tokio::select! {
        r = bench::run(&opts) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    match result.and_then(|report| bench::emit(&report, &opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
