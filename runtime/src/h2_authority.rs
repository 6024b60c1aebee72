//! Lets every gRPC client talk to berthd's unix socket, whatever
//! `:authority` it sends.
//!
//! # Why
//!
//! gRPC over a unix socket has no host, and clients disagree on what to put
//! in the HTTP/2 `:authority` pseudo-header: grpc-go (kubelet, crictl) sends
//! `localhost`, grpc-core ≥ 1.57 (Python, C++, Ruby) the percent-escaped
//! socket path (`run%2Fberth%2Fberth.sock`), grpc-java and older grpcurl the
//! raw path. containerd and CRI-O (grpc-go servers) accept all of them.
//!
//! h2, under hyper and tonic, does not: `h2::server::Peer::convert_poll_message`
//! (h2 0.4.20, `src/server.rs`) parses `:authority` with
//! `http::uri::Authority::from_maybe_shared`, which refuses a `%` outside
//! userinfo or an IPv6 zone and any `/` (`validate_authority_bytes` in http
//! 1.5's `src/uri/authority.rs`), and answers with `RST_STREAM(PROTOCOL_ERROR)`
//! before hyper or tonic ever see the request. That is the client's
//! "Received RST_STREAM with error code 1".
//!
//! # Why at the bytes
//!
//! Nothing above h2 can help: the request dies inside h2. h2 0.4.20, http 1.5
//! and hyper 1.12 are the newest releases and none has a setting to relax the
//! check (the h2 change proposed for it, hyperium/h2#487, is unmerged), and a
//! patched fork of h2 would relax it for every h2 user in berthd and have to
//! be carried forever. So [`AuthorityFix`] sits between the unix connection
//! and h2 and rewrites, in the client's HEADERS frames, exactly the
//! `:authority` values h2 would refuse (same parser) to `localhost`, what
//! grpc-go sends on a unix socket. Everything else h2 still checks itself:
//! the rest of each header list reaches it unchanged, frames other than
//! HEADERS/CONTINUATION pass untouched, and whatever this adapter cannot
//! translate faithfully is handed to h2 so that h2 refuses it.
//!
//! # How
//!
//! Header blocks are HPACK-compressed with a dynamic table that the client's
//! encoder and h2's decoder keep in step, so the value can be a literal,
//! Huffman-coded, or an index into the table, and a block can span
//! CONTINUATION frames. The adapter decodes every block with its own copy of
//! the client's table. A block that needs no rewrite is passed on byte for
//! byte while h2's table is still the client's: connections from grpc-go
//! clients are never changed. The first rewritten block is re-encoded with
//! literals only (no table use), which leaves h2's table behind the
//! client's; from then on every block of that connection is re-encoded the
//! same way, so h2's table is never read again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The largest frame the CRI server accepts (SETTINGS_MAX_FRAME_SIZE):
/// `server::serve` passes it to tonic so the adapter and h2 agree. It is
/// also HTTP/2's smallest allowed value, so frames the adapter writes at
/// this size are legal whatever h2 advertises.
pub const MAX_FRAME_SIZE: u32 = 16_384;

/// The value a refused `:authority` is replaced with: what grpc-go, and
/// Kubernetes' own clients, send on a unix socket.
const REPLACEMENT_AUTHORITY: &str = "localhost";

/// The largest header block buffered for translation. h2 (with hyper's
/// 16 KiB header list limit, which berthd keeps) closes the connection
/// past 4 × 16 KiB of decoded headers, and Huffman coding at worst makes
/// that 3.75 times longer on the wire: every block h2 could accept fits.
const MAX_BLOCK: usize = 256 * 1024;

/// How much is read from the client at a time into the adapter's buffer.
const READ_CHUNK: usize = 32 * 1024;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEAD: usize = 9;

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A server-side connection whose incoming HEADERS frames have a
/// `:authority` h2 accepts. Writes pass straight through.
pub struct AuthorityFix<T> {
    io: T,
    fixer: Fixer,
    /// Read from the client, not yet processed.
    input: BytesMut,
    /// Processed, not yet read by h2.
    output: BytesMut,
    eof: bool,
}

