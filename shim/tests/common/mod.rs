//! Test fixture: a busybox rootfs, an OCI bundle built from oci-spec's
//! default Linux spec, a shim dir with config.pb, and a client for
//! shim.sock. Tests need root (namespaces, mounts, cgroups); without it
//! they print a note and pass.

#![allow(dead_code)]

use std::os::unix::fs::symlink;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use berth_proto::shim::container_state::Status;
use berth_proto::shim::shim_request::Request;
use berth_proto::shim::shim_response::Response;
use berth_proto::shim::*;
use berth_proto::{read_frame, write_frame};
use prost::Message;

pub const SHIM: &str = env!("CARGO_BIN_EXE_berth-shim");
pub const HELPER: &str = env!("CARGO_BIN_EXE_berth-container");

pub fn is_root() -> bool {
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("skipping: berth-shim tests need root");
    }
    root
}

/// A busybox rootfs shared by every test container (built once, then
/// reused: containers only mount over it in their own mount namespace).
pub fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(|| {
        let base = PathBuf::from("/tmp/berth-shim-test-rootfs");
        if base.join(".ready").exists() {
            return base;
        }
        let tmp = PathBuf::from(format!(
            "/tmp/berth-shim-test-rootfs.{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&tmp);
        let bin = tmp.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for d in [
            "proc", "dev", "sys", "tmp", "etc", "root", "usr/bin", "sbin",
        ] {
            std::fs::create_dir_all(tmp.join(d)).unwrap();
        }
        std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
        let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
        for name in String::from_utf8(list.stdout).unwrap().lines() {
            if name != "busybox" && !name.is_empty() {
                symlink("busybox", bin.join(name)).unwrap();
            }
        }
        std::fs::write(tmp.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        std::fs::write(tmp.join("etc/group"), "root:x:0:\n").unwrap();
        std::fs::write(tmp.join(".ready"), "").unwrap();
        if std::fs::rename(&tmp, &base).is_err() {
            // Another test binary won the race; if a stale one is there
            // without the marker, replace it.
            if !base.join(".ready").exists() {
                let _ = std::fs::remove_dir_all(&base);
                std::fs::rename(&tmp, &base).unwrap();
            } else {
                let _ = std::fs::remove_dir_all(&tmp);
            }
        }
        base
    })
}

pub struct Opts {
    pub args: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdin_once: bool,
    pub rootfs: Option<PathBuf>,
    /// Extra top-level `linux` keys merged into the spec (e.g. seccomp).
    pub linux_extra: Option<serde_json::Value>,
    /// Extra top-level spec keys (e.g. hooks).
    pub spec_extra: Option<serde_json::Value>,
}

impl Opts {
    pub fn new(args: &[&str]) -> Self {
        Opts {
            args: args.iter().map(|s| s.to_string()).collect(),
            tty: false,
            stdin: false,
            stdin_once: false,
            rootfs: None,
            linux_extra: None,
            spec_extra: None,
        }
    }
    pub fn sh(script: &str) -> Self {
        Self::new(&["sh", "-c", script])
    }
}

pub struct Fixture {
    pub id: String,
    pub base: PathBuf,
    pub shim_dir: PathBuf,
    pub bundle: PathBuf,
    pub runtime_root: PathBuf,
    pub log_path: PathBuf,
    pub cgroups_path: String,
    pub memory_cgroup: PathBuf,
    shut_down: bool,
}

pub fn unique_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

impl Fixture {
    pub fn new(prefix: &str, opts: Opts) -> Self {
        let id = unique_id(prefix);
        let base = PathBuf::from(format!("/tmp/berth-shim-test/{id}"));
        let _ = std::fs::remove_dir_all(&base);
        let shim_dir = base.join("shim");
        let bundle = base.join("bundle");
        let runtime_root = base.join("runtime");
        let log_dir = base.join("logs");
        for d in [&shim_dir, &bundle, &log_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        let log_path = log_dir.join("0.log");
        let cgroups_path = format!("/berth-test/{id}");
        let memory_cgroup = PathBuf::from(format!("/sys/fs/cgroup/memory{cgroups_path}"));

        let rootfs = opts
            .rootfs
            .clone()
            .unwrap_or_else(|| rootfs().to_path_buf());
        let mut spec = serde_json::to_value(oci_spec::runtime::Spec::default()).unwrap();
        spec["root"] = serde_json::json!({"path": rootfs, "readonly": false});
        spec["hostname"] = serde_json::json!("berth-test");
        let process = &mut spec["process"];
        process["args"] = serde_json::json!(opts.args);
        process["terminal"] = serde_json::json!(opts.tty);
        process["env"] =
            serde_json::json!(["PATH=/bin:/sbin:/usr/bin", "TERM=xterm", "HOME=/root"]);
        let linux = &mut spec["linux"];
        linux["cgroupsPath"] = serde_json::json!(cgroups_path);
        if let Some(serde_json::Value::Object(extra)) = &opts.linux_extra {
            for (k, v) in extra {
                linux[k] = v.clone();
            }
        }
        if let Some(serde_json::Value::Object(extra)) = &opts.spec_extra {
            for (k, v) in extra {
                spec[k] = v.clone();
            }
        }
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec).unwrap(),
        )
        .unwrap();

        let cfg = ShimConfig {
            id: id.clone(),
            bundle: bundle.to_str().unwrap().to_owned(),
            log_path: log_path.to_str().unwrap().to_owned(),
            stdin: opts.stdin,
            stdin_once: opts.stdin_once,
            tty: opts.tty,
            runtime_root: runtime_root.to_str().unwrap().to_owned(),
            memory_cgroup: memory_cgroup.to_str().unwrap().to_owned(),
            container_helper: HELPER.to_owned(),
        };
        std::fs::write(shim_dir.join("config.pb"), cfg.encode_to_vec()).unwrap();
        Fixture {
            id,
            base,
            shim_dir,
            bundle,
            runtime_root,
            log_path,
            cgroups_path,
            memory_cgroup,
            shut_down: false,
        }
    }

    /// Runs `berth-shim start` and returns its one answer.
    pub fn create(&self) -> ShimResponse {
        let out = Command::new(SHIM)
            .arg("start")
            .arg(&self.shim_dir)
            .output()
            .expect("run berth-shim start");
        assert!(out.status.success(), "berth-shim start failed: {out:?}");
        let mut r = out.stdout.as_slice();
        let resp: ShimResponse = read_frame(&mut r).expect("one framed answer");
        assert!(r.is_empty(), "exactly one frame on stdout");
        resp
    }

    pub fn create_ok(&self) {
        let resp = self.create();
        assert_ok(&resp, "create");
    }

    pub fn client(&self) -> Client {
        Client::connect(&self.shim_dir.join("shim.sock"))
    }

    pub fn monitor_pid(&self) -> i32 {
        std::fs::read_to_string(self.shim_dir.join("shim.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Log records as (stream, tag, content), checking each line's format.
    pub fn log_records(&self) -> Vec<(String, String, String)> {
        parse_log(&self.log())
    }

    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let d = entry.path().join(self.cgroups_path.trim_start_matches('/'));
            if d.exists() {
                found.push(d);
            }
        }
        found
    }

    pub fn shutdown(&mut self) {
        let mut c = self.client();
        let resp = c.call(Request::Shutdown(ShutdownRequest {}));
        assert_ok(&resp, "shutdown");
        self.shut_down = true;
    }

    /// Shutdown was sent by the test itself.
    pub fn shutdown_done(&mut self) {
        self.shut_down = true;
    }

    /// Start + wait for EXITED.
    pub fn run_to_exit(&self) -> ContainerState {
        let mut c = self.client();
        assert_ok(&c.call(Request::Start(StartRequest {})), "start");
        c.wait_exited(Duration::from_secs(20))
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if !self.shut_down
            && let Ok(s) = UnixStream::connect(self.shim_dir.join("shim.sock"))
        {
            let mut c = Client { s };
            let _ = c.try_call(Request::Shutdown(ShutdownRequest {}));
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.base);
        }
    }
}

pub fn parse_log(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for line in text.split_inclusive('\n') {
        assert!(line.ends_with('\n'), "unterminated log line {line:?}");
        let line = &line[..line.len() - 1];
        let (ts, rest) = line.split_at(30);
        assert!(is_rfc3339_nano(ts), "bad timestamp in {line:?}");
        let mut parts = rest.splitn(4, ' ');
        assert_eq!(parts.next(), Some(""), "{line:?}");
        let stream = parts.next().unwrap().to_owned();
        let tag = parts.next().unwrap().to_owned();
        let content = parts
            .next()
            .unwrap_or_else(|| panic!("{line:?}"))
            .to_owned();
        assert!(stream == "stdout" || stream == "stderr", "{line:?}");
        assert!(tag == "F" || tag == "P", "{line:?}");
        out.push((stream, tag, content));
    }
    out
}

/// `^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$`
pub fn is_rfc3339_nano(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    b.len() == 30
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..29)
        && b[29] == b'Z'
}

