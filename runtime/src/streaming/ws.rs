//! The WebSocket channel protocol of Kubernetes streaming (`channel.k8s.io`
//! and its `v4.`/`v5.` and `base64.` variants).
//!
//! Every message starts with a channel number; the rest is that channel's
//! bytes (base64 in text messages for the base64 variants, with the channel
//! as an ASCII digit). v5 adds a close signal: a message `[255, n]` says the
//! client closed channel `n`. Each channel is exposed as an ordinary byte
//! stream, so exec, attach and port-forward do not know the transport.

use std::sync::Arc;

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::Closed;

/// The v5 close signal's channel number.
const CLOSE_SIGNAL: u8 = 255;
/// Bytes per outgoing message and per channel buffer.
const CHUNK: usize = 32 * 1024;

/// How a negotiated subprotocol frames channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub base64: bool,
    /// The client may send `[255, channel]` to close a channel.
    pub close_signal: bool,
}

/// Chooses the first of the client's subprotocols the server supports
/// (`offered` in the client's order). No offer at all means the original
/// unversioned binary protocol, as kubelet treats it.
pub fn negotiate<'a>(offered: &[&str], supported: &[&'a str]) -> Option<&'a str> {
    if offered.is_empty() {
        return Some("");
    }
    offered
        .iter()
        .find_map(|o| supported.iter().find(|s| *s == o).copied())
}

/// Which channels a session uses, by number.
#[derive(Debug, Clone, Default)]
pub struct ChannelSpec {
    /// Channels the client writes (stdin, resize, port-forward data).
    pub inbound: Vec<u8>,
    /// Channels the server writes (stdout, stderr, error, data).
    pub outbound: Vec<u8>,
    /// Messages sent before anything else, e.g. the port number on each
    /// port-forward channel.
    pub greeting: Vec<(u8, Vec<u8>)>,
}

/// The byte streams of one WebSocket session. Reading an inbound channel
/// gives what the client sent on it (EOF when it closed it or left);
/// writing an outbound channel sends to the client. Dropping every
/// outbound stream (or calling `shutdown` on them) and then awaiting
/// `finished` flushes and closes the connection.
pub struct Channels {
    pub inbound: Vec<(u8, DuplexStream)>,
    pub outbound: Vec<(u8, DuplexStream)>,
    /// Resolves when the client has gone.
    pub closed: Closed,
    pub finished: tokio::task::JoinHandle<()>,
}

impl Channels {
    pub fn take_inbound(&mut self, channel: u8) -> Option<DuplexStream> {
        let i = self.inbound.iter().position(|(c, _)| *c == channel)?;
        Some(self.inbound.swap_remove(i).1)
    }

    pub fn take_outbound(&mut self, channel: u8) -> Option<DuplexStream> {
        let i = self.outbound.iter().position(|(c, _)| *c == channel)?;
        Some(self.outbound.swap_remove(i).1)
    }
}

