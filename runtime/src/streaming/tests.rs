//! The streaming server against a backend that runs local processes, so
//! the transports and session logic are tested without containers.

use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use berth_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use super::*;
use crate::config::StreamingConfig;

/// Runs exec commands as local processes; "containers" are always there.
pub struct LocalBackend;

impl Backend for LocalBackend {
    fn check_container(&self, id: &str) -> Result<()> {
        if id == "missing" {
            return Err(Error::Missing {
                kind: "container",
                id: id.into(),
            });
        }
        Ok(())
    }

    fn check_sandbox(&self, _id: &str) -> Result<()> {
        Ok(())
    }

    fn exec(
        &self,
        req: &ExecRequest,
        size: Option<remotecommand::TermSize>,
    ) -> Result<ExecProcess> {
        let mut cmd = tokio::process::Command::new(&req.cmd[0]);
        cmd.args(&req.cmd[1..]).kill_on_drop(true);
        let mut pty_master = None;
        if req.tty {
            let pty = nix::pty::openpty(None, None).map_err(|e| Error::Internal(e.to_string()))?;
            let slave = |fd: &OwnedFd| std::process::Stdio::from(fd.try_clone().unwrap());
            cmd.stdin(slave(&pty.slave))
                .stdout(slave(&pty.slave))
                .stderr(slave(&pty.slave));
            if let Some(size) = size {
                fdio::set_window_size(&pty.master, size.width, size.height).unwrap();
            }
            pty_master = Some(pty.master);
        } else {
            cmd.stdin(if req.stdin {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            })
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        }
        let handle = tokio::runtime::Handle::current();
        let _enter = handle.enter();
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::io("spawn the test process", e))?;
        let (stdin, stdout, stderr) = match &pty_master {
            Some(m) => (
                Some(m.try_clone().unwrap()),
                Some(m.try_clone().unwrap()),
                None,
            ),
            None => (
                child.stdin.take().map(|s| s.into_owned_fd().unwrap()),
                child.stdout.take().map(|s| s.into_owned_fd().unwrap()),
                child.stderr.take().map(|s| s.into_owned_fd().unwrap()),
            ),
        };
        Ok(ExecProcess {
            pid: child.id().map(|p| p as i32),
            stdin,
            stdout,
            stderr,
            pty: pty_master,
            exit: Box::pin(async move {
                let status = child
                    .wait()
                    .await
                    .map_err(|e| Error::io("wait for the test process", e))?;
                Ok(status.code().unwrap_or(137))
            }),
        })
    }

    fn attach(&self, _req: &AttachRequest) -> Result<Attached> {
        Err(Error::Unimplemented("attach in the local test backend"))
    }

    fn connect(&self, _sandbox_id: &str, port: u16) -> Result<TcpStream> {
        backend::connect_in(None, port)
    }
}

async fn server(max_sessions: usize) -> Arc<Server> {
    let config = StreamingConfig {
        max_sessions,
        ..Default::default()
    };
    Server::start(&config, Arc::new(LocalBackend))
        .await
        .unwrap()
}

fn exec_request(cmd: &[&str], stdin: bool, tty: bool) -> ExecRequest {
    ExecRequest {
        container_id: "c1".into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        stdin,
        stdout: true,
        stderr: !tty,
        tty,
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn ws_connect(url: &str, protocol: &str) -> std::result::Result<Ws, String> {
    let ws_url = url.replacen("http://", "ws://", 1);
    let mut request = ws_url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocol.parse().unwrap());
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    tokio_tungstenite::client_async(request, tcp)
        .await
        .map(|(ws, _)| ws)
        .map_err(|e| e.to_string())
}

/// Reads messages until the server closes, collecting bytes per channel.
async fn collect(ws: &mut Ws) -> Vec<Vec<u8>> {
    let mut channels = vec![Vec::new(); 8];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, ws.next()).await {
        match m {
            Ok(Message::Binary(b)) if !b.is_empty() => channels[b[0] as usize].extend(&b[1..]),
            Ok(Message::Close(_)) | Err(_) => break,
            _ => {}
        }
    }
    channels
}

