//! The HTTP side of the streaming server: `/exec/<token>`,
//! `/attach/<token>` and `/portforward/<token>` (GET or POST), each
//! upgraded to SPDY/3.1 or to WebSocket as the client asks.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

use super::tokens::Pending;
use super::{Server, portforward, remotecommand, spdy, ws};
use crate::error::{Error, Result};

type Body = Full<Bytes>;

/// Remote-command protocols over SPDY, newest first.
pub const SPDY_REMOTECOMMAND: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];
pub const SPDY_PORTFORWARD: &[&str] = &["portforward.k8s.io"];
const WS_REMOTECOMMAND: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "channel.k8s.io",
    "base64.channel.k8s.io",
];
/// Port-forward over WebSocket: channel pairs, or SPDY carried inside the
/// WebSocket's binary messages (what kubectl ≥ 1.30 and crictl dial).
const WS_SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";
const WS_PORTFORWARD: &[&str] = &[
    WS_SPDY_TUNNEL,
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "portforward.k8s.io",
];

pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        Error::InvalidArgument(format!("streaming TLS {what}: {e}"))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| bad(&format!("certificate {}", cert.display()), &e))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| bad(&format!("key {}", key.display()), &e))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("certificate and key", &e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

pub async fn accept_loop(server: Arc<Server>, listener: TcpListener, tls: Option<TlsAcceptor>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!(error = %e, "streaming server accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let server = server.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(stream) => serve_connection(server, TokioIo::new(stream)).await,
                    Err(e) => tracing::debug!(%peer, error = %e, "streaming TLS handshake failed"),
                },
                None => serve_connection(server, TokioIo::new(stream)).await,
            }
        });
    }
}

async fn serve_connection<I>(server: Arc<Server>, io: I)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
        let server = server.clone();
        async move { Ok::<_, std::convert::Infallible>(route(server, req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "streaming connection ended with an error");
    }
}

fn plain(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(message.into() + "\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn route(server: Arc<Server>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::POST {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST");
    }
    let path = req.uri().path().trim_matches('/');
    let Some((kind, token)) = path.split_once('/') else {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    };
    if token.contains('/') || !matches!(kind, "exec" | "attach" | "portforward") {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    }
    let Some(pending) = server.tokens.consume(kind, token) else {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    };
    let Ok(permit) = server.sessions.clone().try_acquire_owned() else {
        tracing::warn!(
            max = server.max_sessions,
            "streaming session refused: at the limit"
        );
        return plain(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many streaming sessions: {} are open, the limit is {}",
                server.max_sessions, server.max_sessions
            ),
        );
    };
    let upgrade = Upgrade::of(req.headers());
    match upgrade {
        Upgrade::WebSocket => websocket(server, req, pending, permit),
        Upgrade::Spdy => spdy_upgrade(server, req, pending, permit),
        Upgrade::None => plain(
            StatusCode::BAD_REQUEST,
            "streaming needs a connection upgrade to SPDY/3.1 or websocket",
        ),
    }
}

enum Upgrade {
    WebSocket,
    Spdy,
    None,
}

impl Upgrade {
    fn of(headers: &HeaderMap) -> Upgrade {
        let connection_upgrade = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
        if !connection_upgrade {
            return Upgrade::None;
        }
        match headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()) {
            Some(u) if u.trim().eq_ignore_ascii_case("websocket") => Upgrade::WebSocket,
            Some(u) if u.trim().eq_ignore_ascii_case("SPDY/3.1") => Upgrade::Spdy,
            _ => Upgrade::None,
        }
    }
}

/// The values of a header that may repeat and hold comma-separated lists.
fn header_list<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

fn spdy_upgrade(
    server: Arc<Server>,
    mut req: Request<Incoming>,
    pending: Pending,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<Body> {
    let supported = match pending {
        Pending::PortForward(_) => SPDY_PORTFORWARD,
        _ => SPDY_REMOTECOMMAND,
    };
    let offered = header_list(req.headers(), "x-stream-protocol-version");
    // No offer means the original protocol (v1 for remote commands).
    let protocol = if offered.is_empty() {
        ""
    } else {
        match ws::negotiate(&offered, supported) {
            Some(p) => p,
            None => {
                let mut r = plain(
                    StatusCode::FORBIDDEN,
                    format!(
                        "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {supported:?}"
                    ),
                );
                for p in supported {
                    r.headers_mut().append(
                        "x-accepted-stream-protocol-versions",
                        HeaderValue::from_static(p),
                    );
                }
                return r;
            }
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _permit = permit;
        match on_upgrade.await {
            Ok(upgraded) => {
                spdy::serve(server, TokioIo::new(upgraded), protocol, pending).await;
            }
            Err(e) => tracing::debug!(error = %e, "SPDY upgrade failed"),
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    if !protocol.is_empty() {
        h.insert(
            "x-stream-protocol-version",
            HeaderValue::from_static(protocol),
        );
    }
    r
}

fn websocket(
    server: Arc<Server>,
    mut req: Request<Incoming>,
    pending: Pending,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key") else {
        return plain(StatusCode::BAD_REQUEST, "websocket upgrade without a key");
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let supported = match pending {
        Pending::PortForward(_) => WS_PORTFORWARD,
        _ => WS_REMOTECOMMAND,
    };
    let offered = header_list(req.headers(), "sec-websocket-protocol");
    let Some(protocol) = ws::negotiate(&offered, supported) else {
        return plain(
            StatusCode::BAD_REQUEST,
            format!("requested protocol(s) are not supported: {offered:?}; supports {supported:?}"),
        );
    };
    // Port-forward over channels takes its ports from the query.
    let query_ports = match (&pending, protocol) {
        (Pending::PortForward(_), p) if p != WS_SPDY_TUNNEL => {
            match query_ports(req.uri().query().unwrap_or("")) {
                Ok(p) => p,
                Err(e) => return plain(StatusCode::BAD_REQUEST, e),
            }
        }
        _ => Vec::new(),
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let _permit = permit;
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "websocket upgrade failed");
                return;
            }
        };
        let mut config = WebSocketConfig::default();
        config.max_message_size = Some(16 << 20);
        config.max_frame_size = Some(16 << 20);
        let stream =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config))
                .await;
        serve_websocket(server, stream, protocol, pending, query_ports).await;
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    if !protocol.is_empty() {
        h.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
    }
    r
}

