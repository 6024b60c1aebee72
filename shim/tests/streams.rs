//! berth-shim's streaming sessions with real containers (root): ExecStream
//! (pipes and tty, exit codes, cancel by hanging up, concurrency) and Attach
//! (output fan-out beside the log, stdin, stdin_once, slow clients).

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use berth_proto::shim::container_state::Status;
use berth_proto::shim::shim_error::Code;
use berth_proto::shim::shim_request::Request;
use berth_proto::shim::shim_response::Response;
use berth_proto::shim::*;
use berth_proto::{FrameError, read_frame};
use common::*;

#[derive(Debug)]
struct Exec {
    control: UnixStream,
    pid: i32,
    tty: bool,
    fds: Vec<OwnedFd>,
}

fn exec_stream(f: &Fixture, args: &[&str], tty: bool, stdin: bool, size: (u32, u32)) -> Exec {
    match try_exec_stream(f, args, tty, stdin, size) {
        Ok(e) => e,
        Err(e) => panic!("exec {args:?}: {e:?}"),
    }
}

fn try_exec_stream(
    f: &Fixture,
    args: &[&str],
    tty: bool,
    stdin: bool,
    (rows, cols): (u32, u32),
) -> Result<Exec, ShimError> {
    let (control, resp, fds) = stream_request(
        f,
        Request::ExecStream(ExecStreamRequest {
            args: args.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            width: cols,
            height: rows,
        }),
    );
    match resp.response {
        Some(Response::ExecStarted(s)) => {
            assert_eq!(s.tty, tty);
            let want = if tty { 1 } else { 2 + usize::from(stdin) };
            assert_eq!(fds.len(), want, "fds passed for {args:?}");
            Ok(Exec {
                control,
                pid: s.pid,
                tty,
                fds,
            })
        }
        Some(Response::Error(e)) => Err(e),
        other => panic!("ExecStream answered {other:?}"),
    }
}

impl Exec {
    fn wait(&mut self) -> i32 {
        let resp: ShimResponse = read_frame(&mut self.control).expect("ExecExited");
        let code = match resp.response {
            Some(Response::ExecExited(x)) => x.exit_code,
            other => panic!("expected ExecExited, got {other:?}"),
        };
        // Then the session ends.
        assert!(matches!(
            read_frame::<ShimResponse>(&mut self.control),
            Err(FrameError::Closed)
        ));
        code
    }
}

fn write_fd(fd: &OwnedFd, data: &[u8]) {
    let mut f = std::fs::File::from(fd.try_clone().unwrap());
    f.write_all(data).unwrap();
}

