//! The `/metrics` endpoint: plain HTTP/1.1 on `metrics.address`.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{Live, process_stats};
use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::store::{ContainerRecord, ContainerState, SandboxRecord, SandboxState};

/// The running server; dropping it stops accepting scrapes.
pub struct MetricsServer {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Binds `metrics.address` and serves scrapes; `None` when it is empty
/// (metrics off). The bound address goes into the log and `Status`.
pub async fn start(daemon: &Arc<Daemon>) -> Result<Option<MetricsServer>> {
    let configured = &daemon.config.metrics.address;
    if configured.is_empty() {
        return Ok(None);
    }
    let bind_error = |message: String| Error::Config {
        origin: "metrics.address".into(),
        message,
    };
    let address: SocketAddr = configured
        .parse()
        .map_err(|_| bind_error(format!("must be ip:port, got {configured:?}")))?;
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| bind_error(format!("cannot listen on {address}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Error::io("metrics server address", e))?;
    if !bound.ip().is_loopback() {
        // The config allows it; say so, as anyone who reaches the port can
        // read what runs here (counts only, but still).
        tracing::warn!(address = %bound, "metrics served on a non-loopback address");
    }
    daemon.metrics.set_address(bound);
    tracing::info!(address = %bound, "serving metrics");
    let daemon = daemon.clone();
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let daemon = daemon.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let daemon = daemon.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(daemon, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "metrics connection ended with an error");
                }
            });
        }
    });
    Ok(Some(MetricsServer { task }))
}

fn plain(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(format!("{body}\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn route(daemon: Arc<Daemon>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found; try /metrics");
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "only GET");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    // The store reads and /proc are blocking I/O: off the async workers.
    let text = tokio::task::spawn_blocking(move || {
        let live = live(&daemon);
        daemon.metrics.encode(&live)
    })
    .await;
    match text {
        Ok(text) => {
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(super::CONTENT_TYPE),
            );
            r
        }
        Err(e) => plain(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The scrape-time state. The lists are redb read transactions (MVCC: they
/// neither wait for nor block a write); no object lock, no EventHub or
/// transition mutex is taken. A store that cannot be read leaves its
/// families out rather than failing the scrape.
pub fn live(daemon: &Daemon) -> Live {
    let mut live = Live {
        process: process_stats(),
        ..Live::default()
    };
    match daemon.store.list::<SandboxRecord>() {
        Ok(sandboxes) => {
            live.sandboxes = [
                ("ready", SandboxState::Ready),
                ("notready", SandboxState::NotReady),
            ]
            .into_iter()
            .map(|(name, state)| {
                let n = sandboxes.iter().filter(|s| s.state == state).count();
                (name, n as i64)
            })
            .collect();
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot list sandboxes"),
    }
    match daemon.store.list::<ContainerRecord>() {
        Ok(containers) => {
            live.containers = [
                ("created", ContainerState::Created),
                ("running", ContainerState::Running),
                ("exited", ContainerState::Exited),
                ("unknown", ContainerState::Unknown),
            ]
            .into_iter()
            .map(|(name, state)| {
                let n = containers.iter().filter(|c| c.state == state).count();
                (name, n as i64)
            })
            .collect();
            // Whether each shim still runs, from /proc: the recorded state
            // does not tell a shim that died.
            live.shims = containers
                .iter()
                .filter(|c| daemon.host.is_alive(&c.shim))
                .count() as i64;
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot list containers"),
    }
    live
}
