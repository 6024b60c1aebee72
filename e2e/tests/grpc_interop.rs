//! gRPC clients other than grpc-go on berthd's socket (issue 13).
//!
//! grpc-core ≥ 1.57 (Python's grpcio here, as it comes from PyPI) sends the
//! percent-escaped socket path as `:authority`, grpc-java the raw path; h2
//! alone refuses both with RST_STREAM(PROTOCOL_ERROR). berthd must answer
//! them, and still refuse what is really malformed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use berth_cri::v1::*;
use berth_e2e::berthd::bin_dir;
use berth_e2e::process::OwnedChild;
use berth_e2e::report_skip;
use berth_e2e::{Berthd, BerthdOptions, require_root};
use bytes::Bytes;
use futures_util::StreamExt;
use h2::frame::{self, BytesStr, Frame, Pseudo, StreamId};
use h2::{Codec, Reason};
use http::{HeaderMap, HeaderValue, Method};
use prost::Message;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;

const VERSION: &str = "/runtime.v1.RuntimeService/Version";
const LIST_PODS: &str = "/runtime.v1.RuntimeService/ListPodSandbox";

async fn started() -> Berthd {
    require_root();
    Berthd::start(BerthdOptions::default())
        .await
        .expect("start berthd")
}

/// The socket path as grpc-core ≥ 1.57 puts it in `:authority`.
fn escaped(path: &Path) -> String {
    path.display().to_string().replace('/', "%2F")
}

/// What berthd logs when it rewrites an `:authority` (runtime's
/// `h2_authority` module).
const REWRITE_LOG: &str = "is not a URI authority";

// ---- grpcio from PyPI ----

/// Calls Version and ListPodSandbox twice each on one channel (the second
/// time grpc-core sends `:authority` as an HPACK table index), with raw
/// bytes, decoding the few fields it prints by hand.
const PYTHON_CLIENT: &str = r#"
import json, sys
import grpc

def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]; i += 1
        value |= (b & 0x7f) << shift; shift += 7
        if b < 0x80:
            return value, i

def fields(buf):
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 2:
            n, i = varint(buf, i); value = buf[i:i + n]; i += n
        elif wire == 1:
            value = buf[i:i + 8]; i += 8
        elif wire == 5:
            value = buf[i:i + 4]; i += 4
        else:
            raise ValueError("wire type %d" % wire)
        yield number, value

out = {"grpcio": grpc.__version__, "calls": []}
with grpc.insecure_channel(sys.argv[1]) as channel:
    version = channel.unary_unary("/runtime.v1.RuntimeService/Version")
    list_pods = channel.unary_unary("/runtime.v1.RuntimeService/ListPodSandbox")
    for _ in range(2):
        v = {n: val.decode() for n, val in fields(version(b"", timeout=10))}
        pods = []
        for n, pod in fields(list_pods(b"", timeout=10)):
            if n == 1:
                p = dict(fields(pod))
                meta = dict(fields(p.get(2, b"")))
                pods.append({"id": p[1].decode(), "name": meta.get(1, b"").decode()})
        out["calls"].append({"runtime_name": v.get(2), "runtime_api_version": v.get(4), "pods": pods})
print(json.dumps(out))
"#;

/// Why the grpcio test could not run.
struct Skip(String);

/// Runs `cmd` to completion (at most `timeout`), its output in `log`.
fn run_logged(name: &str, mut cmd: Command, log: &Path, timeout: Duration) -> Result<(), String> {
    let file = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    cmd.stdin(Stdio::null())
        .stdout(file.try_clone().map_err(|e| e.to_string())?)
        .stderr(file);
    let mut child = OwnedChild::spawn(name, cmd).map_err(|e| e.to_string())?;
    let status = child.wait_timeout(timeout);
    let output = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = output.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(format!("{name} failed ({s}):\n{tail}")),
        None => Err(format!("{name} did not finish within {timeout:?}:\n{tail}")),
    }
}

