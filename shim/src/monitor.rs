//! The long-lived monitor: one single-threaded poll loop per container.
//!
//! It owns the container's stdio (pipes or a pty master), writes the CRI log,
//! reaps the container's init (and every other orphan: it is a child
//! subreaper), records the exit in `exit.pb`, and answers berthd's requests
//! on `shim.sock`. Everything that needs libcontainer runs in the
//! `berth-container` helper, one run at a time ([`crate::helper`]).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use berth_proto::MAX_FRAME_LEN;
use berth_proto::shim::container_state::Status;
use berth_proto::shim::shim_error::Code;
use berth_proto::shim::{
    AttachStarted, ContainerState, Empty, ExecExited, ExecStarted, ExecStreamRequest,
    ExecSyncResponse, ExitRecord, ShimConfig, ShimError, ShimRequest, ShimResponse,
    shim_request::Request, shim_response::Response,
};

use crate::conn::{Conn, Parsed, Session};
use crate::crilog::{LineSplitter, LogFile, StreamName, timestamp_now};
use crate::files::{self, Diag};
use crate::helper::{self, Helper, HelperStdio};
use crate::sys::{self, ChildExit};
use crate::timefmt::now_nanos;
use berth_cgroup::ContainerCgroup;

/// Cap on each of an ExecSync's stdout and stderr.
pub const EXEC_OUTPUT_CAP: usize = 16 << 20;
/// How long create (one `berth-container create`) may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long Shutdown waits for a killed container to exit.
const SHUTDOWN_EXIT_WAIT: Duration = Duration::from_secs(10);
/// Exits of children nobody claimed yet (an exec'd process can be reaped
/// before its helper reported its pid).
const UNCLAIMED_KEEP: usize = 64;
/// Read chunk for container output.
const READ_CHUNK: usize = 16 * 1024;
/// Output queued for one attach connection beyond which it is dropped (the
/// log must never wait for a slow client).
pub const ATTACH_QUEUE_LIMIT: usize = 1 << 20;

pub fn error(code: Code, message: impl Into<String>) -> ShimResponse {
    ShimResponse {
        response: Some(Response::Error(ShimError {
            code: code as i32,
            message: message.into(),
        })),
    }
}

pub fn ok() -> ShimResponse {
    ShimResponse {
        response: Some(Response::Ok(Empty {})),
    }
}

/// One of the container's output streams.
#[derive(Debug)]
struct Stream {
    fd: OwnedFd,
    splitter: LineSplitter,
    /// Attach frame stream byte.
    attach_id: u8,
}

/// An ExecSync or ExecStream in progress.
#[derive(Debug)]
struct ExecRun {
    id: u64,
    conn: u64,
    args: Vec<String>,
    /// The process's stdio until the helper is spawned.
    stdio: Option<HelperStdio>,
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
    out_buf: Vec<u8>,
    err_buf: Vec<u8>,
    pid: Option<i32>,
    deadline: Option<Instant>,
    /// Set for an ExecStream.
    stream: Option<ExecStream>,
}

/// What an ExecStream needs besides an ExecSync's fields.
#[derive(Debug)]
struct ExecStream {
    /// Rows, columns of a tty's initial size.
    size: Option<(u32, u32)>,
    /// berthd's ends (stdout r, stderr r[, stdin w]) until ExecStarted.
    client_fds: Vec<OwnedFd>,
    /// With tty: the console socket libcontainer sends the master to.
    console: Option<ConsoleSocket>,
    /// ExecStarted was sent; the conn is an exec session.
    started: bool,
    /// The session ended (berthd hung up): the process is killed and its
    /// exit reaped silently.
    abandoned: bool,
}

/// A listening console socket in the shim directory, removed on drop.
#[derive(Debug)]
struct ConsoleSocket {
    listener: OwnedFd,
    dir: PathBuf,
    name: String,
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(&self.name));
    }
}

/// Work for the helper, run one at a time in order.
#[derive(Debug)]
enum Job {
    Start {
        conn: u64,
    },
    Pause {
        conn: u64,
    },
    /// `conn` is None for the monitor's own thaw (after a SIGKILL).
    Resume {
        conn: Option<u64>,
    },
    Exec {
        exec: u64,
    },
    Delete,
}

#[derive(Debug)]
struct HelperRun {
    job: Job,
    pid: i32,
    report: OwnedFd,
    buf: Vec<u8>,
    /// The report pipe hit EOF: stop polling it (the exit comes by SIGCHLD).
    report_eof: bool,
}

#[derive(Debug)]
enum ShutdownPhase {
    WaitExit { deadline: Instant },
    Deleting,
}

#[derive(Debug)]
struct Shutdown {
    conn: u64,
    phase: ShutdownPhase,
}

#[derive(Clone, Copy, Debug)]
enum Tok {
    Signal,
    Listener,
    Stream(usize),
    ExecOut(u64, bool),
    Report,
    Conn(u64),
}

/// What the monitor knows about the container.
#[derive(Debug)]
struct Life {
    status: Status,
    pid: i32,
    created_at: i64,
    started_at: i64,
    finished_at: i64,
    exit_code: i32,
    reason: String,
    message: String,
}

pub struct Monitor {
    cfg: ShimConfig,
    dir: PathBuf,
    diag: Diag,
    helper: Helper,
    sigfd: OwnedFd,
    listener: Option<OwnedFd>,
    conns: Vec<Conn>,
    next_id: u64,
    life: Life,
    streams: Vec<Option<Stream>>,
    stdin_w: Option<OwnedFd>,
    log: LogFile,
    cgroup: ContainerCgroup,
    oom_base: Option<u64>,
    /// Started through the notify socket: libcontainer's state.json still
    /// says "created" until a helper run records "running".
    needs_mark: bool,
    poststart_hooks: bool,
    running: Option<HelperRun>,
    queue: VecDeque<Job>,
    execs: Vec<ExecRun>,
    unclaimed: VecDeque<ChildExit>,
    shutdown: Option<Shutdown>,
    exit_now: bool,
    buf: Vec<u8>,
    records: Vec<u8>,
}

