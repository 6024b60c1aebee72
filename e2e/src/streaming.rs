//! Clients for berthd's streaming server (the URLs CRI `Exec`, `Attach`
//! and `PortForward` answer), written from the Kubernetes protocols rather
//! than from berthd's code: the WebSocket channel protocols
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`, `channel.k8s.io` and the
//! base64 variants), SPDY/3.1 after an HTTP upgrade (remotecommand and
//! portforward, with `berth-spdy` as the session layer in the client role),
//! SPDY tunnelled in WebSocket binary messages, and crictl.
//!
//! Exec and attach sessions of either transport are a [`Session`]: send on
//! a channel, read what the server wrote per channel, wait for the end.
//! Port-forward over SPDY is a [`SpdyForward`]: one request per stream
//! pair, as client-go does it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;

/// Remote-command subprotocols, newest first.
pub const WS_V5: &str = "v5.channel.k8s.io";
pub const WS_V4: &str = "v4.channel.k8s.io";
pub const WS_V4_BASE64: &str = "v4.base64.channel.k8s.io";
pub const WS_V1: &str = "channel.k8s.io";
/// Port-forward as SPDY inside WebSocket binary messages.
pub const WS_SPDY_TUNNEL: &str = "SPDY/3.1+portforward.k8s.io";

/// Why a connection was not upgraded: the HTTP status (when there was an
/// answer) and what came with it.
#[derive(Debug, Clone)]
pub struct Refused {
    pub status: Option<u16>,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(s) => write!(f, "HTTP {s}: {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

fn refused(message: impl std::fmt::Display) -> Refused {
    Refused {
        status: None,
        message: message.to_string(),
    }
}

/// `http://host:port/path?query` → (`host:port`, `/path?query`).
pub fn split_url(url: &str) -> (String, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("streaming URL {url:?} is not http://"));
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

// ---- what a session received ----

/// Everything a session received so far, per channel, in order.
#[derive(Debug, Default, Clone)]
pub struct Output {
    /// Every message as it came (channel, bytes); port-forward channels
    /// start with a two-byte port message.
    pub messages: Vec<(u8, Vec<u8>)>,
    /// The bytes of each channel, concatenated.
    pub channels: BTreeMap<u8, Vec<u8>>,
    /// The session ended (the server closed it, or the transport failed:
    /// see `end`).
    pub closed: bool,
    /// How it ended, when it did.
    pub end: Option<String>,
    /// What the client failed to send (the server had gone).
    pub send_errors: Vec<String>,
}

impl Output {
    pub fn bytes(&self, ch: u8) -> &[u8] {
        self.channels.get(&ch).map(Vec::as_slice).unwrap_or(&[])
    }

    /// A channel's bytes as (lossy) text.
    pub fn text(&self, ch: u8) -> String {
        String::from_utf8_lossy(self.bytes(ch)).into_owned()
    }

    /// The error channel as JSON (a v4+ `metav1.Status`), if it holds any.
    pub fn status(&self) -> Option<serde_json::Value> {
        let b = self.bytes(ERROR);
        if b.is_empty() {
            return None;
        }
        serde_json::from_slice(b).ok()
    }

    /// A port-forward channel without its leading port message, checking
    /// that the port is the expected one.
    pub fn port_data(&self, ch: u8, port: u16) -> Vec<u8> {
        let b = self.bytes(ch);
        assert!(
            b.len() >= 2,
            "port-forward channel {ch} has no port prefix: {b:?}"
        );
        assert_eq!(
            u16::from_le_bytes([b[0], b[1]]),
            port,
            "channel {ch} starts with the wrong port"
        );
        b[2..].to_vec()
    }

    /// Everything received, for assertion messages.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for (ch, b) in &self.channels {
            s.push_str(&format!(
                "\n  channel {ch}: {:?}",
                String::from_utf8_lossy(b)
            ));
        }
        s.push_str(&format!("\n  closed: {} ({:?})", self.closed, self.end));
        for e in &self.send_errors {
            s.push_str(&format!("\n  send failed: {e}"));
        }
        s
    }
}

enum Event {
    Data(u8, Vec<u8>),
    /// One SPDY stream the server writes reached its end.
    StreamEnd,
    /// The whole session ended.
    Closed(String),
}

enum Input {
    Ws {
        sink: SplitSink<WebSocketStream<TcpStream>, Message>,
        base64: bool,
    },
    Spdy {
        conn: berth_spdy::Connection,
        streams: BTreeMap<u8, berth_spdy::SendStream>,
    },
}

