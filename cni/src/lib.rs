//! berth-cni: the CNI specification's types shared by Berth's plugins and by
//! berthd's plugin invocation, and Berth's plugins themselves (`bridge`,
//! `host-local`, `loopback`, `portmap`).
//!
//! Every plugin runs through [`invoke`], which the binaries in `src/bin/`
//! wrap ([`plugin_main`]) and berthd can call in-process: the same
//! [`Request`] gives the same bytes either way.

pub mod ip;
pub mod netlink;
pub mod nft;
pub mod plugins;
pub mod spec;

pub use spec::{CniResult, Command, Error, ErrorCode, ErrorResult, Request, Result, VersionResult};

/// One of Berth's plugins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plugin {
    Bridge,
    HostLocal,
    Loopback,
    Portmap,
}

impl Plugin {
    pub const ALL: [Plugin; 4] = [
        Plugin::Bridge,
        Plugin::HostLocal,
        Plugin::Loopback,
        Plugin::Portmap,
    ];

    /// The binary / `type` name.
    pub fn name(&self) -> &'static str {
        match self {
            Plugin::Bridge => "bridge",
            Plugin::HostLocal => "host-local",
            Plugin::Loopback => "loopback",
            Plugin::Portmap => "portmap",
        }
    }

    pub fn from_name(name: &str) -> Option<Plugin> {
        Plugin::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// Runs `plugin` for `req` in-process and returns what the plugin binary
/// would print on stdout: the result JSON for ADD, the version JSON for
/// VERSION, nothing for DEL/CHECK/STATUS/GC. On failure, the spec's error
/// object (the binary prints it and exits 1).
///
/// The work happens on a fresh thread, so this may be called from inside an
/// async runtime.
pub fn invoke(plugin: Plugin, req: &Request) -> std::result::Result<Vec<u8>, ErrorResult> {
    std::thread::scope(|s| {
        s.spawn(|| run(plugin, req)).join().unwrap_or_else(|_| {
            Err(
                Error::internal(format!("{} plugin panicked", plugin.name()))
                    .to_result(&spec::config_version(&req.config)),
            )
        })
    })
}

fn run(plugin: Plugin, req: &Request) -> std::result::Result<Vec<u8>, ErrorResult> {
    let version = spec::config_version(&req.config);
    if req.command == Command::Version {
        let mut out = serde_json::to_vec(&VersionResult::current()).expect("serializes");
        out.push(b'\n');
        return Ok(out);
    }
    let fail = |e: Error| e.to_result(&version);
    req.validate().map_err(fail)?;
    use plugins::{bridge, host_local, loopback, portmap};
    let result = match (plugin, req.command) {
        (Plugin::Bridge, Command::Add) => bridge::add(req).map(Some),
        (Plugin::Bridge, Command::Del) => bridge::del(req).map(|_| None),
        (Plugin::Bridge, Command::Check) => bridge::check(req).map(|_| None),
        (Plugin::Bridge, Command::Status) => bridge::status(req).map(|_| None),
        (Plugin::Bridge, Command::Gc) => bridge::gc(req).map(|_| None),
        (Plugin::HostLocal, Command::Add) => host_local::add(req).map(Some),
        (Plugin::HostLocal, Command::Del) => host_local::del(req).map(|_| None),
        (Plugin::HostLocal, Command::Check) => host_local::check(req).map(|_| None),
        (Plugin::HostLocal, Command::Status) => host_local::status(req).map(|_| None),
        (Plugin::HostLocal, Command::Gc) => host_local::gc(req).map(|_| None),
        (Plugin::Loopback, Command::Add) => loopback::add(req).map(Some),
        (Plugin::Loopback, Command::Del) => loopback::del(req).map(|_| None),
        (Plugin::Loopback, Command::Check) => loopback::check(req).map(|_| None),
        (Plugin::Loopback, Command::Status) => loopback::status(req).map(|_| None),
        (Plugin::Loopback, Command::Gc) => loopback::gc(req).map(|_| None),
        (Plugin::Portmap, Command::Add) => portmap::add(req).map(Some),
        (Plugin::Portmap, Command::Del) => portmap::del(req).map(|_| None),
        (Plugin::Portmap, Command::Check) => portmap::check(req).map(|_| None),
        (Plugin::Portmap, Command::Status) => portmap::status(req).map(|_| None),
        (Plugin::Portmap, Command::Gc) => portmap::gc(req).map(|_| None),
        (_, Command::Version) => unreachable!("handled above"),
    };
    match result {
        Ok(Some(r)) => Ok(r.to_bytes(&version)),
        Ok(None) => Ok(Vec::new()),
        Err(e) => Err(fail(e)),
    }
}

/// Reads the request from the process (env + stdin), runs the plugin and
/// prints the result or error the way the spec requires; never returns.
/// Bytes every Berth plugin binary carries, so berthd can recognise its own
/// plugins in a CNI bin dir and run their code in-process instead.
pub const PLUGIN_MARKER: &str = "berth-cni-plugin-binary/v1";

/// Whether the file at `path` is one of Berth's plugin binaries (it carries
/// [`PLUGIN_MARKER`]), whose code may then run in-process instead of it.
/// The answer is remembered per path, size and mtime.
pub fn is_berth_plugin(path: &std::path::Path) -> bool {
    type Seen = std::collections::HashMap<std::path::PathBuf, (std::time::SystemTime, u64, bool)>;
    static SEEN: std::sync::Mutex<Option<Seen>> = std::sync::Mutex::new(None);
    let Ok(meta) = std::fs::metadata(path) else {
        return false;
    };
    let key = (meta.modified().unwrap_or(std::time::UNIX_EPOCH), meta.len());
    if let Some((mtime, len, ours)) = SEEN.lock().unwrap().get_or_insert_default().get(path)
        && (*mtime, *len) == key
    {
        return *ours;
    }
    let ours = std::fs::read(path)
        .is_ok_and(|bytes| memchr::memmem::find(&bytes, PLUGIN_MARKER.as_bytes()).is_some());
    SEEN.lock()
        .unwrap()
        .get_or_insert_default()
        .insert(path.to_path_buf(), (key.0, key.1, ours));
    ours
}

pub fn plugin_main(plugin: Plugin) -> ! {
    use std::io::{Read, Write};
    // Keeps the marker in the binary.
    std::hint::black_box(PLUGIN_MARKER);
    let mut config = Vec::new();
    let read = std::io::stdin().read_to_end(&mut config);
    let outcome = match read {
        Err(e) => Err(
            Error::new(ErrorCode::IoFailure, format!("failed to read stdin: {e}"))
                .to_result(&spec::config_version(&config)),
        ),
        Ok(_) => match Request::from_vars(|k| std::env::var(k).ok(), config.clone()) {
            Ok(req) => invoke(plugin, &req),
            Err(e) => Err(e.to_result(&spec::config_version(&config))),
        },
    };
    let mut stdout = std::io::stdout().lock();
    match outcome {
        Ok(out) => {
            let _ = stdout.write_all(&out);
            let _ = stdout.flush();
            std::process::exit(0)
        }
        Err(e) => {
            let mut out = serde_json::to_vec_pretty(&e).expect("serializes");
            out.push(b'\n');
            let _ = stdout.write_all(&out);
            let _ = stdout.flush();
            std::process::exit(1)
        }
    }
}