pub struct Client {
    s: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect shim.sock");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Client { s }
    }

    pub fn try_call(&mut self, req: Request) -> Result<ShimResponse, berth_proto::FrameError> {
        write_frame(&mut self.s, &ShimRequest { request: Some(req) })?;
        read_frame(&mut self.s)
    }

    pub fn call(&mut self, req: Request) -> ShimResponse {
        self.try_call(req).expect("shim answers")
    }

    pub fn state(&mut self) -> ContainerState {
        match self.call(Request::State(StateRequest {})).response {
            Some(Response::State(s)) => s,
            other => panic!("State answered {other:?}"),
        }
    }

    pub fn wait_exited(&mut self, timeout: Duration) -> ContainerState {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.state();
            if s.status == Status::Exited as i32 {
                return s;
            }
            assert!(Instant::now() < deadline, "container did not exit: {s:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn exec(&mut self, args: &[&str], timeout_secs: i64) -> ShimResponse {
        self.call(Request::ExecSync(ExecSyncRequest {
            args: args.iter().map(|s| s.to_string()).collect(),
            timeout_secs,
        }))
    }
}

pub fn assert_ok(resp: &ShimResponse, what: &str) {
    assert!(
        matches!(resp.response, Some(Response::Ok(_))),
        "{what}: expected ok, got {resp:?}"
    );
}

