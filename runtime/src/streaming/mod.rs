//! The streaming server: exec, attach and port-forward sessions for
//! kubelet, kubectl and crictl.
//!
//! `Exec`, `Attach` and `PortForward` only validate the request and answer a
//! URL with a single-use token ([`tokens`]). The client then connects to
//! that URL over HTTP and upgrades to SPDY/3.1 ([`spdy`]) or WebSocket
//! ([`ws`]); both transports produce the same set of byte streams, served by
//! [`remotecommand`] (exec, attach) and [`portforward`]. The container side
//! is a [`Backend`]: the shim hands berthd the process's own pipe or pty
//! descriptors, so bytes go straight between client and process.

pub mod backend;
pub mod fdio;
mod http;
pub mod portforward;
pub mod remotecommand;
mod spdy;
pub mod tokens;
pub mod ws;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use berth_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use bytes::Bytes;
use tokio::sync::{Semaphore, watch};

use crate::config::StreamingConfig;
use crate::error::{Error, IoContext, Result};
use tokens::{Pending, Tokens};

/// How long a streaming URL stays valid (kubelet's request cache: 1 min).
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Streaming URLs handed out and not yet used, at most.
const MAX_PENDING: usize = 1000;

/// What runs the sessions on the container side. Every method may block:
/// the server calls them on a blocking thread.
pub trait Backend: Send + Sync + 'static {
    /// Checks that an exec or attach target can be streamed (before a URL
    /// is handed out).
    fn check_container(&self, container_id: &str) -> Result<()>;
    /// Checks that a pod's ports can be forwarded.
    fn check_sandbox(&self, sandbox_id: &str) -> Result<()>;
    /// Starts `req`'s command in its container; with a terminal of
    /// `size` when the client sent one.
    fn exec(&self, req: &ExecRequest, size: Option<remotecommand::TermSize>)
    -> Result<ExecProcess>;
    /// Attaches to a container's own stdio.
    fn attach(&self, req: &AttachRequest) -> Result<Attached>;
    /// Connects to `localhost:port` in the pod's network namespace.
    fn connect(&self, sandbox_id: &str, port: u16) -> Result<std::net::TcpStream>;
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A process started by exec, with the client's ends of its stdio.
pub struct ExecProcess {
    /// The process's host pid, when known.
    pub pid: Option<i32>,
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The pty master when the exec has a terminal (for resizing; with a
    /// terminal, stdin and stdout are this same terminal).
    pub pty: Option<OwnedFd>,
    /// Resolves to the exit status. Dropping it before then kills the
    /// process (the client went away).
    pub exit: BoxFuture<'static, Result<i32>>,
}

/// Which of a container's output streams a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Stdout,
    Stderr,
}

/// A live attachment to a container's stdio.
pub struct Attached {
    pub stdin: Option<OwnedFd>,
    pub pty: Option<OwnedFd>,
    /// The container's output as it is written; `None` once the container
    /// has exited and everything was delivered. Dropping it detaches.
    pub output: Box<dyn AttachOutput>,
}

pub trait AttachOutput: Send {
    /// The next chunk of output, `Ok(None)` at its end.
    fn next(&mut self) -> BoxFuture<'_, Result<Option<(Output, Bytes)>>>;
    /// Says that this client's stdin has ended (for `stdin_once`).
    fn stdin_done(&mut self);
}

/// Resolves once a client connection has gone away.
#[derive(Clone)]
pub struct Closed(watch::Receiver<bool>);

pub struct Closer(watch::Sender<bool>);

impl Closed {
    pub fn new() -> (Closed, Closer) {
        let (tx, rx) = watch::channel(false);
        (Closed(rx), Closer(tx))
    }

    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|c| *c).await;
    }
}

impl Closer {
    pub fn close(&self) {
        let _ = self.0.send(true);
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.close();
    }
}

/// The streaming server of one berthd.
pub struct Server {
    tokens: Tokens,
    base_url: String,
    sessions: Arc<Semaphore>,
    max_sessions: usize,
    backend: Arc<dyn Backend>,
}

impl Server {
    /// Binds `config.address` and starts serving on the current tokio
    /// runtime. The URLs it hands out name the address actually bound.
    pub async fn start(config: &StreamingConfig, backend: Arc<dyn Backend>) -> Result<Arc<Server>> {
        let address: SocketAddr = config.address.parse().map_err(|_| {
            Error::InvalidArgument(format!(
                "streaming.address must be ip:port, got {:?}",
                config.address
            ))
        })?;
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(http::tls_acceptor(cert, key)?),
            _ => None,
        };
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .context(|| format!("bind the streaming server to {address}"))?;
        let bound = listener
            .local_addr()
            .context(|| "streaming server address".into())?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let server = Arc::new(Server {
            tokens: Tokens::new(TOKEN_TTL, MAX_PENDING),
            base_url: format!("{scheme}://{bound}"),
            sessions: Arc::new(Semaphore::new(config.max_sessions)),
            max_sessions: config.max_sessions,
            backend,
        });
        tracing::info!(url = %server.base_url, "streaming server listening");
        tokio::spawn(http::accept_loop(server.clone(), listener, tls));
        Ok(server)
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn url(&self, request: Pending) -> Result<String> {
        let kind = request.kind();
        let token = self.tokens.insert(request)?;
        Ok(format!("{}/{kind}/{token}", self.base_url))
    }

    /// Exec: validates the request and hands out its URL.
    pub async fn exec_url(&self, req: ExecRequest) -> Result<String> {
        validate_stdio(req.tty, req.stdin, req.stdout, req.stderr)?;
        if req.cmd.is_empty() {
            return Err(Error::InvalidArgument("exec command is required".into()));
        }
        let req = self.checked_container(req, |r| &r.container_id).await?;
        self.url(Pending::Exec(req))
    }

    pub async fn attach_url(&self, req: AttachRequest) -> Result<String> {
        validate_stdio(req.tty, req.stdin, req.stdout, req.stderr)?;
        let req = self.checked_container(req, |r| &r.container_id).await?;
        self.url(Pending::Attach(req))
    }

    pub async fn port_forward_url(&self, req: PortForwardRequest) -> Result<String> {
        if req.pod_sandbox_id.is_empty() {
            return Err(Error::InvalidArgument("pod_sandbox_id is required".into()));
        }
        if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(Error::InvalidArgument(format!(
                "port {p} is not a TCP port"
            )));
        }
        let backend = self.backend.clone();
        let id = req.pod_sandbox_id.clone();
        blocking(move || backend.check_sandbox(&id)).await?;
        self.url(Pending::PortForward(req))
    }

    async fn checked_container<R: Send + 'static>(
        &self,
        req: R,
        id: fn(&R) -> &String,
    ) -> Result<R> {
        if id(&req).is_empty() {
            return Err(Error::InvalidArgument("container_id is required".into()));
        }
        let backend = self.backend.clone();
        blocking(move || backend.check_container(id(&req)).map(|()| req)).await
    }
}

/// Kubelet's rules for which streams a session may ask for.
fn validate_stdio(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> Result<()> {
    if tty && stderr {
        return Err(Error::InvalidArgument(
            "tty and stderr cannot both be true: a terminal has one output stream".into(),
        ));
    }
    if !stdin && !stdout && !stderr {
        return Err(Error::InvalidArgument(
            "one of stdin, stdout or stderr must be set".into(),
        ));
    }
    Ok(())
}

/// Runs blocking backend work off the async workers.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Internal(format!("streaming task: {e}")))?
}

#[cfg(test)]
mod tests;
