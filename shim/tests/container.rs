//! berth-shim with real containers (root): create/start, the CRI log, exit
//! status, kill, exec, reopen, pause, shutdown, failure cleanup.

mod common;

use std::time::{Duration, Instant};

use berth_proto::shim::container_state::Status;
use berth_proto::shim::shim_error::Code;
use berth_proto::shim::shim_request::Request;
use berth_proto::shim::shim_response::Response;
use berth_proto::shim::*;
use common::*;
use prost::Message;

#[test]
fn stdout_and_stderr_land_in_the_log_in_cri_format() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("log", Opts::sh("echo hello; echo oops >&2; echo world"));
    f.create_ok();
    let st = f.run_to_exit();
    assert_eq!(st.exit_code, 0);
    assert_eq!(st.reason, "Completed");
    let recs = f.log_records();
    let mut out: Vec<_> = recs.iter().filter(|r| r.0 == "stdout").collect();
    let err: Vec<_> = recs.iter().filter(|r| r.0 == "stderr").collect();
    assert_eq!(out.len(), 2, "{recs:?}");
    out.sort_by(|a, b| a.2.cmp(&b.2));
    assert_eq!((out[0].1.as_str(), out[0].2.as_str()), ("F", "hello"));
    assert_eq!((out[1].1.as_str(), out[1].2.as_str()), ("F", "world"));
    assert_eq!(err.len(), 1);
    assert_eq!((err[0].1.as_str(), err[0].2.as_str()), ("F", "oops"));
    f.shutdown();
}

#[test]
fn partial_last_line_is_tagged_p() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("partial", Opts::sh("echo first; printf 'no newline'"));
    f.create_ok();
    f.run_to_exit();
    let recs = f.log_records();
    assert_eq!(
        recs,
        vec![
            ("stdout".into(), "F".into(), "first".into()),
            ("stdout".into(), "P".into(), "no newline".into())
        ]
    );
    f.shutdown();
}

#[test]
fn a_40k_line_is_split_into_16k_partial_chunks() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new(
        "long",
        Opts::sh("head -c 40960 /dev/zero | tr '\\000' x; echo; echo after"),
    );
    f.create_ok();
    f.run_to_exit();
    let recs = f.log_records();
    let shape: Vec<(String, usize)> = recs.iter().map(|r| (r.1.clone(), r.2.len())).collect();
    assert_eq!(
        shape,
        vec![
            ("P".into(), 16384),
            ("P".into(), 16384),
            ("F".into(), 40960 - 32768),
            ("F".into(), 5)
        ]
    );
    assert!(recs[..3].iter().all(|r| r.2.bytes().all(|b| b == b'x')));
    f.shutdown();
}

#[test]
fn exit_code_3_is_recorded_with_reason_error() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("exit3", Opts::sh("exit 3"));
    f.create_ok();
    let mut c = f.client();
    let created = c.state();
    assert_eq!(created.status, Status::Created as i32);
    assert!(created.pid > 0);
    assert!(created.created_at_ns > 0);
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    let st = c.wait_exited(Duration::from_secs(10));
    assert_eq!(st.exit_code, 3);
    assert_eq!(st.reason, "Error");
    assert!(st.finished_at_ns >= st.started_at_ns && st.started_at_ns >= st.created_at_ns);
    let rec = ExitRecord::decode(
        std::fs::read(f.shim_dir.join("exit.pb"))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert_eq!(rec.exit_code, 3);
    assert_eq!(rec.reason, "Error");
    assert_eq!(rec.finished_at_ns, st.finished_at_ns);
    assert_eq!(rec.pid, created.pid);
    // Start again: only from CREATED.
    let e = error_of(&c.call(Request::Start(StartRequest {})));
    assert_eq!(e.code, Code::FailedPrecondition as i32);
    // Kill of an exited container is fine; State keeps answering.
    assert_ok(
        &c.call(Request::Kill(KillRequest {
            signal: 9,
            all: false,
        })),
        "kill",
    );
    assert_eq!(c.state().status, Status::Exited as i32);
    f.shutdown();
    assert!(f.shim_dir.join("exit.pb").exists(), "exit.pb stays");
}

