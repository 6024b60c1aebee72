//! One control connection on `shim.sock`: non-blocking, framed
//! (4-byte big-endian length + protobuf, as `berth_proto::write_frame`),
//! one request in flight at a time, any number of requests per connection.
//! A streaming request turns the connection into a [`Session`]: no more
//! requests are parsed (input is discarded; EOF ends an exec session; on an
//! attach session it ends the client's stdin, and hanging up ends it).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use berth_proto::MAX_FRAME_LEN;
use berth_proto::shim::{ShimRequest, ShimResponse};
use prost::Message;

use crate::sys;

/// What a connection is after a streaming request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Session {
    /// Plain request/response.
    None,
    /// An ExecStream session for the exec with this id.
    Exec(u64),
    /// An attach session; `stdin`: it was granted the container's stdin.
    Attach { stdin: bool },
}

#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub fd: OwnedFd,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    out_pos: usize,
    /// A request is being handled; its answer is not sent yet.
    pub busy: bool,
    /// The peer closed its side (or broke the protocol).
    pub eof: bool,
    /// The peer hung up entirely (POLLHUP), not only its writing side.
    pub hup: bool,
    pub broken: bool,
    pub session: Session,
    /// Close once everything queued is written (end of a session).
    pub close_when_flushed: bool,
    /// Fds to pass with the byte at `fds_at` of `outbuf` (SCM_RIGHTS).
    fds: Vec<OwnedFd>,
    fds_at: usize,
}

/// Outcome of parsing the input buffer.
pub enum Parsed {
    Request(ShimRequest),
    Incomplete,
    Bad(String),
}

impl Conn {
    pub fn new(id: u64, fd: OwnedFd) -> Self {
        Conn {
            id,
            fd,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            out_pos: 0,
            busy: false,
            eof: false,
            hup: false,
            broken: false,
            session: Session::None,
            close_when_flushed: false,
            fds: Vec::new(),
            fds_at: 0,
        }
    }

    /// Bytes queued and not yet written.
    pub fn queued(&self) -> usize {
        self.outbuf.len() - self.out_pos
    }

    pub fn wants_write(&self) -> bool {
        self.out_pos < self.outbuf.len()
    }

