//! Async SPDY/3.1 sessions: many byte streams over one transport.
//!
//! Each connection runs two tasks, a reader (decodes frames and routes them)
//! and a writer (encodes control frames and round-robins stream data). All
//! state sits behind one mutex that is only held for bookkeeping, never
//! across I/O.
//!
//! ## Flow control and `moby/spdystream`
//!
//! Go's spdystream (used by kubectl, crictl and client-go) parses SETTINGS
//! and WINDOW_UPDATE but ignores them: it never sends WINDOW_UPDATE and never
//! limits what it sends. Enforcing its (implicit 64 KiB) window would stall
//! every stream after 64 KiB, so this session only blocks writers on the
//! peer's windows once the peer has shown it does flow control (sent
//! SETTINGS or WINDOW_UPDATE, as this crate does on start). Windows are
//! tracked from the start either way. On the receive side we advertise our
//! window and send WINDOW_UPDATE as the application reads; a peer that
//! ignores it gets transport back-pressure instead: when a stream holds
//! more than its window of unread data, the reader task stops reading the
//! socket until the application catches up (spdystream behaves the same
//! way), so memory stays bounded.

use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{oneshot, watch};

use crate::frame::{
    self, Frame, FrameDecoder, FrameError, HeaderCompressor, HeaderDecompressor, Headers, Setting,
    goaway, rst, setting,
};

/// The window SPDY/3.1 assumes before any SETTINGS or WINDOW_UPDATE.
const DEFAULT_WINDOW: i64 = 65_536;
const MAX_WINDOW: i64 = 0x7fff_ffff;
const MAX_STREAM_ID: u32 = 0x7fff_ffff;

/// Session tuning. The defaults suit kubelet streaming.
#[derive(Debug, Clone)]
pub struct Config {
    /// Per-stream receive window we advertise (SETTINGS_INITIAL_WINDOW_SIZE);
    /// also the most unread data buffered per stream before back-pressure.
    pub initial_window: u32,
    /// Session-wide receive window we grant (SPDY/3.1 stream-0 window).
    pub session_window: u32,
    /// Largest DATA payload we send in one frame.
    pub max_data_frame: usize,
    /// Bytes a stream's writer may queue before `poll_write` waits.
    pub send_buffer: usize,
    /// Largest frame payload accepted from the peer.
    pub max_frame_len: usize,
    /// Largest decompressed header block accepted from the peer.
    pub max_header_block: usize,
    /// Concurrently open streams; further SYN_STREAMs are refused.
    pub max_streams: usize,
    /// Peer-opened streams waiting in [`Incoming`] before being refused.
    pub accept_backlog: usize,
    /// Answer every peer SYN_STREAM with an empty SYN_REPLY immediately, as
    /// kubelet does (otherwise call [`Stream::reply`], or write, which
    /// replies implicitly).
    pub auto_reply: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            initial_window: 256 * 1024,
            session_window: 16 * 1024 * 1024,
            max_data_frame: 32 * 1024,
            send_buffer: 256 * 1024,
            max_frame_len: frame::MAX_FRAME_LEN,
            max_header_block: 1 << 20,
            max_streams: 1024,
            accept_backlog: 256,
            auto_reply: false,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Reset {
    Remote(u32),
    Local(u32),
}

impl Reset {
    fn error(self) -> io::Error {
        match self {
            Reset::Remote(code) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("stream reset by peer (status {code})"),
            ),
            Reset::Local(code) => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("stream reset locally (status {code})"),
            ),
        }
    }
}

#[derive(Default)]
struct StreamState {
    // Receive side.
    recv: VecDeque<Bytes>,
    recv_len: usize,
    remote_fin: bool,
    reader_gone: bool,
    recv_unacked: u32,
    read_waker: Option<Waker>,
    /// The connection reader task, parked because this stream is full.
    conn_reader_waker: Option<Waker>,
    // Send side.
    send: BytesMut,
    send_window: i64,
    fin_queued: bool,
    fin_sent: bool,
    queued: bool,
    write_waker: Option<Waker>,
    // Replies.
    need_reply: bool,
    reply: Option<Headers>,
    reply_waker: Option<Waker>,
    reset: Option<Reset>,
    /// Live halves (RecvStream, SendStream), including not-yet-accepted.
    handles: u8,
}

impl StreamState {
    fn wake_all(&mut self) {
        for w in [
            self.read_waker.take(),
            self.write_waker.take(),
            self.reply_waker.take(),
            self.conn_reader_waker.take(),
        ]
        .into_iter()
        .flatten()
        {
            w.wake();
        }
    }
}

