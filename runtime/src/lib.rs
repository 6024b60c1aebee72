//! berthd, the Berth CRI daemon, as a library: the binary in `main.rs` only
//! parses arguments and calls in here.

pub mod config;
pub mod container;
pub mod cri;
pub mod daemon;
pub mod error;
pub mod events;
pub mod h2_authority;
pub mod host;
pub mod image;
pub mod layout;
pub mod locks;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod network;
pub mod oci;
pub mod pod;
pub mod process;
pub mod recovery;
pub mod rpc_log;
pub mod sandbox;
pub mod server;
pub mod store;
pub mod streaming;
pub mod timing;
pub mod undo;
pub mod userns;

#[cfg(test)]
mod lifecycle_tests;
