//! berthd's streaming server end to end: CRI `Exec`, `Attach` and
//! `PortForward` URLs used by our own WebSocket and SPDY clients
//! (`berth_e2e::streaming`) and by crictl, against real containers and pods.
//!
//! What a user sees is asserted: stdin echoed back, exit codes, terminal
//! sizes, attach output (and the CRI log still getting every line), pages
//! served through forwarded ports in pod and host network, errors on a
//! forwarded port nothing listens on, single-use tokens, a client leaving
//! killing only its own exec, a session to a removed container ending.
//!
//! crictl is used when it is found (`$BERTH_CRICTL`, `shared/tools/crictl`
//! beside the workspace); the tests say SKIPPED when it is not. Its
//! terminal for `exec -t` comes from util-linux `script`. Port-forward
//! traffic goes to 127.0.0.1 inside the pod's (or the host's) network
//! namespace only, after net-guard is on.

use std::time::Duration;

use berth_cri::v1::*;
use berth_e2e::pods::*;
use berth_e2e::process::free_port;
use berth_e2e::report_skip;
use berth_e2e::streaming::*;

/// How long any one step of a session may take.
const T: Duration = Duration::from_secs(10);

fn crictl(env: &PodEnv, test: &str) -> Option<Crictl> {
    let c = Crictl::new(&env.d.socket, env.work.path());
    if c.is_none() {
        report_skip(
            test,
            "crictl not found (set $BERTH_CRICTL or put it in shared/tools beside the workspace)",
        );
    }
    c
}

/// A pod with a container that runs until stopped (and stops at once on
/// SIGTERM).
async fn sleeper(env: &mut PodEnv, name: &str) -> (String, String) {
    let pod = env.run_pod(&env.pod_config(name)).await;
    let config = sh_config(
        "sleeper",
        &env.busybox(),
        "trap 'exit 0' TERM; sleep 600 & wait",
    );
    let ctr = env.run(&pod, &config).await;
    (pod, ctr)
}

async fn exec_url(env: &mut PodEnv, ctr: &str, cmd: &[&str], stdin: bool, tty: bool) -> String {
    env.client
        .runtime
        .exec(ExecRequest {
            container_id: ctr.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        })
        .await
        .unwrap_or_else(|e| panic!("Exec {cmd:?} in {ctr}: {e:?}"))
        .into_inner()
        .url
}

async fn attach_url(env: &mut PodEnv, ctr: &str, stdin: bool, tty: bool) -> String {
    env.client
        .runtime
        .attach(AttachRequest {
            container_id: ctr.to_string(),
            stdin,
            tty,
            stdout: true,
            stderr: !tty,
        })
        .await
        .unwrap_or_else(|e| panic!("Attach {ctr}: {e:?}"))
        .into_inner()
        .url
}

async fn port_forward_url(env: &mut PodEnv, pod: &str, ports: &[u16]) -> String {
    env.client
        .runtime
        .port_forward(PortForwardRequest {
            pod_sandbox_id: pod.to_string(),
            port: ports.iter().map(|p| *p as i32).collect(),
        })
        .await
        .unwrap_or_else(|e| panic!("PortForward {pod} {ports:?}: {e:?}"))
        .into_inner()
        .url
}

/// The URL with `?port=..&port=..` for the WebSocket port-forward protocol.
fn with_ports(url: &str, ports: &[u16]) -> String {
    let q: Vec<String> = ports.iter().map(|p| format!("port={p}")).collect();
    format!("{url}?{}", q.join("&"))
}

fn status_of(s: &Session) -> serde_json::Value {
    s.output.status().unwrap_or_else(|| {
        panic!(
            "no JSON status on the error channel:{}",
            s.output.describe()
        )
    })
}

fn assert_success(s: &Session) {
    let status = status_of(s);
    assert_eq!(
        status["status"],
        "Success",
        "status {status}; session:{}",
        s.output.describe()
    );
}

fn assert_exit_code(s: &Session, code: i32) {
    let status = status_of(s);
    assert_eq!(status["status"], "Failure", "{status}");
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(
        status["details"]["causes"][0]["message"],
        code.to_string(),
        "{status}"
    );
}

/// Page text served on each port of [`web_pod`].
fn page(port: u16) -> String {
    format!("page served on {port}")
}

/// A pod running two busybox httpd, on `ports` (each serving
/// [`page`]), listening on 127.0.0.1 only in host network (`host`), else
/// on every address of the pod's own network namespace.
async fn web_pod(env: &mut PodEnv, name: &str, host: bool) -> (String, [u16; 2]) {
    berth_e2e::net::net_guard_on();
    let mut config = env.pod_config(name);
    let ports = if host {
        pod_namespace_options(&mut config).network = NamespaceMode::Node as i32;
        let a = free_port();
        let mut b = free_port();
        while b == a {
            b = free_port();
        }
        [a, b]
    } else {
        [8080, 8081]
    };
    let bind = if host { "127.0.0.1:" } else { "" };
    let pod = env.run_pod(&config).await;
    let mut script = String::from("trap 'exit 0' TERM; ");
    for p in ports {
        script.push_str(&format!(
            "mkdir -p /www{p} && echo '{}' > /www{p}/index.html && httpd -f -p {bind}{p} -h /www{p} & ",
            page(p)
        ));
    }
    script.push_str("wait");
    let ctr = env
        .run(&pod, &sh_config("web", &env.busybox(), &script))
        .await;
    for p in ports {
        env.wait_listening(&ctr, p).await;
    }
    (pod, ports)
}

