//! SPDY/3 framing: the frame types, their wire encoding and an incremental
//! decoder.
//!
//! Layouts follow the SPDY draft 3 specification (section 2.2 ff.): every
//! frame has an 8-byte header whose first bit tells control frames (version,
//! type, flags, 24-bit length) from data frames (31-bit stream id, flags,
//! 24-bit length). Header blocks are a 32-bit pair count followed by 32-bit
//! length-prefixed names and values, zlib-compressed with the SPDY/3
//! dictionary on one stream per direction, each block ending with a sync
//! flush. This is also what Go's `moby/spdystream/spdy` framer writes.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::dictionary::HEADER_DICTIONARY;

/// The protocol version carried in control frames.
pub const VERSION: u16 = 3;

/// Largest length a frame header can express (24 bits).
pub const MAX_FRAME_LEN: usize = (1 << 24) - 1;

/// Control frame type codes.
pub mod kind {
    pub const SYN_STREAM: u16 = 1;
    pub const SYN_REPLY: u16 = 2;
    pub const RST_STREAM: u16 = 3;
    pub const SETTINGS: u16 = 4;
    pub const PING: u16 = 6;
    pub const GOAWAY: u16 = 7;
    pub const HEADERS: u16 = 8;
    pub const WINDOW_UPDATE: u16 = 9;
}

/// RST_STREAM status codes (SPDY/3 section 2.4.2).
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const UNSUPPORTED_VERSION: u32 = 4;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
    pub const FLOW_CONTROL_ERROR: u32 = 7;
    pub const STREAM_IN_USE: u32 = 8;
    pub const STREAM_ALREADY_CLOSED: u32 = 9;
    pub const FRAME_TOO_LARGE: u32 = 11;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// SETTINGS ids used by this crate.
pub mod setting {
    pub const MAX_CONCURRENT_STREAMS: u32 = 4;
    pub const INITIAL_WINDOW_SIZE: u32 = 7;
}

const FLAG_FIN: u8 = 0x01;
const FLAG_UNIDIRECTIONAL: u8 = 0x02;
const FLAG_CLEAR_SETTINGS: u8 = 0x01;

/// An ordered list of header name/value pairs.
///
/// Names are lowercase on the wire; [`Headers::insert`] and the encoder
/// lowercase them. SPDY carries multiple values of one name NUL-separated in
/// a single value; the decoder splits them into repeated entries and the
/// encoder joins repeated names again, as Go's `http.Header` handling does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    /// An empty header list.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Appends a pair, lowercasing the name.
    pub fn insert(&mut self, name: &str, value: impl Into<String>) {
        self.0.push((name.to_ascii_lowercase(), value.into()));
    }

    /// Builder-style [`Headers::insert`].
    pub fn with(mut self, name: &str, value: impl Into<String>) -> Self {
        self.insert(name, value);
        self
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Iterates over the pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<N: AsRef<str>, V: Into<String>> FromIterator<(N, V)> for Headers {
    fn from_iter<T: IntoIterator<Item = (N, V)>>(iter: T) -> Self {
        let mut h = Headers::new();
        for (n, v) in iter {
            h.insert(n.as_ref(), v);
        }
        h
    }
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    /// Per-entry flags (PERSIST_VALUE 0x1, PERSISTED 0x2).
    pub flags: u8,
    /// 24-bit setting id.
    pub id: u32,
    pub value: u32,
}

/// A decoded SPDY/3 frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        fin: bool,
        data: Bytes,
    },
    SynStream {
        stream_id: u32,
        associated_to: u32,
        /// 3-bit priority, 0 is highest.
        priority: u8,
        slot: u8,
        fin: bool,
        unidirectional: bool,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        clear: bool,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        fin: bool,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
}