fn channel(ch: u8, data: &[u8]) -> Message {
    let mut v = vec![ch];
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

#[tokio::test]
async fn websocket_v5_exec_echoes_stdin_and_reports_the_exit_code() {
    let server = server(8).await;
    let url = server
        .exec_url(exec_request(
            &["sh", "-c", "cat; echo oops >&2; exit 3"],
            true,
            false,
        ))
        .await
        .unwrap();
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let mut ws = ws_connect(&url, "v5.channel.k8s.io").await.unwrap();
    ws.send(channel(0, b"hello through stdin\n")).await.unwrap();
    // v5's close signal: stdin is done.
    ws.send(Message::Binary(vec![255, 0].into())).await.unwrap();
    let got = collect(&mut ws).await;
    assert_eq!(got[1], b"hello through stdin\n");
    assert_eq!(got[2], b"oops\n");
    let status: serde_json::Value = serde_json::from_slice(&got[3]).unwrap();
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3");
}

#[tokio::test]
async fn websocket_v4_exec_of_a_successful_command_says_success() {
    let server = server(8).await;
    let url = server
        .exec_url(exec_request(&["echo", "hi"], false, false))
        .await
        .unwrap();
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await.unwrap();
    let got = collect(&mut ws).await;
    assert_eq!(got[1], b"hi\n");
    assert_eq!(got[3], br#"{"metadata":{},"status":"Success"}"#);
}

#[tokio::test]
async fn a_token_works_once_and_unknown_ones_get_404() {
    let server = server(8).await;
    let url = server
        .exec_url(exec_request(&["true"], false, false))
        .await
        .unwrap();
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await.unwrap();
    collect(&mut ws).await;
    let again = ws_connect(&url, "v4.channel.k8s.io").await.unwrap_err();
    assert!(again.contains("404"), "{again}");
    let base = server.base_url().to_string();
    let unknown = ws_connect(&format!("{base}/exec/nope"), "v4.channel.k8s.io")
        .await
        .unwrap_err();
    assert!(unknown.contains("404"), "{unknown}");
}

#[tokio::test]
async fn requests_kubelet_refuses_are_refused() {
    let server = server(8).await;
    let mut r = exec_request(&["true"], false, true);
    r.stderr = true;
    assert!(matches!(
        server.exec_url(r).await,
        Err(Error::InvalidArgument(_))
    ));
    let mut r = exec_request(&["true"], false, false);
    r.stdout = false;
    r.stderr = false;
    assert!(matches!(
        server.exec_url(r).await,
        Err(Error::InvalidArgument(_))
    ));
    let mut r = exec_request(&["true"], false, false);
    r.container_id = "missing".into();
    assert!(matches!(
        server.exec_url(r).await,
        Err(Error::Missing { .. })
    ));
    let r = PortForwardRequest {
        pod_sandbox_id: "p".into(),
        port: vec![70000],
    };
    assert!(matches!(
        server.port_forward_url(r).await,
        Err(Error::InvalidArgument(_))
    ));
}

#[tokio::test]
async fn sessions_beyond_the_limit_are_refused_with_429() {
    let server = server(1).await;
    let long = server
        .exec_url(exec_request(&["sleep", "5"], false, false))
        .await
        .unwrap();
    let _first = ws_connect(&long, "v4.channel.k8s.io").await.unwrap();
    let next = server
        .exec_url(exec_request(&["true"], false, false))
        .await
        .unwrap();
    let refused = ws_connect(&next, "v4.channel.k8s.io").await.unwrap_err();
    assert!(refused.contains("429"), "{refused}");
}

#[tokio::test]
async fn a_client_that_leaves_kills_its_exec() {
    let server = server(8).await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("still-running");
    let script = format!("sleep 1; touch {}", marker.display());
    let url = server
        .exec_url(exec_request(&["sh", "-c", &script], false, false))
        .await
        .unwrap();
    let ws = ws_connect(&url, "v4.channel.k8s.io").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(ws);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!marker.exists(), "the exec outlived its client");
}

#[tokio::test]
async fn tty_exec_sees_a_resize() {
    let server = server(8).await;
    let url = server
        .exec_url(exec_request(
            &["sh", "-c", "stty size; read x; stty size"],
            true,
            true,
        ))
        .await
        .unwrap();
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await.unwrap();
    ws.send(channel(4, br#"{"Width":100,"Height":30}"#))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(channel(4, b"{\"Width\":120,\"Height\":40}\n"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    ws.send(channel(0, b"\n")).await.unwrap();
    let got = collect(&mut ws).await;
    let out = String::from_utf8_lossy(&got[1]);
    // The first size came before the process started; the second resize
    // reached it while it ran.
    assert!(out.contains("30 100"), "stty said {out:?}");
    assert!(out.contains("40 120"), "stty said {out:?}");
}

#[tokio::test]
async fn websocket_port_forward_carries_bytes_both_ways_on_two_ports() {
    let server = server(8).await;
    let mut ports = Vec::new();
    for reply in ["one", "two"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        ports.push(listener.local_addr().unwrap().port());
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(format!("{reply}:").as_bytes()).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
    }
    let url = server
        .port_forward_url(PortForwardRequest {
            pod_sandbox_id: "p".into(),
            port: ports.iter().map(|p| *p as i32).collect(),
        })
        .await
        .unwrap();
    let url = format!("{url}?port={}&port={}", ports[0], ports[1]);
    let mut ws = ws_connect(&url, "v4.channel.k8s.io").await.unwrap();
    ws.send(channel(0, b"hello")).await.unwrap();
    ws.send(channel(2, b"world")).await.unwrap();
    let got = collect(&mut ws).await;
    // Each channel starts with its port, little endian.
    assert_eq!(&got[0][..2], &ports[0].to_le_bytes());
    assert_eq!(&got[0][2..], b"one:hello");
    assert_eq!(&got[2][2..], b"two:world");
    assert_eq!(got[1], ports[0].to_le_bytes(), "no error on port one");
}

#[tokio::test]
async fn websocket_port_forward_to_a_closed_port_reports_on_the_error_channel() {
    let server = server(8).await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = server
        .port_forward_url(PortForwardRequest {
            pod_sandbox_id: "p".into(),
            port: vec![port as i32],
        })
        .await
        .unwrap();
    let mut ws = ws_connect(&format!("{url}?port={port}"), "v4.channel.k8s.io")
        .await
        .unwrap();
    let got = collect(&mut ws).await;
    let message: serde_json::Value = serde_json::from_slice(&got[1][2..]).unwrap();
    assert!(
        message["message"]
            .as_str()
            .unwrap()
            .contains(&format!("localhost:{port}")),
        "{message}"
    );
}

/// Upgrades an HTTP connection to SPDY as client-go does; the answer's
/// status line and headers, and the SPDY client on success.
async fn spdy_connect(url: &str, protocols: &[&str]) -> (String, Option<berth_spdy::Connection>) {
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap();
    let mut tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    let mut request = format!(
        "POST /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    );
    for p in protocols {
        request.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Byte by byte: SPDY frames may follow the headers at once.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if tcp.read(&mut b).await.unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    if !head.starts_with("HTTP/1.1 101") {
        return (head, None);
    }
    let conn = berth_spdy::Connection::client(tcp, berth_spdy::Config::default());
    (head, Some(conn))
}

fn open(conn: &berth_spdy::Connection, kind: &str) -> berth_spdy::Stream {
    conn.open(berth_spdy::Headers::new().with("streamtype", kind), false)
        .unwrap()
}

#[tokio::test]
async fn spdy_v4_exec_echoes_stdin_and_reports_the_exit_code() {
    let server = server(8).await;
    let url = server
        .exec_url(exec_request(
            &["sh", "-c", "cat; echo oops >&2; exit 3"],
            true,
            false,
        ))
        .await
        .unwrap();
    let (head, conn) = spdy_connect(&url, &["v4.channel.k8s.io", "v3.channel.k8s.io"]).await;
    assert!(
        head.to_lowercase()
            .contains("x-stream-protocol-version: v4.channel.k8s.io"),
        "{head}"
    );
    let conn = conn.unwrap();
    let mut error = open(&conn, "error");
    let mut stdin = open(&conn, "stdin");
    let mut stdout = open(&conn, "stdout");
    let mut stderr = open(&conn, "stderr");
    stdin.write_all(b"through spdy\n").await.unwrap();
    stdin.shutdown().await.unwrap();
    let mut out = Vec::new();
    stdout.read_to_end(&mut out).await.unwrap();
    let mut err = Vec::new();
    stderr.read_to_end(&mut err).await.unwrap();
    let mut status = Vec::new();
    error.read_to_end(&mut status).await.unwrap();
    assert_eq!(out, b"through spdy\n");
    assert_eq!(err, b"oops\n");
    let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
    assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
    assert_eq!(status["details"]["causes"][0]["message"], "3");
}

#[tokio::test]
async fn spdy_refuses_protocols_it_does_not_speak() {
    let server = server(8).await;
    let url = server
        .exec_url(exec_request(&["true"], false, false))
        .await
        .unwrap();
    let (head, conn) = spdy_connect(&url, &["v9.channel.k8s.io"]).await;
    assert!(conn.is_none());
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
}

#[tokio::test]
async fn spdy_port_forward_serves_several_connections_and_survives_a_closed_port() {
    let server = server(8).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                    }
                }
            });
        }
    });
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = server
        .port_forward_url(PortForwardRequest {
            pod_sandbox_id: "p".into(),
            port: vec![port as i32],
        })
        .await
        .unwrap();
    let (head, conn) = spdy_connect(&url, &["portforward.k8s.io"]).await;
    let conn = conn.unwrap_or_else(|| panic!("{head}"));
    let pair = |id: u32, port: u16| {
        let h = |kind: &str| {
            berth_spdy::Headers::new()
                .with("streamtype", kind)
                .with("port", port.to_string())
                .with("requestid", id.to_string())
        };
        let error = conn.open(h("error"), false).unwrap();
        let data = conn.open(h("data"), false).unwrap();
        (data, error)
    };
    // A port nothing listens on: an error on its stream only.
    let (_data, mut error) = pair(0, closed_port);
    let mut message = Vec::new();
    error.read_to_end(&mut message).await.unwrap();
    let message: serde_json::Value = serde_json::from_slice(&message).unwrap();
    assert!(
        message["message"].as_str().unwrap().contains("localhost"),
        "{message}"
    );
    // Then two connections at once on a good port, 8 MiB each way.
    let mut tasks = Vec::new();
    for id in [1, 2] {
        let (data, _error) = pair(id, port);
        tasks.push(tokio::spawn(async move {
            let (mut rx, mut tx) = tokio::io::split(data);
            let writer = tokio::spawn(async move {
                let chunk = vec![id as u8; 1 << 20];
                for _ in 0..8 {
                    tx.write_all(&chunk).await.unwrap();
                }
                tx.shutdown().await.unwrap();
            });
            let mut got = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            while got < 8 << 20 {
                let n = rx.read(&mut buf).await.unwrap();
                assert!(n > 0, "stream ended after {got} bytes");
                assert!(buf[..n].iter().all(|b| *b == id as u8));
                got += n;
            }
            writer.await.unwrap();
            _error
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn with_a_certificate_the_server_speaks_only_tls() {
    use tokio_rustls::rustls;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let cert_file = dir.path().join("streaming.crt");
    let key_file = dir.path().join("streaming.key");
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let config = StreamingConfig {
        tls_cert_file: Some(cert_file),
        tls_key_file: Some(key_file),
        ..Default::default()
    };
    let server = Server::start(&config, Arc::new(LocalBackend))
        .await
        .unwrap();
    let url = server
        .exec_url(exec_request(&["true"], false, false))
        .await
        .unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let host = url
        .trim_start_matches("https://")
        .split('/')
        .next()
        .unwrap()
        .to_string();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(&host).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(
        format!("GET /exec/unknown HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.unwrap_or_default();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    // Plain HTTP on the TLS port gets nowhere.
    let mut plain = tokio::net::TcpStream::connect(&host).await.unwrap();
    plain
        .write_all(b"GET /exec/unknown HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("404"));
}