impl Monitor {
    /// Sets up the process (subreaper, signals), creates the container and
    /// starts serving. `Err` carries the answer for berthd after cleanup.
    pub fn create(cfg: ShimConfig, dir: PathBuf, mut diag: Diag) -> Result<Self, ShimResponse> {
        let internal =
            |what: &str, e: std::io::Error| error(Code::Internal, format!("{what}: {e}"));
        sys::set_child_subreaper().map_err(|e| internal("set child subreaper", e))?;
        // SIGTERM/SIGINT/SIGHUP are blocked and read (and ignored) from the
        // signalfd rather than set to SIG_IGN, which would be inherited by
        // the container through execve. Children get an empty mask.
        let sigfd =
            sys::block_signals_to_fd(&[libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
                .map_err(|e| internal("signalfd", e))?;

        let log_path = (!cfg.log_path.is_empty()).then(|| PathBuf::from(&cfg.log_path));
        let log = LogFile::open(log_path).map_err(|e| {
            error(
                Code::Internal,
                format!("open log file {} for {}: {e}", cfg.log_path, cfg.id),
            )
        })?;
        let helper = Helper {
            path: Helper::default_path(&cfg.container_helper),
            root: PathBuf::from(&cfg.runtime_root),
            id: cfg.id.clone(),
        };
        diag.log(format_args!(
            "creating container {} (bundle {}, helper {})",
            cfg.id,
            cfg.bundle,
            helper.path.display()
        ));
        let mut m = Monitor {
            dir,
            diag,
            helper,
            sigfd,
            listener: None,
            conns: Vec::new(),
            next_id: 1,
            life: Life {
                status: Status::Created,
                pid: 0,
                created_at: now_nanos(),
                started_at: 0,
                finished_at: 0,
                exit_code: 0,
                reason: String::new(),
                message: String::new(),
            },
            streams: Vec::new(),
            stdin_w: None,
            log,
            cgroup: ContainerCgroup::default(),
            oom_base: None,
            needs_mark: false,
            poststart_hooks: false,
            running: None,
            queue: VecDeque::new(),
            execs: Vec::new(),
            unclaimed: VecDeque::new(),
            shutdown: None,
            exit_now: false,
            buf: Vec::new(),
            records: Vec::new(),
            cfg,
        };
        if let Err(msg) = m.create_container() {
            m.diag.log(format_args!("create failed: {msg}"));
            m.cleanup_failed_create();
            return Err(error(Code::Internal, msg));
        }
        if let Err(e) = m.listen() {
            let msg = format!("listen on {}: {e}", m.dir.join(files::SOCKET).display());
            m.diag.log(format_args!("{msg}"));
            m.cleanup_failed_create();
            return Err(error(Code::Internal, msg));
        }
        Ok(m)
    }

    fn create_container(&mut self) -> Result<(), String> {
        let io_err = |what: &str, e: std::io::Error| format!("{what}: {e}");
        let mut options: Vec<OsString> = vec!["--bundle".into(), self.cfg.bundle.clone().into()];
        let mut console = None;
        let stdio = if self.cfg.tty {
            console = Some(
                sys::listen_unix(&self.dir, files::CONSOLE_SOCKET)
                    .map_err(|e| io_err("console socket", e))?,
            );
            options.extend(helper::console_socket_option(
                &self.dir,
                files::CONSOLE_SOCKET,
            ));
            HelperStdio::null().map_err(|e| io_err("open /dev/null", e))?
        } else {
            let (out_r, out_w) = sys::pipe().map_err(|e| io_err("stdout pipe", e))?;
            let (err_r, err_w) = sys::pipe().map_err(|e| io_err("stderr pipe", e))?;
            let stdin = if self.cfg.stdin {
                let (in_r, in_w) = sys::pipe().map_err(|e| io_err("stdin pipe", e))?;
                self.stdin_w = Some(in_w);
                in_r
            } else {
                sys::open_dev_null(libc::O_RDONLY).map_err(|e| io_err("open /dev/null", e))?
            };
            for fd in [&out_r, &err_r] {
                sys::set_nonblocking(fd.as_raw_fd()).map_err(|e| io_err("pipe", e))?;
            }
            self.streams.push(Some(Stream {
                fd: out_r,
                splitter: LineSplitter::new(StreamName::Stdout),
                attach_id: berth_proto::output::STDOUT,
            }));
            self.streams.push(Some(Stream {
                fd: err_r,
                splitter: LineSplitter::new(StreamName::Stderr),
                attach_id: berth_proto::output::STDERR,
            }));
            HelperStdio {
                stdin,
                stdout: out_w,
                stderr: err_w,
            }
        };
        let t0 = Instant::now();
        let spawned = self
            .helper
            .spawn("create", &options, &[], false, stdio)
            .map_err(|e| e.to_string())?;
        // Create runs before anything else is served: wait for the helper.
        let code = self.wait_helper(spawned.pid, CREATE_TIMEOUT)?;
        let helper_time = t0.elapsed();
        let mut report = Vec::new();
        helper::read_report(&spawned.report, &mut report);
        let words = helper::outcome(&report, code)?;
        let pid: i32 = words
            .first()
            .and_then(|w| w.parse().ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("berth-container create reported no pid: {words:?}"))?;
        self.life.pid = pid;
        self.poststart_hooks = helper::word_value(&words, "poststart") == Some("1");
        if let Some(listener) = console {
            let master =
                receive_pty_master(&listener).map_err(|e| io_err("receive the pty master", e))?;
            let _ = std::fs::remove_file(self.dir.join(files::CONSOLE_SOCKET));
            sys::set_nonblocking(master.as_raw_fd()).map_err(|e| io_err("pty", e))?;
            if self.cfg.stdin {
                // Input goes to the same master; a dup keeps it open for
                // attach even after the output side hits EOF.
                let dup = master
                    .try_clone()
                    .map_err(|e| io_err("dup pty master", e))?;
                self.stdin_w = Some(dup);
            }
            self.streams.push(Some(Stream {
                fd: master,
                splitter: LineSplitter::new(StreamName::Stdout),
                attach_id: berth_proto::output::STDOUT,
            }));
        }
        self.cgroup = ContainerCgroup::locate(&self.cfg.memory_cgroup, pid);
        self.oom_base = self.cgroup.oom_kills();
        self.diag.log(format_args!(
            "created container {} init pid {pid} in {:.1} ms (berth-container {:.1} ms), cgroup {:?}",
            self.cfg.id,
            self.life_age_ms(),
            helper_time.as_secs_f64() * 1000.0,
            self.cgroup
        ));
        Ok(())
    }

    /// Milliseconds since the monitor started creating the container.
    fn life_age_ms(&self) -> f64 {
        (now_nanos() - self.life.created_at) as f64 / 1e6
    }

    /// Waits for a helper run before the loop starts; kills it after
    /// `timeout` (libcontainer stuck, e.g. on a hung mount).
    fn wait_helper(&mut self, pid: i32, timeout: Duration) -> Result<i32, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(code) =
                sys::try_wait_pid(pid).map_err(|e| format!("wait for berth-container: {e}"))?
            {
                return Ok(code);
            }
            if Instant::now() > deadline {
                let _ = sys::kill(pid, libc::SIGKILL);
                let _ = sys::wait_pid(pid);
                return Err(format!(
                    "berth-container did not finish within {}s",
                    timeout.as_secs()
                ));
            }
            let mut p = libc::pollfd {
                fd: self.sigfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            // Other children's exits are picked up by the loop's first reap.
            sys::read_signals(self.sigfd.as_raw_fd(), |_| {});
        }
    }

    /// A failed create leaves nothing: no container state, no cgroup, no
    /// process, no socket.
    fn cleanup_failed_create(&mut self) {
        if self.life.pid > 0 {
            let _ = sys::kill(self.life.pid, libc::SIGKILL);
        }
        match self.helper.spawn(
            "delete",
            &[],
            &[],
            false,
            match HelperStdio::null() {
                Ok(s) => s,
                Err(_) => return,
            },
        ) {
            Ok(sp) => {
                let code = self.wait_helper(sp.pid, CREATE_TIMEOUT).unwrap_or(255);
                let mut report = Vec::new();
                helper::read_report(&sp.report, &mut report);
                if let Err(e) = helper::outcome(&report, code) {
                    self.diag
                        .log(format_args!("cleanup after failed create: {e}"));
                }
            }
            Err(e) => self
                .diag
                .log(format_args!("cleanup after failed create: {e}")),
        }
        while sys::reap_any().is_some() {}
        let _ = std::fs::remove_file(self.dir.join(files::CONSOLE_SOCKET));
        let _ = std::fs::remove_file(self.dir.join(files::SOCKET));
        let _ = std::fs::remove_file(self.dir.join(files::PID));
    }

    fn listen(&mut self) -> std::io::Result<()> {
        files::write_atomic(
            &self.dir,
            files::PID,
            format!("{}\n", std::process::id()).as_bytes(),
            // A pid means nothing after a reboot: no fsync.
            false,
        )?;
        self.listener = Some(sys::listen_unix(&self.dir, files::SOCKET)?);
        Ok(())
    }

    /// Serves until Shutdown; then removes shim.sock and shim.pid.
    pub fn run(mut self) {
        // Setting up touched heap pages that are free now: give them back
        // (the monitor's private memory is what a node pays per container).
        sys::trim_heap();
        // A child may have exited before the loop (e.g. killed while the
        // monitor was reporting to `berth-shim start`).
        self.reap();
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        let mut toks: Vec<Tok> = Vec::new();
        while !self.exit_now {
            self.pump_conns();
            self.run_next_job();
            if self.exit_now {
                break;
            }
            pfds.clear();
            toks.clear();
            self.poll_set(&mut pfds, &mut toks);
            let timeout = self.poll_timeout();
            // SAFETY: pfds is a valid array of pollfd.
            let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                continue; // EINTR
            }
            for (pfd, tok) in pfds.iter().zip(toks.iter()) {
                if pfd.revents == 0 {
                    continue;
                }
                match *tok {
                    Tok::Signal => self.on_signal(),
                    Tok::Listener => self.accept(),
                    Tok::Stream(i) => self.read_stream(i, false),
                    Tok::ExecOut(id, is_err) => self.read_exec(id, is_err),
                    Tok::Report => {
                        if let Some(run) = &mut self.running {
                            run.report_eof = helper::read_report(&run.report, &mut run.buf);
                        }
                    }
                    Tok::Conn(id) => self.on_conn(id, pfd.revents),
                }
            }
            self.check_deadlines();
        }
        self.finish();
    }

