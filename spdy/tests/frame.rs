//! Wire-format tests: hand-built frames per the SPDY/3 layout, error cases,
//! and encode/decode round trips.

use berth_spdy::frame::{
    self, Frame, FrameDecoder, FrameError, HeaderCompressor, HeaderDecompressor, Headers, Setting,
};
use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;

fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, FrameError> {
    let mut dec = FrameDecoder::default();
    let mut hd = HeaderDecompressor::new();
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = dec.decode(&mut buf, &mut hd)? {
        out.push(f);
    }
    assert!(buf.is_empty(), "left over: {buf:?}");
    Ok(out)
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80, 0x03];
    v.extend_from_slice(&kind.to_be_bytes());
    v.push(flags);
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    v.extend_from_slice(payload);
    v
}

/// A plain header block: count, then length-prefixed names and values.
fn plain_block(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut v = (pairs.len() as u32).to_be_bytes().to_vec();
    for (n, val) in pairs {
        v.extend_from_slice(&(n.len() as u32).to_be_bytes());
        v.extend_from_slice(n.as_bytes());
        v.extend_from_slice(&(val.len() as u32).to_be_bytes());
        v.extend_from_slice(val.as_bytes());
    }
    v
}

/// zlib stream start with FDICT and the SPDY/3 dictionary id, followed by
/// one stored (uncompressed) deflate block: a valid compressed header block
/// built by hand.
fn zlib_stored_first(data: &[u8]) -> Vec<u8> {
    let mut v = vec![0x78, 0xbb, 0xe3, 0xc6, 0xa7, 0xc2];
    v.extend(stored(data));
    v
}

fn stored(data: &[u8]) -> Vec<u8> {
    let len = data.len() as u16;
    let mut v = vec![0x00];
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&(!len).to_le_bytes());
    v.extend_from_slice(data);
    v
}

#[test]
fn data_frame_by_hand() {
    let bytes = [0, 0, 0, 5, 0x01, 0, 0, 3, b'a', b'b', b'c'];
    let f = decode_all(&bytes).unwrap();
    assert_eq!(
        f,
        vec![Frame::Data {
            stream_id: 5,
            fin: true,
            data: Bytes::from_static(b"abc")
        }]
    );
}

#[test]
fn syn_stream_with_hand_compressed_headers_then_syn_reply() {
    let block = plain_block(&[("streamtype", "stdout"), ("port", "8080")]);
    let mut p = vec![0, 0, 0, 1, 0, 0, 0, 0, 0x60, 0];
    p.extend(zlib_stored_first(&block));
    let mut bytes = control(1, 0x01, &p);
    // The second header block continues the same zlib stream.
    let mut p2 = vec![0, 0, 0, 1];
    p2.extend(stored(&plain_block(&[("x", "a\0b")])));
    bytes.extend(control(2, 0, &p2));
    let f = decode_all(&bytes).unwrap();
    assert_eq!(
        f[0],
        Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 3,
            slot: 0,
            fin: true,
            unidirectional: false,
            headers: Headers::new()
                .with("streamtype", "stdout")
                .with("port", "8080"),
        }
    );
    assert_eq!(
        f[1],
        Frame::SynReply {
            stream_id: 1,
            fin: false,
            headers: Headers::new().with("x", "a").with("x", "b"),
        }
    );
}

#[test]
fn encoder_uses_spdy3_dictionary_id() {
    let mut hc = HeaderCompressor::new();
    let mut out = BytesMut::new();
    let f = Frame::SynReply {
        stream_id: 1,
        fin: false,
        headers: Headers::new().with("a", "b"),
    };
    frame::encode(&f, &mut hc, &mut out).unwrap();
    // 8-byte header, 4-byte stream id, then the zlib header + DICTID.
    assert_eq!(out[12] & 0x0f, 8, "deflate");
    assert_ne!(out[13] & 0x20, 0, "FDICT set");
    assert_eq!(&out[14..18], &[0xe3, 0xc6, 0xa7, 0xc2]);
    // Ends with a sync flush marker so the peer can inflate at once.
    assert_eq!(&out[out.len() - 4..], &[0, 0, 0xff, 0xff]);
}