struct State {
    streams: HashMap<u32, StreamState>,
    next_id: u32,
    last_peer_id: u32,
    control: VecDeque<Frame>,
    ready: VecDeque<u32>,
    writer_waker: Option<Waker>,
    accept_queue: VecDeque<(u32, Headers)>,
    accept_waker: Option<Waker>,
    incoming_gone: bool,
    peer_flow_control: bool,
    peer_initial_window: i64,
    send_session_window: i64,
    recv_session_unacked: u32,
    /// Set once the connection is dead: the error every pending op gets.
    closed: Option<(io::ErrorKind, String)>,
    goaway_sent: bool,
    goaway_received: bool,
    /// Connection + Incoming handles held by the user.
    user_handles: usize,
    /// The writer should flush the control queue and shut the transport.
    finishing: bool,
    pings: HashMap<u32, oneshot::Sender<()>>,
    next_ping: u32,
    reader_abort: Option<tokio::task::AbortHandle>,
    writer_abort: Option<tokio::task::AbortHandle>,
}

struct Inner {
    state: Mutex<State>,
    cfg: Config,
    is_server: bool,
    writer_done: watch::Receiver<bool>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ours(&self, id: u32) -> bool {
        id.is_multiple_of(2) == self.is_server
    }
}

impl State {
    fn wake_writer(&mut self) {
        if let Some(w) = self.writer_waker.take() {
            w.wake();
        }
    }

    fn push_control(&mut self, f: Frame) {
        self.control.push_back(f);
        self.wake_writer();
    }

    fn schedule(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id)
            && !s.queued
        {
            s.queued = true;
            self.ready.push_back(id);
            self.wake_writer();
        }
    }

    fn closed_error(&self) -> Option<io::Error> {
        self.closed
            .as_ref()
            .map(|(k, m)| io::Error::new(*k, m.clone()))
    }

    /// Records that the application consumed (or we discarded) `n` bytes,
    /// returning window to the peer in half-window steps.
    fn credit(&mut self, cfg: &Config, id: Option<u32>, n: usize) {
        if n == 0 {
            return;
        }
        let n = n.min(u32::MAX as usize / 2) as u32;
        if let Some(id) = id
            && let Some(s) = self.streams.get_mut(&id)
        {
            s.recv_unacked += n;
            if s.recv_unacked >= cfg.initial_window / 2 && !s.remote_fin && s.reset.is_none() {
                let delta = std::mem::take(&mut s.recv_unacked);
                self.push_control(Frame::WindowUpdate {
                    stream_id: id,
                    delta,
                });
            }
        }
        self.recv_session_unacked += n;
        if self.recv_session_unacked >= cfg.session_window / 2 {
            let delta = std::mem::take(&mut self.recv_session_unacked);
            self.push_control(Frame::WindowUpdate {
                stream_id: 0,
                delta,
            });
        }
    }

    fn ensure_replied(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id)
            && s.need_reply
        {
            s.need_reply = false;
            self.push_control(Frame::SynReply {
                stream_id: id,
                fin: false,
                headers: Headers::new(),
            });
        }
    }

    fn maybe_remove(&mut self, id: u32) {
        let done = match self.streams.get(&id) {
            Some(s) => {
                s.handles == 0 && !s.queued && (s.reset.is_some() || (s.remote_fin && s.fin_sent))
            }
            None => false,
        };
        if done {
            self.streams.remove(&id);
            self.check_drained();
        }
    }

    /// With every user handle gone, finish once the last stream is done.
    fn check_drained(&mut self) {
        if self.user_handles == 0 && self.streams.is_empty() && !self.finishing {
            self.finishing = true;
            self.wake_writer();
        }
    }

    fn reset_stream(&mut self, cfg: &Config, id: u32, reset: Reset, send_rst: bool) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if s.reset.is_some() {
            return;
        }
        s.reset = Some(reset);
        s.send.clear();
        // What the peer sent before resetting stays readable, as Go's
        // spdystream keeps it (client-go resets a port-forward data stream
        // right after its last bytes); a local reset drops it.
        let dropped = match reset {
            Reset::Remote(_) if !s.reader_gone => 0,
            _ => {
                s.recv.clear();
                std::mem::take(&mut s.recv_len)
            }
        };
        s.wake_all();
        if send_rst && let Reset::Local(status) = reset {
            self.push_control(Frame::RstStream {
                stream_id: id,
                status,
            });
        }
        self.credit(cfg, None, dropped);
        self.maybe_remove(id);
    }

    /// Ends the connection: every stream and waiter sees `err`.
    fn fail(&mut self, kind: io::ErrorKind, msg: String) {
        if self.closed.is_none() {
            self.closed = Some((kind, msg));
        }
        for s in self.streams.values_mut() {
            s.wake_all();
        }
        self.pings.clear();
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        self.finishing = true;
        self.wake_writer();
    }
}

