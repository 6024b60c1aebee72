//! Exec, attach and port-forward over SPDY/3.1 (kubelet's
//! `httpstream/spdy` protocol), directly after an HTTP upgrade or tunnelled
//! inside WebSocket binary messages.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use super::Server;
use super::tokens::Pending;

/// Serves one upgraded connection speaking SPDY with `protocol`.
pub async fn serve<I>(server: Arc<Server>, io: I, protocol: &'static str, pending: Pending)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _ = (server, io, protocol, pending);
    tracing::warn!("SPDY sessions are not wired yet");
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