impl<T> AuthorityFix<T> {
    pub fn new(io: T) -> Self {
        AuthorityFix {
            io,
            fixer: Fixer::new(),
            input: BytesMut::new(),
            output: BytesMut::new(),
            eof: false,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if !this.output.is_empty() {
                let n = buf.remaining().min(this.output.len());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Bytes that pass unchanged (DATA payloads, everything once the
            // adapter stepped aside) go straight into h2's buffer.
            if this.input.is_empty()
                && let Some(limit) = this.fixer.passthrough_len()
            {
                let dst = buf.initialize_unfilled_to(limit.min(buf.remaining()));
                let mut direct = ReadBuf::new(dst);
                ready!(Pin::new(&mut this.io).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                if n == 0 {
                    this.eof = true;
                    return Poll::Ready(Ok(()));
                }
                buf.advance(n);
                this.fixer.passed_through(n);
                return Poll::Ready(Ok(()));
            }
            let start = this.input.len();
            this.input.resize(start + READ_CHUNK, 0);
            let mut chunk = ReadBuf::new(&mut this.input[start..]);
            let read = Pin::new(&mut this.io).poll_read(cx, &mut chunk);
            let n = chunk.filled().len();
            this.input.truncate(start + n);
            ready!(read)?;
            if n == 0 {
                this.fixer.finish(&mut this.input, &mut this.output);
                this.eof = true;
            } else {
                this.fixer.process(&mut this.input, &mut this.output);
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// tonic takes the peer's credentials from the connection it serves.
impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<T>
{
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the client's connection preface.
    Preface,
    /// At the start of a frame.
    FrameHead,
    /// Inside a frame passed on unchanged; this many bytes of it are left.
    Payload(usize),
    /// The adapter stepped aside: everything goes to h2 as it comes.
    Verbatim,
}

/// A header block whose frames have not all arrived.
struct Pending {
    stream: u32,
    /// The HEADERS frame's flags.
    flags: u8,
    priority: Option<[u8; 5]>,
    /// The block itself: the frames' payloads without padding or priority.
    fragment: Vec<u8>,
    /// The frames as they came, to pass on when nothing needs changing.
    original: Vec<u8>,
}

/// Why the adapter stepped aside on a connection (for the debug log).
#[derive(Debug, thiserror::Error)]
enum GiveUp {
    #[error("the client did not open with the HTTP/2 preface")]
    NoPreface,
    #[error("a frame of type {0:#x} inside a header block")]
    Interleaved(u8),
    #[error("a CONTINUATION frame that continues no header block")]
    StrayContinuation,
    #[error("a PUSH_PROMISE frame from the client")]
    PushPromise,
    #[error("a header frame of {0} bytes, over the {MAX_FRAME_SIZE} allowed")]
    FrameTooLarge(usize),
    #[error("a HEADERS frame whose padding or priority does not fit")]
    BadHeadersFrame,
    #[error("a header block over {MAX_BLOCK} bytes")]
    BlockTooLarge,
    #[error("a header block HPACK cannot decode: {0}")]
    Hpack(#[from] hpack::DecodeError),
}

/// The frame-level state machine over the bytes the client sends.
struct Fixer {
    state: State,
    /// The client's HPACK encoder table, as this adapter sees it.
    decoder: hpack::Decoder,
    /// Whether h2's HPACK table no longer matches the client's (a block was
    /// re-encoded): from then on no block may reach h2 unchanged.
    diverged: bool,
    pending: Option<Pending>,
}

impl Fixer {
    fn new() -> Self {
        Fixer {
            state: State::Preface,
            decoder: hpack::Decoder::new(),
            diverged: false,
            pending: None,
        }
    }

    /// How many bytes may go to h2 unprocessed, if any.
    fn passthrough_len(&self) -> Option<usize> {
        match self.state {
            State::Payload(left) => Some(left),
            State::Verbatim => Some(usize::MAX),
            State::Preface | State::FrameHead => None,
        }
    }

    fn passed_through(&mut self, n: usize) {
        if let State::Payload(left) = self.state {
            self.state = if left == n {
                State::FrameHead
            } else {
                State::Payload(left - n)
            };
        }
    }

    /// Moves what can be decided of `input` to `output`.
    fn process(&mut self, input: &mut BytesMut, output: &mut BytesMut) {
        loop {
            match self.state {
                State::Verbatim => {
                    output.extend_from_slice(&input.split());
                    return;
                }
                State::Preface => {
                    let n = input.len().min(PREFACE.len());
                    if input[..n] != PREFACE[..n] {
                        self.give_up(GiveUp::NoPreface, output);
                        continue;
                    }
                    if n < PREFACE.len() {
                        return;
                    }
                    output.extend_from_slice(&input.split_to(n));
                    self.state = State::FrameHead;
                }
                State::Payload(left) => {
                    if input.is_empty() {
                        return;
                    }
                    let n = left.min(input.len());
                    output.extend_from_slice(&input.split_to(n));
                    self.passed_through(n);
                }
                State::FrameHead => {
                    if input.len() < FRAME_HEAD {
                        return;
                    }
                    let len = u32::from_be_bytes([0, input[0], input[1], input[2]]) as usize;
                    let kind = input[3];
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.pending.is_some() {
                            self.give_up(GiveUp::Interleaved(kind), output);
                        } else if kind == PUSH_PROMISE {
                            self.give_up(GiveUp::PushPromise, output);
                        } else {
                            self.state = State::Payload(FRAME_HEAD + len);
                        }
                        continue;
                    }
                    if len > MAX_FRAME_SIZE as usize {
                        self.give_up(GiveUp::FrameTooLarge(len), output);
                        continue;
                    }
                    if input.len() < FRAME_HEAD + len {
                        return;
                    }
                    let frame = input.split_to(FRAME_HEAD + len);
                    self.header_frame(&frame, output);
                }
            }
        }
    }

    /// The client closed its side: what is left goes to h2, which sees the
    /// same truncated stream it would have seen.
    fn finish(&mut self, input: &mut BytesMut, output: &mut BytesMut) {
        if let Some(pending) = self.pending.take()
            && !self.diverged
        {
            output.extend_from_slice(&pending.original);
        }
        output.extend_from_slice(&input.split());
        self.state = State::Verbatim;
    }

    /// Takes in one HEADERS or CONTINUATION frame, and passes its block on
    /// once the block is complete.
    fn header_frame(&mut self, frame: &[u8], output: &mut BytesMut) {
        if let Err(why) = self.absorb(frame) {
            // The frame goes on to h2 after what was pending, for h2 to
            // refuse.
            self.give_up(why, output);
            output.extend_from_slice(frame);
            return;
        }
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.fragment.len() > MAX_BLOCK)
        {
            self.give_up(GiveUp::BlockTooLarge, output);
            return;
        }
        if frame[4] & END_HEADERS != 0 {
            let pending = self.pending.take().expect("a block is pending");
            if let Err(why) = self.block(&pending, output) {
                self.pending = Some(pending);
                self.give_up(why, output);
            }
        }
    }

    /// Adds a HEADERS or CONTINUATION frame to the pending block.
    fn absorb(&mut self, frame: &[u8]) -> Result<(), GiveUp> {
        let kind = frame[3];
        let flags = frame[4];
        let stream = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let payload = &frame[FRAME_HEAD..];
        if kind == HEADERS {
            if self.pending.is_some() {
                return Err(GiveUp::Interleaved(kind));
            }
            let (priority, fragment) =
                headers_fragment(flags, payload).ok_or(GiveUp::BadHeadersFrame)?;
            self.pending = Some(Pending {
                stream,
                flags,
                priority,
                fragment: fragment.to_vec(),
                original: frame.to_vec(),
            });
            return Ok(());
        }
        match &mut self.pending {
            Some(pending) if pending.stream == stream => {
                pending.fragment.extend_from_slice(payload);
                pending.original.extend_from_slice(frame);
                Ok(())
            }
            _ => Err(GiveUp::StrayContinuation),
        }
    }

    /// Passes on a complete header block, rewritten if it must be.
    fn block(&mut self, pending: &Pending, output: &mut BytesMut) -> Result<(), GiveUp> {
        let mut instructions = self.decoder.decode(&pending.fragment)?;
        let mut rewrote = false;
        for instruction in &mut instructions {
            if let hpack::Instruction::Field(field) = instruction
                && field.name == ":authority"
                && http::uri::Authority::from_maybe_shared(field.value.clone()).is_err()
            {
                if !self.diverged && !rewrote {
                    tracing::debug!(
                        authority = %String::from_utf8_lossy(&field.value).escape_debug(),
                        "a client's :authority is not a URI authority; serving it as {REPLACEMENT_AUTHORITY}"
                    );
                }
                field.value = Bytes::from_static(REPLACEMENT_AUTHORITY.as_bytes());
                rewrote = true;
            }
        }
        if !rewrote && !self.diverged {
            output.extend_from_slice(&pending.original);
            return Ok(());
        }
        self.diverged = true;
        let mut block = Vec::with_capacity(pending.fragment.len() * 2);
        hpack::encode(&instructions, &mut block);
        write_header_frames(
            output,
            pending.stream,
            pending.flags,
            pending.priority,
            &block,
        );
        Ok(())
    }

    /// Steps aside for the rest of the connection, for something the
    /// adapter cannot or need not translate: h2 gets what the client sent
    /// and refuses it as it would have. Once h2's HPACK table is behind the
    /// client's, h2 must not decode anything untranslated, so it gets a
    /// block it refuses instead (index 0, which no table has) and closes the
    /// connection, as it would for the client's error.
    fn give_up(&mut self, why: GiveUp, output: &mut BytesMut) {
        tracing::debug!(reason = %why, "passing the rest of a CRI connection to h2 as it comes");
        let pending = self.pending.take();
        if self.diverged {
            let stream = pending.as_ref().map_or(1, |p| p.stream);
            write_header_frames(output, stream, 0, None, &[0x80]);
        } else if let Some(pending) = pending {
            output.extend_from_slice(&pending.original);
        }
        self.state = State::Verbatim;
    }
}

/// The header block fragment of a HEADERS frame's payload, and its
/// priority fields; `None` if the padding or priority do not fit (h2 refuses
/// such a frame).
fn headers_fragment(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, after) = rest.split_first()?;
        pad = n as usize;
        rest = after;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, after) = rest.split_at_checked(5)?;
        priority = Some(fields.try_into().expect("5 bytes"));
        rest = after;
    }
    let end = rest.len().checked_sub(pad)?;
    Some((priority, &rest[..end]))
}

/// Writes `block` as a HEADERS frame (keeping END_STREAM and the priority
/// fields, dropping padding) and as many CONTINUATION frames as it needs.
fn write_header_frames(
    output: &mut BytesMut,
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    block: &[u8],
) {
    let mut rest = block;
    let mut first = true;
    loop {
        let prefix: &[u8] = match (first, &priority) {
            (true, Some(fields)) => fields,
            _ => &[],
        };
        let room = MAX_FRAME_SIZE as usize - prefix.len();
        let (chunk, after) = rest.split_at(room.min(rest.len()));
        let (kind, mut frame_flags) = if first {
            (HEADERS, flags & (END_STREAM | PRIORITY))
        } else {
            (CONTINUATION, 0)
        };
        if after.is_empty() {
            frame_flags |= END_HEADERS;
        }
        let len = (prefix.len() + chunk.len()) as u32;
        output.put_slice(&len.to_be_bytes()[1..]);
        output.put_u8(kind);
        output.put_u8(frame_flags);
        output.put_u32(stream);
        output.put_slice(prefix);
        output.put_slice(chunk);
        if after.is_empty() {
            return;
        }
        rest = after;
        first = false;
    }
}

/// HPACK (RFC 7541) decoding into header fields and re-encoding without the
/// dynamic table. Names and values stay bytes: judging them is h2's job.
mod hpack {
    use std::collections::VecDeque;
    use std::sync::OnceLock;

    use bytes::Bytes;

    /// The most a client's table can hold: HTTP/2's default
    /// SETTINGS_HEADER_TABLE_SIZE, which berthd does not change (tonic has
    /// no setting for it), and so the limit h2 holds size updates to.
    const HEADER_TABLE_SIZE: usize = 4_096;

    /// What a table entry costs besides its name and value (RFC 7541 §4.1).
    const ENTRY_OVERHEAD: usize = 32;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Field {
        pub name: Bytes,
        pub value: Bytes,
        /// Sent as "never indexed" (sensitive): kept so when re-encoded.
        pub never_indexed: bool,
    }

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Instruction {
        SizeUpdate(usize),
        Field(Field),
    }

    /// Why a block cannot be decoded. h2 treats each of these as a
    /// connection error too.
    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub enum DecodeError {
        #[error("index {0} is in neither table")]
        BadIndex(usize),
        #[error("an integer longer than 5 octets")]
        IntegerOverflow,
        #[error("the block ends inside a field")]
        Truncated,
        #[error("an invalid Huffman code")]
        Huffman,
        #[error("a table size update to {0}, over {HEADER_TABLE_SIZE}")]
        TableTooLarge(usize),
        #[error("a table size update after a header field")]
        LateSizeUpdate,
    }

    /// The decoding side of one connection's HPACK context.
    pub struct Decoder {
        /// Newest first, as indexed.
        entries: VecDeque<(Bytes, Bytes)>,
        size: usize,
        max_size: usize,
    }

    impl Decoder {
        pub fn new() -> Self {
            Decoder {
                entries: VecDeque::new(),
                size: 0,
                max_size: HEADER_TABLE_SIZE,
            }
        }

        /// Decodes one complete header block, updating the table as the
        /// client's encoder did.
        pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Instruction>, DecodeError> {
            let mut r = Reader { buf: block, pos: 0 };
            let mut out = Vec::new();
            let mut fields_seen = false;
            while let Some(first) = r.peek() {
                let field = if first & 0x80 != 0 {
                    let (name, value) = self.get(r.int(7)?)?;
                    Field {
                        name,
                        value,
                        never_indexed: false,
                    }
                } else if first & 0x40 != 0 {
                    let field = self.literal(&mut r, 6, false)?;
                    self.insert(field.name.clone(), field.value.clone());
                    field
                } else if first & 0x20 != 0 {
                    // Size updates come first in a block (RFC 7541 §4.2).
                    if fields_seen {
                        return Err(DecodeError::LateSizeUpdate);
                    }
                    let size = r.int(5)?;
                    if size > HEADER_TABLE_SIZE {
                        return Err(DecodeError::TableTooLarge(size));
                    }
                    self.max_size = size;
                    self.evict(0);
                    out.push(Instruction::SizeUpdate(size));
                    continue;
                } else {
                    self.literal(&mut r, 4, first & 0x10 != 0)?
                };
                fields_seen = true;
                out.push(Instruction::Field(field));
            }
            Ok(out)
        }

        fn literal(
            &self,
            r: &mut Reader<'_>,
            prefix: u8,
            never_indexed: bool,
        ) -> Result<Field, DecodeError> {
            let index = r.int(prefix)?;
            let name = if index == 0 {
                r.string()?
            } else {
                self.get(index)?.0
            };
            let value = r.string()?;
            Ok(Field {
                name,
                value,
                never_indexed,
            })
        }

        fn get(&self, index: usize) -> Result<(Bytes, Bytes), DecodeError> {
            match index {
                0 => Err(DecodeError::BadIndex(0)),
                1..=61 => {
                    let (name, value) = STATIC_TABLE[index - 1];
                    Ok((
                        Bytes::from_static(name.as_bytes()),
                        Bytes::from_static(value.as_bytes()),
                    ))
                }
                _ => self
                    .entries
                    .get(index - 62)
                    .cloned()
                    .ok_or(DecodeError::BadIndex(index)),
            }
        }

        fn insert(&mut self, name: Bytes, value: Bytes) {
            let size = name.len() + value.len() + ENTRY_OVERHEAD;
            // An entry larger than the table empties it and is not added
            // (RFC 7541 §4.4).
            if size > self.max_size {
                self.entries.clear();
                self.size = 0;
                return;
            }
            self.evict(size);
            self.size += size;
            self.entries.push_front((name, value));
        }

        /// Evicts the oldest entries until `room` more bytes fit.
        fn evict(&mut self, room: usize) {
            while self.size + room > self.max_size {
                let (name, value) = self.entries.pop_back().expect("size counts entries");
                self.size -= name.len() + value.len() + ENTRY_OVERHEAD;
            }
        }
    }

    struct Reader<'a> {
        buf: &'a [u8],
        pos: usize,
    }

    impl Reader<'_> {
        fn peek(&self) -> Option<u8> {
            self.buf.get(self.pos).copied()
        }

        fn byte(&mut self) -> Result<u8, DecodeError> {
            let b = self.peek().ok_or(DecodeError::Truncated)?;
            self.pos += 1;
            Ok(b)
        }

        /// An integer with an N-bit prefix (RFC 7541 §5.1), at most 5
        /// octets long, as h2 reads it.
        fn int(&mut self, prefix: u8) -> Result<usize, DecodeError> {
            let mask = (1u8 << prefix) - 1;
            let first = self.byte()? & mask;
            if first < mask {
                return Ok(first as usize);
            }
            let mut value = mask as usize;
            for shift in [0, 7, 14, 21] {
                let b = self.byte()?;
                value += ((b & 0x7f) as usize) << shift;
                if b & 0x80 == 0 {
                    return Ok(value);
                }
            }
            Err(DecodeError::IntegerOverflow)
        }

        /// A string literal (RFC 7541 §5.2), Huffman-decoded if it is coded.
        fn string(&mut self) -> Result<Bytes, DecodeError> {
            let huffman = self.peek().ok_or(DecodeError::Truncated)? & 0x80 != 0;
            let len = self.int(7)?;
            let end = self
                .pos
                .checked_add(len)
                .filter(|&end| end <= self.buf.len())
                .ok_or(DecodeError::Truncated)?;
            let raw = &self.buf[self.pos..end];
            self.pos = end;
            if huffman {
                huffman_decode(raw).map(Bytes::from)
            } else {
                Ok(Bytes::copy_from_slice(raw))
            }
        }
    }

    /// Encodes `instructions` with literals only: no Huffman coding, no
    /// dynamic table, so the decoder's table is neither read nor changed.
    pub fn encode(instructions: &[Instruction], dst: &mut Vec<u8>) {
        for instruction in instructions {
            match instruction {
                Instruction::SizeUpdate(size) => put_int(dst, *size, 5, 0x20),
                Instruction::Field(field) => {
                    // Literal without indexing (0x00) or never indexed
                    // (0x10), with a literal name (index 0).
                    put_int(dst, 0, 4, if field.never_indexed { 0x10 } else { 0 });
                    put_int(dst, field.name.len(), 7, 0);
                    dst.extend_from_slice(&field.name);
                    put_int(dst, field.value.len(), 7, 0);
                    dst.extend_from_slice(&field.value);
                }
            }
        }
    }

    fn put_int(dst: &mut Vec<u8>, value: usize, prefix: u8, flags: u8) {
        let mask = (1usize << prefix) - 1;
        if value < mask {
            dst.push(flags | value as u8);
            return;
        }
        dst.push(flags | mask as u8);
        let mut rest = value - mask;
        while rest >= 0x80 {
            dst.push((rest & 0x7f) as u8 | 0x80);
            rest >>= 7;
        }
        dst.push(rest as u8);
    }

    /// A node's child that is a symbol, not another node.
    const LEAF: u16 = 0x8000;
    const EOS: u16 = 256;

    /// The Huffman code as a binary tree: `[child for 0, child for 1]` per
    /// node, the root first; a child of 0 is a missing one (the root is no
    /// one's child).
    fn huffman_tree() -> &'static [[u16; 2]] {
        static TREE: OnceLock<Vec<[u16; 2]>> = OnceLock::new();
        TREE.get_or_init(|| {
            let mut tree = vec![[0u16; 2]];
            for (symbol, &(code, len)) in HUFFMAN_CODE.iter().enumerate() {
                let mut node = 0;
                for bit in (0..len).rev() {
                    let side = ((code >> bit) & 1) as usize;
                    if bit == 0 {
                        tree[node][side] = LEAF | symbol as u16;
                    } else {
                        if tree[node][side] == 0 {
                            tree.push([0; 2]);
                            tree[node][side] = (tree.len() - 1) as u16;
                        }
                        node = tree[node][side] as usize;
                    }
                }
            }
            tree
        })
    }

