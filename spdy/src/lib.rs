//! SPDY/3.1 framing and sessions, as Kubernetes' streaming protocols use
//! them (remotecommand and portforward over an HTTP/1.1 upgrade).
//!
//! [`frame`] is the wire format; [`session`] multiplexes async streams over
//! one transport in either role. The peers that matter are Go's
//! `moby/spdystream` (kubectl, crictl, client-go), so behaviour follows what
//! it does where it differs from the draft (see [`session`] on flow control).
//!
//! ```
//! use berth_spdy::{Config, Connection, Headers};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! let (a, b) = tokio::io::duplex(64 * 1024); // normally the upgraded HTTP connection
//! let (_server, mut incoming) = Connection::server(a, Config { auto_reply: true, ..Config::default() });
//! tokio::spawn(async move {
//!     while let Some(mut s) = incoming.accept().await {
//!         let kind = s.headers().get("streamtype").unwrap_or("").to_string();
//!         tokio::spawn(async move { s.write_all(kind.as_bytes()).await?; s.shutdown().await });
//!     }
//! });
//! let client = Connection::client(b, Config::default());
//! let mut s = client.open(Headers::new().with("streamtype", "stdout"), false)?;
//! s.wait_reply().await?;
//! let mut got = String::new();
//! s.read_to_string(&mut got).await?;
//! assert_eq!(got, "stdout");
//! # Ok(()) }
//! ```

mod dictionary;
pub mod frame;
pub mod session;

pub use frame::{Frame, FrameDecoder, FrameError, HeaderCompressor, HeaderDecompressor, Headers};
pub use session::{Config, Connection, Incoming, RecvStream, SendStream, Stream};