    fn poll_set(&self, pfds: &mut Vec<libc::pollfd>, toks: &mut Vec<Tok>) {
        let mut add = |fd: RawFd, events: libc::c_short, tok: Tok| {
            pfds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            toks.push(tok);
        };
        add(self.sigfd.as_raw_fd(), libc::POLLIN, Tok::Signal);
        if let Some(l) = &self.listener {
            add(l.as_raw_fd(), libc::POLLIN, Tok::Listener);
        }
        for (i, s) in self.streams.iter().enumerate() {
            if let Some(s) = s {
                add(s.fd.as_raw_fd(), libc::POLLIN, Tok::Stream(i));
            }
        }
        for e in &self.execs {
            if let Some(fd) = &e.out {
                add(fd.as_raw_fd(), libc::POLLIN, Tok::ExecOut(e.id, false));
            }
            if let Some(fd) = &e.err {
                add(fd.as_raw_fd(), libc::POLLIN, Tok::ExecOut(e.id, true));
            }
        }
        if let Some(run) = &self.running
            && !run.report_eof
        {
            add(run.report.as_raw_fd(), libc::POLLIN, Tok::Report);
        }
        for c in &self.conns {
            let attach = matches!(c.session, Session::Attach { .. });
            if c.eof && !c.wants_write() && !attach {
                // Nothing to read or write: polling would only repeat POLLHUP.
                continue;
            }
            let mut events = 0;
            if !c.eof && !c.busy {
                events |= libc::POLLIN;
            }
            if c.wants_write() {
                events |= libc::POLLOUT;
            }
            add(c.fd.as_raw_fd(), events, Tok::Conn(c.id));
        }
    }