    /// Reads what is available.
    pub fn fill(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            match sys::read(self.fd.as_raw_fd(), &mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return;
                }
                Ok(_) if self.session != Session::None => {}
                Ok(n) => {
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    if self.inbuf.len() > MAX_FRAME_LEN + 4 {
                        // More than one maximal frame queued: stop reading
                        // until it is consumed.
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.broken = true;
                    return;
                }
            }
        }
    }

    pub fn next_request(&mut self) -> Parsed {
        if self.inbuf.len() < 4 {
            return Parsed::Incomplete;
        }
        let len = u32::from_be_bytes([self.inbuf[0], self.inbuf[1], self.inbuf[2], self.inbuf[3]])
            as usize;
        if len > MAX_FRAME_LEN {
            return Parsed::Bad(format!("frame of {len} bytes exceeds the limit"));
        }
        if self.inbuf.len() < 4 + len {
            return Parsed::Incomplete;
        }
        let decoded = ShimRequest::decode(&self.inbuf[4..4 + len]);
        self.inbuf.drain(..4 + len);
        if self.inbuf.is_empty() && self.inbuf.capacity() > 64 * 1024 {
            self.inbuf = Vec::new();
        }
        match decoded {
            Ok(req) => Parsed::Request(req),
            Err(e) => Parsed::Bad(format!("malformed request: {e}")),
        }
    }

    /// Queues a framed response and tries to send it.
    pub fn send(&mut self, resp: &ShimResponse) {
        self.send_with_fds(resp, Vec::new());
    }

    /// Queues a framed response whose first byte carries `fds`
    /// (SCM_RIGHTS); they are closed here once sent, or with the connection.
    pub fn send_with_fds(&mut self, resp: &ShimResponse, fds: Vec<OwnedFd>) {
        if !fds.is_empty() {
            debug_assert!(self.fds.is_empty(), "one fd-carrying frame at a time");
            self.fds = fds;
            self.fds_at = self.outbuf.len();
        }
        let len = resp.encoded_len();
        self.outbuf.reserve(4 + len);
        self.outbuf.extend_from_slice(&(len as u32).to_be_bytes());
        resp.encode(&mut self.outbuf).expect("vec grows");
        self.busy = false;
        self.flush();
    }

    /// Queues raw bytes (attach output frames) and tries to send them.
    pub fn send_raw(&mut self, data: &[u8]) {
        if self.out_pos > 64 * 1024 && self.out_pos * 2 > self.outbuf.len() && self.fds.is_empty() {
            self.outbuf.drain(..self.out_pos);
            self.out_pos = 0;
        }
        self.outbuf.extend_from_slice(data);
        self.flush();
    }

    /// Writes what the socket accepts now.
    pub fn flush(&mut self) {
        while self.out_pos < self.outbuf.len() {
            let written = if !self.fds.is_empty() && self.out_pos == self.fds_at {
                let raw: Vec<i32> = self.fds.iter().map(|f| f.as_raw_fd()).collect();
                let r = sys::send_with_fds(self.fd.as_raw_fd(), &self.outbuf[self.out_pos..], &raw);
                if r.is_ok() {
                    // Passed: the shim keeps no copy.
                    self.fds.clear();
                }
                r
            } else {
                let end = if self.fds.is_empty() || self.fds_at < self.out_pos {
                    self.outbuf.len()
                } else {
                    self.fds_at
                };
                sys::write(self.fd.as_raw_fd(), &self.outbuf[self.out_pos..end])
            };
            match written {
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.broken = true;
                    return;
                }
            }
        }
        self.outbuf.clear();
        self.out_pos = 0;
        if self.outbuf.capacity() > 64 * 1024 {
            self.outbuf = Vec::new();
        }
    }

    /// Finished with: broken, or closed by the peer with nothing left to do.
    pub fn done(&self) -> bool {
        if self.broken || (self.close_when_flushed && !self.wants_write()) {
            return true;
        }
        if let Session::Attach { .. } = self.session {
            // An attach client that shuts down only its writing side has
            // ended its stdin and still reads output.
            return self.hup;
        }
        if self.session != Session::None {
            // The peer hanging up ends a session, whatever is queued.
            return self.eof;
        }
        self.eof && !self.busy && !self.wants_write() && !self.has_frame()
    }

    /// A whole frame (or a bad length) is buffered.
    fn has_frame(&self) -> bool {
        if self.inbuf.len() < 4 {
            return false;
        }
        let len = u32::from_be_bytes([self.inbuf[0], self.inbuf[1], self.inbuf[2], self.inbuf[3]])
            as usize;
        len > MAX_FRAME_LEN || self.inbuf.len() >= 4 + len
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    use berth_proto::shim::shim_request::Request;
    use berth_proto::shim::{KillRequest, StateRequest};

    use super::*;

    fn frame(req: &ShimRequest) -> Vec<u8> {
        let mut v = Vec::new();
        berth_proto::write_frame(&mut v, req).unwrap();
        v
    }

    #[test]
    fn parses_split_and_batched_frames() {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Conn::new(1, b.into());
        let kill = ShimRequest {
            request: Some(Request::Kill(KillRequest {
                signal: 9,
                all: true,
            })),
        };
        let state = ShimRequest {
            request: Some(Request::State(StateRequest {})),
        };
        let mut bytes = frame(&kill);
        bytes.extend(frame(&state));
        a.write_all(&bytes[..3]).unwrap();
        c.fill();
        assert!(matches!(c.next_request(), Parsed::Incomplete));
        a.write_all(&bytes[3..]).unwrap();
        c.fill();
        assert!(matches!(c.next_request(), Parsed::Request(r) if r == kill));
        assert!(matches!(c.next_request(), Parsed::Request(r) if r == state));
        assert!(matches!(c.next_request(), Parsed::Incomplete));
        assert!(!c.done());
        drop(a);
        c.fill();
        assert!(c.eof && c.done());
    }

    #[test]
    fn refuses_oversized_frames_and_answers() {
        let (mut a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let mut c = Conn::new(1, b.into());
        a.write_all(&[0xff, 0xff, 0xff, 0xff]).unwrap();
        c.fill();
        assert!(matches!(c.next_request(), Parsed::Bad(_)));
        c.busy = true;
        c.send(&ShimResponse::default());
        assert!(!c.busy && !c.wants_write());
        let resp: ShimResponse = berth_proto::read_frame(&mut a).unwrap();
        assert_eq!(resp, ShimResponse::default());
    }
}
