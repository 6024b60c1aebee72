//! The streaming server's container side in berthd: containers and pods
//! from the store, processes and stdio from their shims.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth_cri::v1::{AttachRequest, ExecRequest};

use super::remotecommand::TermSize;
use super::{Attached, Backend, ExecProcess};
use crate::container;
use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::sandbox;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct DaemonBackend {
    pub daemon: Arc<Daemon>,
}

impl Backend for DaemonBackend {
    fn check_container(&self, container_id: &str) -> Result<()> {
        container::streamable(&self.daemon, container_id).map(|_| ())
    }

    fn check_sandbox(&self, sandbox_id: &str) -> Result<()> {
        ready_sandbox(&self.daemon, sandbox_id).map(|_| ())
    }

    fn exec(&self, req: &ExecRequest, size: Option<TermSize>) -> Result<ExecProcess> {
        container::exec_stream(&self.daemon, req, size)
    }

    fn attach(&self, req: &AttachRequest) -> Result<Attached> {
        container::attach(&self.daemon, req)
    }

    fn connect(&self, sandbox_id: &str, port: u16) -> Result<TcpStream> {
        let netns = ready_sandbox(&self.daemon, sandbox_id)?;
        connect_in(netns, port)
    }
}

/// The network namespace of a ready pod (`None`: the host's).
fn ready_sandbox(daemon: &Daemon, id: &str) -> Result<Option<PathBuf>> {
    let record = sandbox::find(daemon, id)?;
    sandbox::require_ready(&record, "it must be ready to forward its ports")?;
    let ctx = sandbox::context(daemon, record)?;
    Ok(ctx.namespace_path(sandbox::namespaces::Kind::Net))
}

/// Connects to `localhost:port`, inside `netns` when given. The socket is
/// made on a short-lived thread that entered the namespace, so berthd's
/// own threads never change namespace; a socket keeps the namespace it was
/// made in.
pub fn connect_in(netns: Option<PathBuf>, port: u16) -> Result<TcpStream> {
    let Some(netns) = netns else {
        return connect_localhost(port);
    };
    sandbox::namespaces::in_netns(&netns, "port-forward", move || connect_localhost(port))
}

fn connect_localhost(port: u16) -> Result<TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(s) => Ok(s),
        Err(first) => {
            // A server listening on IPv6 loopback only.
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| {
                Error::io(
                    format!("failed to connect to localhost:{port} inside the pod"),
                    first,
                )
            })
        }
    }
}