/// A Python with grpcio (≥ 1.57, the versions that escape the path) from
/// PyPI, in a venv under the target dir, made once for all test runs:
/// `<target>/debug/python-grpcio/bin/python`.
fn grpcio_python() -> Result<PathBuf, Skip> {
    let venv = bin_dir().join("python-grpcio");
    let python = venv.join("bin/python");
    let ready = venv.join("ready");
    let lock_path = bin_dir().join("python-grpcio.lock");
    let lock_file = std::fs::File::create(&lock_path).expect("create the venv lock");
    // Another test process may be making it right now.
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the venv");
    if ready.exists() {
        return Ok(python);
    }
    let _ = std::fs::remove_dir_all(&venv);
    let log = bin_dir().join("python-grpcio.log");
    let mut venv_cmd = Command::new("python3");
    venv_cmd.args(["-m", "venv"]).arg(&venv);
    // python3 and python3-venv are test packages (scripts/deps.sh).
    run_logged("python3 -m venv", venv_cmd, &log, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    let mut pip = Command::new(venv.join("bin/pip"));
    pip.args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--timeout",
        "20",
        "--retries",
        "1",
        "grpcio>=1.57",
    ]);
    if let Err(e) = run_logged("pip install grpcio", pip, &log, Duration::from_secs(600)) {
        // CI reaches PyPI: there a failed install is a failure.
        assert!(
            std::env::var_os("CI").is_none(),
            "PyPI should be reachable in CI: {e}"
        );
        let _ = std::fs::remove_dir_all(&venv);
        return Err(Skip(format!(
            "grpcio could not be installed from PyPI: {e}"
        )));
    }
    std::fs::write(&ready, "").expect("mark the venv ready");
    Ok(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_lists_pods() {
    require_root();
    let python = match tokio::task::spawn_blocking(grpcio_python).await.unwrap() {
        Ok(python) => python,
        Err(Skip(why)) => {
            report_skip("python_grpcio_client_lists_pods", &why);
            return;
        }
    };
    let d = started().await;
    let mut c = d.client().await.unwrap();
    // A host-network pod needs neither images nor CNI.
    let pod_id = c
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "grpcio-pod".into(),
                    uid: "uid-grpcio".into(),
                    namespace: "berth-e2e".into(),
                    attempt: 0,
                }),
                linux: Some(LinuxPodSandboxConfig {
                    security_context: Some(LinuxSandboxSecurityContext {
                        namespace_options: Some(NamespaceOption {
                            network: NamespaceMode::Node as i32,
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;

    let script = d.dir.path().join("grpcio_client.py");
    std::fs::write(&script, PYTHON_CLIENT).unwrap();
    let out_path = d.dir.path().join("grpcio_client.out");
    let mut cmd = Command::new(&python);
    cmd.arg(&script)
        .arg(format!("unix://{}", d.socket.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(d.dir.path().join("grpcio_client.err")).unwrap());
    let mut child = OwnedChild::spawn("grpcio client", cmd).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait_timeout(Duration::from_secs(60)))
        .await
        .unwrap();
    let stderr =
        std::fs::read_to_string(d.dir.path().join("grpcio_client.err")).unwrap_or_default();
    assert!(
        status.is_some_and(|s| s.success()),
        "grpcio client ({status:?}):\n{stderr}"
    );
    let out: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_path).unwrap()).unwrap();
    let calls = out["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{out}");
    for call in calls {
        assert_eq!(call["runtime_name"], "berth", "{out}");
        assert_eq!(call["runtime_api_version"], "v1", "{out}");
        assert_eq!(
            call["pods"],
            serde_json::json!([{"id": pod_id, "name": "grpcio-pod"}]),
            "{out}"
        );
    }
    assert!(
        d.log().contains(REWRITE_LOG),
        "grpcio {} sent an :authority h2 accepts; this test no longer covers the issue",
        out["grpcio"]
    );

    c.runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod_id.clone(),
        })
        .await
        .unwrap();
    c.runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod_id,
        })
        .await
        .unwrap();
}

// ---- HTTP/2 at the frame level, with h2's own codec ----

/// How a call ended, as the client saw it.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// A response: HTTP status, `grpc-status`, the gRPC message.
    Answer {
        status: u16,
        grpc_status: Option<String>,
        message: Vec<u8>,
    },
    Reset(Reason),
    GoAway(Reason),
}

impl Outcome {
    /// The decoded message of a successful gRPC answer.
    fn ok<M: Message + Default>(&self) -> M {
        match self {
            Outcome::Answer {
                status: 200,
                grpc_status: Some(code),
                message,
            } if code == "0" => {
                assert!(message.len() >= 5, "gRPC message {message:?}");
                M::decode(&message[5..]).expect("decode the answer")
            }
            other => panic!("not a gRPC answer: {other:?}"),
        }
    }
}

/// An HTTP/2 client at the frame level (h2's `unstable` codec): it can send
/// what `h2::client` refuses to build, such as an `:authority` that is no
/// URI authority, or no `:method`. h2's HPACK encoder indexes `:authority`
/// and Huffman-codes it, as grpc-core may.
struct RawClient {
    codec: Codec<UnixStream, Bytes>,
    next_stream: u32,
}