/// An exec or attach session, over WebSocket or SPDY.
pub struct Session {
    /// The negotiated subprotocol (empty: none was negotiated).
    pub protocol: String,
    pub output: Output,
    events: mpsc::UnboundedReceiver<Event>,
    input: Input,
    /// SPDY: streams the server writes that have not ended.
    open_readers: usize,
    /// The tasks reading the transport (aborted on drop, which closes it).
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
        if let Input::Spdy { conn, .. } = &self.input
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let conn = conn.clone();
            rt.spawn(async move { conn.close().await });
        }
    }
}

impl Session {
    /// Sends `data` on channel `ch` (stdin 0, resize 4; port-forward data
    /// channels for the WebSocket port-forward protocol).
    pub async fn send(&mut self, ch: u8, data: &[u8]) {
        match &mut self.input {
            Input::Ws { sink, base64 } => {
                let m = if *base64 {
                    let mut t = String::new();
                    t.push(char::from(b'0' + ch));
                    base64::engine::general_purpose::STANDARD.encode_string(data, &mut t);
                    Message::Text(t.into())
                } else {
                    let mut v = vec![ch];
                    v.extend_from_slice(data);
                    Message::Binary(v.into())
                };
                if let Err(e) = sink.send(m).await {
                    self.output
                        .send_errors
                        .push(format!("websocket send on channel {ch}: {e}"));
                }
            }
            Input::Spdy { streams, .. } => {
                let s = streams
                    .get_mut(&ch)
                    .unwrap_or_else(|| panic!("no SPDY stream for channel {ch}"));
                if let Err(e) = s.write_all(data).await {
                    self.output
                        .send_errors
                        .push(format!("SPDY write on channel {ch}: {e}"));
                }
                let _ = s.flush().await;
            }
        }
    }

    /// Says the client is done with channel `ch`: the v5 close signal
    /// `[255, ch]` over WebSocket, a FIN on the stream over SPDY.
    pub async fn close_channel(&mut self, ch: u8) {
        match &mut self.input {
            Input::Ws { sink, base64 } => {
                assert!(!*base64, "no close signal in the base64 protocols");
                if let Err(e) = sink.send(Message::Binary(vec![255, ch].into())).await {
                    self.output
                        .send_errors
                        .push(format!("websocket close signal for channel {ch}: {e}"));
                }
            }
            Input::Spdy { streams, .. } => {
                if let Some(mut s) = streams.remove(&ch)
                    && let Err(e) = s.shutdown().await
                {
                    self.output
                        .send_errors
                        .push(format!("SPDY FIN on channel {ch}: {e}"));
                }
            }
        }
    }

    /// A terminal resize as kubectl sends it.
    pub async fn resize(&mut self, width: u16, height: u16) {
        let json = serde_json::json!({"Width": width, "Height": height}).to_string();
        self.send(RESIZE, json.as_bytes()).await;
    }

    /// Takes one event, waiting until `deadline`; false on timeout.
    async fn step(&mut self, deadline: Instant) -> bool {
        if self.output.closed {
            return false;
        }
        match tokio::time::timeout_at(deadline, self.events.recv()).await {
            Err(_) => false,
            Ok(None) => {
                self.output.closed = true;
                true
            }
            Ok(Some(Event::Data(ch, b))) => {
                self.output
                    .channels
                    .entry(ch)
                    .or_default()
                    .extend_from_slice(&b);
                self.output.messages.push((ch, b));
                true
            }
            Ok(Some(Event::StreamEnd)) => {
                self.open_readers = self.open_readers.saturating_sub(1);
                if self.open_readers == 0 {
                    self.output.closed = true;
                    self.output.end = Some("every stream ended".into());
                }
                true
            }
            Ok(Some(Event::Closed(why))) => {
                self.output.closed = true;
                self.output.end = Some(why);
                true
            }
        }
    }