fn query_ports(query: &str) -> std::result::Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("port=") {
            if v.is_empty() {
                return Err("query parameter \"port\" cannot be empty".into());
            }
            ports.extend(portforward::parse_ports(v)?);
        }
    }
    if ports.is_empty() {
        return Err("query parameter \"port\" is required".into());
    }
    Ok(ports)
}

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;

async fn serve_websocket<S>(
    server: Arc<Server>,
    stream: WebSocketStream<S>,
    protocol: &'static str,
    pending: Pending,
    ports: Vec<u16>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let framing = ws::Framing {
        base64: protocol.contains("base64"),
        close_signal: protocol.starts_with("v5."),
    };
    let backend = server.backend.clone();
    match pending {
        Pending::PortForward(req) if protocol == WS_SPDY_TUNNEL => {
            let tunnel = super::spdy::WsTunnel::new(stream);
            spdy::serve(
                server,
                tunnel,
                "portforward.k8s.io",
                Pending::PortForward(req),
            )
            .await;
        }
        Pending::PortForward(req) => {
            let mut spec = ws::ChannelSpec::default();
            for (i, port) in ports.iter().enumerate() {
                let data = (i * 2) as u8;
                spec.inbound.push(data);
                spec.outbound.extend([data, data + 1]);
                spec.greeting.push((data, port.to_le_bytes().to_vec()));
                spec.greeting.push((data + 1, port.to_le_bytes().to_vec()));
            }
            let mut channels = ws::serve(stream, framing, spec);
            let mut forwards = Vec::new();
            for (i, port) in ports.into_iter().enumerate() {
                let data = (i * 2) as u8;
                let (Some(rx), Some(tx), Some(err)) = (
                    channels.take_inbound(data),
                    channels.take_outbound(data),
                    channels.take_outbound(data + 1),
                ) else {
                    continue;
                };
                let joined = Joined { rx, tx };
                forwards.push(tokio::spawn(portforward::forward(
                    backend.clone(),
                    req.pod_sandbox_id.clone(),
                    port,
                    joined,
                    err,
                )));
            }
            drop(channels.inbound);
            drop(channels.outbound);
            for f in forwards {
                let _ = f.await;
            }
            let _ = channels.finished.await;
        }
        other => {
            let (stdin, stdout, stderr, tty) = match &other {
                Pending::Exec(r) => (r.stdin, r.stdout, r.stderr, r.tty),
                Pending::Attach(r) => (r.stdin, r.stdout, r.stderr, r.tty),
                Pending::PortForward(_) => unreachable!("handled above"),
            };
            let mut spec = ws::ChannelSpec::default();
            if stdin {
                spec.inbound.push(STDIN);
            }
            if tty {
                spec.inbound.push(RESIZE);
            }
            if stdout {
                spec.outbound.push(STDOUT);
            }
            if stderr {
                spec.outbound.push(STDERR);
            }
            spec.outbound.push(ERROR);
            // An empty message on the lowest writable channel tells the
            // client the session is up, as kubelet does.
            let first = if stdout {
                STDOUT
            } else if stderr {
                STDERR
            } else {
                ERROR
            };
            spec.greeting.push((first, Vec::new()));
            let mut channels = ws::serve(stream, framing, spec);
            let streams = remotecommand::Streams {
                stdin: boxed_read(channels.take_inbound(STDIN)),
                resize: boxed_read(channels.take_inbound(RESIZE)),
                stdout: boxed_write(channels.take_outbound(STDOUT)),
                stderr: boxed_write(channels.take_outbound(STDERR)),
                error: boxed_write(channels.take_outbound(ERROR)),
                status_json: protocol.starts_with("v4.") || protocol.starts_with("v5."),
                closed: channels.closed.clone(),
            };
            match other {
                Pending::Exec(r) => remotecommand::exec(backend, r, streams).await,
                Pending::Attach(r) => remotecommand::attach(backend, r, streams).await,
                Pending::PortForward(_) => unreachable!("handled above"),
            }
            drop(channels.inbound);
            drop(channels.outbound);
            let _ = channels.finished.await;
        }
    }
}

fn boxed_read(s: Option<tokio::io::DuplexStream>) -> Option<remotecommand::BoxRead> {
    s.map(|s| Box::new(s) as remotecommand::BoxRead)
}

fn boxed_write(s: Option<tokio::io::DuplexStream>) -> Option<remotecommand::BoxWrite> {
    s.map(|s| Box::new(s) as remotecommand::BoxWrite)
}

/// A read half and a write half used as one stream.
pub struct Joined<R, W> {
    pub rx: R,
    pub tx: W,
}

impl<R: tokio::io::AsyncRead + Unpin, W: Unpin> tokio::io::AsyncRead for Joined<R, W> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.rx).poll_read(cx, buf)
    }
}

impl<R: Unpin, W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Joined<R, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.tx).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tx).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.tx).poll_shutdown(cx)
    }
}