fn set_winsize(fd: &OwnedFd, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: ioctl with a valid winsize.
    assert_eq!(
        unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
}

fn running(prefix: &str, opts: Opts) -> Fixture {
    let f = Fixture::new(prefix, opts);
    f.create_ok();
    assert_ok(&f.client().call(Request::Start(StartRequest {})), "start");
    f
}

#[test]
fn exec_stream_cat_echoes_stdin_and_reports_exit_codes() {
    if !is_root() {
        return;
    }
    let mut f = running("xcat", Opts::new(&["sleep", "1000"]));
    let mut e = exec_stream(&f, &["cat"], false, true, (0, 0));
    assert!(e.pid > 0 && pid_alive(e.pid));
    let stdin = e.fds.pop().unwrap();
    write_fd(&stdin, b"hello\nworld\n");
    // EOF works: nobody else holds the write end (the shim kept no copy).
    drop(stdin);
    let out = read_fd_until(&e.fds[0], Duration::from_secs(10), |_| false);
    assert_eq!(out, "hello\nworld\n");
    assert_eq!(e.wait(), 0);

    let mut e = exec_stream(
        &f,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
        false,
        (0, 0),
    );
    let err = read_fd_until(&e.fds[1], Duration::from_secs(10), |_| false);
    let out = read_fd_until(&e.fds[0], Duration::from_secs(10), |_| false);
    assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
    assert_eq!(e.wait(), 3);

    // Killed by a signal: 128 + signal, as runc/containerd report.
    let mut e = exec_stream(&f, &["sh", "-c", "kill -TERM $$"], false, false, (0, 0));
    assert_eq!(e.wait(), 128 + libc::SIGTERM);
    // Nothing of it went to the container's log.
    assert!(f.log().is_empty(), "{}", f.log());
    f.shutdown();
}

#[test]
fn tty_exec_has_the_size_before_and_after_a_resize() {
    if !is_root() {
        return;
    }
    let mut f = running("xtty", Opts::new(&["sleep", "1000"]));
    let mut e = exec_stream(
        &f,
        &["sh", "-c", "stty size; tty; read x; stty size"],
        true,
        true,
        (24, 80),
    );
    let master = &e.fds[0];
    let t = read_fd_until(master, Duration::from_secs(10), |t| t.contains("/dev/pts/"));
    assert!(t.contains("24 80"), "{t:?}");
    set_winsize(master, 50, 132);
    write_fd(master, b"\n");
    let t = read_fd_until(master, Duration::from_secs(10), |t| t.contains("50 132"));
    assert!(t.contains("50 132"), "{t:?}");
    assert_eq!(e.wait(), 0);

    // The pty is the controlling terminal: ^C interrupts the foreground
    // process.
    let mut e = exec_stream(&f, &["sleep", "100"], true, true, (0, 0));
    std::thread::sleep(Duration::from_millis(200));
    write_fd(&e.fds[0], b"\x03");
    assert_eq!(e.wait(), 128 + libc::SIGINT);
    assert!(
        !f.shim_dir
            .read_dir()
            .unwrap()
            .flatten()
            .any(|d| d.file_name().to_string_lossy().starts_with("exec-"))
    );
    f.shutdown();
}

#[test]
fn hanging_up_kills_only_the_exec_process() {
    if !is_root() {
        return;
    }
    let mut f = running("xhup", Opts::new(&["sleep", "1000"]));
    let e = exec_stream(&f, &["sleep", "1001"], false, true, (0, 0));
    let pid = e.pid;
    assert!(pid_alive(pid));
    let other = exec_stream(&f, &["sleep", "1002"], false, false, (0, 0));
    drop(e);
    assert!(
        eventually(Duration::from_secs(5), || !pid_alive(pid)),
        "exec process survived its session"
    );
    let mut c = f.client();
    assert_eq!(c.state().status, Status::Running as i32);
    assert!(pid_alive(other.pid), "another exec was killed");
    // ... and the monitor reaped it (no zombie child left).
    let monitor = f.monitor_pid();
    assert!(eventually(Duration::from_secs(5), || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
    }));
    drop(other);
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(format!("/proc/{monitor}/task/{monitor}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .count()
            <= 1
    }));
    f.shutdown();
}