    /// RFC 7541 §5.2: the string may end with at most 7 bits of padding,
    /// all ones (a prefix of EOS), and may not contain EOS.
    fn huffman_decode(src: &[u8]) -> Result<Vec<u8>, DecodeError> {
        let tree = huffman_tree();
        let mut out = Vec::with_capacity(src.len() * 8 / 5);
        let mut node = 0usize;
        let mut pending_bits = 0;
        let mut all_ones = true;
        for &byte in src {
            for bit in (0..8).rev() {
                let side = (byte >> bit) & 1;
                pending_bits += 1;
                all_ones &= side == 1;
                let next = tree[node][side as usize];
                if next & LEAF != 0 {
                    let symbol = next & !LEAF;
                    if symbol == EOS {
                        return Err(DecodeError::Huffman);
                    }
                    out.push(symbol as u8);
                    node = 0;
                    pending_bits = 0;
                    all_ones = true;
                } else if next == 0 {
                    return Err(DecodeError::Huffman);
                } else {
                    node = next as usize;
                }
            }
        }
        if pending_bits > 7 || !all_ones {
            return Err(DecodeError::Huffman);
        }
        Ok(out)
    }

    /// RFC 7541 Appendix A.
    const STATIC_TABLE: [(&str, &str); 61] = [
        (":authority", ""),
        (":method", "GET"),
        (":method", "POST"),
        (":path", "/"),
        (":path", "/index.html"),
        (":scheme", "http"),
        (":scheme", "https"),
        (":status", "200"),
        (":status", "204"),
        (":status", "206"),
        (":status", "304"),
        (":status", "400"),
        (":status", "404"),
        (":status", "500"),
        ("accept-charset", ""),
        ("accept-encoding", "gzip, deflate"),
        ("accept-language", ""),
        ("accept-ranges", ""),
        ("accept", ""),
        ("access-control-allow-origin", ""),
        ("age", ""),
        ("allow", ""),
        ("authorization", ""),
        ("cache-control", ""),
        ("content-disposition", ""),
        ("content-encoding", ""),
        ("content-language", ""),
        ("content-length", ""),
        ("content-location", ""),
        ("content-range", ""),
        ("content-type", ""),
        ("cookie", ""),
        ("date", ""),
        ("etag", ""),
        ("expect", ""),
        ("expires", ""),
        ("from", ""),
        ("host", ""),
        ("if-match", ""),
        ("if-modified-since", ""),
        ("if-none-match", ""),
        ("if-range", ""),
        ("if-unmodified-since", ""),
        ("last-modified", ""),
        ("link", ""),
        ("location", ""),
        ("max-forwards", ""),
        ("proxy-authenticate", ""),
        ("proxy-authorization", ""),
        ("range", ""),
        ("referer", ""),
        ("refresh", ""),
        ("retry-after", ""),
        ("server", ""),
        ("set-cookie", ""),
        ("strict-transport-security", ""),
        ("transfer-encoding", ""),
        ("user-agent", ""),
        ("vary", ""),
        ("via", ""),
        ("www-authenticate", ""),
    ];

