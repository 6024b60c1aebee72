//! A minimal HTTP/1.0 client for talking to the harness registry on
//! loopback: enough to check readiness, read manifests and blobs back and
//! push blobs without trusting the code under test. Plain TCP, or TLS
//! (rustls with ring) trusting one CA file, with optional basic auth.

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
