//! Exec, attach and port-forward over SPDY/3.1 (kubelet's
//! `httpstream/spdy` protocol), directly after an HTTP upgrade or tunnelled
//! inside WebSocket binary messages.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use berth_spdy::{Config, Connection, Incoming, Stream};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::tokens::Pending;
use super::{Closed, Server, portforward, remotecommand};

/// How long a client has to open the streams of a session (kubelet's
/// default stream creation timeout).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a finished session waits for its client to hang up.
const LINGER: Duration = Duration::from_secs(5);

/// Serves one upgraded connection speaking SPDY with `protocol`.
pub async fn serve<I>(server: Arc<Server>, io: I, protocol: &'static str, pending: Pending)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let config = Config {
        auto_reply: true,
        ..Config::default()
    };
    let (conn, incoming) = Connection::server(io, config);
    let backend = server.backend.clone();
    match pending {
        Pending::PortForward(req) => port_forward(backend, incoming, req.pod_sandbox_id).await,
        Pending::Exec(req) => {
            let wanted = Wanted {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                resize: req.tty && protocol_has_resize(protocol),
            };
            if let Some((streams, watcher)) = remote_streams(incoming, protocol, wanted).await {
                remotecommand::exec(backend, req, streams).await;
                watcher.abort();
            }
        }
        Pending::Attach(req) => {
            let wanted = Wanted {
                stdin: req.stdin,
                stdout: req.stdout,
                stderr: req.stderr,
                resize: req.tty && protocol_has_resize(protocol),
            };
            if let Some((streams, watcher)) = remote_streams(incoming, protocol, wanted).await {
                remotecommand::attach(backend, req, streams).await;
                watcher.abort();
            }
        }
    }
    // What the session wrote is still being sent: give the client a moment
    // to read it and hang up, as it does once it has the status.
    let deadline = tokio::time::Instant::now() + LINGER;
    while !conn.is_closed() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    conn.close().await;
}

/// v3 added the resize stream.
fn protocol_has_resize(protocol: &str) -> bool {
    matches!(
        protocol,
        "v3.channel.k8s.io" | "v4.channel.k8s.io" | "v5.channel.k8s.io"
    )
}

#[derive(Clone, Copy)]
struct Wanted {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    resize: bool,
}

/// Waits for the client's streams (error plus those the request asked
/// for), as kubelet does, then watches the connection for its end.
async fn remote_streams(
    mut incoming: Incoming,
    protocol: &str,
    wanted: Wanted,
) -> Option<(remotecommand::Streams, tokio::task::JoinHandle<()>)> {
    let expected = 1
        + usize::from(wanted.stdin)
        + usize::from(wanted.stdout)
        + usize::from(wanted.stderr)
        + usize::from(wanted.resize);
    let (closed, closer) = Closed::new();
    let mut streams = remotecommand::Streams {
        stdin: None,
        stdout: None,
        stderr: None,
        resize: None,
        error: None,
        status_json: matches!(protocol, "v4.channel.k8s.io" | "v5.channel.k8s.io"),
        closed,
    };
    let mut received = 0;
    // Our halves of the streams the client only writes (stdin, resize)
    // stay open until the connection ends: client-go closes its stdin as
    // soon as it sees our side close, even before it sent what it read
    // (its copyStdin waits on the stream in a second goroutine), and
    // kubelet never closes them first.
    let mut held = Vec::new();
    let collect = async {
        while received < expected {
            let stream = incoming.accept().await?;
            let kind = stream.headers().get("streamtype").unwrap_or("").to_string();
            let (recv, send) = stream.into_split();
            match kind.as_str() {
                "error" => streams.error = Some(Box::new(send)),
                "stdin" => {
                    streams.stdin = Some(Box::new(recv));
                    held.push(send);
                }
                "stdout" => streams.stdout = Some(Box::new(send)),
                "stderr" => streams.stderr = Some(Box::new(send)),
                "resize" => {
                    streams.resize = Some(Box::new(recv));
                    held.push(send);
                }
                other => {
                    tracing::debug!(stream_type = other, "ignoring an unexpected SPDY stream");
                    continue;
                }
            }
            received += 1;
        }
        Some(())
    };
    match tokio::time::timeout(STREAM_CREATION_TIMEOUT, collect).await {
        Ok(Some(())) => {}
        Ok(None) => return None,
        Err(_) => {
            tracing::debug!(
                received,
                expected,
                "timed out waiting for the client's streams"
            );
            return None;
        }
    }
    // The oldest protocol never reads stdin (kubelet closes it right away).
    if protocol.is_empty() || protocol == "channel.k8s.io" {
        streams.stdin = None;
    }
    // The connection's end is the client's end: later streams are refused.
    let watcher = tokio::spawn(async move {
        while let Some(extra) = incoming.accept().await {
            extra.reset(berth_spdy::frame::rst::REFUSED_STREAM);
        }
        closer.close();
        drop(held);
    });
    Some((streams, watcher))
}