/// Why a byte stream is not valid SPDY/3. Every variant is a connection
/// error: the shared zlib state or the framing is lost.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("unsupported SPDY version {0}")]
    UnsupportedVersion(u16),
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    #[error("invalid length {len} for control frame type {kind}")]
    InvalidLength { kind: u16, len: usize },
    #[error("stream id 0 is not allowed in this frame")]
    ZeroStreamId,
    #[error("header block: {0}")]
    HeaderBlock(&'static str),
    #[error("decompressed header block exceeds {0} bytes")]
    HeaderBlockTooLarge(usize),
    #[error("header compression: {0}")]
    Compression(String),
    #[error("frame field out of range: {0}")]
    Invalid(&'static str),
}

/// Outgoing header compression state (one per connection direction).
pub struct HeaderCompressor {
    z: Compress,
    plain: BytesMut,
    packed: Vec<u8>,
}

impl Default for HeaderCompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderCompressor {
    pub fn new() -> Self {
        let mut z = Compress::new(Compression::default(), true);
        z.set_dictionary(HEADER_DICTIONARY)
            .expect("setting the zlib dictionary on a fresh stream cannot fail");
        Self {
            z,
            plain: BytesMut::new(),
            packed: Vec::new(),
        }
    }

    /// Serializes and compresses `headers`, appending the compressed block
    /// (ending in a sync flush, so the peer can inflate it at once) to `out`.
    fn compress(&mut self, headers: &Headers, out: &mut BytesMut) -> Result<(), FrameError> {
        self.plain.clear();
        write_header_block(headers, &mut self.plain);
        self.packed.clear();
        let mut input: &[u8] = &self.plain;
        loop {
            self.packed.reserve(input.len() + 64);
            let before = self.z.total_in();
            self.z
                .compress_vec(input, &mut self.packed, FlushCompress::Sync)
                .map_err(|e| FrameError::Compression(e.to_string()))?;
            input = &input[(self.z.total_in() - before) as usize..];
            // Space left over means the sync flush completed.
            if input.is_empty() && self.packed.len() < self.packed.capacity() {
                break;
            }
        }
        out.extend_from_slice(&self.packed);
        Ok(())
    }
}

/// Incoming header decompression state (one per connection direction).
pub struct HeaderDecompressor {
    z: Decompress,
    out: Vec<u8>,
}

impl Default for HeaderDecompressor {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderDecompressor {
    pub fn new() -> Self {
        Self {
            z: Decompress::new(true),
            out: Vec::new(),
        }
    }

    /// Inflates one compressed block, refusing to produce (much) more than
    /// `limit` bytes: the output buffer grows in steps and is checked after
    /// each, so a zlib bomb costs at most about twice the limit.
    fn decompress(&mut self, mut input: &[u8], limit: usize) -> Result<&[u8], FrameError> {
        self.out.clear();
        loop {
            if self.out.len() > limit {
                return Err(FrameError::HeaderBlockTooLarge(limit));
            }
            if self.out.len() == self.out.capacity() {
                self.out.reserve(4096.min(limit + 1 - self.out.len()));
            }
            let before_in = self.z.total_in();
            let before_out = self.out.len();
            let res = self
                .z
                .decompress_vec(input, &mut self.out, FlushDecompress::Sync);
            let consumed = (self.z.total_in() - before_in) as usize;
            let produced = self.out.len() - before_out;
            input = &input[consumed..];
            match res {
                Ok(Status::StreamEnd) => {
                    // The header stream never ends in SPDY.
                    return Err(FrameError::Compression(
                        "unexpected end of zlib stream".into(),
                    ));
                }
                Ok(_) => {
                    let spare = self.out.len() < self.out.capacity();
                    if input.is_empty() && spare {
                        break;
                    }
                    if consumed == 0 && produced == 0 && spare {
                        return Err(FrameError::Compression("inflate made no progress".into()));
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z
                        .set_dictionary(HEADER_DICTIONARY)
                        .map_err(|e| FrameError::Compression(e.to_string()))?;
                }
                Err(e) => return Err(FrameError::Compression(e.to_string())),
            }
        }
        if self.out.len() > limit {
            return Err(FrameError::HeaderBlockTooLarge(limit));
        }
        Ok(&self.out)
    }
}

fn write_header_block(headers: &Headers, out: &mut BytesMut) {
    // Join repeated names with NUL, keeping first-occurrence order.
    let mut merged: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, value) in headers.iter() {
        let name = name.to_ascii_lowercase();
        if let Some((_, v)) = merged.iter_mut().find(|(n, _)| *n == name) {
            v.push('\0');
            v.push_str(value);
        } else {
            merged.push((name, value.to_string()));
        }
    }
    out.put_u32(merged.len() as u32);
    for (n, v) in &merged {
        out.put_u32(n.len() as u32);
        out.put_slice(n.as_bytes());
        out.put_u32(v.len() as u32);
        out.put_slice(v.as_bytes());
    }
}

fn parse_header_block(mut b: &[u8]) -> Result<Headers, FrameError> {
    if b.len() < 4 {
        return Err(FrameError::HeaderBlock("truncated pair count"));
    }
    let n = b.get_u32() as usize;
    // Each pair needs at least 8 bytes: bounds the count before allocating.
    if n > b.len() / 8 {
        return Err(FrameError::HeaderBlock("pair count exceeds block"));
    }
    let mut h = Headers(Vec::with_capacity(n));
    let take = |b: &mut &[u8]| -> Result<String, FrameError> {
        if b.len() < 4 {
            return Err(FrameError::HeaderBlock("truncated length"));
        }
        let len = b.get_u32() as usize;
        if len > b.len() {
            return Err(FrameError::HeaderBlock("string exceeds block"));
        }
        let s = String::from_utf8_lossy(&b[..len]).into_owned();
        b.advance(len);
        Ok(s)
    };
    for _ in 0..n {
        let name = take(&mut b)?;
        if name.is_empty() {
            return Err(FrameError::HeaderBlock("empty header name"));
        }
        let value = take(&mut b)?;
        let name = name.to_ascii_lowercase();
        if value.contains('\0') {
            for v in value.split('\0') {
                h.0.push((name.clone(), v.to_string()));
            }
        } else {
            h.0.push((name, value));
        }
    }
    if !b.is_empty() {
        return Err(FrameError::HeaderBlock("trailing bytes"));
    }
    Ok(h)
}

fn put_control_header(out: &mut BytesMut, kind: u16, flags: u8, len: usize) {
    out.put_u16(0x8000 | VERSION);
    out.put_u16(kind);
    out.put_u32(((flags as u32) << 24) | (len as u32 & 0x00ff_ffff));
}

/// Writes a DATA frame header; the caller appends `len` payload bytes.
pub fn encode_data_header(stream_id: u32, fin: bool, len: usize, out: &mut BytesMut) {
    debug_assert!(len <= MAX_FRAME_LEN);
    out.put_u32(stream_id & 0x7fff_ffff);
    out.put_u32(((if fin { FLAG_FIN } else { 0 } as u32) << 24) | len as u32);
}

fn flag(b: bool, f: u8) -> u8 {
    if b { f } else { 0 }
}

/// Appends the wire form of `frame` to `out`, compressing any header block
/// with `hc`.
pub fn encode(
    frame: &Frame,
    hc: &mut HeaderCompressor,
    out: &mut BytesMut,
) -> Result<(), FrameError> {
    match frame {
        Frame::Data {
            stream_id,
            fin,
            data,
        } => {
            if data.len() > MAX_FRAME_LEN {
                return Err(FrameError::FrameTooLarge(data.len()));
            }
            if *stream_id == 0 {
                return Err(FrameError::ZeroStreamId);
            }
            encode_data_header(*stream_id, *fin, data.len(), out);
            out.put_slice(data);
        }
        Frame::SynStream {
            stream_id,
            associated_to,
            priority,
            slot,
            fin,
            unidirectional,
            headers,
        } => {
            let start = out.len();
            put_control_header(out, kind::SYN_STREAM, 0, 0);
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32(associated_to & 0x7fff_ffff);
            out.put_u8((priority & 0x7) << 5);
            out.put_u8(*slot);
            hc.compress(headers, out)?;
            let flags = flag(*fin, FLAG_FIN) | flag(*unidirectional, FLAG_UNIDIRECTIONAL);
            patch_len(out, start, flags)?;
        }
        Frame::SynReply {
            stream_id,
            fin,
            headers,
        }
        | Frame::Headers {
            stream_id,
            fin,
            headers,
        } => {
            let k = if matches!(frame, Frame::SynReply { .. }) {
                kind::SYN_REPLY
            } else {
                kind::HEADERS
            };
            let start = out.len();
            put_control_header(out, k, 0, 0);
            out.put_u32(stream_id & 0x7fff_ffff);
            hc.compress(headers, out)?;
            patch_len(out, start, flag(*fin, FLAG_FIN))?;
        }
        Frame::RstStream { stream_id, status } => {
            put_control_header(out, kind::RST_STREAM, 0, 8);
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32(*status);
        }
        Frame::Settings { clear, entries } => {
            let len = 4 + 8 * entries.len();
            if len > MAX_FRAME_LEN {
                return Err(FrameError::FrameTooLarge(len));
            }
            put_control_header(out, kind::SETTINGS, flag(*clear, FLAG_CLEAR_SETTINGS), len);
            out.put_u32(entries.len() as u32);
            for s in entries {
                out.put_u32(((s.flags as u32) << 24) | (s.id & 0x00ff_ffff));
                out.put_u32(s.value);
            }
        }
        Frame::Ping { id } => {
            put_control_header(out, kind::PING, 0, 4);
            out.put_u32(*id);
        }
        Frame::GoAway {
            last_good_stream_id,
            status,
        } => {
            put_control_header(out, kind::GOAWAY, 0, 8);
            out.put_u32(last_good_stream_id & 0x7fff_ffff);
            out.put_u32(*status);
        }
        Frame::WindowUpdate { stream_id, delta } => {
            put_control_header(out, kind::WINDOW_UPDATE, 0, 8);
            out.put_u32(stream_id & 0x7fff_ffff);
            out.put_u32(delta & 0x7fff_ffff);
        }
    }
    Ok(())
}

fn patch_len(out: &mut BytesMut, start: usize, flags: u8) -> Result<(), FrameError> {
    let len = out.len() - start - 8;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(FrameError::FrameTooLarge(len));
    }
    let word = ((flags as u32) << 24) | len as u32;
    out[start + 4..start + 8].copy_from_slice(&word.to_be_bytes());
    Ok(())
}

/// Incremental frame decoder with size limits.
///
/// Feed it the connection's read buffer; it consumes whole frames only and
/// leaves partial input in place. Unknown control frame types are skipped
/// (as the spec asks) without buffering their payload.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    max_frame_len: usize,
    max_header_block: usize,
    skip: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN, 1 << 20)
    }
}