    /// Reads until channel `ch` contains `needle`; false if the session
    /// ended or `timeout` passed first.
    pub async fn read_until(&mut self, ch: u8, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if contains(self.output.bytes(ch), needle.as_bytes()) {
                return true;
            }
            if !self.step(deadline).await {
                return contains(self.output.bytes(ch), needle.as_bytes());
            }
        }
    }

    /// Reads until `check` holds; false if the session ended or `timeout`
    /// passed first.
    pub async fn read_while(
        &mut self,
        timeout: Duration,
        mut done: impl FnMut(&Output) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.output) {
                return true;
            }
            if !self.step(deadline).await {
                return done(&self.output);
            }
        }
    }

    /// Reads until the server ends the session; false on timeout.
    pub async fn wait_closed(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.output.closed {
            if !self.step(deadline).await {
                break;
            }
        }
        self.output.closed
    }

    /// Ends the session from the client's side without a goodbye (as a
    /// killed client would): the connection is just closed.
    pub fn abandon(self) {
        drop(self);
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

// ---- WebSocket ----

async fn ws_handshake(
    url: &str,
    protocols: &[&str],
) -> Result<(WebSocketStream<TcpStream>, String), Refused> {
    let (host, path) = split_url(url);
    let mut request = format!("ws://{host}{path}")
        .into_client_request()
        .map_err(refused)?;
    if !protocols.is_empty() {
        request.headers_mut().insert(
            "sec-websocket-protocol",
            protocols.join(", ").parse().map_err(refused)?,
        );
    }
    let tcp = TcpStream::connect(&host)
        .await
        .map_err(|e| refused(format!("connect {host}: {e}")))?;
    let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    config.max_message_size = Some(64 << 20);
    match tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await {
        Ok((ws, response)) => {
            let protocol = response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            Ok((ws, protocol))
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(Refused {
            status: Some(r.status().as_u16()),
            message: r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
                .unwrap_or_default(),
        }),
        Err(e) => Err(refused(format!("websocket handshake: {e}"))),
    }
}

/// Connects to an exec, attach or port-forward URL over WebSocket offering
/// `protocols` (in order of preference).
pub async fn ws_connect(url: &str, protocols: &[&str]) -> Result<Session, Refused> {
    let (ws, protocol) = ws_handshake(url, protocols).await?;
    let base64 = protocol.contains("base64");
    let (sink, mut source) = ws.split();
    let (tx, events) = mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        let why = loop {
            match source.next().await {
                None => break "the connection ended without a close frame".to_string(),
                Some(Err(e)) => break format!("websocket error: {e}"),
                Some(Ok(Message::Close(frame))) => {
                    break format!("close frame {frame:?}");
                }
                Some(Ok(Message::Binary(b))) if !base64 => {
                    if let Some((&ch, data)) = b.split_first() {
                        let _ = tx.send(Event::Data(ch, data.to_vec()));
                    }
                }
                Some(Ok(Message::Text(t))) if base64 => {
                    let t = t.as_str();
                    let Some(ch) = t.bytes().next().and_then(|c| c.checked_sub(b'0')) else {
                        break format!("a base64 message without a channel: {t:?}");
                    };
                    match base64::engine::general_purpose::STANDARD.decode(&t[1..]) {
                        Ok(data) => {
                            let _ = tx.send(Event::Data(ch, data));
                        }
                        Err(e) => break format!("bad base64 in {t:?}: {e}"),
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(other)) => break format!("a message of the wrong kind: {other:?}"),
            }
        };
        let _ = tx.send(Event::Closed(why));
    });
    Ok(Session {
        protocol,
        output: Output::default(),
        events,
        input: Input::Ws { sink, base64 },
        open_readers: 0,
        readers: vec![reader],
    })
}

// ---- SPDY ----

/// Upgrades a connection to `url` to SPDY/3.1 (`X-Stream-Protocol-Version`
/// for each of `protocols`); returns the raw connection and the protocol
/// the server chose.
pub async fn spdy_upgrade(url: &str, protocols: &[&str]) -> Result<(TcpStream, String), Refused> {
    let (host, path) = split_url(url);
    let mut tcp = TcpStream::connect(&host)
        .await
        .map_err(|e| refused(format!("connect {host}: {e}")))?;
    // As Go's net (client-go, kubectl) does for every TCP connection: the
    // session's small frames are not held back by Nagle's algorithm.
    let _ = tcp.set_nodelay(true);
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\nContent-Length: 0\r\n"
    );
    for p in protocols {
        head.push_str(&format!("X-Stream-Protocol-Version: {p}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await.map_err(refused)?;
    // Byte by byte: whatever follows the head is SPDY.
    let mut response = Vec::new();
    let mut byte = [0u8; 1];
    while !response.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
            .await
            .map_err(|_| refused("no upgrade answer within 10 s"))?
            .map_err(refused)?;
        if n == 0 {
            return Err(refused(format!(
                "connection closed during the upgrade, after {:?}",
                String::from_utf8_lossy(&response)
            )));
        }
        response.push(byte[0]);
        if response.len() > 64 * 1024 {
            return Err(refused("an upgrade answer head over 64 KiB"));
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let mut lines = text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| refused(format!("not an HTTP answer: {text:?}")))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    if status != 101 {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
            .min(64 * 1024);
        let mut body = vec![0u8; len];
        let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut body)).await;
        return Err(Refused {
            status: Some(status),
            message: String::from_utf8_lossy(&body).trim().to_string(),
        });
    }
    Ok((tcp, header("x-stream-protocol-version").unwrap_or_default()))
}

/// Opens a client stream with `headers` and waits for the server's reply
/// (client-go's `CreateStream` does the same).
async fn open_stream(
    conn: &berth_spdy::Connection,
    headers: &[(&str, String)],
    fin: bool,
) -> Result<berth_spdy::Stream, String> {
    let mut h = berth_spdy::Headers::new();
    for (k, v) in headers {
        h.insert(k, v.clone());
    }
    let stream = conn
        .open(h, fin)
        .map_err(|e| format!("open SPDY stream {headers:?}: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(10), stream.wait_reply()).await {
        Ok(Ok(_)) => Ok(stream),
        Ok(Err(e)) => Err(format!("SPDY stream {headers:?} refused: {e}")),
        Err(_) => Err(format!("no SYN_REPLY for SPDY stream {headers:?} in 10 s")),
    }
}

/// Which streams an exec or attach session asks for.
#[derive(Debug, Clone, Copy)]
pub struct Stdio {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// Connects to an exec or attach URL over SPDY/3.1 offering `protocols`,
/// and opens the streams of `stdio` as client-go does: error, stdin,
/// stdout, stderr, resize, each waiting for its reply.
pub async fn spdy_remote_command(
    url: &str,
    protocols: &[&str],
    stdio: Stdio,
) -> Result<Session, Refused> {
    let (tcp, protocol) = spdy_upgrade(url, protocols).await?;
    let conn = berth_spdy::Connection::client(tcp, berth_spdy::Config::default());
    let mut wanted = vec![(ERROR, "error")];
    if stdio.stdin {
        wanted.push((STDIN, "stdin"));
    }
    if stdio.stdout {
        wanted.push((STDOUT, "stdout"));
    }
    if stdio.stderr {
        wanted.push((STDERR, "stderr"));
    }
    if stdio.tty {
        wanted.push((RESIZE, "resize"));
    }
    let (tx, events) = mpsc::unbounded_channel();
    let mut streams = BTreeMap::new();
    let mut open_readers = 0;
    let mut readers = Vec::new();
    for (ch, kind) in wanted {
        let stream = open_stream(&conn, &[("streamType", kind.to_string())], false)
            .await
            .map_err(refused)?;
        let (mut recv, send) = stream.into_split();
        if matches!(ch, STDIN | RESIZE) {
            streams.insert(ch, send);
            continue;
        }
        // Streams the client only reads: half-close our side.
        let mut send = send;
        let _ = send.shutdown().await;
        open_readers += 1;
        let tx = tx.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match recv.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => {
                        let _ = tx.send(Event::Data(ch, buf[..n].to_vec()));
                    }
                    Err(e) => {
                        let _ = tx.send(Event::Data(
                            ch,
                            format!("<SPDY read error: {e}>").into_bytes(),
                        ));
                        break;
                    }
                }
            }
            let _ = tx.send(Event::StreamEnd);
        }));
    }
    Ok(Session {
        protocol,
        output: Output::default(),
        events,
        input: Input::Spdy { conn, streams },
        open_readers,
        readers,
    })
}