/// A SPDY connection handle. Cloning is cheap; when every clone and the
/// [`Incoming`] are dropped, the session sends GOAWAY and closes the
/// transport after the remaining streams finish.
pub struct Connection {
    user: UserHandle,
}

impl Clone for Connection {
    fn clone(&self) -> Self {
        self.user.0.lock().user_handles += 1;
        Self {
            user: UserHandle(self.user.0.clone()),
        }
    }
}

struct UserHandle(Arc<Inner>);

impl Drop for UserHandle {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.user_handles -= 1;
        if st.user_handles == 0 {
            if !st.goaway_sent && st.closed.is_none() {
                st.goaway_sent = true;
                let last = st.last_peer_id;
                st.push_control(Frame::GoAway {
                    last_good_stream_id: last,
                    status: goaway::OK,
                });
            }
            st.check_drained();
        }
    }
}

/// Streams opened by the peer, in arrival order.
pub struct Incoming {
    user: UserHandle,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let inner = &self.user.0;
        let mut st = inner.lock();
        st.incoming_gone = true;
        while let Some((id, _)) = st.accept_queue.pop_front() {
            if let Some(s) = st.streams.get_mut(&id) {
                s.handles = 0;
            }
            st.reset_stream(&inner.cfg, id, Reset::Local(rst::REFUSED_STREAM), true);
        }
    }
}

impl Incoming {
    /// The next peer-opened stream; `None` once the peer sent GOAWAY or the
    /// connection ended.
    pub async fn accept(&mut self) -> Option<Stream> {
        poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// Poll form of [`Incoming::accept`].
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<Stream>> {
        let inner = &self.user.0;
        let mut st = inner.lock();
        if let Some((id, headers)) = st.accept_queue.pop_front() {
            return Poll::Ready(Some(Stream::new(inner.clone(), id, headers)));
        }
        if st.closed.is_some() || st.goaway_received || st.goaway_sent {
            return Poll::Ready(None);
        }
        st.accept_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Connection {
    /// Starts a server-role session (even stream ids; accepts the client's
    /// odd ones).
    pub fn server<T>(io: T, cfg: Config) -> (Connection, Incoming)
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = start(io, cfg, true);
        inner.lock().user_handles = 2;
        (
            Connection {
                user: UserHandle(inner.clone()),
            },
            Incoming {
                user: UserHandle(inner),
            },
        )
    }

    /// Starts a client-role session (odd stream ids). Streams the server
    /// tries to open are refused.
    pub fn client<T>(io: T, cfg: Config) -> Connection
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = start(io, cfg, false);
        {
            let mut st = inner.lock();
            st.user_handles = 1;
            st.incoming_gone = true;
        }
        Connection {
            user: UserHandle(inner),
        }
    }

    /// Opens a stream with a SYN_STREAM carrying `headers`; `fin` half-closes
    /// our side at once. Does not wait for the SYN_REPLY: use
    /// [`Stream::wait_reply`] before writing if the peer is spdystream, which
    /// drops data on streams it has not replied to yet.
    pub fn open(&self, headers: Headers, fin: bool) -> io::Result<Stream> {
        let inner = &self.user.0;
        let mut st = inner.lock();
        if let Some(e) = st.closed_error() {
            return Err(e);
        }
        if st.goaway_sent || st.goaway_received {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "connection is going away",
            ));
        }
        let id = st.next_id;
        if id > MAX_STREAM_ID {
            return Err(io::Error::other("stream ids exhausted"));
        }
        st.next_id += 2;
        let window = st.peer_initial_window;
        st.streams.insert(
            id,
            StreamState {
                send_window: window,
                fin_queued: fin,
                fin_sent: fin,
                handles: 2,
                ..Default::default()
            },
        );
        st.push_control(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin,
            unidirectional: false,
            headers: headers.clone(),
        });
        drop(st);
        Ok(Stream::new(inner.clone(), id, headers))
    }

    /// Sends a PING and waits for the echo; returns the round-trip time.
    pub async fn ping(&self) -> io::Result<Duration> {
        let rx = {
            let mut st = self.user.0.lock();
            if let Some(e) = st.closed_error() {
                return Err(e);
            }
            let id = st.next_ping;
            st.next_ping = st.next_ping.wrapping_add(2) & 0x7fff_ffff;
            let (tx, rx) = oneshot::channel();
            st.pings.insert(id, tx);
            st.push_control(Frame::Ping { id });
            rx
        };
        let start = Instant::now();
        rx.await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed before ping reply",
            )
        })?;
        Ok(start.elapsed())
    }

    /// Sends GOAWAY, flushes pending control frames (briefly) and closes the
    /// transport. Open streams fail with `ConnectionAborted`.
    pub async fn close(&self) {
        let inner = &self.user.0;
        let mut done = inner.writer_done.clone();
        {
            let mut st = inner.lock();
            if !st.goaway_sent && st.closed.is_none() {
                st.goaway_sent = true;
                let last = st.last_peer_id;
                st.push_control(Frame::GoAway {
                    last_good_stream_id: last,
                    status: goaway::OK,
                });
            }
            st.fail(
                io::ErrorKind::ConnectionAborted,
                "connection closed locally".into(),
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), done.wait_for(|d| *d)).await;
        let st = inner.lock();
        for h in [&st.reader_abort, &st.writer_abort].into_iter().flatten() {
            h.abort();
        }
    }

    /// True once the connection has ended (transport closed or error).
    pub fn is_closed(&self) -> bool {
        self.user.0.lock().closed.is_some()
    }
}