    /// Milliseconds until the nearest deadline, or -1.
    fn poll_timeout(&self) -> libc::c_int {
        let mut nearest: Option<Instant> = None;
        for d in self.execs.iter().filter_map(|e| e.deadline) {
            nearest = Some(nearest.map_or(d, |n| n.min(d)));
        }
        if let Some(Shutdown {
            phase: ShutdownPhase::WaitExit { deadline },
            ..
        }) = &self.shutdown
        {
            nearest = Some(nearest.map_or(*deadline, |n| n.min(*deadline)));
        }
        match nearest {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up so the deadline has passed when poll returns.
                (left.as_millis() as u64 + 1).min(i32::MAX as u64) as libc::c_int
            }
        }
    }

    // ---- signals and children -------------------------------------------

    fn on_signal(&mut self) {
        let mut child = false;
        sys::read_signals(self.sigfd.as_raw_fd(), |sig| {
            if sig == libc::SIGCHLD as u32 {
                child = true;
            }
            // SIGTERM, SIGINT, SIGHUP: ignored; only Shutdown stops the
            // monitor.
        });
        if child {
            self.reap();
        }
    }

    fn reap(&mut self) {
        while let Some(exit) = sys::reap_any() {
            self.on_child_exit(exit);
        }
    }

    fn on_child_exit(&mut self, exit: ChildExit) {
        if self.running.as_ref().is_some_and(|r| r.pid == exit.pid) {
            self.on_helper_exit(exit.code);
        } else if exit.pid == self.life.pid && self.life.status != Status::Exited {
            self.on_init_exit(exit.code);
        } else if let Some(i) = self.execs.iter().position(|e| e.pid == Some(exit.pid)) {
            self.finish_exec(i, exit.code);
        } else {
            if self.unclaimed.len() == UNCLAIMED_KEEP {
                self.unclaimed.pop_front();
            }
            self.unclaimed.push_back(exit);
        }
    }

    fn on_init_exit(&mut self, code: i32) {
        let now = now_nanos();
        // Output written before the exit is in the pipes: log it first.
        for i in 0..self.streams.len() {
            self.read_stream(i, true);
        }
        let oom = match (self.oom_base, self.cgroup.oom_kills()) {
            (Some(before), Some(after)) => after > before,
            (None, Some(after)) => after > 0,
            _ => false,
        };
        let reason = if oom {
            "OOMKilled"
        } else if code == 0 {
            "Completed"
        } else {
            "Error"
        };
        self.life.exit_code = code;
        self.life.finished_at = now;
        self.life.reason = reason.to_owned();
        self.stdin_w = None;
        let rec = ExitRecord {
            exit_code: code,
            finished_at_ns: now,
            reason: self.life.reason.clone(),
            message: self.life.message.clone(),
            started_at_ns: self.life.started_at,
            pid: self.life.pid,
        };
        if let Err(e) = files::write_exit_record(&self.dir, &rec) {
            self.diag.log(format_args!("write {}: {e}", files::EXIT));
        }
        self.life.status = Status::Exited;
        self.diag.log(format_args!(
            "container {} exited with {code} ({reason})",
            self.cfg.id
        ));
        // Attached clients get what was read, then EOF.
        for c in &mut self.conns {
            if matches!(c.session, Session::Attach { .. }) {
                c.close_when_flushed = true;
            }
        }
        if let Some(sd) = &mut self.shutdown
            && matches!(sd.phase, ShutdownPhase::WaitExit { .. })
        {
            sd.phase = ShutdownPhase::Deleting;
            self.queue.push_back(Job::Delete);
        }
    }

    // ---- container output -----------------------------------------------

    /// Reads a stream: a few chunks per wakeup so requests stay served, or
    /// (`drain`) until it would block, bounded in case something keeps
    /// writing. EOF closes it after writing a pending partial line.
    fn read_stream(&mut self, i: usize, drain: bool) {
        let Some(Some(stream)) = self.streams.get_mut(i) else {
            return;
        };
        let ts = timestamp_now();
        let mut eof = false;
        let max_chunks = if drain { 256 } else { 16 };
        for _ in 0..max_chunks {
            match sys::read_chunk(stream.fd.as_raw_fd(), &mut self.buf, READ_CHUNK) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(_) => {
                    stream.splitter.feed(&self.buf, &ts, &mut self.records);
                    fan_out(&mut self.conns, &mut self.diag, stream.attach_id, &self.buf);
                }
                // EIO: a pty whose slave side is closed everywhere.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    eof = true;
                    break;
                }
                Err(_) => break, // EAGAIN
            }
        }
        if eof {
            stream.splitter.finish(&ts, &mut self.records);
            self.streams[i] = None;
        }
        self.write_records();
    }

    fn write_records(&mut self) {
        if self.records.is_empty() {
            return;
        }
        if let Err(e) = self.log.write(&self.records) {
            self.diag
                .log(format_args!("write {}: {e}", self.cfg.log_path));
        }
        self.records.clear();
        if self.records.capacity() > 4 * READ_CHUNK {
            self.records = Vec::new();
        }
    }

    // ---- connections ----------------------------------------------------

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        while let Ok(Some(fd)) = sys::accept(listener.as_raw_fd()) {
            let id = self.next_id;
            self.next_id += 1;
            self.conns.push(Conn::new(id, fd));
        }
    }

    fn on_conn(&mut self, id: u64, revents: libc::c_short) {
        let Some(c) = self.conns.iter_mut().find(|c| c.id == id) else {
            return;
        };
        if revents & libc::POLLOUT != 0 {
            c.flush();
        }
        if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            c.hup = true;
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            c.fill();
        }
        // An attach client's EOF is the end of its stdin (stdin_once).
        if c.eof && c.session == (Session::Attach { stdin: true }) {
            c.session = Session::Attach { stdin: false };
            self.attach_stdin_ended();
        }
    }

    /// Handles buffered requests of idle connections; drops finished ones.
    fn pump_conns(&mut self) {
        let mut i = 0;
        while i < self.conns.len() {
            while self.conns[i].session == Session::None
                && !self.conns[i].busy
                && !self.conns[i].broken
            {
                match self.conns[i].next_request() {
                    Parsed::Incomplete => break,
                    Parsed::Bad(msg) => {
                        self.conns[i].send(&error(Code::InvalidArgument, msg));
                        self.conns[i].broken = true;
                    }
                    Parsed::Request(req) => {
                        let id = self.conns[i].id;
                        self.conns[i].busy = true;
                        if let Some(resp) = self.handle(id, req) {
                            self.conns[i].send(&resp);
                        }
                    }
                }
            }
            if self.conns[i].done() {
                let c = self.conns.swap_remove(i);
                self.session_ended(c.id, c.session);
            } else {
                i += 1;
            }
        }
    }

    fn respond(&mut self, conn: u64, resp: &ShimResponse) {
        if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) {
            c.send(resp);
        }
    }

    // ---- requests -------------------------------------------------------

    /// Answers now (`Some`) or later through [`Self::respond`] (`None`).
    fn handle(&mut self, conn: u64, req: ShimRequest) -> Option<ShimResponse> {
        let Some(req) = req.request else {
            return Some(error(Code::InvalidArgument, "empty request"));
        };
        if self.shutdown.is_some() && !matches!(req, Request::State(_)) {
            return Some(error(
                Code::FailedPrecondition,
                format!("container {} is shutting down", self.cfg.id),
            ));
        }
        match req {
            Request::State(_) => Some(self.state()),
            Request::Start(_) => self.start(conn),
            Request::Kill(k) => Some(self.kill(k.signal, k.all)),
            Request::ReopenLog(_) => Some(match self.log.reopen() {
                Ok(()) => ok(),
                Err(e) => error(
                    Code::Internal,
                    format!("reopen log {} of {}: {e}", self.cfg.log_path, self.cfg.id),
                ),
            }),
            Request::ExecSync(x) => self.exec_sync(conn, x.args, x.timeout_secs),
            Request::ExecStream(x) => self.exec_stream(conn, x),
            Request::Attach(a) => self.attach(conn, a.stdin),
            Request::Pause(_) => {
                if self.life.status != Status::Running {
                    return Some(self.precondition("pause"));
                }
                self.queue.push_back(Job::Pause { conn });
                None
            }
            Request::Resume(_) => {
                if self.life.status != Status::Paused {
                    return Some(self.precondition("resume"));
                }
                self.queue.push_back(Job::Resume { conn: Some(conn) });
                None
            }
            Request::Shutdown(_) => self.begin_shutdown(conn),
        }
    }

    fn precondition(&self, what: &str) -> ShimResponse {
        error(
            Code::FailedPrecondition,
            format!(
                "cannot {what} container {}: it is {}",
                self.cfg.id,
                self.life.status.as_str_name().to_lowercase()
            ),
        )
    }

    fn state(&self) -> ShimResponse {
        let l = &self.life;
        ShimResponse {
            response: Some(Response::State(ContainerState {
                status: l.status as i32,
                pid: l.pid,
                created_at_ns: l.created_at,
                started_at_ns: l.started_at,
                finished_at_ns: l.finished_at,
                exit_code: l.exit_code,
                reason: l.reason.clone(),
                message: l.message.clone(),
            })),
        }
    }

    fn start(&mut self, conn: u64) -> Option<ShimResponse> {
        if self.life.status != Status::Created {
            return Some(self.precondition("start"));
        }
        if self.poststart_hooks {
            // Hooks run in the runtime's namespaces: libcontainer's start.
            self.queue.push_back(Job::Start { conn });
            return None;
        }
        // libcontainer's start, minus its bookkeeping: the init waits on
        // the notify socket in the container's state dir for one message
        // (the state file's "running" is recorded by the next helper run).
        let state_dir = self.helper.root.join(&self.cfg.id);
        let notified = sys::connect_unix(&state_dir, "notify.sock")
            .and_then(|sock| sys::write_all(sock.as_raw_fd(), b"start container"));
        match notified {
            Ok(()) => {
                self.life.status = Status::Running;
                self.life.started_at = now_nanos();
                self.needs_mark = true;
                Some(ok())
            }
            Err(e) => Some(error(
                Code::Internal,
                format!("start container {}: notify init: {e}", self.cfg.id),
            )),
        }
    }

    fn kill(&mut self, signal: i32, all: bool) -> ShimResponse {
        if !(1..=64).contains(&signal) {
            return error(Code::InvalidArgument, format!("invalid signal {signal}"));
        }
        let mut result = Ok(());
        if self.life.status != Status::Exited {
            result = sys::kill(self.life.pid, signal);
        }
        if all {
            // Every other process once (the init got it above).
            for pid in self
                .cgroup
                .pids()
                .into_iter()
                .filter(|p| *p != self.life.pid)
            {
                let r = sys::kill(pid, signal);
                if result.is_ok() {
                    result = r;
                }
            }
        }
        if signal == libc::SIGKILL && self.life.status == Status::Paused {
            // Frozen tasks die only once thawed.
            self.queue.push_back(Job::Resume { conn: None });
        }
        match result {
            Ok(()) => ok(),
            Err(e) => error(
                Code::Internal,
                format!("kill container {} with signal {signal}: {e}", self.cfg.id),
            ),
        }
    }

    fn exec_sync(
        &mut self,
        conn: u64,
        args: Vec<String>,
        timeout_secs: i64,
    ) -> Option<ShimResponse> {
        if args.is_empty() {
            return Some(error(Code::InvalidArgument, "exec needs a command"));
        }
        if self.life.status != Status::Running {
            return Some(self.precondition("exec in"));
        }
        let pipes = sys::pipe().and_then(|(or, ow)| {
            let (er, ew) = sys::pipe()?;
            sys::set_nonblocking(or.as_raw_fd())?;
            sys::set_nonblocking(er.as_raw_fd())?;
            Ok((or, ow, er, ew))
        });
        let (out_r, out_w, err_r, err_w) = match pipes {
            Ok(p) => p,
            Err(e) => return Some(error(Code::Internal, format!("exec pipes: {e}"))),
        };
        let id = self.next_id;
        self.next_id += 1;
        let deadline = (timeout_secs > 0)
            .then(|| Instant::now() + Duration::from_secs(timeout_secs.unsigned_abs()));
        let stdin = match sys::open_dev_null(libc::O_RDONLY) {
            Ok(fd) => fd,
            Err(e) => return Some(error(Code::Internal, format!("open /dev/null: {e}"))),
        };
        self.execs.push(ExecRun {
            id,
            conn,
            args,
            stdio: Some(HelperStdio {
                stdin,
                stdout: out_w,
                stderr: err_w,
            }),
            out: Some(out_r),
            err: Some(err_r),
            out_buf: Vec::new(),
            err_buf: Vec::new(),
            pid: None,
            deadline,
            stream: None,
        });
        self.queue.push_back(Job::Exec { exec: id });
        None
    }

    fn read_exec(&mut self, id: u64, is_err: bool) {
        let Some(e) = self.execs.iter_mut().find(|e| e.id == id) else {
            return;
        };
        drain_exec_pipe(e, is_err, &mut self.buf, 16);
    }

    fn finish_exec(&mut self, i: usize, code: i32) {
        let mut e = self.execs.swap_remove(i);
        if let Some(st) = &e.stream {
            if st.started
                && !st.abandoned
                && let Some(c) = self.conns.iter_mut().find(|c| c.id == e.conn)
            {
                c.send(&ShimResponse {
                    response: Some(Response::ExecExited(ExecExited { exit_code: code })),
                });
                c.close_when_flushed = true;
            }
            return;
        }
        // What the process wrote before exiting is in the pipes; children
        // it left behind holding them are not waited for.
        drain_exec_pipe(&mut e, false, &mut self.buf, usize::MAX);
        drain_exec_pipe(&mut e, true, &mut self.buf, usize::MAX);
        let (stdout, stderr) = fit_frame(
            std::mem::take(&mut e.out_buf),
            std::mem::take(&mut e.err_buf),
        );
        let resp = ShimResponse {
            response: Some(Response::ExecSync(ExecSyncResponse {
                stdout,
                stderr,
                exit_code: code,
            })),
        };
        self.respond(e.conn, &resp);
        if self.execs.is_empty() {
            sys::trim_heap();
        }
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.execs.len() {
            if self.execs[i].deadline.is_some_and(|d| d <= now) {
                let e = self.execs.swap_remove(i);
                if let Some(pid) = e.pid {
                    let _ = sys::kill(pid, libc::SIGKILL);
                } else if let Some(run) = &self.running
                    && matches!(run.job, Job::Exec { exec } if exec == e.id)
                {
                    // Still being set up: stop the helper; the process it may
                    // have started is reaped as an orphan.
                    let _ = sys::kill(run.pid, libc::SIGKILL);
                } else {
                    self.queue
                        .retain(|j| !matches!(j, Job::Exec { exec } if *exec == e.id));
                }
                let msg = format!("exec {:?} in container {} timed out", e.args, self.cfg.id);
                self.respond(e.conn, &error(Code::DeadlineExceeded, msg));
            } else {
                i += 1;
            }
        }
        if let Some(Shutdown {
            conn,
            phase: ShutdownPhase::WaitExit { deadline },
        }) = &self.shutdown
            && *deadline <= now
        {
            let conn = *conn;
            self.shutdown = None;
            let msg = format!(
                "container {} did not exit within {}s of SIGKILL",
                self.cfg.id,
                SHUTDOWN_EXIT_WAIT.as_secs()
            );
            self.respond(conn, &error(Code::Internal, msg));
        }
    }

    fn begin_shutdown(&mut self, conn: u64) -> Option<ShimResponse> {
        if self.life.status == Status::Exited {
            self.shutdown = Some(Shutdown {
                conn,
                phase: ShutdownPhase::Deleting,
            });
            self.queue.push_back(Job::Delete);
        } else {
            self.shutdown = Some(Shutdown {
                conn,
                phase: ShutdownPhase::WaitExit {
                    deadline: Instant::now() + SHUTDOWN_EXIT_WAIT,
                },
            });
            let _ = self.kill(libc::SIGKILL, true);
        }
        None
    }

    // ---- streaming exec and attach ----------------------------------------

    fn exec_stream(&mut self, conn: u64, x: ExecStreamRequest) -> Option<ShimResponse> {
        if x.args.is_empty() {
            return Some(error(Code::InvalidArgument, "exec needs a command"));
        }
        if self.life.status != Status::Running {
            return Some(self.precondition("exec in"));
        }
        let id = self.next_id;
        self.next_id += 1;
        let setup = (|| -> std::io::Result<(HelperStdio, Vec<OwnedFd>, Option<ConsoleSocket>)> {
            if x.tty {
                // The process's stdio is the pty libcontainer allocates in
                // the container; the helper's own is /dev/null.
                let name = format!("exec-{id}.sock");
                let listener = sys::listen_unix(&self.dir, &name)?;
                let console = ConsoleSocket {
                    listener,
                    dir: self.dir.clone(),
                    name,
                };
                return Ok((HelperStdio::null()?, Vec::new(), Some(console)));
            }
            let (out_r, out_w) = sys::pipe()?;
            let (err_r, err_w) = sys::pipe()?;
            let mut client = vec![out_r, err_r];
            let stdin = if x.stdin {
                let (in_r, in_w) = sys::pipe()?;
                client.push(in_w);
                in_r
            } else {
                sys::open_dev_null(libc::O_RDONLY)?
            };
            let stdio = HelperStdio {
                stdin,
                stdout: out_w,
                stderr: err_w,
            };
            Ok((stdio, client, None))
        })();
        let (stdio, client_fds, console) = match setup {
            Ok(s) => s,
            Err(e) => return Some(error(Code::Internal, format!("exec stdio: {e}"))),
        };
        let size = (x.tty && x.width > 0 && x.height > 0).then_some((x.height, x.width));
        self.execs.push(ExecRun {
            id,
            conn,
            args: x.args,
            stdio: Some(stdio),
            out: None,
            err: None,
            out_buf: Vec::new(),
            err_buf: Vec::new(),
            pid: None,
            deadline: None,
            stream: Some(ExecStream {
                size,
                client_fds,
                console,
                started: false,
                abandoned: false,
            }),
        });
        self.queue.push_back(Job::Exec { exec: id });
        None
    }

    /// The helper started an ExecStream's process: hand berthd its stdio.
    fn exec_started(&mut self, i: usize, pid: i32) {
        let e = &mut self.execs[i];
        let Some(st) = &mut e.stream else {
            return;
        };
        let mut fds = std::mem::take(&mut st.client_fds);
        let tty = st.console.is_some();
        if let Some(cs) = st.console.take() {
            match receive_pty_master(&cs.listener) {
                Ok(master) => fds.push(master),
                Err(err) => {
                    let _ = sys::kill(pid, libc::SIGKILL);
                    st.abandoned = true;
                    let (conn, args) = (e.conn, e.args.clone());
                    let msg = format!("exec {args:?}: receive the pty master: {err}");
                    self.respond(conn, &error(Code::Internal, msg));
                    return;
                }
            }
        }
        let conn = e.conn;
        let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) else {
            // berthd is gone already.
            let _ = sys::kill(pid, libc::SIGKILL);
            st.abandoned = true;
            return;
        };
        st.started = true;
        c.session = Session::Exec(e.id);
        c.send_with_fds(
            &ShimResponse {
                response: Some(Response::ExecStarted(ExecStarted { pid, tty })),
            },
            fds,
        );
    }

    fn attach(&mut self, conn: u64, stdin: bool) -> Option<ShimResponse> {
        if self.life.status == Status::Exited {
            return Some(self.precondition("attach to"));
        }
        let mut fds = Vec::new();
        let grant = stdin && self.stdin_w.is_some();
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| error(Code::Internal, format!("attach: dup: {e}")))
        };
        if self.cfg.tty {
            // The pty master (the output stream; also the stdin writer).
            let Some(Some(master)) = self.streams.first() else {
                return Some(error(
                    Code::FailedPrecondition,
                    format!("container {}: its terminal is closed", self.cfg.id),
                ));
            };
            match dup(&master.fd) {
                Ok(fd) => fds.push(fd),
                Err(resp) => return Some(resp),
            }
        } else if grant && let Some(w) = &self.stdin_w {
            match dup(w) {
                Ok(fd) => fds.push(fd),
                Err(resp) => return Some(resp),
            }
        }
        let c = self.conns.iter_mut().find(|c| c.id == conn)?;
        c.session = Session::Attach { stdin: grant };
        c.send_with_fds(
            &ShimResponse {
                response: Some(Response::AttachStarted(AttachStarted {
                    stdin: grant,
                    tty: self.cfg.tty,
                })),
            },
            fds,
        );
        None
    }

    /// A session connection closed (berthd hung up, or the session ended).
    fn session_ended(&mut self, conn: u64, session: Session) {
        match session {
            Session::None => {}
            Session::Exec(id) => {
                if let Some(e) = self.execs.iter_mut().find(|e| e.id == id)
                    && let Some(st) = &mut e.stream
                    && !st.abandoned
                {
                    st.abandoned = true;
                    if let Some(pid) = e.pid {
                        // Only this process; its exit is reaped as usual.
                        let _ = sys::kill(pid, libc::SIGKILL);
                        self.diag.log(format_args!(
                            "exec session {conn} closed: killed exec pid {pid}"
                        ));
                    }
                }
            }
            Session::Attach { stdin: true } => self.attach_stdin_ended(),
            Session::Attach { stdin: false } => {}
        }
    }

    /// An attach client that had stdin ended it (EOF or hang-up): with
    /// stdin_once the container's stdin closes now.
    fn attach_stdin_ended(&mut self) {
        if self.cfg.stdin_once && self.stdin_w.take().is_some() {
            self.diag.log(format_args!(
                "stdin_once: first attach with stdin ended, closing stdin of {}",
                self.cfg.id
            ));
        }
    }

    // ---- helper runs ----------------------------------------------------

    fn run_next_job(&mut self) {
        while self.running.is_none() {
            let Some(job) = self.queue.pop_front() else {
                return;
            };
            let mut options: Vec<OsString> = Vec::new();
            let (command, tail, stdio) = match &job {
                Job::Start { .. } => ("start", Vec::new(), HelperStdio::null()),
                Job::Pause { .. } => ("pause", Vec::new(), HelperStdio::null()),
                Job::Resume { .. } => ("resume", Vec::new(), HelperStdio::null()),
                Job::Delete => {
                    self.kill_leftovers();
                    ("delete", Vec::new(), HelperStdio::null())
                }
                Job::Exec { exec } => {
                    let Some(e) = self.execs.iter_mut().find(|e| e.id == *exec) else {
                        continue;
                    };
                    let Some(stdio) = e.stdio.take() else {
                        continue;
                    };
                    if let Some(st) = &e.stream
                        && let Some(cs) = &st.console
                    {
                        options = helper::console_socket_option(&cs.dir, &cs.name);
                        if let Some((rows, cols)) = st.size {
                            options.push("--console-size".into());
                            options.push(format!("{rows}x{cols}").into());
                        }
                    }
                    ("exec", e.args.clone(), Ok(stdio))
                }
            };
            let mark = self.needs_mark && !matches!(job, Job::Delete | Job::Start { .. });
            let spawned = stdio.and_then(|s| self.helper.spawn(command, &options, &tail, mark, s));
            match spawned {
                Ok(sp) => {
                    self.running = Some(HelperRun {
                        job,
                        pid: sp.pid,
                        report: sp.report,
                        buf: Vec::new(),
                        report_eof: false,
                    });
                }
                Err(e) => self.job_done(job, Err(format!("{command}: {e}"))),
            }
        }
    }

    fn on_helper_exit(&mut self, code: i32) {
        let Some(mut run) = self.running.take() else {
            return;
        };
        helper::read_report(&run.report, &mut run.buf);
        let outcome = helper::outcome(&run.buf, code);
        if outcome.is_ok() && !matches!(run.job, Job::Delete | Job::Start { .. }) {
            self.needs_mark = false;
        }
        self.job_done(run.job, outcome);
        if self.queue.is_empty() && self.execs.is_empty() {
            sys::trim_heap();
        }
    }

    fn job_done(&mut self, job: Job, outcome: Result<Vec<String>, String>) {
        let reply = |r: &Result<Vec<String>, String>| match r {
            Ok(_) => ok(),
            Err(msg) => error(Code::Internal, msg.clone()),
        };
        match job {
            Job::Start { conn } => {
                if outcome.is_ok() && self.life.status == Status::Created {
                    self.life.status = Status::Running;
                    self.life.started_at = now_nanos();
                }
                self.respond(conn, &reply(&outcome));
            }
            Job::Pause { conn } => {
                if outcome.is_ok() && self.life.status == Status::Running {
                    self.life.status = Status::Paused;
                }
                self.respond(conn, &reply(&outcome));
            }
            Job::Resume { conn } => {
                if outcome.is_ok() && self.life.status == Status::Paused {
                    self.life.status = Status::Running;
                }
                match conn {
                    Some(conn) => self.respond(conn, &reply(&outcome)),
                    None => {
                        if let Err(e) = &outcome {
                            self.diag.log(format_args!("thaw after kill: {e}"));
                        }
                    }
                }
            }
            Job::Exec { exec } => {
                let Some(i) = self.execs.iter().position(|e| e.id == exec) else {
                    return; // timed out meanwhile
                };
                match outcome {
                    Ok(words) => match words.first().and_then(|w| w.parse::<i32>().ok()) {
                        Some(pid) => {
                            self.execs[i].pid = Some(pid);
                            if self.execs[i].stream.is_some() {
                                self.exec_started(i, pid);
                            }
                            if let Some(j) = self.unclaimed.iter().position(|x| x.pid == pid)
                                && let Some(i) = self.execs.iter().position(|e| e.id == exec)
                            {
                                let exit = self.unclaimed.remove(j).expect("index valid");
                                self.finish_exec(i, exit.code);
                            }
                        }
                        None => {
                            let e = self.execs.swap_remove(i);
                            self.respond(e.conn, &error(Code::Internal, "exec reported no pid"));
                        }
                    },
                    Err(msg) => {
                        let e = self.execs.swap_remove(i);
                        self.respond(e.conn, &error(Code::ExecFailed, msg));
                    }
                }
            }
            Job::Delete => {
                let Some(sd) = self.shutdown.take() else {
                    return;
                };
                match outcome {
                    Ok(_) => {
                        self.respond(sd.conn, &ok());
                        self.exit_now = true;
                        self.diag
                            .log(format_args!("container {} deleted", self.cfg.id));
                    }
                    Err(msg) => self.respond(sd.conn, &error(Code::Internal, msg)),
                }
            }
        }
    }

    /// Before delete: nothing may be left in the container's cgroup.
    fn kill_leftovers(&mut self) {
        let start = Instant::now();
        loop {
            let pids = self.cgroup.pids();
            if pids.is_empty() || start.elapsed() > Duration::from_secs(2) {
                return;
            }
            for pid in pids {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(5));
            self.reap();
        }
    }

    /// After Shutdown answered: flush answers, flush output, remove the
    /// socket and pid file (not exit.pb, not the log).
    fn finish(mut self) {
        self.listener = None;
        let _ = std::fs::remove_file(self.dir.join(files::SOCKET));
        let _ = std::fs::remove_file(self.dir.join(files::PID));
        for i in 0..self.streams.len() {
            self.read_stream(i, true);
        }
        let ts = timestamp_now();
        for s in self.streams.iter_mut().flatten() {
            s.splitter.finish(&ts, &mut self.records);
        }
        self.write_records();
        let deadline = Instant::now() + Duration::from_secs(1);
        for c in &mut self.conns {
            while c.wants_write() && !c.broken && Instant::now() < deadline {
                let mut p = libc::pollfd {
                    fd: c.fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, 100) };
                c.flush();
            }
        }
        self.diag.log(format_args!("monitor exiting"));
    }
}