#[test]
fn simple_control_frames_by_hand() {
    let mut bytes = control(3, 0, &[0, 0, 0, 3, 0, 0, 0, 5]);
    bytes.extend(control(6, 0, &[0, 0, 0, 7]));
    bytes.extend(control(7, 0, &[0, 0, 0, 9, 0, 0, 0, 0]));
    bytes.extend(control(9, 0, &[0, 0, 0, 0, 0, 1, 0, 0]));
    bytes.extend(control(4, 1, &[0, 0, 0, 1, 1, 0, 0, 7, 0, 0, 0x10, 0]));
    assert_eq!(
        decode_all(&bytes).unwrap(),
        vec![
            Frame::RstStream {
                stream_id: 3,
                status: frame::rst::CANCEL
            },
            Frame::Ping { id: 7 },
            Frame::GoAway {
                last_good_stream_id: 9,
                status: 0
            },
            Frame::WindowUpdate {
                stream_id: 0,
                delta: 65536
            },
            Frame::Settings {
                clear: true,
                entries: vec![Setting {
                    flags: 1,
                    id: 7,
                    value: 4096
                }]
            },
        ]
    );
}

#[test]
fn unknown_control_frames_are_skipped_even_when_split() {
    let mut bytes = control(10, 0, &[0xaa; 100]); // CREDENTIAL
    bytes.extend(control(0x1234, 0, &[1, 2, 3]));
    bytes.extend(control(6, 0, &[0, 0, 0, 1]));
    let mut dec = FrameDecoder::default();
    let mut hd = HeaderDecompressor::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in bytes {
        buf.put_u8(b);
        if let Some(f) = dec.decode(&mut buf, &mut hd).unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got, vec![Frame::Ping { id: 1 }]);
}

#[test]
fn truncated_input_waits() {
    let bytes = control(6, 0, &[0, 0, 0, 7]);
    let mut dec = FrameDecoder::default();
    let mut hd = HeaderDecompressor::new();
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(dec.decode(&mut buf, &mut hd).unwrap(), None);
        assert_eq!(buf.len(), cut, "partial input stays buffered");
    }
}

#[test]
fn oversize_frame_is_an_error() {
    let mut dec = FrameDecoder::new(1024, 1 << 20);
    let mut hd = HeaderDecompressor::new();
    let mut buf = BytesMut::from(&[0u8, 0, 0, 1, 0, 0, 0x04, 0x01][..]);
    assert_eq!(
        dec.decode(&mut buf, &mut hd),
        Err(FrameError::FrameTooLarge(1025))
    );
}

#[test]
fn bad_version_and_bad_lengths() {
    let mut v2 = control(6, 0, &[0, 0, 0, 1]);
    v2[1] = 2;
    assert_eq!(decode_all(&v2), Err(FrameError::UnsupportedVersion(2)));
    assert!(matches!(
        decode_all(&control(6, 0, &[0, 0, 1])),
        Err(FrameError::InvalidLength { kind: 6, len: 3 })
    ));
    assert!(matches!(
        decode_all(&control(3, 0, &[0, 0, 0, 1])),
        Err(FrameError::InvalidLength { .. })
    ));
    assert!(matches!(
        decode_all(&control(4, 0, &[0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 1])),
        Err(FrameError::InvalidLength { .. })
    ));
    assert_eq!(
        decode_all(&[0, 0, 0, 0, 0, 0, 0, 0]),
        Err(FrameError::ZeroStreamId)
    );
}

