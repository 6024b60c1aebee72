//! Session tests: client and server over in-memory and loopback transports.

use std::time::{Duration, Instant};

use berth_spdy::frame::{self, Frame, FrameDecoder, HeaderCompressor, HeaderDecompressor};
use berth_spdy::{Config, Connection, Headers};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn pair(cfg: Config) -> (Connection, berth_spdy::Incoming, Connection) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let (srv, inc) = Connection::server(a, cfg.clone());
    let cli = Connection::client(b, cfg);
    (srv, inc, cli)
}

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn open_reply_and_echo() {
    let (_srv, mut inc, cli) = pair(Config::default());
    let server = tokio::spawn(async move {
        let mut s = inc.accept().await.unwrap();
        assert_eq!(s.headers().get("streamtype"), Some("stdin"));
        assert_eq!(s.id() % 2, 1);
        s.reply(Headers::new().with("ok", "yes")).unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        s.write_all(&buf).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut s = cli
        .open(Headers::new().with("StreamType", "stdin"), false)
        .unwrap();
    let reply = s.wait_reply().await.unwrap();
    assert_eq!(reply.get("ok"), Some("yes"));
    s.write_all(b"hello spdy").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, b"hello spdy");
    server.await.unwrap();
}

#[tokio::test]
async fn many_concurrent_streams_bidirectional() {
    let cfg = Config {
        auto_reply: true,
        ..Config::default()
    };
    let (_srv, mut inc, cli) = pair(cfg);
    tokio::spawn(async move {
        while let Some(s) = inc.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    });
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        let s = cli
            .open(Headers::new().with("requestid", i.to_string()), false)
            .unwrap();
        tasks.push(tokio::spawn(async move {
            s.wait_reply().await.unwrap();
            let data: Vec<u8> = (0..(50_000 + i * 1000))
                .map(|x| (x * 7 + i) as u8)
                .collect();
            let (mut r, mut w) = s.into_split();
            let d2 = data.clone();
            let wt = tokio::spawn(async move {
                w.write_all(&d2).await.unwrap();
                w.shutdown().await.unwrap();
            });
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            wt.await.unwrap();
            assert_eq!(got, data);
        }));
    }
    for t in tasks {
        tokio::time::timeout(T, t).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn fin_gives_eof_and_reset_gives_error() {
    let (_srv, mut inc, cli) = pair(Config::default());
    let a = cli.open(Headers::new().with("n", "a"), true).unwrap();
    let b = cli.open(Headers::new().with("n", "b"), false).unwrap();
    let mut sa = inc.accept().await.unwrap();
    let mut sb = inc.accept().await.unwrap();
    sa.reply(Headers::new()).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(sa.read(&mut buf).await.unwrap(), 0, "SYN_STREAM FIN = EOF");
    // Peer reset: reads and writes fail.
    b.reset(frame::rst::CANCEL);
    let err = tokio::time::timeout(T, sb.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(sb.write_all(b"x").await.is_err());
    drop(a);
}

/// Data the peer sent before its RST_STREAM is still read (spdystream
/// keeps it, and client-go resets a port-forward data stream right after
/// its last bytes); the reset shows after it.
#[tokio::test]
async fn data_before_a_peer_reset_is_still_read() {
    let (_srv, mut inc, cli) = pair(Config::default());
    let mut c = cli.open(Headers::new(), false).unwrap();
    let mut s = inc.accept().await.unwrap();
    s.reply(Headers::new()).unwrap();
    c.wait_reply().await.unwrap();
    c.write_all(b"last words").await.unwrap();
    c.flush().await.unwrap();
    // Let the data arrive before the reset.
    tokio::time::sleep(Duration::from_millis(50)).await;
    c.reset(frame::rst::CANCEL);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4];
    let err = loop {
        match tokio::time::timeout(T, s.read(&mut buf)).await.unwrap() {
            Ok(0) => panic!("EOF instead of the reset"),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break e,
        }
    };
    assert_eq!(got, b"last words");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn refusing_a_stream() {
    let (_srv, mut inc, cli) = pair(Config::default());
    let s = cli.open(Headers::new(), false).unwrap();
    let srv_s = inc.accept().await.unwrap();
    srv_s.reset(frame::rst::REFUSED_STREAM);
    let err = tokio::time::timeout(T, s.wait_reply())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
}

#[tokio::test]
async fn ping_round_trip_both_ways() {
    let (srv, _inc, cli) = pair(Config::default());
    tokio::time::timeout(T, cli.ping()).await.unwrap().unwrap();
    tokio::time::timeout(T, srv.ping()).await.unwrap().unwrap();
}

#[tokio::test]
async fn slow_reader_bounded_and_no_deadlock() {
    let cfg = Config {
        initial_window: 64 * 1024,
        send_buffer: 64 * 1024,
        auto_reply: true,
        ..Config::default()
    };
    let (_srv, mut inc, cli) = pair(cfg);
    let mut s = cli.open(Headers::new(), false).unwrap();
    s.wait_reply().await.unwrap();
    let total = 4 << 20;
    let writer = tokio::spawn(async move {
        let chunk = vec![7u8; 100_000];
        let mut sent = 0;
        while sent < total {
            s.write_all(&chunk).await.unwrap();
            sent += chunk.len();
        }
        s.shutdown().await.unwrap();
        s
    });
    let mut srv_s = inc.accept().await.unwrap();
    // Not reading: the writer must stall once windows and buffers are full.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !writer.is_finished(),
        "writer should be blocked by flow control"
    );
    // A second stream still works meanwhile (flow control is per stream).
    let mut other = cli.open(Headers::new(), false).unwrap();
    other.wait_reply().await.unwrap();
    other.write_all(b"ping").await.unwrap();
    other.shutdown().await.unwrap();
    let mut o = inc.accept().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(T, o.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"ping");
    // Now drain slowly.
    let mut n = 0;
    let mut buf = vec![0u8; 10_000];
    loop {
        let k = tokio::time::timeout(T, srv_s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        if k == 0 {
            break;
        }
        n += k;
    }
    assert!(n >= total);
    tokio::time::timeout(T, writer).await.unwrap().unwrap();
}

/// A peer that behaves like Go's spdystream: never sends SETTINGS or
/// WINDOW_UPDATE, and sends far more than 64 KiB. Neither side may stall,
/// and our server must keep sending to it beyond 64 KiB.
#[tokio::test]
async fn spdystream_like_peer_without_flow_control() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (_srv, mut inc) = Connection::server(
        a,
        Config {
            auto_reply: true,
            ..Config::default()
        },
    );
    let (mut rd, mut wr) = tokio::io::split(b);
    let total = 1 << 20;
    let raw_writer = tokio::spawn(async move {
        let mut hc = HeaderCompressor::new();
        let mut out = BytesMut::new();
        let syn = Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers: Headers::new().with("streamtype", "stdin"),
        };
        frame::encode(&syn, &mut hc, &mut out).unwrap();
        let chunk = bytes::Bytes::from(vec![1u8; 32 * 1024]);
        for i in 0..(total / chunk.len()) {
            let f = Frame::Data {
                stream_id: 1,
                fin: i + 1 == total / chunk.len(),
                data: chunk.clone(),
            };
            frame::encode(&f, &mut hc, &mut out).unwrap();
            wr.write_all(&out).await.unwrap();
            out.clear();
        }
        wr
    });
    let echo = tokio::spawn(async move {
        let mut s = inc.accept().await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf.len(), total);
        s.write_all(&buf).await.unwrap();
        s.shutdown().await.unwrap();
    });
    // Read what the server sends back without ever granting window.
    let mut dec = FrameDecoder::default();
    let mut hd = HeaderDecompressor::new();
    let mut buf = BytesMut::new();
    let mut got = 0;
    let mut saw_reply = false;
    let mut fin = false;
    while !fin {
        while let Some(f) = dec.decode(&mut buf, &mut hd).unwrap() {
            match f {
                Frame::SynReply { stream_id: 1, .. } => saw_reply = true,
                Frame::Data {
                    stream_id: 1,
                    data,
                    fin: f,
                } => {
                    assert!(
                        saw_reply,
                        "data before SYN_REPLY would be dropped by spdystream"
                    );
                    got += data.len();
                    fin = f;
                }
                _ => {}
            }
        }
        if fin {
            break;
        }
        let n = tokio::time::timeout(T, rd.read_buf(&mut buf))
            .await
            .expect("server stalled")
            .unwrap();
        assert!(n > 0);
    }
    assert_eq!(got, total);
    echo.await.unwrap();
    raw_writer.await.unwrap();
}