/// What one forwarded SPDY connection gave back.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    /// Everything read on the data stream until its end (or the timeout).
    pub data: Vec<u8>,
    /// Everything read on the error stream (empty: no error).
    pub error: String,
    /// How reading the data stream ended when not with a clean end.
    pub data_error: Option<String>,
}

impl Forwarded {
    pub fn data_text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// The streams of one forwarded connection ([`SpdyForward::open`]).
pub struct ForwardStreams {
    /// What the server reports about the connection (empty: no error).
    pub error_rx: berth_spdy::RecvStream,
    /// Already closed (opened with FIN); kept so the stream stays whole.
    pub error_tx: berth_spdy::SendStream,
    /// The pod's bytes.
    pub rx: berth_spdy::RecvStream,
    /// Bytes to the pod; shut it down to half-close the connection.
    pub tx: berth_spdy::SendStream,
}

/// Port-forward over SPDY (after an HTTP upgrade or in a WebSocket
/// tunnel): every [`SpdyForward::request`] is one forwarded connection,
/// a stream pair with its own `requestID`, as client-go makes them.
pub struct SpdyForward {
    pub conn: berth_spdy::Connection,
    pub protocol: String,
    next_request: std::sync::atomic::AtomicU32,
}

impl SpdyForward {
    /// Port-forward over SPDY/3.1 after an HTTP upgrade.
    pub async fn connect(url: &str) -> Result<SpdyForward, Refused> {
        let (tcp, protocol) = spdy_upgrade(url, &["portforward.k8s.io"]).await?;
        Ok(SpdyForward {
            conn: berth_spdy::Connection::client(tcp, berth_spdy::Config::default()),
            protocol,
            next_request: Default::default(),
        })
    }