fn start<T>(io: T, cfg: Config, is_server: bool) -> Arc<Inner>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (done_tx, done_rx) = watch::channel(false);
    let mut control = VecDeque::new();
    // Announce our flow control: this also tells a berth peer that we
    // honour windows (spdystream ignores both frames).
    control.push_back(Frame::Settings {
        clear: false,
        entries: vec![Setting {
            flags: 0,
            id: setting::INITIAL_WINDOW_SIZE,
            value: cfg.initial_window,
        }],
    });
    if i64::from(cfg.session_window) > DEFAULT_WINDOW {
        control.push_back(Frame::WindowUpdate {
            stream_id: 0,
            delta: (i64::from(cfg.session_window) - DEFAULT_WINDOW) as u32,
        });
    }
    let state = State {
        streams: HashMap::new(),
        next_id: if is_server { 2 } else { 1 },
        last_peer_id: 0,
        control,
        ready: VecDeque::new(),
        writer_waker: None,
        accept_queue: VecDeque::new(),
        accept_waker: None,
        incoming_gone: false,
        peer_flow_control: false,
        peer_initial_window: DEFAULT_WINDOW,
        send_session_window: DEFAULT_WINDOW,
        recv_session_unacked: 0,
        closed: None,
        goaway_sent: false,
        goaway_received: false,
        user_handles: 0,
        finishing: false,
        pings: HashMap::new(),
        next_ping: if is_server { 2 } else { 1 },
        reader_abort: None,
        writer_abort: None,
    };
    let inner = Arc::new(Inner {
        state: Mutex::new(state),
        cfg,
        is_server,
        writer_done: done_rx,
    });
    let (r, w) = tokio::io::split(io);
    let reader = tokio::spawn(read_loop(inner.clone(), r));
    let writer = tokio::spawn(write_loop(inner.clone(), w, done_tx));
    {
        let mut st = inner.lock();
        st.reader_abort = Some(reader.abort_handle());
        st.writer_abort = Some(writer.abort_handle());
    }
    inner
}

// ---------------------------------------------------------------- reader

async fn read_loop<R: AsyncRead + Unpin>(inner: Arc<Inner>, mut r: R) {
    let mut decoder = FrameDecoder::new(inner.cfg.max_frame_len, inner.cfg.max_header_block);
    let mut hd = HeaderDecompressor::new();
    let mut buf = BytesMut::with_capacity(256 * 1024);
    loop {
        match decoder.decode(&mut buf, &mut hd) {
            Ok(Some(frame)) => {
                if let Err(e) = handle_frame(&inner, frame).await {
                    protocol_error(&inner, e);
                    return;
                }
            }
            Ok(None) => {
                if buf.capacity() - buf.len() < 16 * 1024 {
                    buf.reserve(256 * 1024);
                }
                match r.read_buf(&mut buf).await {
                    Ok(0) => {
                        inner.lock().fail(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed by peer".into(),
                        );
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        inner
                            .lock()
                            .fail(e.kind(), format!("transport read failed: {e}"));
                        return;
                    }
                }
            }
            Err(e) => {
                protocol_error(&inner, e);
                return;
            }
        }
    }
}

fn protocol_error(inner: &Inner, e: FrameError) {
    tracing::debug!(error = %e, "spdy protocol error, closing connection");
    let mut st = inner.lock();
    if !st.goaway_sent && st.closed.is_none() {
        st.goaway_sent = true;
        let last = st.last_peer_id;
        st.push_control(Frame::GoAway {
            last_good_stream_id: last,
            status: goaway::PROTOCOL_ERROR,
        });
    }
    st.fail(
        io::ErrorKind::InvalidData,
        format!("spdy protocol error: {e}"),
    );
}