/// A peer that closes a stream twice (spdystream sends a second empty FIN
/// frame) loses none of the data it sent before: the reader still reads it
/// all, then EOF.
#[tokio::test]
async fn a_second_fin_keeps_unread_data() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (_srv, mut inc) = Connection::server(
        a,
        Config {
            auto_reply: true,
            ..Config::default()
        },
    );
    let (_rd, mut wr) = tokio::io::split(b);
    let mut hc = HeaderCompressor::new();
    let mut out = BytesMut::new();
    let frames = [
        Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers: Headers::new().with("streamtype", "stdin"),
        },
        Frame::Data {
            stream_id: 1,
            fin: false,
            data: bytes::Bytes::from_static(b"via-spdy\n"),
        },
        Frame::Data {
            stream_id: 1,
            fin: true,
            data: bytes::Bytes::new(),
        },
        Frame::Data {
            stream_id: 1,
            fin: true,
            data: bytes::Bytes::new(),
        },
    ];
    for f in &frames {
        frame::encode(f, &mut hc, &mut out).unwrap();
    }
    wr.write_all(&out).await.unwrap();
    let mut s = inc.accept().await.unwrap();
    // Everything has arrived before the first read.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut got = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"via-spdy\n");
}

#[tokio::test]
async fn protocol_violation_closes_connection_only() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (srv, mut inc) = Connection::server(a, Config::default());
    let (_rd, mut wr) = tokio::io::split(b);
    let mut hc = HeaderCompressor::new();
    let mut out = BytesMut::new();
    for id in [3u32, 1] {
        // 1 after 3: a reused/lower id.
        let syn = Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers: Headers::new(),
        };
        frame::encode(&syn, &mut hc, &mut out).unwrap();
    }
    wr.write_all(&out).await.unwrap();
    let mut s3 = inc.accept().await.unwrap();
    let mut buf = [0u8; 4];
    let err = tokio::time::timeout(T, s3.read(&mut buf))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert!(inc.accept().await.is_none());
    assert!(srv.is_closed());
    // Another connection is unaffected.
    let (_srv2, mut inc2, cli2) = pair(Config::default());
    let _c = cli2.open(Headers::new(), false).unwrap();
    assert!(inc2.accept().await.is_some());
}