    /// Port-forward over SPDY in WebSocket binary messages
    /// (`SPDY/3.1+portforward.k8s.io`, what kubectl ≥ 1.30 dials).
    pub async fn connect_tunnel(url: &str) -> Result<SpdyForward, Refused> {
        let (ws, protocol) = ws_handshake(url, &[WS_SPDY_TUNNEL]).await?;
        Ok(SpdyForward {
            conn: berth_spdy::Connection::client(tunnel(ws), berth_spdy::Config::default()),
            protocol,
            next_request: Default::default(),
        })
    }

    /// One connection to the pod's `port`, its streams left to the caller
    /// (to stream large amounts without keeping them): the error stream
    /// (closed for writing at once) and the data stream, each replied to.
    pub async fn open(&self, port: u16) -> Result<ForwardStreams, String> {
        let id = self
            .next_request
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let common = [("port", port.to_string()), ("requestID", id.to_string())];
        let mut headers = vec![("streamType", "error".to_string())];
        headers.extend(common.iter().cloned());
        let error = open_stream(&self.conn, &headers, true).await?;
        headers[0].1 = "data".into();
        let data = open_stream(&self.conn, &headers, false).await?;
        let (error_rx, error_tx) = error.into_split();
        let (rx, tx) = data.into_split();
        Ok(ForwardStreams {
            error_rx,
            error_tx,
            rx,
            tx,
        })
    }

    /// One connection to the pod's `port`: opens the error stream (closed
    /// for writing at once) and the data stream, writes `request`, reads
    /// the data stream to its end and then the error stream, all within
    /// `timeout`.
    pub async fn request(
        &self,
        port: u16,
        request: &[u8],
        timeout: Duration,
    ) -> Result<Forwarded, String> {
        let ForwardStreams {
            mut error_rx,
            error_tx: _error_tx,
            mut rx,
            mut tx,
        } = self.open(port).await?;
        let deadline = Instant::now() + timeout;
        let mut out = Forwarded::default();
        if let Err(e) = tx.write_all(request).await {
            out.data_error = Some(format!("write: {e}"));
        }
        let _ = tx.flush().await;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match tokio::time::timeout_at(deadline, rx.read(&mut buf)).await {
                Err(_) => {
                    out.data_error = Some("timed out reading the data stream".into());
                    break;
                }
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => out.data.extend_from_slice(&buf[..n]),
                Ok(Err(e)) => {
                    out.data_error = Some(e.to_string());
                    break;
                }
            }
        }
        drop(tx);
        let mut error = Vec::new();
        let until = deadline.max(Instant::now() + Duration::from_secs(2));
        match tokio::time::timeout_at(until, error_rx.read_to_end(&mut error)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => error.extend_from_slice(format!("<error stream: {e}>").as_bytes()),
            Err(_) => error.extend_from_slice(b"<error stream did not end>"),
        }
        out.error = String::from_utf8_lossy(&error).into_owned();
        Ok(out)
    }
}