async fn handle_frame(inner: &Arc<Inner>, frame: Frame) -> Result<(), FrameError> {
    let cfg = &inner.cfg;
    match frame {
        Frame::Data {
            stream_id,
            fin,
            data,
        } => {
            let len = data.len();
            {
                let mut st = inner.lock();
                let never_opened = if inner.ours(stream_id) {
                    stream_id >= st.next_id
                } else {
                    stream_id > st.last_peer_id
                };
                match st.streams.get_mut(&stream_id) {
                    Some(s) if s.reset.is_none() && !s.remote_fin => {
                        if s.reader_gone {
                            st.credit(cfg, Some(stream_id), len);
                        } else if len > 0 {
                            s.recv_len += len;
                            s.recv.push_back(data);
                        }
                        let s = st.streams.get_mut(&stream_id).expect("present");
                        if fin {
                            s.remote_fin = true;
                        }
                        if let Some(w) = s.read_waker.take() {
                            w.wake();
                        }
                        if fin {
                            st.maybe_remove(stream_id);
                        }
                    }
                    // An empty frame after FIN adds nothing: Go's spdystream
                    // sends a second FIN when a stream is closed twice (as
                    // kubectl's and crictl's stdin copy does). Resetting the
                    // stream would throw away data its reader has not read.
                    Some(s) if s.reset.is_none() && len == 0 => {}
                    Some(s) if s.reset.is_none() => {
                        // Data after FIN.
                        st.credit(cfg, None, len);
                        st.reset_stream(
                            cfg,
                            stream_id,
                            Reset::Local(rst::STREAM_ALREADY_CLOSED),
                            true,
                        );
                    }
                    _ => {
                        st.credit(cfg, None, len);
                        if never_opened {
                            st.push_control(Frame::RstStream {
                                stream_id,
                                status: rst::INVALID_STREAM,
                            });
                        }
                    }
                }
            }
            // Back-pressure: wait while this stream holds more than its
            // window of unread data (only a peer ignoring our window gets
            // here).
            let cap = cfg.initial_window as usize;
            poll_fn(|cx| {
                let mut st = inner.lock();
                if st.closed.is_some() {
                    return Poll::Ready(());
                }
                match st.streams.get_mut(&stream_id) {
                    Some(s) if s.recv_len > cap && !s.reader_gone && s.reset.is_none() => {
                        s.conn_reader_waker = Some(cx.waker().clone());
                        Poll::Pending
                    }
                    _ => Poll::Ready(()),
                }
            })
            .await;
        }
        Frame::SynStream {
            stream_id,
            fin,
            unidirectional,
            headers,
            ..
        } => {
            let mut st = inner.lock();
            if inner.ours(stream_id) || stream_id <= st.last_peer_id {
                return Err(FrameError::Invalid("SYN_STREAM with invalid stream id"));
            }
            st.last_peer_id = stream_id;
            let refuse = st.incoming_gone
                || st.goaway_sent
                || st.closed.is_some()
                || st.streams.len() >= cfg.max_streams
                || st.accept_queue.len() >= cfg.accept_backlog;
            if refuse {
                st.push_control(Frame::RstStream {
                    stream_id,
                    status: rst::REFUSED_STREAM,
                });
                return Ok(());
            }
            let window = st.peer_initial_window;
            let need_reply = !unidirectional && !cfg.auto_reply;
            if !unidirectional && cfg.auto_reply {
                st.push_control(Frame::SynReply {
                    stream_id,
                    fin: false,
                    headers: Headers::new(),
                });
            }
            st.streams.insert(
                stream_id,
                StreamState {
                    remote_fin: fin,
                    send_window: window,
                    fin_queued: unidirectional,
                    fin_sent: unidirectional,
                    need_reply,
                    handles: 2,
                    ..Default::default()
                },
            );
            st.accept_queue.push_back((stream_id, headers));
            if let Some(w) = st.accept_waker.take() {
                w.wake();
            }
        }
        Frame::SynReply {
            stream_id,
            fin,
            headers,
        } => {
            let mut st = inner.lock();
            if let Some(s) = st.streams.get_mut(&stream_id)
                && inner.ours(stream_id)
                && s.reply.is_none()
            {
                s.reply = Some(headers);
                if fin {
                    s.remote_fin = true;
                    if let Some(w) = s.read_waker.take() {
                        w.wake();
                    }
                }
                if let Some(w) = s.reply_waker.take() {
                    w.wake();
                }
                st.maybe_remove(stream_id);
            }
        }
        Frame::Headers { stream_id, fin, .. } => {
            let mut st = inner.lock();
            if fin && let Some(s) = st.streams.get_mut(&stream_id) {
                s.remote_fin = true;
                if let Some(w) = s.read_waker.take() {
                    w.wake();
                }
                st.maybe_remove(stream_id);
            }
        }
        Frame::RstStream { stream_id, status } => {
            let mut st = inner.lock();
            st.reset_stream(cfg, stream_id, Reset::Remote(status), false);
        }
        Frame::Settings { entries, .. } => {
            let mut st = inner.lock();
            st.peer_flow_control = true;
            for e in entries {
                if e.id == setting::INITIAL_WINDOW_SIZE {
                    let new = i64::from(e.value).min(MAX_WINDOW);
                    let delta = new - st.peer_initial_window;
                    st.peer_initial_window = new;
                    for s in st.streams.values_mut() {
                        s.send_window += delta;
                    }
                }
            }
            reschedule_all(&mut st);
        }
        Frame::Ping { id } => {
            let mut st = inner.lock();
            if inner.ours(id) {
                if let Some(tx) = st.pings.remove(&id) {
                    let _ = tx.send(());
                }
            } else {
                st.push_control(Frame::Ping { id });
            }
        }
        Frame::GoAway {
            last_good_stream_id,
            ..
        } => {
            let mut st = inner.lock();
            st.goaway_received = true;
            let refused: Vec<u32> = st
                .streams
                .keys()
                .copied()
                .filter(|id| inner.ours(*id) && *id > last_good_stream_id)
                .collect();
            for id in refused {
                st.reset_stream(cfg, id, Reset::Remote(rst::REFUSED_STREAM), false);
            }
            if let Some(w) = st.accept_waker.take() {
                w.wake();
            }
        }
        Frame::WindowUpdate { stream_id, delta } => {
            let mut st = inner.lock();
            st.peer_flow_control = true;
            let delta = i64::from(delta);
            if stream_id == 0 {
                st.send_session_window = (st.send_session_window + delta).min(MAX_WINDOW);
                reschedule_all(&mut st);
            } else if let Some(s) = st.streams.get_mut(&stream_id) {
                s.send_window = (s.send_window + delta).min(MAX_WINDOW);
                if !s.send.is_empty() || (s.fin_queued && !s.fin_sent) {
                    st.schedule(stream_id);
                }
            }
        }
    }
    Ok(())
}