#[test]
fn oom_kill_is_reported_as_oomkilled() {
    if !is_root() {
        return;
    }
    // tail keeps the last 200 MB of an endless input in memory: far over
    // the 16 MiB limit (swap included).
    let mut opts = Opts::new(&["tail", "-c", "200000000", "/dev/zero"]);
    opts.linux_extra = Some(serde_json::json!({
        "resources": {"devices": [], "memory": {"limit": 16777216, "swap": 16777216}}
    }));
    let mut f = Fixture::new("oom", opts);
    f.create_ok();
    let st = f.run_to_exit();
    assert_eq!(st.exit_code, 137, "{st:?}");
    assert_eq!(st.reason, "OOMKilled");
    let rec = ExitRecord::decode(
        std::fs::read(f.shim_dir.join("exit.pb"))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    assert_eq!(rec.reason, "OOMKilled");
    f.shutdown();
}

#[test]
fn sigkill_gives_137() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("kill", Opts::new(&["sleep", "1000"]));
    f.create_ok();
    let mut c = f.client();
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    assert_eq!(c.state().status, Status::Running as i32);
    assert_ok(
        &c.call(Request::Kill(KillRequest {
            signal: 9,
            all: false,
        })),
        "kill",
    );
    let st = c.wait_exited(Duration::from_secs(10));
    assert_eq!(st.exit_code, 137);
    assert_eq!(st.reason, "Error");
    let e = error_of(&c.call(Request::Kill(KillRequest {
        signal: 0,
        all: false,
    })));
    assert_eq!(e.code, Code::InvalidArgument as i32);
    f.shutdown();
}

#[test]
fn kill_all_reaches_every_process_of_the_cgroup() {
    if !is_root() {
        return;
    }
    // The shell ignores TERM; its child does not. Then it blocks reading
    // its stdin (kept open by the monitor) without a new process.
    let mut opts = Opts::sh("trap 'echo got-term' TERM; sleep 1000 & wait; echo waited; read x");
    opts.stdin = true;
    let mut f = Fixture::new("killall", opts);
    f.create_ok();
    let mut c = f.client();
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    // Wait until the child has exec'd sleep (a forked shell not yet exec'd
    // would still run the trap).
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(f.memory_cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .any(|p| {
                std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default()
                    == b"sleep\x001000\x00"
            })
    }));
    assert_ok(
        &c.call(Request::Kill(KillRequest {
            signal: 15,
            all: true,
        })),
        "kill all",
    );
    let ok = eventually(Duration::from_secs(5), || {
        std::fs::read_to_string(f.memory_cgroup.join("cgroup.procs"))
            .map(|s| s.lines().count() == 1)
            .unwrap_or(false)
    });
    assert!(
        ok,
        "procs {:?} log {}",
        std::fs::read_to_string(f.memory_cgroup.join("cgroup.procs")),
        f.log()
    );
    assert!(eventually(Duration::from_secs(5), || f
        .log()
        .contains("stdout F waited")));
    assert_eq!(c.state().status, Status::Running as i32);
    f.shutdown();
}