    /// RFC 7541 Appendix B: (code, length in bits) of each byte, then EOS.
    #[rustfmt::skip]
    const HUFFMAN_CODE: [(u32, u8); 257] = [
        (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28), (0xfffffe5, 28),
        (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24), (0x3ffffffc, 30), (0xfffffe9, 28),
        (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28), (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28),
        (0xfffffef, 28), (0xffffff0, 28), (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28),
        (0xffffff4, 28), (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
        (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10), (0xffa, 12),
        (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11), (0x3fa, 10), (0x3fb, 10),
        (0xf9, 8), (0x7fb, 11), (0xfa, 8), (0x16, 6), (0x17, 6), (0x18, 6),
        (0x0, 5), (0x1, 5), (0x2, 5), (0x19, 6), (0x1a, 6), (0x1b, 6),
        (0x1c, 6), (0x1d, 6), (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),
        (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), (0x1ffa, 13), (0x21, 6),
        (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7), (0x61, 7), (0x62, 7),
        (0x63, 7), (0x64, 7), (0x65, 7), (0x66, 7), (0x67, 7), (0x68, 7),
        (0x69, 7), (0x6a, 7), (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7),
        (0x6f, 7), (0x70, 7), (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7),
        (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14), (0x22, 6),
        (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5), (0x24, 6), (0x5, 5),
        (0x25, 6), (0x26, 6), (0x27, 6), (0x6, 5), (0x74, 7), (0x75, 7),
        (0x28, 6), (0x29, 6), (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7),
        (0x2c, 6), (0x8, 5), (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),
        (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), (0x7fc, 11), (0x3ffd, 14),
        (0x1ffd, 13), (0xffffffc, 28), (0xfffe6, 20), (0x3fffd2, 22), (0xfffe7, 20), (0xfffe8, 20),
        (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22), (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23),
        (0x7fffdb, 23), (0x7fffdc, 23), (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23),
        (0xffffec, 24), (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23),
        (0x7fffe2, 23), (0x7fffe3, 23), (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22), (0x7fffe5, 23),
        (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24), (0x3fffda, 22), (0x1fffdd, 21),
        (0xfffe9, 20), (0x3fffdb, 22), (0x3fffdc, 22), (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21),
        (0x7fffea, 23), (0x3fffdd, 22), (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22),
        (0x7fffeb, 23), (0x7fffec, 23), (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),
        (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20), (0x3fffe2, 22),
        (0x3fffe3, 22), (0x3fffe4, 22), (0x7ffff0, 23), (0x3fffe5, 22), (0x3fffe6, 22), (0x7ffff1, 23),
        (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20), (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23),
        (0x3fffe8, 22), (0x1ffffec, 25), (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27),
        (0x7ffffdf, 27), (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), (0x7fff2, 19), (0x1fffe3, 21),
        (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27), (0xfffff2, 24),
        (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26), (0xffffffd, 28), (0x7ffffe3, 27),
        (0x7ffffe4, 27), (0x7ffffe5, 27), (0xfffec, 20), (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21),
        (0x3fffe9, 22), (0x1fffe7, 21), (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22),
        (0x1ffffee, 25), (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
        (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27), (0x7ffffe8, 27),
        (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28), (0x7ffffec, 27), (0x7ffffed, 27),
        (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27), (0x3ffffee, 26), (0x3fffffff, 30),
    ];

    /// Huffman-codes `src`, for tests that need what clients send.
    #[cfg(test)]
    pub fn huffman_encode(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut acc, mut bits) = (0u64, 0u32);
        for &b in src {
            let (code, len) = HUFFMAN_CODE[b as usize];
            acc = (acc << len) | code as u64;
            bits += len as u32;
            while bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
            }
        }
        if bits > 0 {
            // Pad with the most significant bits of EOS: ones.
            out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn hex(s: &str) -> Vec<u8> {
            (0..s.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
                .collect()
        }

        fn fields(instructions: &[Instruction]) -> Vec<(String, String)> {
            instructions
                .iter()
                .filter_map(|i| match i {
                    Instruction::Field(f) => Some((
                        String::from_utf8(f.name.to_vec()).unwrap(),
                        String::from_utf8(f.value.to_vec()).unwrap(),
                    )),
                    Instruction::SizeUpdate(_) => None,
                })
                .collect()
        }

        fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
            list.iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        }

        /// The three requests of RFC 7541 C.3 (plain) and C.4 (Huffman):
        /// literals, incremental indexing and references to both tables.
        #[test]
        fn rfc7541_request_examples() {
            for blocks in [
                [
                    "828684410f7777772e6578616d706c652e636f6d",
                    "828684be58086e6f2d6361636865",
                    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
                ],
                [
                    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
                    "828684be5886a8eb10649cbf",
                    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
                ],
            ] {
                let mut d = Decoder::new();
                let first = d.decode(&hex(blocks[0])).unwrap();
                assert_eq!(
                    fields(&first),
                    pairs(&[
                        (":method", "GET"),
                        (":scheme", "http"),
                        (":path", "/"),
                        (":authority", "www.example.com"),
                    ])
                );
                let second = d.decode(&hex(blocks[1])).unwrap();
                assert_eq!(
                    fields(&second),
                    pairs(&[
                        (":method", "GET"),
                        (":scheme", "http"),
                        (":path", "/"),
                        (":authority", "www.example.com"),
                        ("cache-control", "no-cache"),
                    ])
                );
                let third = d.decode(&hex(blocks[2])).unwrap();
                assert_eq!(
                    fields(&third),
                    pairs(&[
                        (":method", "GET"),
                        (":scheme", "https"),
                        (":path", "/index.html"),
                        (":authority", "www.example.com"),
                        ("custom-key", "custom-value"),
                    ])
                );
                assert_eq!(d.size, 164, "table size after C.3.3 / C.4.3");
            }
        }

        fn literal_indexed(name: &str, value: &str) -> Vec<u8> {
            let mut out = vec![0x40];
            put_int(&mut out, name.len(), 7, 0);
            out.extend_from_slice(name.as_bytes());
            put_int(&mut out, value.len(), 7, 0);
            out.extend_from_slice(value.as_bytes());
            out
        }

        #[test]
        fn size_updates_evict_oldest_entries() {
            let mut d = Decoder::new();
            let mut block = Vec::new();
            put_int(&mut block, 100, 5, 0x20);
            block.extend(literal_indexed("aaaa", &"x".repeat(30)));
            d.decode(&block).unwrap();
            d.decode(&literal_indexed("bbbb", &"y".repeat(30))).unwrap();
            assert_eq!(fields(&d.decode(&[0xbe]).unwrap())[0].0, "bbbb");
            assert_eq!(d.decode(&[0xbf]), Err(DecodeError::BadIndex(63)));
            // Larger than the whole table: empties it.
            d.decode(&literal_indexed("c", &"z".repeat(80))).unwrap();
            assert_eq!(d.decode(&[0xbe]), Err(DecodeError::BadIndex(62)));
        }

        #[test]
        fn malformed_blocks_are_errors() {
            let mut d = Decoder::new();
            assert_eq!(d.decode(&[0x80]), Err(DecodeError::BadIndex(0)));
            assert_eq!(
                d.decode(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
                Err(DecodeError::IntegerOverflow)
            );
            assert_eq!(d.decode(&[0x82, 0x20]), Err(DecodeError::LateSizeUpdate));
            let mut big = Vec::new();
            put_int(&mut big, 4097, 5, 0x20);
            assert_eq!(d.decode(&big), Err(DecodeError::TableTooLarge(4097)));
            // A name of 5 bytes announced, 2 there.
            assert_eq!(
                d.decode(&[0x00, 0x05, b'a', b'b']),
                Err(DecodeError::Truncated)
            );
        }

        #[test]
        fn huffman_padding_rules() {
            assert_eq!(huffman_decode(&[0x07]).unwrap(), b"0");
            // Padding that is not a prefix of EOS.
            assert_eq!(huffman_decode(&[0x00]), Err(DecodeError::Huffman));
            // Eight bits of padding.
            assert_eq!(huffman_decode(&[0x07, 0xff]), Err(DecodeError::Huffman));
            // EOS itself (30 ones), padded with ones.
            assert_eq!(
                huffman_decode(&[0xff, 0xff, 0xff, 0xff]),
                Err(DecodeError::Huffman)
            );
            let all: Vec<u8> = (0..=255).collect();
            assert_eq!(huffman_decode(&huffman_encode(&all)).unwrap(), all);
        }

        #[test]
        fn encoding_round_trips_without_touching_the_table() {
            let instructions = vec![
                Instruction::SizeUpdate(0),
                Instruction::SizeUpdate(4096),
                Instruction::Field(Field {
                    name: Bytes::from_static(b":path"),
                    value: Bytes::from(vec![b'/'; 300]),
                    never_indexed: false,
                }),
                Instruction::Field(Field {
                    name: Bytes::from_static(b"authorization"),
                    value: Bytes::from_static(b"secret"),
                    never_indexed: true,
                }),
            ];
            let mut block = Vec::new();
            encode(&instructions, &mut block);
            let mut d = Decoder::new();
            assert_eq!(d.decode(&block).unwrap(), instructions);
            assert!(d.entries.is_empty());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::hpack::{Decoder, Instruction, huffman_encode};
    use super::*;

    const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn string(out: &mut Vec<u8>, s: &[u8], huffman: bool) {
        if huffman {
            let coded = huffman_encode(s);
            hpack_int(out, coded.len(), 7, 0x80);
            out.extend(coded);
        } else {
            hpack_int(out, s.len(), 7, 0);
            out.extend_from_slice(s);
        }
    }

    fn hpack_int(out: &mut Vec<u8>, value: usize, prefix: u8, flags: u8) {
        let mask = (1usize << prefix) - 1;
        if value < mask {
            out.push(flags | value as u8);
            return;
        }
        out.push(flags | mask as u8);
        let mut rest = value - mask;
        while rest >= 0x80 {
            out.push((rest & 0x7f) as u8 | 0x80);
            rest >>= 7;
        }
        out.push(rest as u8);
    }

    /// A gRPC request's header block as grpc-core encodes one (the name of
    /// `:authority` by static index, its value added to the table), or
    /// with `:authority` as a reference to the table entry that added it.
    fn grpc_block(authority: Option<(&str, bool)>, path: &str) -> Vec<u8> {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        b.push(0x04); // :path, static name, not indexed
        string(&mut b, path.as_bytes(), false);
        match authority {
            Some((value, huffman)) => {
                b.push(0x41); // :authority (static 1), incremental indexing
                string(&mut b, value.as_bytes(), huffman);
            }
            None => b.push(0xbe), // the newest table entry
        }
        b.push(0x00);
        string(&mut b, b"content-type", false);
        string(&mut b, b"application/grpc", true);
        b.push(0x00);
        string(&mut b, b"te", false);
        string(&mut b, b"trailers", false);
        b
    }

    /// Runs `input` through a fresh adapter, once in one piece and once a
    /// byte at a time, and returns the output (the same both ways).
    fn run(input: &[u8]) -> Vec<u8> {
        let mut whole = Fixer::new();
        let (mut inp, mut out) = (BytesMut::from(input), BytesMut::new());
        whole.process(&mut inp, &mut out);
        whole.finish(&mut inp, &mut out);

        let mut bytewise = Fixer::new();
        let (mut inp2, mut out2) = (BytesMut::new(), BytesMut::new());
        for &b in input {
            inp2.put_u8(b);
            bytewise.process(&mut inp2, &mut out2);
        }
        bytewise.finish(&mut inp2, &mut out2);
        assert_eq!(out, out2, "output depends on how the input was split");
        out.to_vec()
    }

    struct Frame {
        kind: u8,
        flags: u8,
        stream: u32,
        payload: Vec<u8>,
    }

    fn frames(out: &[u8]) -> Vec<Frame> {
        assert_eq!(&out[..PREFACE.len()], PREFACE);
        let mut rest = &out[PREFACE.len()..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            assert!(len <= MAX_FRAME_SIZE as usize, "frame of {len} bytes");
            frames.push(Frame {
                kind: rest[3],
                flags: rest[4],
                stream: u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
                payload: rest[FRAME_HEAD..FRAME_HEAD + len].to_vec(),
            });
            rest = &rest[FRAME_HEAD + len..];
        }
        frames
    }

    /// The header lists h2 decodes from `out`, with its own table, one per
    /// header block.
    fn h2_view(out: &[u8]) -> Vec<Vec<(String, String)>> {
        let mut decoder = Decoder::new();
        let mut lists = Vec::new();
        let mut block = Vec::new();
        for f in frames(out) {
            match f.kind {
                HEADERS => {
                    let (_, fragment) = headers_fragment(f.flags, &f.payload).unwrap();
                    block = fragment.to_vec();
                }
                CONTINUATION => block.extend(&f.payload),
                _ => continue,
            }
            if f.flags & END_HEADERS != 0 {
                let list = decoder
                    .decode(&block)
                    .unwrap()
                    .into_iter()
                    .filter_map(|i| match i {
                        Instruction::Field(f) => Some((
                            String::from_utf8(f.name.to_vec()).unwrap(),
                            String::from_utf8(f.value.to_vec()).unwrap(),
                        )),
                        Instruction::SizeUpdate(_) => None,
                    })
                    .collect();
                lists.push(list);
            }
        }
        lists
    }

    fn authority(list: &[(String, String)]) -> &str {
        &list.iter().find(|(n, _)| n == ":authority").unwrap().1
    }

    fn connection(blocks: &[Vec<u8>]) -> Vec<u8> {
        let mut input = PREFACE.to_vec();
        input.extend(SETTINGS);
        for (i, block) in blocks.iter().enumerate() {
            let stream = 2 * i as u32 + 1;
            input.extend(frame(HEADERS, END_HEADERS, stream, block));
            input.extend(frame(0x0, END_STREAM, stream, &[0, 0, 0, 0, 0]));
        }
        input
    }

    #[test]
    fn valid_authorities_pass_byte_for_byte() {
        let input = connection(&[
            grpc_block(Some(("localhost", false)), "/a"),
            grpc_block(None, "/b"),
        ]);
        assert_eq!(run(&input), input);
    }

    #[test]
    fn escaped_socket_paths_become_localhost_also_from_the_table() {
        for huffman in [false, true] {
            let input = connection(&[
                grpc_block(Some(("run%2Fberth%2Fberth.sock", huffman)), "/a"),
                grpc_block(None, "/b"),
                // Valid, but h2's table is behind now: re-encoded as well.
                grpc_block(Some(("localhost", false)), "/c"),
                grpc_block(None, "/d"),
            ]);
            let out = run(&input);
            let lists = h2_view(&out);
            assert_eq!(lists.len(), 4);
            for (list, path) in lists.iter().zip(["/a", "/b", "/c", "/d"]) {
                assert_eq!(authority(list), "localhost");
                assert_eq!(list[0], (":method".into(), "POST".into()));
                assert_eq!(list[2], (":path".into(), path.into()));
                assert_eq!(list[4], ("content-type".into(), "application/grpc".into()));
            }
            // DATA and SETTINGS frames are untouched.
            let kinds: Vec<u8> = frames(&out).iter().map(|f| f.kind).collect();
            assert_eq!(kinds, [4, 1, 0, 1, 0, 1, 0, 1, 0]);
        }
    }

    #[test]
    fn raw_paths_and_empty_authorities_are_rewritten() {
        for value in ["/run/berth/berth.sock", ""] {
            let out = run(&connection(&[grpc_block(Some((value, false)), "/a")]));
            assert_eq!(authority(&h2_view(&out)[0]), "localhost");
        }
    }

    #[test]
    fn continuation_padding_and_priority() {
        let block = grpc_block(Some(("run%2Fberth%2Fberth.sock", true)), "/a");
        let (head, tail) = block.split_at(5); // inside the :path string
        let mut payload = vec![3]; // pad length
        payload.extend([0x80, 0, 0, 0, 16]); // exclusive on stream 0, weight 16
        payload.extend(head);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, tail));
        let out = run(&input);
        let fs = frames(&out);
        assert_eq!(fs.len(), 1);
        assert_eq!(fs[0].flags, PRIORITY | END_STREAM | END_HEADERS);
        assert_eq!(&fs[0].payload[..5], &[0x80, 0, 0, 0, 16]);
        assert_eq!(authority(&h2_view(&out)[0]), "localhost");
    }

    #[test]
    fn large_blocks_are_split_into_frames_h2_accepts() {
        let mut block = grpc_block(Some(("run%2Fberth%2Fberth.sock", false)), "/a");
        block.push(0x00);
        string(&mut block, b"x-big", false);
        string(&mut block, &[b'v'; 40_000], true);
        // The client's frames, at most MAX_FRAME_SIZE each.
        let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME_SIZE as usize).collect();
        let mut input = PREFACE.to_vec();
        for (i, chunk) in chunks.iter().enumerate() {
            let kind = if i == 0 { HEADERS } else { CONTINUATION };
            let flags = if i == chunks.len() - 1 {
                END_HEADERS
            } else {
                0
            };
            input.extend(frame(kind, flags, 1, chunk));
        }
        let out = run(&input);
        let fs = frames(&out);
        assert_eq!(fs.len(), 3, "40 kB of literals in 16 kB frames");
        assert_eq!(fs[0].kind, HEADERS);
        assert!(fs[1..].iter().all(|f| f.kind == CONTINUATION));
        let ends: Vec<bool> = fs.iter().map(|f| f.flags & END_HEADERS != 0).collect();
        assert_eq!(ends, [false, false, true]);
        let list = &h2_view(&out)[0];
        assert_eq!(authority(list), "localhost");
        assert_eq!(list.last().unwrap().1.len(), 40_000);
    }

    #[test]
    fn what_cannot_be_decoded_reaches_h2_as_sent() {
        // In step with h2: h2 gets the broken block and refuses it itself.
        let mut input = connection(&[grpc_block(Some(("localhost", false)), "/a")]);
        input.extend(frame(HEADERS, END_HEADERS, 3, &[0x80]));
        input.extend(frame(0x0, 0, 3, b"after"));
        assert_eq!(run(&input), input);

        // Not HTTP/2 at all.
        let http1 = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let mut f = Fixer::new();
        let (mut i, mut o) = (BytesMut::from(&http1[..]), BytesMut::new());
        f.process(&mut i, &mut o);
        assert_eq!(o.to_vec(), http1);

        // A frame inside a header block.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        input.extend(frame(0x6, 0, 0, &[0; 8]));
        assert_eq!(run(&input), input);
    }

    #[test]
    fn once_behind_h2_gets_a_block_it_refuses_instead_of_garbage() {
        let mut input = connection(&[grpc_block(Some(("run%2Fberth.sock", false)), "/a")]);
        // Index 70: in no table.
        input.extend(frame(HEADERS, END_HEADERS, 3, &[0xc6]));
        input.extend(frame(0x0, 0, 3, b"after"));
        let out = run(&input);
        let fs = frames(&out);
        let refused = &fs[fs.len() - 2];
        assert_eq!(
            (refused.kind, refused.stream, refused.payload.as_slice()),
            (HEADERS, 3, &[0x80][..])
        );
        assert_eq!(fs.last().unwrap().payload, b"after");
    }

    /// Through the AsyncRead side, with reads of every size.
    #[tokio::test]
    async fn reads_through_the_adapter() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let input = connection(&[
            grpc_block(Some(("run%2Fberth%2Fberth.sock", true)), "/a"),
            grpc_block(None, "/b"),
        ]);
        let expected = run(&input);
        for read_size in [1, 7, 100, 64 * 1024] {
            let (mut client, server) = tokio::io::duplex(13);
            let feed = input.clone();
            let writer = tokio::spawn(async move {
                client.write_all(&feed).await.unwrap();
                client.shutdown().await.unwrap();
            });
            let mut fixed = AuthorityFix::new(server);
            let mut out = Vec::new();
            let mut buf = vec![0u8; read_size];
            loop {
                let n = fixed.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            writer.await.unwrap();
            assert_eq!(out, expected, "reads of {read_size} bytes");
        }
    }
}