impl FrameDecoder {
    /// `max_frame_len` bounds any frame payload (≤ 16 MiB by the format);
    /// `max_header_block` bounds a decompressed header block.
    pub fn new(max_frame_len: usize, max_header_block: usize) -> Self {
        Self {
            max_frame_len: max_frame_len.min(MAX_FRAME_LEN),
            max_header_block,
            skip: 0,
        }
    }

    /// Decodes the next complete frame from `buf`, or `Ok(None)` if more
    /// input is needed.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        hd: &mut HeaderDecompressor,
    ) -> Result<Option<Frame>, FrameError> {
        loop {
            if self.skip > 0 {
                let n = self.skip.min(buf.len());
                buf.advance(n);
                self.skip -= n;
                if self.skip > 0 {
                    return Ok(None);
                }
            }
            if buf.len() < 8 {
                return Ok(None);
            }
            let w0 = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
            let w1 = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
            let flags = (w1 >> 24) as u8;
            let len = (w1 & 0x00ff_ffff) as usize;
            if len > self.max_frame_len {
                return Err(FrameError::FrameTooLarge(len));
            }
            let control = w0 & 0x8000_0000 != 0;
            if control {
                let version = ((w0 >> 16) & 0x7fff) as u16;
                if version != VERSION {
                    return Err(FrameError::UnsupportedVersion(version));
                }
                let k = (w0 & 0xffff) as u16;
                if !(kind::SYN_STREAM..=kind::WINDOW_UPDATE).contains(&k) || k == 5 {
                    buf.advance(8);
                    self.skip = len;
                    continue;
                }
            }
            if buf.len() < 8 + len {
                buf.reserve(8 + len - buf.len());
                return Ok(None);
            }
            buf.advance(8);
            let payload = buf.split_to(len);
            if !control {
                let stream_id = w0 & 0x7fff_ffff;
                if stream_id == 0 {
                    return Err(FrameError::ZeroStreamId);
                }
                return Ok(Some(Frame::Data {
                    stream_id,
                    fin: flags & FLAG_FIN != 0,
                    data: payload.freeze(),
                }));
            }
            let k = (w0 & 0xffff) as u16;
            return self.control(k, flags, &payload, hd).map(Some);
        }
    }

    fn control(
        &self,
        k: u16,
        flags: u8,
        mut p: &[u8],
        hd: &mut HeaderDecompressor,
    ) -> Result<Frame, FrameError> {
        let len = p.len();
        let bad_len = || FrameError::InvalidLength { kind: k, len };
        let fin = flags & FLAG_FIN != 0;
        let sid = |v: u32| -> Result<u32, FrameError> {
            let v = v & 0x7fff_ffff;
            if v == 0 {
                Err(FrameError::ZeroStreamId)
            } else {
                Ok(v)
            }
        };
        Ok(match k {
            kind::SYN_STREAM => {
                if len < 10 {
                    return Err(bad_len());
                }
                let stream_id = sid(p.get_u32())?;
                let associated_to = p.get_u32() & 0x7fff_ffff;
                let priority = p.get_u8() >> 5;
                let slot = p.get_u8();
                let headers = parse_header_block(hd.decompress(p, self.max_header_block)?)?;
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    slot,
                    fin,
                    unidirectional: flags & FLAG_UNIDIRECTIONAL != 0,
                    headers,
                }
            }
            kind::SYN_REPLY | kind::HEADERS => {
                if len < 4 {
                    return Err(bad_len());
                }
                let stream_id = sid(p.get_u32())?;
                let headers = parse_header_block(hd.decompress(p, self.max_header_block)?)?;
                if k == kind::SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        fin,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        fin,
                        headers,
                    }
                }
            }
            kind::RST_STREAM => {
                if len != 8 {
                    return Err(bad_len());
                }
                let stream_id = sid(p.get_u32())?;
                Frame::RstStream {
                    stream_id,
                    status: p.get_u32(),
                }
            }
            kind::SETTINGS => {
                if len < 4 {
                    return Err(bad_len());
                }
                let n = p.get_u32() as usize;
                if n.checked_mul(8) != Some(p.len()) {
                    return Err(bad_len());
                }
                let entries = (0..n)
                    .map(|_| {
                        let w = p.get_u32();
                        Setting {
                            flags: (w >> 24) as u8,
                            id: w & 0x00ff_ffff,
                            value: p.get_u32(),
                        }
                    })
                    .collect();
                Frame::Settings {
                    clear: flags & FLAG_CLEAR_SETTINGS != 0,
                    entries,
                }
            }
            kind::PING => {
                if len != 4 {
                    return Err(bad_len());
                }
                Frame::Ping { id: p.get_u32() }
            }
            kind::GOAWAY => {
                if len != 8 {
                    return Err(bad_len());
                }
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & 0x7fff_ffff,
                    status: p.get_u32(),
                }
            }
            kind::WINDOW_UPDATE => {
                if len != 8 {
                    return Err(bad_len());
                }
                let stream_id = p.get_u32() & 0x7fff_ffff;
                let delta = p.get_u32() & 0x7fff_ffff;
                if delta == 0 {
                    return Err(FrameError::Invalid("zero window delta"));
                }
                Frame::WindowUpdate { stream_id, delta }
            }
            _ => unreachable!("unknown types are skipped before"),
        })
    }
}