#[test]
fn missing_binary_is_a_quick_error() {
    if !is_root() {
        return;
    }
    let mut f = running("xmiss", Opts::new(&["sleep", "1000"]));
    for tty in [false, true] {
        let t = Instant::now();
        match try_exec_stream(&f, &["/no/such/binary"], tty, true, (0, 0)) {
            Err(e) => assert!(
                e.message.contains("not found") || e.message.contains("no such"),
                "{e:?}"
            ),
            Ok(mut e) => assert_eq!(e.wait(), 127),
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    // Not running: refused.
    let mut g = Fixture::new("xcreated", Opts::new(&["sleep", "1000"]));
    g.create_ok();
    let e = try_exec_stream(&g, &["true"], false, false, (0, 0)).unwrap_err();
    assert_eq!(e.code, Code::FailedPrecondition as i32);
    g.shutdown();
    f.shutdown();
}

#[test]
fn streaming_execs_run_concurrently() {
    if !is_root() {
        return;
    }
    let mut f = running("xconc", Opts::new(&["sleep", "1000"]));
    let mut execs: Vec<Exec> = (0..4)
        .map(|_| {
            exec_stream(
                &f,
                &["sh", "-c", "read x; echo got-$x"],
                false,
                true,
                (0, 0),
            )
        })
        .collect();
    // All four wait on stdin at once.
    assert!(execs.iter().all(|e| pid_alive(e.pid)));
    for (i, e) in execs.iter_mut().enumerate().rev() {
        write_fd(&e.fds[2], format!("{i}\n").as_bytes());
        let out = read_fd_until(&e.fds[0], Duration::from_secs(10), |_| false);
        assert_eq!(out, format!("got-{i}\n"));
        assert_eq!(e.wait(), 0);
    }
    // ExecSync still works beside them.
    let mut c = f.client();
    match c.exec(&["echo", "sync"], 10).response {
        Some(Response::ExecSync(r)) => assert_eq!(r.stdout, b"sync\n"),
        other => panic!("{other:?}"),
    }
    f.shutdown();
}

fn attach(f: &Fixture, stdin: bool) -> (UnixStream, AttachStarted, Vec<OwnedFd>) {
    let (s, resp, fds) = stream_request(f, Request::Attach(AttachRequest { stdin }));
    match resp.response {
        Some(Response::AttachStarted(a)) => (s, a, fds),
        other => panic!("Attach answered {other:?}"),
    }
}

#[test]
fn attach_gets_the_output_and_the_log_every_line() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new(
        "aout",
        Opts::sh("for i in $(seq 1 300); do echo line$i; echo err$i >&2; done; sleep 1000"),
    );
    f.create_ok();
    let (mut a, started, fds) = attach(&f, true);
    assert!(!started.stdin && !started.tty && fds.is_empty());
    let (mut b, _, _) = attach(&f, false);
    assert_ok(&f.client().call(Request::Start(StartRequest {})), "start");
    for s in [&mut a, &mut b] {
        let (out, err, _) = read_attach_until(s, Duration::from_secs(20), |o, e| {
            o.ends_with(b"line300\n") && e.ends_with(b"err300\n")
        });
        let want_out: String = (1..=300).map(|i| format!("line{i}\n")).collect();
        let want_err: String = (1..=300).map(|i| format!("err{i}\n")).collect();
        assert_eq!(String::from_utf8(out).unwrap(), want_out);
        assert_eq!(String::from_utf8(err).unwrap(), want_err);
    }
    assert!(eventually(Duration::from_secs(5), || f.log_records().len() == 600));
    let recs = f.log_records();
    for i in 1..=300 {
        assert!(recs.contains(&("stdout".into(), "F".into(), format!("line{i}"))));
        assert!(recs.contains(&("stderr".into(), "F".into(), format!("err{i}"))));
    }
    // The container's exit ends the attach.
    assert_ok(
        &f.client().call(Request::Kill(KillRequest {
            signal: 9,
            all: true,
        })),
        "kill",
    );
    let (_, _, eof) = read_attach_until(&mut a, Duration::from_secs(10), |_, _| false);
    assert!(eof);
    f.shutdown();
}

#[test]
fn attach_writes_to_the_containers_stdin() {
    if !is_root() {
        return;
    }
    let mut opts = Opts::new(&["cat"]);
    opts.stdin = true;
    let mut f = running("ain", opts);
    let (mut a, started, fds) = attach(&f, true);
    assert!(started.stdin && !started.tty);
    assert_eq!(fds.len(), 1);
    write_fd(&fds[0], b"ping\n");
    read_attach_until(&mut a, Duration::from_secs(10), |o, _| o == b"ping\n");
    assert!(eventually(Duration::from_secs(5), || f
        .log()
        .contains(" F ping\n")));
    // Without stdin_once, closing the attach leaves stdin open.
    drop(fds);
    drop(a);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.client().state().status, Status::Running as i32);
    let (_, started, fds) = attach(&f, true);
    assert!(started.stdin && fds.len() == 1);
    f.shutdown();
}

#[test]
fn stdin_once_closes_stdin_after_the_first_attach() {
    if !is_root() {
        return;
    }
    let mut opts = Opts::sh("cat; echo cat-saw-eof; sleep 1000");
    opts.stdin = true;
    opts.stdin_once = true;
    let mut f = running("aonce", opts);
    // An attach without stdin does not count.
    let (quiet, started, _) = attach(&f, false);
    assert!(!started.stdin);
    drop(quiet);
    let (mut a, started, fds) = attach(&f, true);
    assert!(started.stdin);
    write_fd(&fds[0], b"one\n");
    read_attach_until(&mut a, Duration::from_secs(10), |o, _| o == b"one\n");
    std::thread::sleep(Duration::from_millis(200));
    assert!(!f.log().contains("cat-saw-eof"));
    drop(fds);
    drop(a);
    assert!(
        eventually(Duration::from_secs(5), || f.log().contains("cat-saw-eof")),
        "{}",
        f.log()
    );
    let (_, started, fds) = attach(&f, true);
    assert!(!started.stdin && fds.is_empty());
    f.shutdown();
}

