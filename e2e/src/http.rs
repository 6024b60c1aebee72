//! A minimal HTTP/1.0 client for talking to the harness registry on
//! loopback: enough to check readiness, read manifests and blobs back and
//! push blobs without trusting the code under test. Plain TCP, or TLS
//! (rustls with ring) trusting one CA file, with optional basic auth.
//! [`get_http11`] is an async plain-TCP HTTP/1.1 GET (what a Prometheus
//! scraper sends), for timing a daemon's metrics endpoint.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Where a request goes: a loopback `addr`, over TLS when `tls_ca` names
/// the PEM CA file to trust, with basic auth when `basic_auth` is set.
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub addr: String,
    pub tls_ca: Option<PathBuf>,
    pub basic_auth: Option<(String, String)>,
}

impl Target {
    pub fn plain(addr: &str) -> Target {
        Target {
            addr: addr.to_string(),
            ..Default::default()
        }
    }
}

/// `Basic <base64(user:pass)>`
pub fn basic_auth_header(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// GET `path` from `addr` (must be a 127.0.0.0/8 address) with extra headers.
pub fn get(addr: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<HttpResponse> {
    request(&Target::plain(addr), "GET", path, headers, &[])
}

/// One request (`GET`, `HEAD`, `PUT`, `POST`, ...) to `target`; the
/// connection is closed after the response.
pub fn request(
    target: &Target,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    let addr = target.addr.as_str();
    let sock: std::net::SocketAddr = addr.parse()?;
    anyhow::ensure!(
        sock.ip().is_loopback(),
        "harness HTTP only talks to loopback, not {addr}"
    );
    let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some((user, password)) = &target.basic_auth {
        req.push_str(&format!(
            "Authorization: {}\r\n",
            basic_auth_header(user, password)
        ));
    }
    if !body.is_empty() || matches!(method, "PUT" | "POST" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let raw = match &target.tls_ca {
        None => exchange(stream, req.as_bytes(), body)?,
        Some(ca) => {
            let config = tls_config(ca)?;
            let name = rustls::pki_types::ServerName::try_from(sock.ip().to_string())?;
            let conn = rustls::ClientConnection::new(config, name)?;
            exchange(rustls::StreamOwned::new(conn, stream), req.as_bytes(), body)?
        }
    };
    parse_response(addr, &raw)
}

fn exchange(mut stream: impl Read + Write, head: &[u8], body: &[u8]) -> anyhow::Result<Vec<u8>> {
    stream.write_all(head)?;
    stream.write_all(body)?;
    stream.flush()?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A TLS peer closing without close_notify: the response is whole
        // (HTTP/1.0 ends it with the connection).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(raw)
}

fn tls_config(ca: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)
        .map_err(|e| anyhow::anyhow!("read CA {}: {e}", ca.display()))?
    {
        roots.add(cert.map_err(|e| anyhow::anyhow!("parse CA {}: {e}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// GET `path` from loopback `addr` over plain TCP as HTTP/1.1 with
/// `Connection: close` (no `Accept-Encoding`: an identity body), on tokio;
/// returns once the whole body is read: by `Content-Length`, the last
/// chunk of a chunked body, or the end of the connection. The body is
/// returned de-chunked. Everything, connecting included, within `timeout`.
pub async fn get_http11(addr: &str, path: &str, timeout: Duration) -> anyhow::Result<HttpResponse> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock: std::net::SocketAddr = addr.parse()?;
    anyhow::ensure!(
        sock.ip().is_loopback(),
        "harness HTTP only talks to loopback, not {addr}"
    );
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(sock).await?;
        stream.set_nodelay(true)?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: berth-e2e\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut raw = Vec::with_capacity(64 * 1024);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return parse_http11(addr, &raw, true);
            }
            raw.extend_from_slice(&buf[..n]);
            if let Some(r) = parse_http11(addr, &raw, false)? {
                return Ok(Some(r));
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => anyhow::bail!("GET http://{addr}{path}: no whole response within {timeout:?}"),
        Ok(Err(e)) => Err(e.context(format!("GET http://{addr}{path}"))),
        Ok(Ok(None)) => anyhow::bail!("GET http://{addr}{path}: the connection ended mid-response"),
        Ok(Ok(Some(r))) => Ok(r),
    }
}

/// An HTTP/1.1 response from the bytes read so far: `None` while it is
/// not whole yet; `eof`: the connection has ended (a body without length
/// or chunking ends there).
fn parse_http11(addr: &str, raw: &[u8], eof: bool) -> anyhow::Result<Option<HttpResponse>> {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        anyhow::ensure!(!eof, "no end of headers in response from {addr}");
        return Ok(None);
    };
    let mut r = parse_response(addr, &raw[..split + 4])?;
    let body = &raw[split + 4..];
    let chunked = r
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return match dechunk(body)? {
            Some(b) => {
                r.body = b;
                Ok(Some(r))
            }
            None if eof => anyhow::bail!("chunked body from {addr} ended before its last chunk"),
            None => Ok(None),
        };
    }
    if let Some(len) = r.header("content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| anyhow::anyhow!("bad Content-Length {len:?} from {addr}"))?;
        if body.len() >= len {
            r.body = body[..len].to_vec();
            return Ok(Some(r));
        }
        anyhow::ensure!(
            !eof,
            "body from {addr} ended after {} of {len} bytes",
            body.len()
        );
        return Ok(None);
    }
    if eof {
        r.body = body.to_vec();
        return Ok(Some(r));
    }
    Ok(None)
}

/// A chunked body's data, once its last (empty) chunk is there.
fn dechunk(mut body: &[u8]) -> anyhow::Result<Option<Vec<u8>>> {
    let mut out = Vec::with_capacity(body.len());
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&body[..eol])?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| anyhow::anyhow!("bad chunk size line {line:?}"))?;
        body = &body[eol + 2..];
        if size == 0 {
            // Trailers (none expected) end with an empty line.
            return Ok(body.windows(2).any(|w| w == b"\r\n").then_some(out));
        }
        if body.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}

fn parse_response(addr: &str, raw: &[u8]) -> anyhow::Result<HttpResponse> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no end of headers in response from {addr}"))?;
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("bad status line {status_line:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(HttpResponse {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http11_bodies() {
        let cl = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel";
        assert!(parse_http11("a", cl, false).unwrap().is_none());
        let cl = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let r = parse_http11("a", cl, false).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        let ch =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;x=1\r\nlo\r\n";
        assert!(parse_http11("a", ch, false).unwrap().is_none());
        assert!(parse_http11("a", ch, true).is_err());
        let mut whole = ch.to_vec();
        whole.extend_from_slice(b"0\r\n\r\n");
        let r = parse_http11("a", &whole, false).unwrap().unwrap();
        assert_eq!(r.body, b"hello");
        let eof = b"HTTP/1.1 404 Not Found\r\n\r\nnope";
        assert!(parse_http11("a", eof, false).unwrap().is_none());
        let r = parse_http11("a", eof, true).unwrap().unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"nope"[..]));
    }
}