/// Half of a port-forward request: its data or its error stream.
#[derive(Default)]
struct Pair {
    port: Option<u16>,
    data: Option<Stream>,
    error: Option<Stream>,
    created: Option<tokio::time::Instant>,
}

/// Serves port-forward streams: each forwarded connection is a data and
/// an error stream with the same `requestid` and `port` headers.
async fn port_forward(
    backend: Arc<dyn super::Backend>,
    mut incoming: Incoming,
    sandbox_id: String,
) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let stream = tokio::select! {
            s = incoming.accept() => match s {
                Some(s) => s,
                None => break,
            },
            _ = sweep.tick() => {
                expire_pairs(&mut pairs).await;
                continue;
            }
        };
        let headers = stream.headers();
        let kind = headers.get("streamtype").unwrap_or("").to_string();
        let port = match headers.get("port").map(portforward::parse_ports) {
            Some(Ok(p)) if p.len() == 1 => p[0],
            _ => {
                stream.reset(berth_spdy::frame::rst::PROTOCOL_ERROR);
                continue;
            }
        };
        let request_id = match headers.get("requestid") {
            Some(id) if !id.is_empty() => id.to_string(),
            // Clients older than request ids: pair by stream id, as kubelet
            // does (error stream n, data stream n + 2).
            _ => match kind.as_str() {
                "error" => stream.id().to_string(),
                _ => stream.id().saturating_sub(2).to_string(),
            },
        };
        let pair = pairs.entry(request_id.clone()).or_default();
        pair.created.get_or_insert_with(tokio::time::Instant::now);
        pair.port = Some(port);
        let slot = match kind.as_str() {
            "data" => &mut pair.data,
            "error" => &mut pair.error,
            _ => {
                stream.reset(berth_spdy::frame::rst::PROTOCOL_ERROR);
                continue;
            }
        };
        if slot.is_some() {
            stream.reset(berth_spdy::frame::rst::PROTOCOL_ERROR);
            continue;
        }
        *slot = Some(stream);
        if pair.data.is_some() && pair.error.is_some() {
            let pair = pairs.remove(&request_id).unwrap_or_default();
            if let (Some(data), Some(error), Some(port)) = (pair.data, pair.error, pair.port) {
                let (_, error) = error.into_split();
                tokio::spawn(portforward::forward(
                    backend.clone(),
                    sandbox_id.clone(),
                    port,
                    data,
                    error,
                ));
            }
        }
    }
}

/// Pairs whose other half never came get an error and are dropped.
async fn expire_pairs(pairs: &mut HashMap<String, Pair>) {
    let now = tokio::time::Instant::now();
    let expired: Vec<String> = pairs
        .iter()
        .filter(|(_, p)| p.created.is_some_and(|c| now - c > STREAM_CREATION_TIMEOUT))
        .map(|(id, _)| id.clone())
        .collect();
    for id in expired {
        if let Some(pair) = pairs.remove(&id)
            && let Some(error) = pair.error
        {
            let (_, mut error) = error.into_split();
            let message = format!("timed out waiting for the streams of request {id}");
            let _ = error.write_all(message.as_bytes()).await;
            let _ = error.shutdown().await;
        }
    }
}

/// A WebSocket whose binary messages carry a byte stream (client-go's
/// `TunnelingConnection`), as one `AsyncRead + AsyncWrite`.
pub struct WsTunnel;

impl WsTunnel {
    #[allow(clippy::new_ret_no_self)]
    pub fn new<S>(ws: WebSocketStream<S>) -> DuplexStream
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let (mut sink, mut source) = ws.split();
        let (mut rd, mut wr) = tokio::io::split(ours);
        tokio::spawn(async move {
            while let Some(Ok(m)) = source.next().await {
                match m {
                    Message::Binary(b) => {
                        if wr.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    Message::Close(_) => break,
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
                    Message::Text(_) => break,
                }
            }
            let _ = wr.shutdown().await;
        });
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let msg = Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n]));
                        if sink.send(msg).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sink.close().await;
        });
        theirs
    }
}
