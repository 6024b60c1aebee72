//! berth-proto: the messages berthd and berth-shim exchange, and the framing
//! that carries them (a 4-byte big-endian length, then protobuf bytes).
//!
//! The framing is blocking `std::io` on purpose: the shim has no async
//! runtime. berthd calls it from a blocking task.

use std::io::{Read, Write};

use prost::Message;

/// Generated from `proto/shim.proto`.
pub mod shim {
    include!(concat!(env!("OUT_DIR"), "/berth.shim.v1.rs"));
}

/// Frames larger than this are refused: no legitimate message comes close,
/// and a corrupt length must not make either side allocate gigabytes.
pub const MAX_FRAME_LEN: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("peer closed the connection")]
    Closed,
}

/// Writes one framed message.
pub fn write_frame<M: Message>(w: &mut impl Write, msg: &M) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(4 + len);
    buf.extend_from_slice(&(len as u32).to_be_bytes());
    msg.encode(&mut buf).expect("vec has capacity");
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// The body length a frame header announces, refused beyond
/// [`MAX_FRAME_LEN`] (for readers other than [`read_frame`], e.g. async).
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Reads one framed message; `Closed` when the peer hung up between frames.
pub fn read_frame<M: Message + Default>(r: &mut impl Read) -> Result<M, FrameError> {
    let mut len_buf = [0u8; 4];
    if let Err(e) = r.read_exact(&mut len_buf) {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Closed
        } else {
            e.into()
        });
    }
    let len = frame_len(len_buf)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(M::decode(body.as_slice())?)
}

/// Attach output frames (after `AttachStarted`): `[u8 stream][u32 BE
/// length][bytes]`.
pub mod output {
    /// Stream byte of stdout (and of a tty's output).
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    /// Header: stream byte + length.
    pub const HEADER_LEN: usize = 5;
    /// No frame the shim sends is longer than this (it reads 16 KiB chunks).
    pub const MAX_CHUNK: usize = 1 << 20;

    /// Appends one frame to `out`.
    pub fn encode(stream: u8, data: &[u8], out: &mut Vec<u8>) {
        out.reserve(HEADER_LEN + data.len());
        out.push(stream);
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }

    #[derive(Debug, PartialEq, Eq, thiserror::Error)]
    pub enum OutputError {
        #[error("unknown output stream {0}")]
        BadStream(u8),
        #[error("output frame of {0} bytes exceeds the limit")]
        TooLarge(usize),
    }

    /// Incremental decoder over bytes as they arrive (sync or async).
    #[derive(Debug, Default)]
    pub struct Decoder {
        buf: Vec<u8>,
        pos: usize,
    }

    impl Decoder {
        pub fn new() -> Self {
            Self::default()
        }

        /// Adds received bytes.
        pub fn push(&mut self, data: &[u8]) {
            if self.pos > 0 && self.pos == self.buf.len() {
                self.buf.clear();
                self.pos = 0;
            } else if self.pos > 64 * 1024 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            self.buf.extend_from_slice(data);
        }

        /// The next whole frame, if buffered: (stream, bytes).
        pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, OutputError> {
            let rest = &self.buf[self.pos..];
            if rest.len() < HEADER_LEN {
                return Ok(None);
            }
            let stream = rest[0];
            if stream != STDOUT && stream != STDERR {
                return Err(OutputError::BadStream(stream));
            }
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len > MAX_CHUNK {
                return Err(OutputError::TooLarge(len));
            }
            if rest.len() < HEADER_LEN + len {
                return Ok(None);
            }
            let data = rest[HEADER_LEN..HEADER_LEN + len].to_vec();
            self.pos += HEADER_LEN + len;
            Ok(Some((stream, data)))
        }

        /// Bytes of an unfinished frame are buffered (EOF now is truncation).
        pub fn has_partial(&self) -> bool {
            self.pos < self.buf.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::shim::*;
    use super::*;

    #[test]
    fn output_frames_decode_across_splits() {
        let mut bytes = Vec::new();
        output::encode(output::STDOUT, b"hello", &mut bytes);
        output::encode(output::STDERR, b"", &mut bytes);
        output::encode(output::STDERR, b"err\n", &mut bytes);
        let mut d = output::Decoder::new();
        let mut got = Vec::new();
        for b in &bytes {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert!(!d.has_partial());
        assert_eq!(
            got,
            vec![
                (output::STDOUT, b"hello".to_vec()),
                (output::STDERR, vec![]),
                (output::STDERR, b"err\n".to_vec())
            ]
        );
        d.push(&[9, 0, 0, 0, 0]);
        assert_eq!(d.next_frame(), Err(output::OutputError::BadStream(9)));
    }

    #[test]
    fn request_round_trips_through_a_stream() {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let req = ShimRequest {
            request: Some(shim_request::Request::Kill(KillRequest {
                signal: 15,
                all: true,
            })),
        };
        write_frame(&mut a, &req).unwrap();
        write_frame(
            &mut a,
            &ShimRequest {
                request: Some(shim_request::Request::Start(StartRequest {})),
            },
        )
        .unwrap();
        drop(a);
        assert_eq!(read_frame::<ShimRequest>(&mut b).unwrap(), req);
        assert!(matches!(
            read_frame::<ShimRequest>(&mut b).unwrap().request,
            Some(shim_request::Request::Start(_))
        ));
        assert!(matches!(
            read_frame::<ShimRequest>(&mut b),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn oversized_length_is_refused_without_allocating() {
        let mut input: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame::<ShimResponse>(&mut input),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn truncated_body_is_an_error() {
        let mut input: &[u8] = &[0, 0, 0, 10, 1, 2];
        assert!(read_frame::<ShimResponse>(&mut input).is_err());
    }
}
