//! One log line per CRI call: its method (and the ids the handler recorded
//! on the `cri` span), how long it took and its gRPC code. Success at
//! debug; a failure at warn with its message (the cause chain
//! `cri/status.rs` put there; Internal errors are also logged at error
//! there). A tower layer on the tonic server, so no handler repeats it.
//! The same layer counts each call and its latency in [`Metrics`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::Code;

use crate::metrics::Metrics;

#[derive(Clone)]
pub struct RpcLogLayer {
    pub metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for RpcLogLayer {
    type Service = RpcLog<S>;
    fn layer(&self, inner: S) -> RpcLog<S> {
        RpcLog {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// The status of a failed call, from its response headers: a failed
/// unary call is "trailers-only" (the status is in the headers); a
/// successful one has its status in the trailers, which come later, so no
/// status header means OK.
pub fn failure(headers: &http::HeaderMap) -> Option<tonic::Status> {
    tonic::Status::from_header_map(headers).filter(|s| s.code() != Code::Ok)
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
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let result = future.await;
            let elapsed = started.elapsed();
            let duration_us = elapsed.as_micros() as u64;
            let code = match &result {
                Ok(response) => match failure(response.headers()) {
                    None => {
                        tracing::debug!(method, duration_us, code = ?Code::Ok, "CRI call");
                        Code::Ok
                    }
                    Some(status) => {
                        tracing::warn!(method, duration_us, code = ?status.code(), error = %status.message(), "CRI call failed");
                        status.code()
                    }
                },
                Err(e) => {
                    tracing::warn!(method, duration_us, error = %e, "CRI call failed in transport");
                    Code::Unknown
                }
            };
            // A stream (GetContainerEvents) counts when its headers go out.
            metrics.rpc_done(&method, code, elapsed);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_from_headers() {
        let mut h = http::HeaderMap::new();
        assert!(failure(&h).is_none(), "no status header: OK");
        h.insert("grpc-status", "0".parse().unwrap());
        assert!(failure(&h).is_none());
        h.insert("grpc-status", "5".parse().unwrap());
        h.insert(
            "grpc-message",
            "container%20%22x%22%20not%20found%3A%20gone%25"
                .parse()
                .unwrap(),
        );
        let status = failure(&h).unwrap();
        assert_eq!(status.code(), Code::NotFound);
        assert_eq!(status.message(), "container \"x\" not found: gone%");
    }
}
