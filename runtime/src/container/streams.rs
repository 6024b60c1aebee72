//! Streaming exec and attach: the container side of the streaming server.
//! The shim starts the process (or attaches) and hands berthd the client's
//! ends of the stdio descriptors.

use k8s_cri::v1::{AttachRequest, ExecRequest};

use super::{current, find, not_running};
use crate::daemon::Daemon;
use crate::error::{Error, Result};
use crate::store::{ContainerRecord, ContainerState};
use crate::streaming::remotecommand::TermSize;
use crate::streaming::{Attached, ExecProcess};

/// The container, if exec and attach can reach it now.
pub fn streamable(daemon: &Daemon, id: &str) -> Result<ContainerRecord> {
    let record = current(daemon, find(daemon, id)?);
    tracing::Span::current().record("container_id", record.id.as_str());
    if record.state != ContainerState::Running {
        return Err(not_running(&record));
    }
    Ok(record)
}

pub fn exec_stream(
    daemon: &Daemon,
    req: &ExecRequest,
    size: Option<TermSize>,
) -> Result<ExecProcess> {
    let _ = size;
    let _record = streamable(daemon, &req.container_id)?;
    Err(Error::Unimplemented("streaming exec"))
}

pub fn attach(daemon: &Daemon, req: &AttachRequest) -> Result<Attached> {
    let _record = streamable(daemon, &req.container_id)?;
    Err(Error::Unimplemented("attach"))
}
