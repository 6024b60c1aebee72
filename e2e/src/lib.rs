//! berth-e2e: the end-to-end harness every scenario test and the benchmark
//! stand on: a real registry on loopback, OCI test images built from Debian's
//! busybox-static and pushed to it, a berthd started on temporary dirs, and a
//! CRI client on its socket. Everything a harness starts is stopped and
//! removed when it is dropped, also when a test panics.

pub mod bench;
pub mod berthd;
pub mod cri;
pub mod deploy;
pub mod http;
pub mod images;
pub mod net;
pub mod pods;
pub mod process;
pub mod registry;
pub mod streaming;

pub use berthd::{Berthd, BerthdOptions, CniOptions, metrics_address, scrape};
pub use images::{
    BuiltImage, BuiltIndex, Compression, Image, ImageSettings, Malicious, Platform, TestImages,
};
pub use registry::{Registry, RegistryOptions};

/// Says that a test (or part of one) was skipped and why, straight on the
/// test's stderr: libtest captures `eprintln!`, and a skip must be seen.
pub fn report_skip(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// Fails fast with a clear message when a test needs root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "berth e2e tests need root (namespaces, mounts, the CRI socket)"
    );
}