#[tokio::test]
async fn goaway_on_close_ends_peer() {
    let (srv, mut inc, cli) = pair(Config::default());
    let mut s = cli.open(Headers::new(), false).unwrap();
    let _ss = inc.accept().await.unwrap();
    srv.close().await;
    let mut buf = [0u8; 4];
    assert!(
        tokio::time::timeout(T, s.read(&mut buf))
            .await
            .unwrap()
            .is_err()
    );
    assert!(cli.open(Headers::new(), false).is_err());
    assert!(inc.accept().await.is_none());
}

#[tokio::test]
async fn garbage_input_closes_without_panic() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (srv, mut inc) = Connection::server(a, Config::default());
    let (_rd, mut wr) = tokio::io::split(b);
    wr.write_all(&[0x80, 0x07, 0, 1, 0, 0, 0, 0, 1, 2, 3])
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(T, inc.accept())
            .await
            .unwrap()
            .is_none()
    );
    assert!(srv.is_closed());
}

async fn throughput(total: usize) -> f64 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let client_io = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (server_io, _) = listener.accept().await.unwrap();
    client_io.set_nodelay(true).unwrap();
    server_io.set_nodelay(true).unwrap();
    let cfg = Config {
        auto_reply: true,
        ..Config::default()
    };
    let (_srv, mut inc) = Connection::server(server_io, cfg.clone());
    let cli = Connection::client(client_io, cfg);
    let sink = tokio::spawn(async move {
        let mut s = inc.accept().await.unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0;
        loop {
            let k = s.read(&mut buf).await.unwrap();
            if k == 0 {
                break n;
            }
            n += k;
        }
    });
    let mut s = cli.open(Headers::new(), false).unwrap();
    s.wait_reply().await.unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    s.shutdown().await.unwrap();
    let n = sink.await.unwrap();
    assert_eq!(n, sent);
    sent as f64 / start.elapsed().as_secs_f64() / 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn throughput_smoke() {
    let mbps = throughput(32 << 20).await;
    eprintln!("throughput (32 MiB, this profile): {mbps:.0} MB/s");
}

/// `cargo test -p berth-spdy --release -- --ignored throughput_256m --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn throughput_256m() {
    let mbps = throughput(256 << 20).await;
    eprintln!("throughput (256 MiB over TCP loopback, one stream): {mbps:.0} MB/s");
}