/// A port nothing listens on in `pod`'s network namespace.
fn closed_port(open: &[u16]) -> u16 {
    (9000..9100).find(|p| !open.contains(p)).unwrap()
}

fn assert_page(what: &str, response: &str, port: u16) {
    assert!(
        response.starts_with("HTTP/1.") && response.contains(" 200 "),
        "{what}: no 200 answer from port {port}: {response:?}"
    );
    assert!(
        response.contains(&page(port)),
        "{what}: port {port} did not serve its page: {response:?}"
    );
}

// ---- 1. exec: stdin echoed, exit codes ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_websocket_echoes_stdin_and_reports_exit_codes() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "ws-exec").await;

    // v5: stdin through cat, the close signal ends it, success is a Status.
    let url = exec_url(&mut env, &ctr, &["cat"], true, false).await;
    let mut s = ws_connect(&url, &[WS_V5, WS_V4])
        .await
        .unwrap_or_else(|e| panic!("websocket exec: {e}"));
    assert_eq!(s.protocol, WS_V5);
    s.send(STDIN, b"hello through stdin\n").await;
    assert!(
        s.read_until(STDOUT, "hello through stdin\n", T).await,
        "cat did not echo stdin:{}",
        s.output.describe()
    );
    s.send(STDIN, b"a second line\n").await;
    assert!(
        s.read_until(STDOUT, "a second line\n", T).await,
        "cat did not echo the second line:{}",
        s.output.describe()
    );
    s.close_channel(STDIN).await;
    assert!(
        s.wait_closed(T).await,
        "closing stdin did not end cat:{}",
        s.output.describe()
    );
    assert_eq!(
        s.output.text(STDOUT),
        "hello through stdin\na second line\n"
    );
    assert_success(&s);

    // v4: stdout, stderr and a failing command's exit code.
    let url = exec_url(
        &mut env,
        &ctr,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
        false,
    )
    .await;
    let mut s = ws_connect(&url, &[WS_V4]).await.unwrap();
    assert_eq!(s.protocol, WS_V4);
    assert!(s.wait_closed(T).await, "{}", s.output.describe());
    assert_eq!(s.output.text(STDOUT), "out\n", "{}", s.output.describe());
    assert_eq!(s.output.text(STDERR), "err\n", "{}", s.output.describe());
    assert_exit_code(&s, 3);

    // The base64 variant: text messages, same outcome.
    let url = exec_url(&mut env, &ctr, &["echo", "in base64"], false, false).await;
    let mut s = ws_connect(&url, &[WS_V4_BASE64]).await.unwrap();
    assert_eq!(s.protocol, WS_V4_BASE64);
    assert!(s.wait_closed(T).await, "{}", s.output.describe());
    assert_eq!(
        s.output.text(STDOUT),
        "in base64\n",
        "{}",
        s.output.describe()
    );
    assert_success(&s);

    // The unversioned protocol: the failure as plain text.
    let url = exec_url(&mut env, &ctr, &["sh", "-c", "exit 3"], false, false).await;
    let mut s = ws_connect(&url, &[WS_V1]).await.unwrap();
    assert!(s.wait_closed(T).await, "{}", s.output.describe());
    let error = s.output.text(ERROR);
    assert!(
        error.contains("exit code 3"),
        "channel.k8s.io error channel: {error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_over_spdy_echoes_stdin_and_reports_exit_codes() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "spdy-exec").await;
    let all = Stdio {
        stdin: true,
        stdout: true,
        stderr: true,
        tty: false,
    };

    let url = exec_url(&mut env, &ctr, &["cat"], true, false).await;
    let mut s = spdy_remote_command(&url, &[WS_V4], all)
        .await
        .unwrap_or_else(|e| panic!("SPDY exec: {e}"));
    assert_eq!(s.protocol, WS_V4);
    s.send(STDIN, b"hello over spdy\n").await;
    assert!(
        s.read_until(STDOUT, "hello over spdy\n", T).await,
        "cat did not echo stdin:{}",
        s.output.describe()
    );
    // FIN on the stdin stream is EOF for cat.
    s.close_channel(STDIN).await;
    assert!(s.wait_closed(T).await, "{}", s.output.describe());
    assert_eq!(s.output.text(STDOUT), "hello over spdy\n");
    assert_success(&s);

    let url = exec_url(
        &mut env,
        &ctr,
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        false,
        false,
    )
    .await;
    let mut s = spdy_remote_command(
        &url,
        &[WS_V5, WS_V4],
        Stdio {
            stdin: false,
            ..all
        },
    )
    .await
    .unwrap_or_else(|e| panic!("SPDY exec: {e}"));
    assert_eq!(s.protocol, WS_V5);
    assert!(s.wait_closed(T).await, "{}", s.output.describe());
    assert_eq!(s.output.text(STDOUT), "out\n", "{}", s.output.describe());
    assert_eq!(s.output.text(STDERR), "err\n", "{}", s.output.describe());
    assert_exit_code(&s, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_exec_echoes_stdin_and_propagates_the_exit_code() {
    const TEST: &str = "crictl_exec_echoes_stdin_and_propagates_the_exit_code";
    let mut env = PodEnv::start().await;
    let Some(crictl) = crictl(&env, TEST) else {
        return;
    };
    let (_pod, ctr) = sleeper(&mut env, "crictl-exec").await;
    for transport in ["spdy", "websocket"] {
        let line = format!("hello from crictl over {transport}\n");
        let r = crictl
            .run(
                &["exec", "-i", "--transport", transport, &ctr, "cat"],
                line.as_bytes(),
                T,
            )
            .await;
        assert_eq!(r.code, Some(0), "crictl exec -i ({transport}) cat: {r:?}");
        assert_eq!(r.stdout, line, "crictl exec -i ({transport}) cat: {r:?}");

        let r = crictl
            .run(
                &[
                    "exec",
                    "--transport",
                    transport,
                    &ctr,
                    "sh",
                    "-c",
                    "echo before; exit 3",
                ],
                b"",
                T,
            )
            .await;
        assert!(!r.timed_out, "crictl exec ({transport}) hung: {r:?}");
        assert_eq!(r.stdout, "before\n", "crictl exec ({transport}): {r:?}");
        assert!(
            r.code.is_some_and(|c| c != 0),
            "crictl exec ({transport}) of `exit 3` exited {:?}: {r:?}",
            r.code
        );
        // client-go's words for a v4 NonZeroExitCode status.
        assert!(
            r.stderr.contains("command terminated with exit code 3"),
            "crictl exec ({transport}) does not show the exit code: {r:?}"
        );
    }
}

// ---- 2. tty exec sees resizes ----

/// Runs `stty size` for every line on a terminal session until it prints
/// `rows cols`, resending the line (a resize and stdin travel separately,
/// so the first line may beat the resize).
async fn wait_for_size(s: &mut Session, rows: u16, cols: u16) {
    let want = format!("{rows} {cols}");
    let deadline = tokio::time::Instant::now() + T;
    loop {
        s.send(STDIN, b"\n").await;
        if s.read_until(STDOUT, &want, Duration::from_millis(500))
            .await
        {
            return;
        }
        assert!(
            !s.output.closed && tokio::time::Instant::now() < deadline,
            "the terminal never became {want}:{}",
            s.output.describe()
        );
    }
}

const STTY_LOOP: &[&str] = &["sh", "-c", "while read x; do stty size; done; echo done"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_exec_over_websocket_sees_resizes() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "ws-tty").await;
    let url = exec_url(&mut env, &ctr, STTY_LOOP, true, true).await;
    let mut s = ws_connect(&url, &[WS_V5]).await.unwrap();
    s.resize(100, 30).await;
    wait_for_size(&mut s, 30, 100).await;
    s.resize(120, 42).await;
    wait_for_size(&mut s, 42, 120).await;
    // Ctrl-D: EOF for a terminal's reader.
    s.send(STDIN, b"\x04").await;
    assert!(s.wait_closed(T).await, "{}", s.output.describe());
    assert!(s.output.text(STDOUT).contains("done"));
    assert_success(&s);
    assert!(
        s.output.bytes(STDERR).is_empty(),
        "a terminal has no stderr"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tty_exec_over_spdy_sees_resizes() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "spdy-tty").await;
    let url = exec_url(&mut env, &ctr, STTY_LOOP, true, true).await;
    let mut s = spdy_remote_command(
        &url,
        &[WS_V4],
        Stdio {
            stdin: true,
            stdout: true,
            stderr: false,
            tty: true,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("SPDY tty exec: {e}"));
    s.resize(100, 30).await;
    wait_for_size(&mut s, 30, 100).await;
    s.resize(120, 42).await;
    wait_for_size(&mut s, 42, 120).await;
    s.send(STDIN, b"\x04").await;
    assert!(s.wait_closed(T).await, "{}", s.output.describe());
    assert_success(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_tty_exec_sees_its_terminal_size() {
    const TEST: &str = "crictl_tty_exec_sees_its_terminal_size";
    let mut env = PodEnv::start().await;
    let Some(crictl) = crictl(&env, TEST) else {
        return;
    };
    let Some(script) = script_path() else {
        report_skip(TEST, "util-linux `script` is not on the PATH");
        return;
    };
    let (_pod, ctr) = sleeper(&mut env, "crictl-tty").await;
    for transport in ["spdy", "websocket"] {
        // script gives crictl a terminal of the size stty sets; crictl -t
        // sends it as the first resize.
        let line = format!(
            "stty cols 91 rows 27; {}",
            crictl.shell_line(&[
                "exec",
                "-i",
                "-t",
                "--transport",
                transport,
                &ctr,
                "stty",
                "size"
            ])
        );
        let mut cmd = tokio::process::Command::new(&script);
        cmd.args(["-qec", &line, "/dev/null"]);
        let r = run_command(cmd, b"", false, T).await;
        assert!(
            r.stdout.contains("27 91"),
            "crictl exec -it ({transport}) stty size: {r:?}"
        );
        assert_eq!(r.code, Some(0), "crictl exec -it ({transport}): {r:?}");
    }
}

// ---- 3. attach, stdin_once, the log file ----

/// A container with stdin (once) that answers every line it reads, on
/// stdout and stderr, and says when its stdin ended.
async fn answering_container(env: &mut PodEnv, pod: &str, name: &str) -> (String, ContainerConfig) {
    let mut config = sh_config(
        name,
        &env.busybox(),
        "echo started; while read x; do echo got $x; echo err $x >&2; done; echo stdin closed",
    );
    config.stdin = true;
    config.stdin_once = true;
    let ctr = env.run(pod, &config).await;
    // It waits for stdin: still running a moment later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = env.status(&ctr).await;
    assert_eq!(
        status.state,
        ContainerState::ContainerRunning as i32,
        "a container with stdin: true did not wait for its stdin (stdin not given to it?): {status:?}; log {:?}",
        read_cri_log_so_far(&env.log_file(pod, &config))
    );
    (ctr, config)
}

/// After the attach: the container ended on its own (stdin_once) with 0,
/// and its CRI log holds every line, also those the attach saw.
async fn assert_attach_outcome(
    env: &mut PodEnv,
    pod: &str,
    ctr: &str,
    config: &ContainerConfig,
    words: &[&str],
) {
    let status = env.wait_exited(ctr).await;
    assert_eq!(status.exit_code, 0, "{status:?}");
    let path = env.log_file(pod, config);
    let lines = read_cri_log(&path);
    let out = stream_text(&lines, "stdout");
    let err = stream_text(&lines, "stderr");
    let mut want_out = String::from("started\n");
    let mut want_err = String::new();
    for w in words {
        want_out.push_str(&format!("got {w}\n"));
        want_err.push_str(&format!("err {w}\n"));
    }
    want_out.push_str("stdin closed\n");
    assert_eq!(out, want_out, "stdout in the CRI log {}", path.display());
    assert_eq!(err, want_err, "stderr in the CRI log {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_over_websocket_with_stdin_once() {
    let mut env = PodEnv::start().await;
    let pod = env.run_pod(&env.pod_config("ws-attach")).await;
    let (ctr, config) = answering_container(&mut env, &pod, "answers").await;
    let url = attach_url(&mut env, &ctr, true, false).await;
    let mut s = ws_connect(&url, &[WS_V5, WS_V4]).await.unwrap();
    assert_eq!(s.protocol, WS_V5);
    for w in ["one", "two"] {
        s.send(STDIN, format!("{w}\n").as_bytes()).await;
        assert!(
            s.read_until(STDOUT, &format!("got {w}\n"), T).await
                && s.read_until(STDERR, &format!("err {w}\n"), T).await,
            "attach did not see the answer to {w}:{}",
            s.output.describe()
        );
    }
    // stdin_once: the container's stdin ends with this client's.
    s.close_channel(STDIN).await;
    assert!(
        s.read_until(STDOUT, "stdin closed\n", T).await,
        "closing stdin did not reach the container:{}",
        s.output.describe()
    );
    assert!(
        s.wait_closed(T).await,
        "the attach did not end with the container:{}",
        s.output.describe()
    );
    // The attach saw only what came after it: not "started".
    assert_eq!(
        s.output.text(STDOUT),
        "got one\ngot two\nstdin closed\n",
        "{}",
        s.output.describe()
    );
    assert_attach_outcome(&mut env, &pod, &ctr, &config, &["one", "two"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_over_spdy_with_stdin_once() {
    let mut env = PodEnv::start().await;
    let pod = env.run_pod(&env.pod_config("spdy-attach")).await;
    let (ctr, config) = answering_container(&mut env, &pod, "answers").await;
    let url = attach_url(&mut env, &ctr, true, false).await;
    let mut s = spdy_remote_command(
        &url,
        &[WS_V4],
        Stdio {
            stdin: true,
            stdout: true,
            stderr: true,
            tty: false,
        },
    )
    .await
    .unwrap_or_else(|e| panic!("SPDY attach: {e}"));
    s.send(STDIN, b"three\n").await;
    assert!(
        s.read_until(STDOUT, "got three\n", T).await
            && s.read_until(STDERR, "err three\n", T).await,
        "{}",
        s.output.describe()
    );
    s.close_channel(STDIN).await;
    assert!(
        s.read_until(STDOUT, "stdin closed\n", T).await,
        "{}",
        s.output.describe()
    );
    assert!(s.wait_closed(T).await, "{}", s.output.describe());
    assert_attach_outcome(&mut env, &pod, &ctr, &config, &["three"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_attach_writes_stdin_and_reads_output() {
    const TEST: &str = "crictl_attach_writes_stdin_and_reads_output";
    let mut env = PodEnv::start().await;
    let Some(crictl) = crictl(&env, TEST) else {
        return;
    };
    let pod = env.run_pod(&env.pod_config("crictl-attach")).await;
    for transport in ["spdy", "websocket"] {
        let (ctr, config) =
            answering_container(&mut env, &pod, &format!("answers-{transport}")).await;
        let word = format!("via-{transport}");
        let r = crictl
            .run(
                &["attach", "-i", "--transport", transport, &ctr],
                format!("{word}\n").as_bytes(),
                T,
            )
            .await;
        assert!(
            r.stdout.contains(&format!("got {word}\n")) && r.stdout.contains("stdin closed\n"),
            "crictl attach -i ({transport}): {r:?}; CRI log {:?}",
            read_cri_log_so_far(&env.log_file(&pod, &config))
        );
        assert!(
            r.stderr.contains(&format!("err {word}\n")),
            "crictl attach -i ({transport}) stderr: {r:?}"
        );
        assert_eq!(r.code, Some(0), "crictl attach -i ({transport}): {r:?}");
        assert_attach_outcome(&mut env, &pod, &ctr, &config, &[&word]).await;
    }
}

// ---- 4. port-forward to HTTP servers ----

/// Forwards one GET to each of `ports` over the WebSocket channel
/// protocol; returns the session (its server side may still be open).
async fn ws_forward_two(env: &mut PodEnv, pod: &str, ports: [u16; 2], what: &str) -> Session {
    let url = port_forward_url(env, pod, &ports).await;
    let mut s = ws_connect(&with_ports(&url, &ports), &[WS_V4])
        .await
        .unwrap_or_else(|e| panic!("{what}: websocket port-forward: {e}"));
    assert_eq!(s.protocol, WS_V4);
    s.send(0, &http_get("/")).await;
    s.send(2, &http_get("/")).await;
    let pages = [page(ports[0]), page(ports[1])];
    let both = s
        .read_while(T, |o| {
            contains_text(o.bytes(0), &pages[0]) && contains_text(o.bytes(2), &pages[1])
        })
        .await;
    assert!(
        both,
        "{what}: no answer from both ports:{}",
        s.output.describe()
    );
    for (i, port) in ports.into_iter().enumerate() {
        let data = (2 * i) as u8;
        let answer = String::from_utf8_lossy(&s.output.port_data(data, port)).into_owned();
        assert_page(what, &answer, port);
        let error = s.output.port_data(data + 1, port);
        assert!(
            error.is_empty(),
            "{what}: error on port {port}: {:?}",
            String::from_utf8_lossy(&error)
        );
    }
    s
}

fn contains_text(hay: &[u8], needle: &str) -> bool {
    String::from_utf8_lossy(hay).contains(needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_over_websocket_reaches_servers_in_pod_and_host_network() {
    let mut env = PodEnv::start().await;
    let (pod, ports) = web_pod(&mut env, "ws-forward", false).await;
    let mut in_pod = ws_forward_two(&mut env, &pod, ports, "pod network").await;
    let (host_pod, host_ports) = web_pod(&mut env, "ws-forward-host", true).await;
    let mut in_host = ws_forward_two(&mut env, &host_pod, host_ports, "host network").await;
    // Kubelet ends the session once every forwarded connection has ended
    // (the servers closed theirs after answering): the channel protocol has
    // no way for the client to half-close a port.
    for (s, what) in [(&mut in_pod, "pod network"), (&mut in_host, "host network")] {
        assert!(
            s.wait_closed(T).await,
            "{what}: the session stayed open after both servers closed their connections:{}",
            s.output.describe()
        );
    }
}

async fn spdy_forward_two(f: &SpdyForward, ports: [u16; 2], what: &str) {
    let get = http_get("/");
    let (a, b) = tokio::join!(f.request(ports[0], &get, T), f.request(ports[1], &get, T));
    for (r, port) in [(a, ports[0]), (b, ports[1])] {
        let r = r.unwrap_or_else(|e| panic!("{what}: port {port}: {e}"));
        assert_eq!(r.error, "", "{what}: error stream of port {port}: {r:?}");
        assert_eq!(r.data_error, None, "{what}: port {port}: {r:?}");
        assert_page(what, &r.data_text(), port);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_over_spdy_reaches_servers_in_pod_and_host_network() {
    let mut env = PodEnv::start().await;
    let (pod, ports) = web_pod(&mut env, "spdy-forward", false).await;
    let (host_pod, host_ports) = web_pod(&mut env, "spdy-forward-host", true).await;
    for (pod, ports, net) in [(&pod, ports, "pod"), (&host_pod, host_ports, "host")] {
        let url = port_forward_url(&mut env, pod, &ports).await;
        let f = SpdyForward::connect(&url)
            .await
            .unwrap_or_else(|e| panic!("SPDY port-forward upgrade: {e}"));
        assert_eq!(f.protocol, "portforward.k8s.io");
        spdy_forward_two(&f, ports, &format!("SPDY, {net} network")).await;
        // A second round on the same connection.
        spdy_forward_two(&f, ports, &format!("SPDY again, {net} network")).await;

        let url = port_forward_url(&mut env, pod, &ports).await;
        let f = SpdyForward::connect_tunnel(&url)
            .await
            .unwrap_or_else(|e| panic!("SPDY-in-websocket port-forward: {e}"));
        assert_eq!(f.protocol, WS_SPDY_TUNNEL);
        spdy_forward_two(&f, ports, &format!("SPDY in websocket, {net} network")).await;
    }
}

/// Waits until crictl port-forward says it forwards 127.0.0.1:`port`
/// (its stdout collected in `out`), or exits.
async fn wait_forwarding(
    child: &mut tokio::process::Child,
    out: &std::sync::Arc<std::sync::Mutex<String>>,
    port: u16,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + T;
    let want = format!("Forwarding from 127.0.0.1:{port} ");
    loop {
        if out.lock().unwrap().contains(&want) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("crictl port-forward exited {status}"));
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("crictl did not say {want:?} within {T:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn http_page(port: u16) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        berth_e2e::http::get(&format!("127.0.0.1:{port}"), "/", &[])
            .map(|r| {
                format!(
                    "HTTP/1.x {} \n{}",
                    r.status,
                    String::from_utf8_lossy(&r.body)
                )
            })
            .map_err(|e| format!("{e:#}"))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_port_forward_serves_the_pod_pages() {
    const TEST: &str = "crictl_port_forward_serves_the_pod_pages";
    let mut env = PodEnv::start().await;
    let Some(crictl) = crictl(&env, TEST) else {
        return;
    };
    let (pod, ports) = web_pod(&mut env, "crictl-forward", false).await;
    let mut failures = Vec::new();
    for transport in ["spdy", "websocket"] {
        let local = [free_port(), free_port()];
        let specs: Vec<String> = local
            .iter()
            .zip(ports)
            .map(|(l, r)| format!("{l}:{r}"))
            .collect();
        let mut args = vec!["port-forward", "--transport", transport, &pod];
        args.extend(specs.iter().map(String::as_str));
        let mut cmd = crictl.command(&args);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn crictl port-forward");
        let out = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stdout, &mut buf).await {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let ready = wait_forwarding(&mut child, &out, local[1]).await;
        let mut results = Vec::new();
        if ready.is_ok() {
            for (l, r) in local.iter().zip(ports) {
                // Twice: every connection is a new stream pair.
                for _ in 0..2 {
                    results.push((r, http_page(*l).await));
                }
            }
        }
        let _ = child.start_kill();
        let output = child.wait_with_output().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
        let log = format!(
            "crictl port-forward ({transport}) stdout {:?} stderr {:?}",
            out.lock().unwrap(),
            String::from_utf8_lossy(&output.stderr)
        );
        if let Err(e) = ready {
            failures.push(format!("{e}; {log}"));
            continue;
        }
        for (port, r) in results {
            match r {
                Ok(answer) if answer.contains(" 200 ") && answer.contains(&page(port)) => {}
                Ok(other) => failures.push(format!(
                    "GET through the local port for {port}: {other:?}; {log}"
                )),
                Err(e) => {
                    failures.push(format!("GET through the local port for {port}: {e}; {log}"))
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---- 5. a port nothing listens on ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_to_a_closed_port_errors_and_the_connection_stays_usable() {
    let mut env = PodEnv::start().await;
    let (pod, ports) = web_pod(&mut env, "closed-port", false).await;
    let good = ports[0];
    let bad = closed_port(&ports);

    // WebSocket channels: the bad port's error channel says so, then the
    // good port (asked for after the error came) still answers.
    let url = port_forward_url(&mut env, &pod, &[bad, good]).await;
    let mut s = ws_connect(&with_ports(&url, &[bad, good]), &[WS_V4])
        .await
        .unwrap();
    assert!(
        s.read_while(T, |o| o.bytes(1).len() > 2).await,
        "no error for port {bad}:{}",
        s.output.describe()
    );
    let error = s.output.port_data(1, bad);
    let error: serde_json::Value = serde_json::from_slice(&error).unwrap_or_else(|e| {
        panic!(
            "the error is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&error)
        )
    });
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains(&bad.to_string())),
        "the error does not name port {bad}: {error}"
    );
    assert!(
        !s.output.closed,
        "the session ended with the bad port's error:{}",
        s.output.describe()
    );
    s.send(2, &http_get("/")).await;
    let served = page(good);
    assert!(
        s.read_while(T, |o| contains_text(o.bytes(2), &served))
            .await,
        "{}",
        s.output.describe()
    );
    let answer = String::from_utf8_lossy(&s.output.port_data(2, good)).into_owned();
    assert_page("websocket after an error", &answer, good);
    assert!(s.output.port_data(3, good).is_empty());

    // SPDY, directly and in a websocket: one stream pair fails, the next
    // on the same connection works.
    for tunnel in [false, true] {
        let what = if tunnel { "SPDY in websocket" } else { "SPDY" };
        let url = port_forward_url(&mut env, &pod, &[bad, good]).await;
        let f = if tunnel {
            SpdyForward::connect_tunnel(&url).await
        } else {
            SpdyForward::connect(&url).await
        }
        .unwrap_or_else(|e| panic!("{what} port-forward: {e}"));
        let r = f
            .request(bad, &http_get("/"), T)
            .await
            .unwrap_or_else(|e| panic!("{what}: port {bad}: {e}"));
        assert!(
            r.error.contains(&bad.to_string()),
            "{what}: no error naming port {bad}: {r:?}"
        );
        assert!(r.data.is_empty(), "{what}: data from port {bad}: {r:?}");
        let r = f
            .request(good, &http_get("/"), T)
            .await
            .unwrap_or_else(|e| panic!("{what}: port {good} after the error: {e}"));
        assert_eq!(r.error, "", "{what}: {r:?}");
        assert_page(&format!("{what} after an error"), &r.data_text(), good);
    }
}

// ---- 6. single-use tokens ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_urls_work_once() {
    let mut env = PodEnv::start().await;
    let (pod, ctr) = sleeper(&mut env, "tokens").await;

    let url = exec_url(&mut env, &ctr, &["true"], false, false).await;
    let mut first = ws_connect(&url, &[WS_V4])
        .await
        .unwrap_or_else(|e| panic!("first use of an exec URL: {e}"));
    first.wait_closed(T).await;
    for second in [
        ws_connect(&url, &[WS_V4]).await.err(),
        spdy_upgrade(&url, &[WS_V4]).await.err(),
    ] {
        let e = second.expect("an exec URL worked twice");
        assert_eq!(e.status, Some(404), "{e}");
    }

    let url = attach_url(&mut env, &ctr, false, false).await;
    let first = ws_connect(&url, &[WS_V5])
        .await
        .unwrap_or_else(|e| panic!("first use of an attach URL: {e}"));
    let e = ws_connect(&url, &[WS_V5])
        .await
        .err()
        .expect("an attach URL worked twice");
    assert_eq!(e.status, Some(404), "{e}");
    first.abandon();

    let url = port_forward_url(&mut env, &pod, &[80]).await;
    let (_first, protocol) = spdy_upgrade(&url, &["portforward.k8s.io"])
        .await
        .unwrap_or_else(|e| panic!("first use of a port-forward URL: {e}"));
    assert_eq!(protocol, "portforward.k8s.io");
    let e = ws_connect(&with_ports(&url, &[80]), &[WS_V4])
        .await
        .err()
        .expect("a port-forward URL worked twice");
    assert_eq!(e.status, Some(404), "{e}");

    let (host, _) = split_url(&url);
    for path in ["/exec/not-a-token", "/portforward/", "/nothing/here"] {
        let e = ws_connect(&format!("http://{host}{path}"), &[WS_V4])
            .await
            .err()
            .unwrap_or_else(|| panic!("{path} was served"));
        assert_eq!(e.status, Some(404), "{path}: {e}");
    }
}

// ---- 7. a client leaving kills only its exec ----

/// The `sleep N` processes in a container (busybox ps).
async fn sleeps(env: &mut PodEnv, ctr: &str) -> String {
    let out = env.sh(ctr, "ps -o args").await;
    out.lines()
        .filter(|l| l.starts_with("sleep "))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_kills_only_its_exec() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "disconnect").await;

    let url = exec_url(
        &mut env,
        &ctr,
        &[
            "sh",
            "-c",
            "echo b-started; sleep 602 >/dev/null 2>&1 & cat",
        ],
        true,
        false,
    )
    .await;
    let mut staying = ws_connect(&url, &[WS_V5]).await.unwrap();
    assert!(
        staying.read_until(STDOUT, "b-started", T).await,
        "{}",
        staying.output.describe()
    );

    // One client over each transport goes without a goodbye, as a killed
    // kubectl: its exec dies, nothing else does.
    for (spdy, sleep) in [(false, "sleep 601"), (true, "sleep 603")] {
        let transport = if spdy { "SPDY" } else { "websocket" };
        let script = format!("echo a-started; exec {sleep}");
        let url = exec_url(&mut env, &ctr, &["sh", "-c", &script], false, false).await;
        let mut leaving = if spdy {
            spdy_remote_command(
                &url,
                &[WS_V4],
                Stdio {
                    stdin: false,
                    stdout: true,
                    stderr: true,
                    tty: false,
                },
            )
            .await
        } else {
            ws_connect(&url, &[WS_V5]).await
        }
        .unwrap_or_else(|e| panic!("{transport} exec: {e}"));
        assert!(
            leaving.read_until(STDOUT, "a-started", T).await,
            "{transport}:{}",
            leaving.output.describe()
        );
        let before = sleeps(&mut env, &ctr).await;
        assert!(
            before.contains(sleep) && before.contains("sleep 602"),
            "{before}"
        );
        leaving.abandon();
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let now = sleeps(&mut env, &ctr).await;
            if !now.contains(sleep) {
                assert!(
                    now.contains("sleep 600") && now.contains("sleep 602"),
                    "{transport}: the container or the other exec lost a process: {now}"
                );
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{transport}: the exec outlived its client: {now}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let line = format!("still here after the {transport} client left\n");
        staying.send(STDIN, line.as_bytes()).await;
        assert!(
            staying.read_until(STDOUT, &line, T).await,
            "the other exec stopped answering:{}",
            staying.output.describe()
        );
    }
    let status = env.status(&ctr).await;
    assert_eq!(
        status.state,
        ContainerState::ContainerRunning as i32,
        "{status:?}"
    );
    staying.close_channel(STDIN).await;
    assert!(
        staying.wait_closed(T).await,
        "{}",
        staying.output.describe()
    );
    assert_success(&staying);
}

// ---- 8. the container goes away during a session ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_to_a_removed_container_ends_with_an_error() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "removed").await;
    let url = exec_url(
        &mut env,
        &ctr,
        &["sh", "-c", "echo started; exec sleep 603"],
        false,
        false,
    )
    .await;
    let mut exec = ws_connect(&url, &[WS_V5]).await.unwrap();
    assert!(
        exec.read_until(STDOUT, "started", T).await,
        "{}",
        exec.output.describe()
    );
    let url = attach_url(&mut env, &ctr, false, false).await;
    let mut attach = ws_connect(&url, &[WS_V5]).await.unwrap();

    env.stop_container(&ctr, 0).await.expect("StopContainer");
    env.remove_container(&ctr).await.expect("RemoveContainer");

    assert!(
        exec.wait_closed(T).await,
        "the exec session outlived its container:{}",
        exec.output.describe()
    );
    let status = status_of(&exec);
    assert_eq!(status["status"], "Failure", "{status}");
    assert!(
        status["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{status}"
    );
    assert!(
        attach.wait_closed(T).await,
        "the attach session outlived its container:{}",
        attach.output.describe()
    );
    assert!(
        !attach.output.bytes(ERROR).is_empty(),
        "the attach ended without a word:{}",
        attach.output.describe()
    );

    // And new sessions are refused up front.
    let err = env
        .client
        .runtime
        .exec(ExecRequest {
            container_id: ctr.clone(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .expect_err("Exec in a removed container");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
}

async fn exec_sync(
    env: &mut PodEnv,
    ctr: &str,
    cmd: &[&str],
    timeout: i64,
) -> Result<ExecSyncResponse, tonic::Status> {
    env.client
        .runtime
        .exec_sync(ExecSyncRequest {
            container_id: ctr.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout,
        })
        .await
        .map(|r| r.into_inner())
}

/// ExecSync keeps each stream to kubelet's 16 MiB (the whole answer fits
/// a 16 MiB CRI message) and says on stderr what it cut; berthd does not
/// keep the memory afterwards.
#[tokio::test]
async fn exec_sync_output_is_capped_and_says_so() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "capped").await;
    let r = exec_sync(
        &mut env,
        &ctr,
        &["sh", "-c", "head -c 104857600 /dev/zero; echo done >&2"],
        60,
    )
    .await
    .expect("a 100 MiB ExecSync answers");
    assert_eq!(r.exit_code, 0);
    assert!(r.stdout.len() <= 16 << 20, "{}", r.stdout.len());
    assert!(r.stdout.len() >= 15 << 20, "{}", r.stdout.len());
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.starts_with("done\n"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "stdout was cut to its first {} of 104857600 bytes",
            r.stdout.len()
        )),
        "{stderr}"
    );
    // Small output is untouched.
    let r = exec_sync(&mut env, &ctr, &["echo", "hi"], 10)
        .await
        .unwrap();
    assert_eq!(
        (r.stdout.as_slice(), r.stderr.as_slice()),
        (&b"hi\n"[..], &b""[..])
    );
}

/// A timed-out ExecSync is an error, and the command and what it started
/// are gone; a missing binary is exit code 127 with the reason.
#[tokio::test]
async fn exec_sync_timeout_kills_the_command_and_its_children() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "timeout").await;
    let t0 = std::time::Instant::now();
    let err = exec_sync(
        &mut env,
        &ctr,
        &["sh", "-c", "sleep 300 & sleep 301 & echo started; wait"],
        1,
    )
    .await
    .expect_err("the exec times out");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ps = env
        .sh(&ctr, "ps -o args | grep -c '[s]leep 30[01]' || true")
        .await;
    assert_eq!(
        ps.trim(),
        "0",
        "the exec's children survived its timeout: {}",
        env.d
            .log()
            .lines()
            .filter(|l| l.contains("exec"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let r = exec_sync(&mut env, &ctr, &["/no/such/binary"], 10)
        .await
        .expect("a missing binary is an exit code, not an error");
    assert_eq!(r.exit_code, 127, "{r:?}");
    assert!(!r.stderr.is_empty());
}

/// berthd going away (SIGKILL) ends its streaming sessions, and with them
/// their exec processes, but never the containers; after the restart new
/// sessions work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_berthd_restart_ends_sessions_but_not_containers() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "restart").await;
    let url = exec_url(
        &mut env,
        &ctr,
        &["sh", "-c", "echo up; exec sleep 604"],
        false,
        false,
    )
    .await;
    let mut session = ws_connect(&url, &[WS_V5]).await.unwrap();
    assert!(
        session.read_until(STDOUT, "up", T).await,
        "{}",
        session.output.describe()
    );
    env.d.kill9();
    assert!(
        session.wait_closed(T).await,
        "the session outlived berthd: {}",
        session.output.describe()
    );
    env.d.restart().await.unwrap();
    env.reconnect().await;
    let deadline = tokio::time::Instant::now() + T;
    while sleeps(&mut env, &ctr).await.contains("sleep 604") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the exec outlived its session"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        env.status(&ctr).await.state,
        ContainerState::ContainerRunning as i32
    );
    let url = exec_url(&mut env, &ctr, &["echo", "again"], false, false).await;
    let mut session = ws_connect(&url, &[WS_V5]).await.unwrap();
    assert!(session.read_until(STDOUT, "again", T).await);
}

/// A command that does not exist is an exit code (127) and the reason on
/// stderr, as runc reports it, over both transports.
#[tokio::test]
async fn exec_of_a_missing_binary_is_exit_code_127() {
    let mut env = PodEnv::start().await;
    let (_pod, ctr) = sleeper(&mut env, "missing").await;
    let url = exec_url(&mut env, &ctr, &["/no/such/binary"], false, false).await;
    let mut session = ws_connect(&url, &[WS_V5]).await.unwrap();
    assert!(session.wait_closed(T).await);
    assert_exit_code(&session, 127);
    assert!(
        !session.output.bytes(STDERR).is_empty(),
        "{}",
        session.output.describe()
    );
}
