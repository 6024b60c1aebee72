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
    let len = u32::from_be_bytes(len_buf) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(M::decode(body.as_slice())?)
}

#[cfg(test)]
mod tests {
    use super::shim::*;
    use super::*;

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