fn reschedule_all(st: &mut State) {
    let ids: Vec<u32> = st
        .streams
        .iter()
        .filter(|(_, s)| !s.queued && s.reset.is_none() && !s.send.is_empty())
        .map(|(id, _)| *id)
        .collect();
    for id in ids {
        st.schedule(id);
    }
}

// ---------------------------------------------------------------- writer

const WRITE_BATCH: usize = 256 * 1024;

struct Batch {
    control: Vec<Frame>,
    data: Vec<(u32, bool, Bytes)>,
    finish: bool,
}

fn collect(inner: &Inner, st: &mut State, b: &mut Batch) {
    b.control.extend(st.control.drain(..));
    if st.closed.is_some() {
        // Dead connection: only the remaining control frames (GOAWAY) go out.
        st.ready.clear();
        return;
    }
    let mut budget = WRITE_BATCH;
    let rounds = st.ready.len();
    let mut visited = 0;
    while budget > 0 && visited < rounds.max(1) * 64 {
        let Some(id) = st.ready.pop_front() else {
            break;
        };
        visited += 1;
        let flow = st.peer_flow_control;
        let session = st.send_session_window;
        let Some(s) = st.streams.get_mut(&id) else {
            continue;
        };
        s.queued = false;
        if s.reset.is_some() || s.fin_sent {
            st.maybe_remove(id);
            continue;
        }
        let mut n = s.send.len().min(inner.cfg.max_data_frame).min(budget);
        if flow {
            n = n
                .min(s.send_window.max(0) as usize)
                .min(session.max(0) as usize);
        }
        let fin = s.fin_queued && n == s.send.len();
        if n == 0 && !fin {
            // Empty or blocked on the peer's window; a WINDOW_UPDATE
            // reschedules it.
            continue;
        }
        let chunk = s.send.split_to(n).freeze();
        s.send_window -= n as i64;
        if fin {
            s.fin_sent = true;
        }
        if let Some(w) = s.write_waker.take() {
            w.wake();
        }
        let more = !s.send.is_empty() || (s.fin_queued && !s.fin_sent);
        st.send_session_window -= n as i64;
        budget -= n.max(1).min(budget);
        b.data.push((id, fin, chunk));
        if more {
            st.schedule(id);
        } else if fin {
            st.maybe_remove(id);
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(inner: Arc<Inner>, mut w: W, done: watch::Sender<bool>) {
    let mut hc = HeaderCompressor::new();
    let mut out = BytesMut::with_capacity(WRITE_BATCH + 64 * 1024);
    let mut batch = Batch {
        control: Vec::new(),
        data: Vec::new(),
        finish: false,
    };
    loop {
        poll_fn(|cx| {
            let mut st = inner.lock();
            collect(&inner, &mut st, &mut batch);
            if batch.control.is_empty() && batch.data.is_empty() {
                if st.finishing {
                    batch.finish = true;
                    return Poll::Ready(());
                }
                st.writer_waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(())
        })
        .await;
        for f in batch.control.drain(..) {
            if let Err(e) = frame::encode(&f, &mut hc, &mut out) {
                // Our own frame cannot be encoded (e.g. huge headers): the
                // compressor state is unknown now, so give up.
                inner
                    .lock()
                    .fail(io::ErrorKind::InvalidInput, format!("encoding frame: {e}"));
                batch.finish = true;
                break;
            }
        }
        if !batch.finish {
            for (id, fin, chunk) in batch.data.drain(..) {
                frame::encode_data_header(id, fin, chunk.len(), &mut out);
                out.extend_from_slice(&chunk);
            }
        }
        batch.data.clear();
        if !out.is_empty() {
            let res = async {
                w.write_all(&out).await?;
                w.flush().await
            }
            .await;
            out.clear();
            if let Err(e) = res {
                inner
                    .lock()
                    .fail(e.kind(), format!("transport write failed: {e}"));
                break;
            }
        }
        if batch.finish {
            break;
        }
    }
    let _ = w.shutdown().await;
    let _ = done.send(true);
    let mut st = inner.lock();
    if st.user_handles == 0 || st.closed.is_some() {
        // Nobody can use the connection any more: stop the reader too.
        if st.closed.is_none() {
            st.fail(io::ErrorKind::ConnectionAborted, "connection closed".into());
        }
        if let Some(h) = st.reader_abort.take() {
            h.abort();
        }
    }
}

// ---------------------------------------------------------------- streams

struct Handle {
    inner: Arc<Inner>,
    id: u32,
}

/// The receiving half of a stream ([`AsyncRead`]). Dropping it discards
/// further data for the stream.
pub struct RecvStream {
    h: Handle,
}

/// The sending half of a stream ([`AsyncWrite`]; `poll_shutdown` sends
/// FIN). Dropping it without shutdown also sends FIN after pending data.
pub struct SendStream {
    h: Handle,
}

/// One SPDY stream: the peer's (or our) SYN_STREAM headers plus both halves.
pub struct Stream {
    headers: Headers,
    recv: RecvStream,
    send: SendStream,
}

impl Stream {
    fn new(inner: Arc<Inner>, id: u32, headers: Headers) -> Self {
        Self {
            headers,
            recv: RecvStream {
                h: Handle {
                    inner: inner.clone(),
                    id,
                },
            },
            send: SendStream {
                h: Handle { inner, id },
            },
        }
    }

    /// Stream id (odd: client-opened, even: server-opened).
    pub fn id(&self) -> u32 {
        self.recv.h.id
    }

    /// The SYN_STREAM headers (the peer's for accepted streams, ours for
    /// opened ones).
    pub fn headers(&self) -> &Headers {
        &self.headers
    }

    /// Answers a peer-opened stream with SYN_REPLY. Writing replies
    /// implicitly with empty headers.
    pub fn reply(&self, headers: Headers) -> io::Result<()> {
        let h = &self.recv.h;
        let mut st = h.inner.lock();
        let s = st
            .streams
            .get_mut(&h.id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotConnected, "stream is closed"))?;
        if !s.need_reply {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "stream already replied (or opened locally)",
            ));
        }
        s.need_reply = false;
        st.push_control(Frame::SynReply {
            stream_id: h.id,
            fin: false,
            headers,
        });
        Ok(())
    }

    /// Waits for the peer's SYN_REPLY on a stream we opened.
    pub async fn wait_reply(&self) -> io::Result<Headers> {
        let h = &self.recv.h;
        poll_fn(|cx| {
            let mut st = h.inner.lock();
            let closed = st.closed_error();
            let Some(s) = st.streams.get_mut(&h.id) else {
                return Poll::Ready(Err(closed.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotConnected, "stream is closed")
                })));
            };
            if let Some(r) = &s.reply {
                return Poll::Ready(Ok(r.clone()));
            }
            if let Some(r) = s.reset {
                return Poll::Ready(Err(r.error()));
            }
            if let Some(e) = closed {
                return Poll::Ready(Err(e));
            }
            s.reply_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Aborts the stream with RST_STREAM `status` (see [`frame::rst`]).
    pub fn reset(&self, status: u32) {
        self.send.reset(status);
    }

    /// Splits into halves usable from different tasks.
    pub fn into_split(self) -> (RecvStream, SendStream) {
        (self.recv, self.send)
    }
}

impl RecvStream {
    pub fn id(&self) -> u32 {
        self.h.id
    }
}

impl SendStream {
    pub fn id(&self) -> u32 {
        self.h.id
    }

    /// Aborts the whole stream with RST_STREAM `status`.
    pub fn reset(&self, status: u32) {
        let inner = &self.h.inner;
        let mut st = inner.lock();
        let finished = st
            .streams
            .get(&self.h.id)
            .is_none_or(|s| s.remote_fin && s.fin_sent);
        if !finished {
            st.reset_stream(&inner.cfg, self.h.id, Reset::Local(status), true);
        }
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        let inner = &self.h.inner;
        let mut st = inner.lock();
        let Some(s) = st.streams.get_mut(&self.h.id) else {
            return;
        };
        s.handles = s.handles.saturating_sub(1);
        s.reader_gone = true;
        let dropped = std::mem::take(&mut s.recv_len);
        s.recv.clear();
        if let Some(w) = s.conn_reader_waker.take() {
            w.wake();
        }
        st.credit(&inner.cfg, Some(self.h.id), dropped);
        st.maybe_remove(self.h.id);
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        let id = self.h.id;
        let mut st = self.h.inner.lock();
        let alive = st.closed.is_none();
        let Some(s) = st.streams.get_mut(&id) else {
            return;
        };
        s.handles = s.handles.saturating_sub(1);
        if !s.fin_queued && s.reset.is_none() && alive {
            s.fin_queued = true;
            st.ensure_replied(id);
            st.schedule(id);
        }
        st.maybe_remove(id);
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let inner = &self.h.inner;
        let id = self.h.id;
        let mut st = inner.lock();
        let closed = st.closed_error();
        let Some(s) = st.streams.get_mut(&id) else {
            return Poll::Ready(closed.map_or(Ok(()), Err));
        };
        if let Some(r) = s.reset
            && s.recv_len == 0
        {
            return Poll::Ready(Err(r.error()));
        }
        if s.recv_len > 0 {
            let mut n = 0;
            while buf.remaining() > 0 {
                let Some(front) = s.recv.front_mut() else {
                    break;
                };
                let k = front.len().min(buf.remaining());
                buf.put_slice(&front[..k]);
                n += k;
                if k == front.len() {
                    s.recv.pop_front();
                } else {
                    let _ = front.split_to(k);
                }
            }
            s.recv_len -= n;
            if s.recv_len <= inner.cfg.initial_window as usize
                && let Some(w) = s.conn_reader_waker.take()
            {
                w.wake();
            }
            st.credit(&inner.cfg, Some(id), n);
            return Poll::Ready(Ok(()));
        }
        if s.remote_fin {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = closed {
            return Poll::Ready(Err(e));
        }
        s.read_waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

fn stream_gone(st: &State) -> io::Error {
    st.closed_error()
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream is closed"))
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let inner = &self.h.inner;
        let id = self.h.id;
        let mut st = inner.lock();
        if let Some(e) = st.closed_error() {
            return Poll::Ready(Err(e));
        }
        let Some(s) = st.streams.get_mut(&id) else {
            return Poll::Ready(Err(stream_gone(&st)));
        };
        if let Some(r) = s.reset {
            return Poll::Ready(Err(r.error()));
        }
        if s.fin_queued {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = inner.cfg.send_buffer.saturating_sub(s.send.len());
        if room == 0 {
            s.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = room.min(buf.len());
        s.send.extend_from_slice(&buf[..n]);
        st.ensure_replied(id);
        st.schedule(id);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.h.inner.lock();
        if let Some(e) = st.closed_error() {
            return Poll::Ready(Err(e));
        }
        let Some(s) = st.streams.get_mut(&self.h.id) else {
            return Poll::Ready(Ok(()));
        };
        if let Some(r) = s.reset {
            return Poll::Ready(Err(r.error()));
        }
        if s.send.is_empty() {
            return Poll::Ready(Ok(()));
        }
        s.write_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let id = self.h.id;
        let mut st = self.h.inner.lock();
        let closed = st.closed_error();
        let Some(s) = st.streams.get_mut(&id) else {
            return Poll::Ready(closed.map_or(Ok(()), Err));
        };
        if let Some(r) = s.reset {
            return Poll::Ready(Err(r.error()));
        }
        if s.fin_sent {
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = closed {
            return Poll::Ready(Err(e));
        }
        s.write_waker = Some(cx.waker().clone());
        if !s.fin_queued {
            s.fin_queued = true;
            st.ensure_replied(id);
            st.schedule(id);
        }
        Poll::Pending
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id())
            .field("headers", &self.headers)
            .finish()
    }
}