#[test]
fn exec_sync_runs_in_the_container() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("exec", Opts::new(&["sleep", "1000"]));
    f.create_ok();
    let mut c = f.client();
    // Not started yet: no exec.
    let e = error_of(&c.exec(&["echo", "hi"], 0));
    assert_eq!(e.code, Code::FailedPrecondition as i32);
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    match c.exec(&["echo", "hi"], 10).response {
        Some(Response::ExecSync(r)) => {
            assert_eq!(r.stdout, b"hi\n");
            assert!(r.stderr.is_empty());
            assert_eq!(r.exit_code, 0);
        }
        other => panic!("{other:?}"),
    }
    match c
        .exec(
            &["sh", "-c", "echo out; echo err >&2; hostname >&2; exit 5"],
            0,
        )
        .response
    {
        Some(Response::ExecSync(r)) => {
            assert_eq!(r.stdout, b"out\n");
            assert_eq!(r.stderr, b"err\nberth-test\n");
            assert_eq!(r.exit_code, 5);
        }
        other => panic!("{other:?}"),
    }
    // Same pid namespace as the container: its init is pid 1.
    match c.exec(&["cat", "/proc/1/cmdline"], 0).response {
        Some(Response::ExecSync(r)) => assert_eq!(r.stdout, b"sleep\x001000\x00"),
        other => panic!("{other:?}"),
    }
    // A missing binary is an error, not a hang.
    let e = error_of(&c.exec(&["/no/such/binary"], 10));
    assert!(
        e.message.contains("not found") || e.message.contains("no such"),
        "{e:?}"
    );
    // Output larger than a pipe buffer.
    match c.exec(&["head", "-c", "300000", "/dev/zero"], 10).response {
        Some(Response::ExecSync(r)) => assert_eq!(r.stdout.len(), 300_000),
        other => panic!("{other:?}"),
    }
    // Output beyond one frame is trimmed to fit, not an error.
    match c.exec(&["head", "-c", "5000000", "/dev/zero"], 20).response {
        Some(Response::ExecSync(r)) => {
            assert_eq!(r.exit_code, 0);
            assert_eq!(r.stdout.len(), berth_proto::MAX_FRAME_LEN - 64);
        }
        other => panic!("{other:?}"),
    }
    // A client that goes away mid-request (berthd restarting) harms nothing.
    {
        let mut gone = f.client();
        let _ = berth_proto::write_frame(
            &mut std::os::unix::net::UnixStream::connect(f.shim_dir.join("shim.sock")).unwrap(),
            &ShimRequest {
                request: Some(Request::ExecSync(ExecSyncRequest {
                    args: vec!["sleep".into(), "1".into()],
                    timeout_secs: 0,
                })),
            },
        );
        let _ = gone.state();
    }
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(c.state().status, Status::Running as i32);
    // The exec'd processes were reaped by the monitor.
    let monitor = f.monitor_pid();
    let children = std::fs::read_to_string(format!("/proc/{monitor}/task/{monitor}/children"))
        .unwrap_or_default();
    assert!(
        children.split_whitespace().count() <= 1,
        "monitor children: {children}"
    );
    // The container's log got none of it.
    assert!(f.log().is_empty(), "{}", f.log());
    f.shutdown();
}

#[test]
fn exec_sync_timeout_kills_the_process() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("exectimeout", Opts::new(&["sleep", "1000"]));
    f.create_ok();
    let mut c = f.client();
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    let t = Instant::now();
    let e = error_of(&c.exec(&["sleep", "77"], 1));
    let took = t.elapsed();
    assert_eq!(e.code, Code::DeadlineExceeded as i32, "{e:?}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // The timed-out process is gone from the container.
    assert!(eventually(Duration::from_secs(5), || {
        match c.exec(&["ps"], 5).response {
            Some(Response::ExecSync(r)) => !String::from_utf8_lossy(&r.stdout).contains("sleep 77"),
            _ => false,
        }
    }));
    // Concurrent connections are served while an exec runs.
    let mut slow = f.client();
    let handle = std::thread::spawn(move || slow.exec(&["sleep", "1"], 5));
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    assert_eq!(c.state().status, Status::Running as i32);
    assert!(t.elapsed() < Duration::from_millis(500));
    match handle.join().unwrap().response {
        Some(Response::ExecSync(r)) => assert_eq!(r.exit_code, 0),
        other => panic!("{other:?}"),
    }
    f.shutdown();
}