/// A WebSocket whose binary messages carry a byte stream, as one
/// `AsyncRead + AsyncWrite` (client-go's `TunnelingConnection`).
fn tunnel(ws: WebSocketStream<TcpStream>) -> tokio::io::DuplexStream {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut sink, mut source) = ws.split();
    let (mut rd, mut wr) = tokio::io::split(ours);
    tokio::spawn(async move {
        while let Some(Ok(m)) = source.next().await {
            let ok = match m {
                Message::Binary(b) => wr.write_all(&b).await.is_ok(),
                Message::Close(_) | Message::Text(_) => false,
                _ => true,
            };
            if !ok {
                break;
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
                    let m = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if sink.send(m).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    });
    theirs
}

/// A minimal HTTP/1.0 GET, as bytes to send through a forwarded port.
pub fn http_get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").into_bytes()
}

// ---- crictl ----

/// Where crictl is: `$BERTH_CRICTL`, else `shared/tools/crictl` beside the
/// workspace (where CI puts it), else `/work/shared/tools/crictl`; `None`
/// when none of them exists.
pub fn crictl_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BERTH_CRICTL") {
        return Some(p.into());
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/crictl");
    [beside, PathBuf::from("/work/shared/tools/crictl")]
        .into_iter()
        .find(|p| p.exists())
}

/// Whether `script` (util-linux, gives crictl a terminal for `-t`) is on
/// the PATH.
pub fn script_path() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("script"))
            .find(|p| p.exists())
    })
}

/// crictl pointed at one berthd through a config file of its own.
pub struct Crictl {
    pub bin: PathBuf,
    pub config: PathBuf,
}

/// What a crictl run gave.
#[derive(Debug)]
pub struct CrictlRun {
    /// The exit code (`None`: killed by a signal or by the timeout).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Crictl {
    /// crictl for the berthd on `socket`, its config written into `dir`;
    /// `None` when there is no crictl.
    pub fn new(socket: &Path, dir: &Path) -> Option<Crictl> {
        let bin = crictl_path()?;
        let config = dir.join("crictl.yaml");
        let endpoint = format!("unix://{}", socket.display());
        std::fs::write(
            &config,
            format!("runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 10\n"),
        )
        .expect("write crictl.yaml");
        Some(Crictl { bin, config })
    }

    /// `crictl --config <ours> args...`.
    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.arg("--config").arg(&self.config).args(args);
        cmd.kill_on_drop(true);
        cmd
    }

    /// The same as one shell command line (for `script -c`).
    pub fn shell_line(&self, args: &[&str]) -> String {
        let mut words = vec![
            self.bin.display().to_string(),
            "--config".into(),
            self.config.display().to_string(),
        ];
        words.extend(args.iter().map(|s| s.to_string()));
        words
            .iter()
            .map(|w| shell_quote(w))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs crictl with `stdin` as its input (closed after it), at most
    /// `timeout`.
    pub async fn run(&self, args: &[&str], stdin: &[u8], timeout: Duration) -> CrictlRun {
        run_command(self.command(args), stdin, true, timeout).await
    }
}

/// Quotes `s` for sh.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs `cmd` feeding it `stdin`; closes its stdin afterwards when
/// `close_stdin` (else keeps it open until the command exits), kills it
/// after `timeout`.
pub async fn run_command(
    mut cmd: tokio::process::Command,
    stdin: &[u8],
    close_stdin: bool,
    timeout: Duration,
) -> CrictlRun {
    use std::process::Stdio as S;
    cmd.stdin(S::piped()).stdout(S::piped()).stderr(S::piped());
    cmd.kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.as_std().get_program()));
    let mut input = child.stdin.take().unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let data = stdin.to_vec();
    let feeder = tokio::spawn(async move {
        let _ = input.write_all(&data).await;
        if close_stdin {
            drop(input);
        } else {
            // Held open until the task is aborted.
            std::future::pending::<()>().await;
        }
    });
    let out_task = tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v).await;
        v
    });
    let err_task = tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v).await;
        v
    });
    let (code, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => (status.code(), false),
        Ok(Err(e)) => panic!("wait for {:?}: {e}", cmd.as_std().get_program()),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            (None, true)
        }
    };
    feeder.abort();
    let grab = |t: tokio::task::JoinHandle<Vec<u8>>| async move {
        match tokio::time::timeout(Duration::from_secs(5), t).await {
            Ok(Ok(v)) => String::from_utf8_lossy(&v).into_owned(),
            _ => String::new(),
        }
    };
    CrictlRun {
        code,
        stdout: grab(out_task).await,
        stderr: grab(err_task).await,
        timed_out,
    }
}
