//! One log line per CRI call: its method (and the ids the handler recorded
//! on the `cri` span), how long it took and its gRPC code. Success at
//! debug; a failure at warn with its message (the cause chain
//! `cri/status.rs` put there; Internal errors are also logged at error
//! there). A tower layer on the tonic server, so no handler repeats it.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Code;

#[derive(Clone, Copy, Default)]
pub struct RpcLogLayer;

impl<S> tower::Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;
    fn layer(&self, inner: S) -> RpcLog<S> {
        RpcLog { inner }
    }
}

#[derive(Clone)]
pub struct RpcLog<S> {
    inner: S,
}

/// The gRPC code of a response, from its headers: a failed unary call is
/// "trailers-only" (the status is in the headers); a successful one has
/// its status in the trailers, which come later, so no status header
/// means OK.
pub fn response_code(headers: &http::HeaderMap) -> Code {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

/// `grpc-message` is percent-encoded.
fn response_message(headers: &http::HeaderMap) -> String {
    let raw = headers
        .get("grpc-message")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if raw[i] == b'%'
            && i + 2 < raw.len()
            && let (Some(h), Some(l)) = (hex(raw[i + 1]), hex(raw[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(raw[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcLog<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: std::fmt::Display,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let duration_us = started.elapsed().as_micros() as u64;
            match &result {
                Ok(response) => {
                    let code = response_code(response.headers());
                    if code == Code::Ok {
                        tracing::debug!(method, duration_us, code = ?code, "CRI call");
                    } else {
                        let message = response_message(response.headers());
                        tracing::warn!(method, duration_us, code = ?code, error = %message, "CRI call failed");
                    }
                }
                Err(e) => {
                    tracing::warn!(method, duration_us, error = %e, "CRI call failed in transport")
                }
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_and_message_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(response_code(&h), Code::Ok);
        h.insert("grpc-status", "5".parse().unwrap());
        h.insert(
            "grpc-message",
            "container%20%22x%22%20not%20found%3A%20gone%25"
                .parse()
                .unwrap(),
        );
        assert_eq!(response_code(&h), Code::NotFound);
        assert_eq!(response_message(&h), "container \"x\" not found: gone%");
        h.insert("grpc-message", "bad%2".parse().unwrap());
        assert_eq!(response_message(&h), "bad%2");
    }
}