#[test]
fn garbage_header_blocks_are_errors() {
    // Not zlib at all.
    let mut p = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    p.extend_from_slice(b"this is not zlib data");
    assert!(decode_all(&control(1, 0, &p)).is_err());
    // Valid zlib, but the block claims more pairs than it holds.
    let mut block = plain_block(&[("a", "b")]);
    block[3] = 200;
    let mut p = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    p.extend(zlib_stored_first(&block));
    assert!(matches!(
        decode_all(&control(1, 0, &p)),
        Err(FrameError::HeaderBlock(_))
    ));
    // Name length past the end.
    let mut p = vec![0, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    p.extend(zlib_stored_first(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']));
    assert!(matches!(
        decode_all(&control(1, 0, &p)),
        Err(FrameError::HeaderBlock(_))
    ));
}

#[test]
fn header_bomb_is_bounded() {
    // 4 MiB of zeros compresses to a few KiB; the limit is 64 KiB.
    let mut hc = HeaderCompressor::new();
    let mut out = BytesMut::new();
    let big = "\0".repeat(4 << 20);
    let f = Frame::Headers {
        stream_id: 1,
        fin: false,
        headers: Headers::new().with("a", big),
    };
    frame::encode(&f, &mut hc, &mut out).unwrap();
    assert!(out.len() < 64 * 1024);
    let mut dec = FrameDecoder::new(frame::MAX_FRAME_LEN, 64 * 1024);
    let mut hd = HeaderDecompressor::new();
    assert_eq!(
        dec.decode(&mut out, &mut hd),
        Err(FrameError::HeaderBlockTooLarge(64 * 1024))
    );
}

#[test]
fn random_garbage_never_panics() {
    let mut seed = 0x1234_5678_u64;
    for _ in 0..2000 {
        let mut bytes = Vec::new();
        for _ in 0..(seed % 200) {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            bytes.push((seed >> 33) as u8);
        }
        if let Some(b) = bytes.first_mut() {
            *b |= 0x80;
        }
        if bytes.len() > 1 {
            bytes[1] = 3;
        }
        let _ = decode_all_lenient(&bytes);
    }
}

fn decode_all_lenient(bytes: &[u8]) -> Result<(), FrameError> {
    let mut dec = FrameDecoder::default();
    let mut hd = HeaderDecompressor::new();
    let mut buf = BytesMut::from(bytes);
    while dec.decode(&mut buf, &mut hd)?.is_some() {}
    Ok(())
}

fn arb_headers() -> impl Strategy<Value = Headers> {
    proptest::collection::btree_map("[a-z][a-z0-9-]{0,15}", "[ -~]{0,40}", 0..6)
        .prop_map(|m| m.into_iter().collect())
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let id = 1u32..0x7fff_ffff;
    prop_oneof![
        (
            id.clone(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..2000)
        )
            .prop_map(|(stream_id, fin, d)| Frame::Data {
                stream_id,
                fin,
                data: d.into()
            }),
        (
            id.clone(),
            0u32..0x7fff_ffff,
            0u8..8,
            any::<u8>(),
            any::<bool>(),
            any::<bool>(),
            arb_headers()
        )
            .prop_map(
                |(stream_id, associated_to, priority, slot, fin, unidirectional, headers)| {
                    Frame::SynStream {
                        stream_id,
                        associated_to,
                        priority,
                        slot,
                        fin,
                        unidirectional,
                        headers,
                    }
                }
            ),
        (id.clone(), any::<bool>(), arb_headers()).prop_map(|(stream_id, fin, headers)| {
            Frame::SynReply {
                stream_id,
                fin,
                headers,
            }
        }),
        (id.clone(), any::<bool>(), arb_headers()).prop_map(|(stream_id, fin, headers)| {
            Frame::Headers {
                stream_id,
                fin,
                headers,
            }
        }),
        (id.clone(), any::<u32>())
            .prop_map(|(stream_id, status)| Frame::RstStream { stream_id, status }),
        (
            any::<bool>(),
            proptest::collection::vec((any::<u8>(), 0u32..0x0100_0000, any::<u32>()), 0..5)
        )
            .prop_map(|(clear, e)| Frame::Settings {
                clear,
                entries: e
                    .into_iter()
                    .map(|(flags, id, value)| Setting { flags, id, value })
                    .collect()
            }),
        any::<u32>().prop_map(|id| Frame::Ping { id }),
        (0u32..0x7fff_ffff, any::<u32>()).prop_map(|(last_good_stream_id, status)| {
            Frame::GoAway {
                last_good_stream_id,
                status,
            }
        }),
        (0u32..0x7fff_ffff, 1u32..0x7fff_ffff)
            .prop_map(|(stream_id, delta)| Frame::WindowUpdate { stream_id, delta }),
    ]
}

proptest! {
    #[test]
    fn round_trip_with_random_splits(
        frames in proptest::collection::vec(arb_frame(), 1..20),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10),
    ) {
        let mut hc = HeaderCompressor::new();
        let mut wire = BytesMut::new();
        for f in &frames {
            frame::encode(f, &mut hc, &mut wire).unwrap();
        }
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(wire.len() + 1)).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut dec = FrameDecoder::default();
        let mut hd = HeaderDecompressor::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        for p in points {
            buf.extend_from_slice(&wire[at..p]);
            at = p;
            while let Some(f) = dec.decode(&mut buf, &mut hd).unwrap() {
                got.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }
}