/// Queues an output chunk on every attach connection; one that has more
/// than [`ATTACH_QUEUE_LIMIT`] queued is dropped instead.
fn fan_out(conns: &mut [Conn], diag: &mut Diag, stream: u8, data: &[u8]) {
    let mut frame: Option<Vec<u8>> = None;
    for c in conns.iter_mut() {
        // A client that half-closed (ended its stdin) still reads output.
        if !matches!(c.session, Session::Attach { .. }) || c.broken || c.hup || c.close_when_flushed
        {
            continue;
        }
        if c.queued() + data.len() + berth_proto::output::HEADER_LEN > ATTACH_QUEUE_LIMIT {
            diag.log(format_args!(
                "attach connection {} is too slow ({} bytes queued): dropping it",
                c.id,
                c.queued()
            ));
            c.broken = true;
            continue;
        }
        let f = frame.get_or_insert_with(|| {
            let mut v = Vec::with_capacity(data.len() + berth_proto::output::HEADER_LEN);
            berth_proto::output::encode(stream, data, &mut v);
            v
        });
        c.send_raw(f);
    }
}

/// Reads an exec pipe (at most `max_chunks` reads), keeping at most
/// [`EXEC_OUTPUT_CAP`] bytes; closes it at EOF.
fn drain_exec_pipe(e: &mut ExecRun, is_err: bool, buf: &mut Vec<u8>, max_chunks: usize) {
    let (slot, out) = if is_err {
        (&mut e.err, &mut e.err_buf)
    } else {
        (&mut e.out, &mut e.out_buf)
    };
    let Some(fd) = slot else {
        return;
    };
    for _ in 0..max_chunks {
        match sys::read_chunk(fd.as_raw_fd(), buf, READ_CHUNK) {
            Ok(0) => {
                *slot = None;
                return;
            }
            Ok(n) => {
                let room = EXEC_OUTPUT_CAP.saturating_sub(out.len());
                out.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(_) => {
                *slot = None;
                return;
            }
        }
    }
}

/// Trims ExecSync output so the answer fits in one frame
/// ([`MAX_FRAME_LEN`]): each stream keeps at least half of the budget, and
/// what one does not use goes to the other.
pub fn fit_frame(mut stdout: Vec<u8>, mut stderr: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
    let budget = MAX_FRAME_LEN.saturating_sub(64);
    if stdout.len() + stderr.len() <= budget {
        return (stdout, stderr);
    }
    let half = budget / 2;
    let (o, e) = if stdout.len() <= half {
        (stdout.len(), budget - stdout.len())
    } else if stderr.len() <= half {
        (budget - stderr.len(), stderr.len())
    } else {
        (half, budget - half)
    };
    stdout.truncate(o);
    stderr.truncate(e);
    (stdout, stderr)
}

/// Accepts libcontainer's connection on the console socket and takes the
/// pty master it sends. By the time create returned the init has sent it.
fn receive_pty_master(listener: &OwnedFd) -> std::io::Result<OwnedFd> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(conn) = sys::accept(listener.as_raw_fd())? {
            let mut p = libc::pollfd {
                fd: conn.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 5000) };
            return sys::recv_fd(conn.as_raw_fd());
        }
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no connection on the console socket",
            ));
        }
        let mut p = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 100) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_output_fits_one_frame() {
        let (o, e) = fit_frame(vec![1; 10], vec![2; 20]);
        assert_eq!((o.len(), e.len()), (10, 20));
        let big = MAX_FRAME_LEN;
        let (o, e) = fit_frame(vec![1; big], vec![2; 100]);
        assert_eq!(e.len(), 100);
        assert_eq!(o.len() + e.len(), MAX_FRAME_LEN - 64);
        let (o, e) = fit_frame(vec![1; big], vec![2; big]);
        assert_eq!(o.len(), (MAX_FRAME_LEN - 64) / 2);
        assert_eq!(o.len() + e.len(), MAX_FRAME_LEN - 64);
        let resp = ShimResponse {
            response: Some(Response::ExecSync(ExecSyncResponse {
                stdout: o,
                stderr: e,
                exit_code: 1,
            })),
        };
        assert!(prost::Message::encoded_len(&resp) <= MAX_FRAME_LEN);
    }
}