#[test]
fn attach_to_a_tty_container_gets_the_master() {
    if !is_root() {
        return;
    }
    let mut opts = Opts::sh("read x; stty size; echo got-$x; sleep 1000");
    opts.tty = true;
    opts.stdin = true;
    let mut f = running("atty", opts);
    let (mut a, started, fds) = attach(&f, true);
    assert!(started.stdin && started.tty && fds.len() == 1);
    set_winsize(&fds[0], 33, 99);
    write_fd(&fds[0], b"hey\n");
    let (out, _, _) = read_attach_until(&mut a, Duration::from_secs(10), |o, _| {
        String::from_utf8_lossy(o).contains("got-hey")
    });
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("33 99"), "{out:?}");
    assert!(eventually(Duration::from_secs(5), || f
        .log()
        .contains("got-hey")));
    f.shutdown();
}

#[test]
fn a_client_that_never_reads_does_not_stall_the_log() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new(
        "aslow",
        Opts::sh(
            "sleep 0.3; yes 0123456789012345678901234567890123456789 | head -n 100000; echo END; sleep 1000",
        ),
    );
    f.create_ok();
    let (mut slow, _, _) = attach(&f, false);
    let (mut good, _, _) = attach(&f, false);
    assert_ok(&f.client().call(Request::Start(StartRequest {})), "start");
    let reader = std::thread::spawn(move || {
        let (out, _, eof) = read_attach_until(&mut good, Duration::from_secs(60), |o, _| {
            o.ends_with(b"END\n")
        });
        (out.len(), eof)
    });
    // The log gets everything while `slow` reads nothing.
    assert!(
        eventually(Duration::from_secs(30), || f.log().ends_with(" F END\n")),
        "log stalled at {} bytes",
        f.log().len()
    );
    assert_eq!(f.log_records().len(), 100_001);
    assert_eq!(reader.join().unwrap(), (41 * 100_000 + 4, false));
    // The slow client was dropped: it gets less than everything, then EOF.
    let (out, _, eof) = read_attach_until(&mut slow, Duration::from_secs(10), |_, _| false);
    assert!(eof);
    assert!(out.len() < 41 * 100_000, "{}", out.len());
    let diag = std::fs::read_to_string(f.shim_dir.join("shim.log")).unwrap_or_default();
    assert!(diag.contains("too slow"), "{diag}");
    assert_eq!(f.client().state().status, Status::Running as i32);
    f.shutdown();
}

#[test]
fn the_shim_keeps_no_copy_of_passed_fds() {
    if !is_root() {
        return;
    }
    let mut f = running("xnocopy", Opts::new(&["sleep", "1000"]));
    let monitor = f.monitor_pid();
    let mut e = exec_stream(&f, &["sh", "-c", "read x"], false, true, (0, 0));
    let ours: Vec<String> = e
        .fds
        .iter()
        .map(|fd| {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
            link.to_string_lossy().into_owned()
        })
        .collect();
    assert!(ours.iter().all(|l| l.starts_with("pipe:")), "{ours:?}");
    // The monitor closes its copies right after sendmsg (the answer can
    // arrive a moment before that).
    assert!(
        eventually(Duration::from_secs(2), || {
            std::fs::read_dir(format!("/proc/{monitor}/fd"))
                .unwrap()
                .flatten()
                .filter_map(|d| std::fs::read_link(d.path()).ok())
                .all(|l| !ours.contains(&l.to_string_lossy().into_owned()))
        }),
        "the monitor still holds one of {ours:?}"
    );
    write_fd(&e.fds[2], b"\n");
    assert_eq!(e.wait(), 0);
    assert!(!e.tty);
    f.shutdown();
}