#[test]
fn exec_gets_the_containers_seccomp_profile() {
    if !is_root() {
        return;
    }
    let seccomp = serde_json::json!({
        "seccomp": {
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        }
    });
    let mut opts = Opts::sh("mkdir /tmp/init-dir 2>&1; sleep 1000");
    opts.linux_extra = Some(seccomp);
    let mut f = Fixture::new("seccomp", opts);
    f.create_ok();
    let mut c = f.client();
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    match c.exec(&["mkdir", "/tmp/exec-dir"], 10).response {
        Some(Response::ExecSync(r)) => {
            assert_ne!(r.exit_code, 0, "mkdir must be refused by seccomp: {r:?}");
            assert!(
                String::from_utf8_lossy(&r.stderr).contains("ermitted"),
                "{r:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(eventually(Duration::from_secs(5), || f
        .log()
        .contains("ermitted")));
    f.shutdown();
}

#[test]
fn reopen_log_after_rotation_loses_no_line() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new(
        "reopen",
        Opts::sh("i=0; while [ $i -lt 400 ]; do echo line$i; i=$((i+1)); usleep 2000; done"),
    );
    f.create_ok();
    let mut c = f.client();
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    assert!(eventually(Duration::from_secs(10), || f
        .log()
        .lines()
        .count()
        > 50));
    let rotated = f.log_path.with_extension("log.1");
    std::fs::rename(&f.log_path, &rotated).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_ok(&c.call(Request::ReopenLog(ReopenLogRequest {})), "reopen");
    c.wait_exited(Duration::from_secs(20));
    let old = parse_log(&std::fs::read_to_string(&rotated).unwrap());
    let new = f.log_records();
    assert!(!new.is_empty(), "new lines go to the new file");
    let all: Vec<String> = old.iter().chain(new.iter()).map(|r| r.2.clone()).collect();
    let want: Vec<String> = (0..400).map(|i| format!("line{i}")).collect();
    assert_eq!(all, want);
    f.shutdown();
}

#[test]
fn poststart_hooks_run_through_libcontainers_start() {
    if !is_root() {
        return;
    }
    let marker = std::path::PathBuf::from(format!(
        "/tmp/berth-shim-test/hook-marker-{}",
        unique_id("m")
    ));
    let mut opts = Opts::new(&["sleep", "1000"]);
    opts.spec_extra = Some(serde_json::json!({
        "hooks": {"poststart": [{
            "path": "/bin/sh",
            "args": ["sh", "-c", format!("cat > {}", marker.display())]
        }]}
    }));
    let mut f = Fixture::new("hooks", opts);
    f.create_ok();
    assert!(!marker.exists());
    let mut c = f.client();
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    // The hook got the container's state on stdin.
    let state = std::fs::read_to_string(&marker).unwrap();
    let _ = std::fs::remove_file(&marker);
    assert!(state.contains(&f.id), "{state}");
    assert_eq!(c.state().status, Status::Running as i32);
    f.shutdown();
}

#[test]
fn monitor_lives_on_its_own() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("alone", Opts::new(&["sleep", "1000"]));
    f.create_ok();
    let monitor = f.monitor_pid();
    assert!(pid_alive(monitor));
    // Not our child (the `start` process exited), in its own session.
    let stat = std::fs::read_to_string(format!("/proc/{monitor}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ppid: u32 = fields[1].parse().unwrap();
    let sid: i32 = fields[3].parse().unwrap();
    assert_ne!(ppid, std::process::id());
    assert_eq!(sid, monitor);
    // shim.sock is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(f.shim_dir.join("shim.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    {
        let mut c = f.client();
        assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    }
    // Nobody talks to it; SIGTERM is ignored.
    unsafe { libc::kill(monitor, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    assert!(pid_alive(monitor));
    let mut c = f.client();
    let st = c.state();
    assert_eq!(st.status, Status::Running as i32);
    assert!(pid_alive(st.pid));
    f.shutdown();
}

#[test]
fn shutdown_leaves_nothing_behind() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("shutdown", Opts::sh("echo started; exec sleep 1000"));
    f.create_ok();
    let monitor = f.monitor_pid();
    let mut c = f.client();
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    let init = c.state().pid;
    assert!(eventually(Duration::from_secs(5), || f
        .log()
        .contains("stdout F started")));
    assert!(!f.cgroup_dirs().is_empty());
    assert!(f.runtime_root.join(&f.id).exists());
    // Shutdown of a running container kills it first.
    assert_ok(&c.call(Request::Shutdown(ShutdownRequest {})), "shutdown");
    drop(c);
    f.shutdown_done();
    assert!(wait_gone(monitor, Duration::from_secs(5)), "monitor exits");
    assert!(!pid_alive(init));
    assert!(f.cgroup_dirs().is_empty(), "{:?}", f.cgroup_dirs());
    assert!(!f.runtime_root.join(&f.id).exists());
    assert!(!f.shim_dir.join("shim.sock").exists());
    assert!(!f.shim_dir.join("shim.pid").exists());
    assert!(f.shim_dir.join("exit.pb").exists());
    assert!(f.log_path.exists(), "the log stays");
}

#[test]
fn shutdown_of_a_created_container() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("shutcreated", Opts::new(&["sleep", "1000"]));
    f.create_ok();
    let monitor = f.monitor_pid();
    let init = f.client().state().pid;
    f.shutdown();
    assert!(wait_gone(monitor, Duration::from_secs(5)));
    assert!(!pid_alive(init));
    assert!(f.cgroup_dirs().is_empty());
    assert!(!f.runtime_root.join(&f.id).exists());
}