pub fn error_of(resp: &ShimResponse) -> ShimError {
    match &resp.response {
        Some(Response::Error(e)) => e.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

pub fn pid_alive(pid: i32) -> bool {
    // A zombie still "exists": look at its state.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    !pid_alive(pid)
}

/// Polls `f` until true.
pub fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A streaming request (ExecStream, Attach) on its own connection: the
/// first answer and the fds that came with it (read with recvmsg, exactly
/// that frame, so what follows stays on the connection).
pub fn stream_request(
    f: &Fixture,
    req: Request,
) -> (UnixStream, ShimResponse, Vec<std::os::fd::OwnedFd>) {
    use std::os::fd::AsRawFd;
    let mut s = UnixStream::connect(f.shim_dir.join("shim.sock")).expect("connect shim.sock");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write_frame(&mut s, &ShimRequest { request: Some(req) }).unwrap();
    let mut fds = Vec::new();
    let mut len = [0u8; 4];
    recv_exact(s.as_raw_fd(), &mut len, &mut fds);
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    recv_exact(s.as_raw_fd(), &mut body, &mut fds);
    let resp = ShimResponse::decode(body.as_slice()).unwrap();
    (s, resp, fds)
}

fn recv_exact(fd: i32, buf: &mut [u8], fds: &mut Vec<std::os::fd::OwnedFd>) {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::FromRawFd;
    let mut got = 0;
    while got < buf.len() {
        let mut cmsg = nix::cmsg_space!([i32; 8]);
        let mut iov = [std::io::IoSliceMut::new(&mut buf[got..])];
        let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
            .expect("recvmsg");
        for c in msg.cmsgs().unwrap() {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: fresh fds from the kernel.
                fds.extend(
                    raw.into_iter()
                        .map(|r| unsafe { std::os::fd::OwnedFd::from_raw_fd(r) }),
                );
            }
        }
        assert!(msg.bytes > 0, "shim closed the connection mid-frame");
        got += msg.bytes;
    }
}

/// Reads attach output frames until `pred` holds on what a stream got, or
/// EOF / timeout. Returns (stdout bytes, stderr bytes, eof).
pub fn read_attach_until(
    s: &mut UnixStream,
    timeout: Duration,
    mut pred: impl FnMut(&[u8], &[u8]) -> bool,
) -> (Vec<u8>, Vec<u8>, bool) {
    use std::io::Read;
    let deadline = Instant::now() + timeout;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let mut dec = berth_proto::output::Decoder::new();
    let mut buf = [0u8; 65536];
    loop {
        while let Some((stream, data)) = dec.next_frame().expect("well-formed output frames") {
            match stream {
                berth_proto::output::STDOUT => out.extend(data),
                _ => err.extend(data),
            }
        }
        if pred(&out, &err) {
            return (out, err, false);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "timed out; stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => {
                assert!(!dec.has_partial(), "truncated output frame");
                return (out, err, true);
            }
            Ok(n) => dec.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read attach output: {e}"),
        }
    }
}

/// Reads a fd (pipe / pty master) until `pred` holds on everything read,
/// or EOF/EIO; panics after `timeout`.
pub fn read_fd_until(
    fd: &std::os::fd::OwnedFd,
    timeout: Duration,
    mut pred: impl FnMut(&str) -> bool,
) -> String {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if pred(&text) {
            return text;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out, read {text:?}");
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, left.as_millis().min(1000) as i32) };
        if p.revents == 0 {
            continue;
        }
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return text; // EOF, or EIO on a pty whose slave is closed
        }
        got.extend_from_slice(&buf[..n as usize]);
    }
}