impl RawClient {
    async fn connect(socket: &Path) -> RawClient {
        let mut io = UnixStream::connect(socket).await.unwrap();
        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let codec = Codec::new(io);
        let mut client = RawClient {
            codec,
            next_stream: 1,
        };
        client
            .send(Frame::Settings(frame::Settings::default()))
            .await;
        client
    }

    async fn send(&mut self, frame: Frame<Bytes>) {
        std::future::poll_fn(|cx| self.codec.poll_ready(cx))
            .await
            .unwrap();
        self.codec.buffer(frame).unwrap();
        std::future::poll_fn(|cx| self.codec.flush(cx))
            .await
            .unwrap();
    }

    /// Sends one request with a gRPC message `body`, and waits for how it
    /// ends.
    async fn call(&mut self, pseudo: Pseudo, fields: HeaderMap, body: &[u8]) -> Outcome {
        let id = StreamId::from(self.next_stream);
        self.next_stream += 2;
        self.send(Frame::Headers(frame::Headers::new(id, pseudo, fields)))
            .await;
        let mut message = vec![0];
        message.extend((body.len() as u32).to_be_bytes());
        message.extend_from_slice(body);
        let mut data = frame::Data::new(id, Bytes::from(message));
        data.set_end_stream(true);
        self.send(Frame::Data(data)).await;

        let (mut status, mut grpc_status, mut message) = (None, None, Vec::new());
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), self.codec.next())
                .await
                .expect("berthd answers within 10 s");
            let frame = match next {
                Some(Ok(frame)) => frame,
                other => panic!("connection ended: {other:?}"),
            };
            match frame {
                Frame::Settings(s) if !s.is_ack() => {
                    self.send(Frame::Settings(frame::Settings::ack())).await;
                }
                Frame::Headers(h) if h.stream_id() == id => {
                    let end = h.is_end_stream();
                    let (pseudo, fields) = h.into_parts();
                    if let Some(s) = pseudo.status {
                        status = Some(s.as_u16());
                    }
                    if let Some(code) = fields.get("grpc-status") {
                        grpc_status = Some(code.to_str().unwrap().to_string());
                    }
                    if end {
                        return Outcome::Answer {
                            status: status.expect(":status"),
                            grpc_status,
                            message,
                        };
                    }
                }
                Frame::Data(d) if d.stream_id() == id => message.extend_from_slice(d.payload()),
                Frame::Reset(r) if r.stream_id() == id => return Outcome::Reset(r.reason()),
                Frame::GoAway(g) => return Outcome::GoAway(g.reason()),
                _ => {}
            }
        }
    }

    /// Writes raw bytes, past the codec's encoder.
    async fn send_raw(&mut self, bytes: &[u8]) {
        std::future::poll_fn(|cx| self.codec.flush(cx))
            .await
            .unwrap();
        self.codec.get_mut().write_all(bytes).await.unwrap();
    }

    /// Waits for the GOAWAY that ends the connection.
    async fn go_away(&mut self) -> Reason {
        loop {
            let next = tokio::time::timeout(Duration::from_secs(10), self.codec.next())
                .await
                .expect("berthd answers within 10 s");
            match next {
                Some(Ok(Frame::GoAway(g))) => return g.reason(),
                Some(Ok(_)) => {}
                other => panic!("connection ended without GOAWAY: {other:?}"),
            }
        }
    }
}

fn text(s: &str) -> BytesStr {
    BytesStr::try_from(Bytes::copy_from_slice(s.as_bytes())).unwrap()
}

/// A gRPC request's pseudo-headers and headers.
fn grpc_request(authority: &str, path: &str) -> (Pseudo, HeaderMap) {
    let pseudo = Pseudo {
        method: Some(Method::POST),
        scheme: Some(text("http")),
        authority: Some(text(authority)),
        path: Some(text(path)),
        ..Default::default()
    };
    let mut fields = HeaderMap::new();
    fields.insert("content-type", HeaderValue::from_static("application/grpc"));
    fields.insert("te", HeaderValue::from_static("trailers"));
    (pseudo, fields)
}