#[test]
fn pause_and_resume() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new(
        "pause",
        Opts::sh("i=0; while true; do echo tick$i; i=$((i+1)); usleep 20000; done"),
    );
    f.create_ok();
    let mut c = f.client();
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    let e = error_of(&c.call(Request::Resume(ResumeRequest {})));
    assert_eq!(e.code, Code::FailedPrecondition as i32);
    assert_ok(&c.call(Request::Pause(PauseRequest {})), "pause");
    assert_eq!(c.state().status, Status::Paused as i32);
    std::thread::sleep(Duration::from_millis(100));
    let frozen = f.log().lines().count();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.log().lines().count(), frozen, "no output while paused");
    let e = error_of(&c.exec(&["true"], 5));
    assert_eq!(e.code, Code::FailedPrecondition as i32);
    assert_ok(&c.call(Request::Resume(ResumeRequest {})), "resume");
    assert_eq!(c.state().status, Status::Running as i32);
    assert!(eventually(Duration::from_secs(5), || f
        .log()
        .lines()
        .count()
        > frozen + 2));
    // Shutdown of a paused container works too.
    assert_ok(&c.call(Request::Pause(PauseRequest {})), "pause again");
    let init = c.state().pid;
    f.shutdown();
    assert!(wait_gone(init, Duration::from_secs(5)));
    assert!(f.cgroup_dirs().is_empty());
}

#[test]
fn only_the_intended_stdio_reaches_the_container() {
    if !is_root() {
        return;
    }
    let mut f = Fixture::new("fds", Opts::sh("exec ls -l /proc/self/fd"));
    f.create_ok();
    f.run_to_exit();
    let fds: Vec<(String, String)> = f
        .log_records()
        .into_iter()
        .filter_map(|r| {
            let (left, target) = r.2.split_once(" -> ")?;
            Some((left.rsplit(' ').next()?.to_owned(), target.to_owned()))
        })
        .collect();
    let numbers: Vec<&str> = fds.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&numbers[..3], ["0", "1", "2"], "{fds:?}");
    assert_eq!(fds[0].1, "/dev/null");
    assert!(
        fds[1].1.starts_with("pipe:") && fds[2].1.starts_with("pipe:"),
        "{fds:?}"
    );
    // Anything else can only be the directory ls itself is reading.
    assert!(
        fds[3..].iter().all(|(_, t)| t.starts_with("/proc/")),
        "{fds:?}"
    );
    f.shutdown();
    // The init starts with no blocked and no ignored signal (the monitor
    // blocks some, Rust ignores SIGPIPE).
    let mut f = Fixture::new(
        "signals",
        Opts::new(&["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]),
    );
    f.create_ok();
    f.run_to_exit();
    let lines: Vec<String> = f.log_records().into_iter().map(|r| r.2).collect();
    assert_eq!(
        lines,
        vec!["SigBlk:\t0000000000000000", "SigIgn:\t0000000000000000"]
    );
    f.shutdown();
}

#[test]
fn stdin_pipe_is_kept_open() {
    if !is_root() {
        return;
    }
    let mut opts = Opts::new(&["cat"]);
    opts.stdin = true;
    let mut f = Fixture::new("stdin", opts);
    f.create_ok();
    let mut c = f.client();
    assert_ok(&c.call(Request::Start(StartRequest {})), "start");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        c.state().status,
        Status::Running as i32,
        "cat waits on stdin"
    );
    f.shutdown();
}

