//! GetContainerEvents: the domain's lifecycle events as CRI messages.
//!
//! Each subscriber has a task of its own that turns events into messages
//! (reading the pod's status when the event is taken) and hands them to
//! the gRPC stream. A client that stops reading blocks only that task;
//! the hub then drops the subscriber when its buffer is full, which ends
//! the stream.

use std::pin::Pin;
use std::sync::Arc;

use berth_cri::v1::{ContainerEventResponse, ContainerEventType};
use tokio_stream::Stream;
use tonic::Status;

use super::convert;
use crate::container;
use crate::daemon::Daemon;
use crate::error::Result;
use crate::events::{Event, EventKind};
use crate::sandbox;

pub type EventStream = Pin<Box<dyn Stream<Item = Result<ContainerEventResponse, Status>> + Send>>;

/// Messages queued for the gRPC stream of one subscriber.
const STREAM_BUFFER: usize = 64;

pub fn stream(daemon: Arc<Daemon>, who: &str) -> EventStream {
    let mut events = daemon.events.subscribe("GetContainerEvents", who);
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let message = {
                let event = event.clone();
                daemon.run(move |d| message(d, &event)).await
            };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(id = %event.id, error = %crate::error::chain(&e), "could not build a container event");
                    continue;
                }
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

fn event_type(kind: EventKind) -> ContainerEventType {
    match kind {
        EventKind::Created => ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => ContainerEventType::ContainerDeletedEvent,
    }
}

/// The CRI message of `event`: the container's status as the transition
/// left it, beside the pod's status and its other containers as they are.
fn message(daemon: &Daemon, event: &Event) -> Result<ContainerEventResponse> {
    let sandbox = daemon
        .store
        .get::<crate::store::SandboxRecord>(&event.sandbox_id)?
        .map(|r| sandbox::context(daemon, r))
        .transpose()?;
    let pod_sandbox_status = sandbox
        .as_ref()
        .map(|ctx| convert::pod_sandbox_status(&ctx.record, &ctx.config));
    let mut containers_statuses = Vec::new();
    if sandbox.is_some() {
        for c in container::of_sandbox(daemon, &event.sandbox_id)? {
            let c = match &event.container {
                Some(own) if own.id == c.id => own.clone(),
                _ => container::current(daemon, c),
            };
            containers_statuses.push(convert::container_status_of(&c));
        }
    }
    if let Some(own) = &event.container
        && event.kind != EventKind::Deleted
        && !containers_statuses.iter().any(|s| s.id == own.id)
    {
        containers_statuses.push(convert::container_status_of(own));
    }
    Ok(ContainerEventResponse {
        container_id: event.id.clone(),
        container_event_type: event_type(event.kind).into(),
        created_at: event.at_ns,
        pod_sandbox_status,
        containers_statuses,
    })
}