async fn version(client: &mut RawClient, authority: &str) -> Outcome {
    let (pseudo, fields) = grpc_request(authority, VERSION);
    client.call(pseudo, fields, &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_h2_client_with_escaped_socket_path_gets_answers() {
    let d = started().await;
    let mut c = RawClient::connect(&d.socket).await;
    let socket = d.socket.display().to_string();
    for authority in [
        // grpc-core's form, twice: the second time h2's encoder sends it as
        // an index into the HPACK table.
        escaped(&d.socket),
        escaped(&d.socket),
        // Without the leading slash, as grpcio 1.85 sends it.
        escaped(&d.socket).trim_start_matches("%2F").to_string(),
        // grpc-java's form.
        socket.clone(),
        // Valid, once the connection is being rewritten.
        "localhost".into(),
    ] {
        let v: VersionResponse = version(&mut c, &authority).await.ok();
        assert_eq!(v.runtime_name, "berth", "{authority}");
        assert_eq!(v.runtime_api_version, "v1");
    }
    let (pseudo, fields) = grpc_request(&escaped(&d.socket), LIST_PODS);
    let pods: ListPodSandboxResponse = c.call(pseudo, fields, &[]).await.ok();
    assert!(pods.items.is_empty(), "{pods:?}");
    assert!(d.log().contains(REWRITE_LOG));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn normal_authority_works_and_malformed_requests_are_refused() {
    let d = started().await;

    // h2's own client, which only sends valid URIs.
    let io = UnixStream::connect(&d.socket).await.unwrap();
    let (mut send, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let request = http::Request::post(format!("http://localhost{VERSION}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = send.send_request(request, false).unwrap();
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut recv = response.into_body();
    let mut message = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        message.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    let v = VersionResponse::decode(&message[5..]).unwrap();
    assert_eq!(v.runtime_name, "berth");
    assert!(
        !d.log().contains(REWRITE_LOG),
        "a valid authority is never rewritten"
    );

    // A connection whose header blocks reach h2 unchanged: h2's checks.
    let mut c = RawClient::connect(&d.socket).await;
    let (pseudo, mut fields) = grpc_request("localhost", VERSION);
    fields.insert("connection", HeaderValue::from_static("close"));
    assert_eq!(
        c.call(pseudo, fields, &[]).await,
        Outcome::Reset(Reason::PROTOCOL_ERROR)
    );
    let _: VersionResponse = version(&mut c, "localhost").await.ok();
    assert!(!d.log().contains(REWRITE_LOG));

    // A connection being rewritten: h2 still judges the rest of each request.
    let mut c = RawClient::connect(&d.socket).await;
    let authority = escaped(&d.socket);
    let _: VersionResponse = version(&mut c, &authority).await.ok();
    // A connection-specific header (RFC 9113 §8.2.2).
    let (pseudo, mut fields) = grpc_request(&authority, VERSION);
    fields.insert("connection", HeaderValue::from_static("close"));
    assert_eq!(
        c.call(pseudo, fields, &[]).await,
        Outcome::Reset(Reason::PROTOCOL_ERROR)
    );
    // No :method.
    let (mut pseudo, fields) = grpc_request(&authority, VERSION);
    pseudo.method = None;
    assert_eq!(
        c.call(pseudo, fields, &[]).await,
        Outcome::Reset(Reason::PROTOCOL_ERROR)
    );
    // Still answering on the same connection after stream errors.
    let _: VersionResponse = version(&mut c, &authority).await.ok();
    // A pseudo-header after a regular one, sent as raw HPACK literals.
    let mut block = vec![0x83, 0x86, 0x04, VERSION.len() as u8];
    block.extend_from_slice(VERSION.as_bytes());
    block.extend([0x00, 2, b't', b'e', 8]);
    block.extend_from_slice(b"trailers");
    block.extend([0x01, authority.len() as u8]);
    block.extend_from_slice(authority.as_bytes());
    let stream = c.next_stream;
    c.next_stream += 2;
    let mut raw = (block.len() as u32).to_be_bytes()[1..].to_vec();
    raw.extend([0x1, 0x4 | 0x1]);
    raw.extend(stream.to_be_bytes());
    raw.extend(block);
    c.send_raw(&raw).await;
    let reason = loop {
        let next = tokio::time::timeout(Duration::from_secs(10), c.codec.next())
            .await
            .expect("berthd answers within 10 s");
        match next {
            Some(Ok(Frame::Reset(r))) if u32::from(r.stream_id()) == stream => break r.reason(),
            Some(Ok(_)) => {}
            other => panic!("connection ended: {other:?}"),
        }
    };
    assert_eq!(reason, Reason::PROTOCOL_ERROR);
    // An HPACK block no decoder can read (index 0): the connection goes,
    // with the code h2 gives HPACK errors.
    let mut raw = vec![0, 0, 1, 0x1, 0x4];
    raw.extend(c.next_stream.to_be_bytes());
    raw.push(0x80);
    c.send_raw(&raw).await;
    assert_eq!(c.go_away().await, Reason::PROTOCOL_ERROR);

    // berthd goes on serving.
    let mut c = RawClient::connect(&d.socket).await;
    let _: VersionResponse = version(&mut c, &authority).await.ok();
}