#[test]
fn tty_output_goes_to_the_log_as_stdout() {
    if !is_root() {
        return;
    }
    let mut opts = Opts::sh("tty; echo hi-from-tty >&2");
    opts.tty = true;
    let mut f = Fixture::new("tty", opts);
    f.create_ok();
    let st = f.run_to_exit();
    assert_eq!(st.exit_code, 0);
    let recs = f.log_records();
    assert!(recs.iter().all(|r| r.0 == "stdout"), "{recs:?}");
    let text: Vec<String> = recs
        .iter()
        .map(|r| r.2.trim_end_matches('\r').to_owned())
        .collect();
    assert!(text.iter().any(|l| l.starts_with("/dev/pts/")), "{text:?}");
    assert!(text.iter().any(|l| l == "hi-from-tty"), "{text:?}");
    assert!(!f.shim_dir.join("console.sock").exists());
    f.shutdown();
}

#[test]
fn failing_create_missing_binary_leaves_nothing() {
    if !is_root() {
        return;
    }
    let f = Fixture::new("nobin", Opts::new(&["/no/such/binary"]));
    let resp = f.create();
    let e = error_of(&resp);
    assert!(e.message.contains("/no/such/binary"), "{e:?}");
    assert_nothing_left(&f);
}

#[test]
fn failing_create_missing_rootfs_leaves_nothing() {
    if !is_root() {
        return;
    }
    let mut opts = Opts::new(&["true"]);
    opts.rootfs = Some("/tmp/berth-shim-test/definitely-missing-rootfs".into());
    let f = Fixture::new("norootfs", opts);
    let e = error_of(&f.create());
    assert!(!e.message.is_empty());
    assert_nothing_left(&f);
}

#[test]
fn bad_config_is_an_invalid_argument() {
    if !is_root() {
        return;
    }
    let f = Fixture::new("badcfg", Opts::new(&["true"]));
    std::fs::write(f.shim_dir.join("config.pb"), b"\xff\xff\xff").unwrap();
    let e = error_of(&f.create());
    assert_eq!(e.code, Code::InvalidArgument as i32);
    assert_nothing_left(&f);
}

fn assert_nothing_left(f: &Fixture) {
    assert!(f.cgroup_dirs().is_empty(), "{:?}", f.cgroup_dirs());
    assert!(!f.runtime_root.join(&f.id).exists());
    assert!(!f.shim_dir.join("shim.sock").exists());
    assert!(!f.shim_dir.join("shim.pid").exists());
    // No process of ours mentions this container any more.
    let id = f.id.clone();
    assert!(eventually(Duration::from_secs(5), || {
        std::fs::read_dir("/proc").unwrap().flatten().all(|p| {
            std::fs::read(p.path().join("cmdline"))
                .map(|c| !String::from_utf8_lossy(&c).contains(&id))
                .unwrap_or(true)
        })
    }));
}

#[test]
fn version() {
    let out = std::process::Command::new(SHIM)
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("berth-shim "));
    let out = std::process::Command::new(HELPER)
        .arg("--version")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("berth-container "));
}

#[test]
fn pause_mode_reaps_and_exits_on_sigterm() {
    let mut child = std::process::Command::new(SHIM)
        .arg("pause")
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(child.try_wait().unwrap().is_none());
    unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        child.try_wait().unwrap().is_none(),
        "other signals are blocked"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert!(st.success());
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(10));
    }
}
