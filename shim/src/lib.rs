//! berth-shim: the per-container monitor (this library) and its modes.
//!
//! The monitor binary (`berth-shim`, `src/main.rs`) uses only this library:
//! berth-proto, berth-cgroup, prost, libc and std, a single-threaded poll loop, no async
//! runtime. libcontainer lives in the separate `berth-container` helper
//! (`src/bin/berth-container/`), run once per operation.
//!
//! Modules: [`start`] (`berth-shim start <shim_dir>`: fork the monitor and
//! report create's outcome), [`monitor`] (the loop), [`conn`] (framed
//! requests), [`crilog`] (CRI log format), [`helper`] (running
//! `berth-container`), [`files`] (the
//! shim directory), [`pause`] (`berth-shim pause`), [`sys`], [`timefmt`].

pub mod conn;
pub mod crilog;
pub mod files;
pub mod helper;
pub mod monitor;
pub mod pause;
pub mod start;
pub mod sys;
pub mod timefmt;