/// Starts serving `ws` with the channels of `spec`.
pub fn serve<S>(ws: WebSocketStream<S>, framing: Framing, spec: ChannelSpec) -> Channels
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, mut source) = ws.split();
    let (closed, closer) = Closed::new();
    let closer = Arc::new(closer);

    // Client → channels.
    let mut inbound = Vec::new();
    let mut feeds = Vec::new();
    for &ch in &spec.inbound {
        let (ours, theirs) = tokio::io::duplex(CHUNK);
        inbound.push((ch, theirs));
        feeds.push((ch, Some(ours)));
    }
    let reader_closer = closer.clone();
    tokio::spawn(async move {
        while let Some(message) = source.next().await {
            let Ok(message) = message else { break };
            let payload = match message {
                Message::Binary(b) if !framing.base64 => b,
                Message::Text(t) if framing.base64 => match decode_base64(t.as_str()) {
                    Some(b) => b,
                    None => break,
                },
                Message::Close(_) => break,
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                // The wrong kind of message for this subprotocol.
                _ => break,
            };
            let Some((&ch, data)) = payload.split_first() else {
                continue;
            };
            if ch == CLOSE_SIGNAL && framing.close_signal {
                if let Some(&target) = data.first()
                    && let Some((_, feed)) = feeds.iter_mut().find(|(c, _)| *c == target)
                {
                    *feed = None;
                }
                continue;
            }
            // Bytes for a channel the session does not read are dropped,
            // as kubelet ignores them.
            if let Some((_, Some(feed))) = feeds.iter_mut().find(|(c, _)| *c == ch)
                && feed.write_all(data).await.is_err()
            {
                // The session stopped reading this channel.
                feeds.retain(|(c, _)| *c != ch);
            }
        }
        reader_closer.close();
    });

    // Channels → client, through one writer.
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    let mut outbound = Vec::new();
    let mut pumps = Vec::new();
    for &ch in &spec.outbound {
        let (ours, theirs) = tokio::io::duplex(CHUNK);
        outbound.push((ch, theirs));
        let tx = tx.clone();
        pumps.push(tokio::spawn(pump_out(ch, ours, framing, tx)));
    }
    let greeting: Vec<Message> = spec
        .greeting
        .iter()
        .map(|(ch, data)| encode(*ch, data, framing))
        .collect();
    drop(tx);
    let writer_closer = closer.clone();
    let finished = tokio::spawn(async move {
        let mut sink = sink;
        let mut ok = true;
        for m in greeting {
            if sink.send(m).await.is_err() {
                ok = false;
                break;
            }
        }
        while ok && let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                ok = false;
                break;
            }
            // Batch what is already queued into one flush.
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    ok = false;
                    break;
                }
            }
            if ok && sink.flush().await.is_err() {
                ok = false;
            }
        }
        if ok {
            let _ = sink
                .send(Message::Close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                })))
                .await;
        }
        let _ = sink.close().await;
        for p in pumps {
            p.abort();
        }
        writer_closer.close();
    });

    Channels {
        inbound,
        outbound,
        closed,
        finished,
    }
}

async fn pump_out(ch: u8, mut from: DuplexStream, framing: Framing, tx: mpsc::Sender<Message>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if tx.send(encode(ch, &buf[..n], framing)).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn encode(ch: u8, data: &[u8], framing: Framing) -> Message {
    if framing.base64 {
        let mut text = String::with_capacity(1 + data.len().div_ceil(3) * 4);
        text.push(char::from(b'0' + ch));
        base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
        Message::Text(text.into())
    } else {
        let mut b = BytesMut::with_capacity(1 + data.len());
        b.put_u8(ch);
        b.put_slice(data);
        Message::Binary(b.freeze())
    }
}

fn decode_base64(text: &str) -> Option<Bytes> {
    let (first, rest) = text.as_bytes().split_first()?;
    let ch = first.checked_sub(b'0').filter(|c| *c <= 9)?;
    let mut out = vec![ch];
    base64::engine::general_purpose::STANDARD
        .decode_vec(rest, &mut out)
        .ok()?;
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_takes_the_clients_first_supported_protocol() {
        let supported = ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"];
        assert_eq!(
            negotiate(&["v5.channel.k8s.io", "v4.channel.k8s.io"], &supported),
            Some("v5.channel.k8s.io")
        );
        assert_eq!(
            negotiate(&["x", "v4.channel.k8s.io"], &supported),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(negotiate(&[], &supported), Some(""));
        assert_eq!(negotiate(&["x"], &supported), None);
    }

    #[test]
    fn base64_framing_round_trips() {
        let framing = Framing {
            base64: true,
            close_signal: false,
        };
        let Message::Text(t) = encode(2, b"hello\0\xff", framing) else {
            panic!("base64 framing sends text")
        };
        assert!(t.as_str().starts_with('2'));
        assert_eq!(
            decode_base64(t.as_str()).unwrap().as_ref(),
            b"\x02hello\0\xff"
        );
        assert!(decode_base64("x").is_none());
        assert!(decode_base64("1!!").is_none());
    }
}
