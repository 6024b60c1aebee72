//! Container lifecycle events for `GetContainerEvents` (kubelet's evented
//! PLEG, `crictl events`).
//!
//! Every state change of a container (and of a sandbox, which kubelet sees
//! as the pod's own container, as containerd publishes it) is published here
//! by the one transition point that made it durable, in commit order. Each
//! subscriber has a bounded buffer; one that does not keep up is dropped
//! with a log line, so a slow or stuck client never blocks a CRI call or
//! another subscriber.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::store::ContainerRecord;

/// Events buffered per subscriber before it counts as stuck.
pub const SUBSCRIBER_BUFFER: usize = 1024;

/// Events published before the first subscriber, shortly after start-up
/// (exits that happened while berthd was down, found by recovery), are
/// handed to the first subscriber if it connects within this window.
const STARTUP_REPLAY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub kind: EventKind,
    /// The container's id, or the sandbox's for a sandbox event.
    pub id: String,
    pub sandbox_id: String,
    pub at_ns: i64,
    /// The container as the transition left it; `None` for sandbox events.
    pub container: Option<ContainerRecord>,
}

struct Subscriber {
    id: u64,
    /// The metrics label: which code subscribed (a constant).
    kind: &'static str,
    name: String,
    tx: mpsc::Sender<Event>,
}

struct Inner {
    next_id: u64,
    subscribers: Vec<Subscriber>,
    /// Start-up events kept for the first subscriber; `None` once it took
    /// them or the replay window has passed.
    backlog: Option<Vec<Event>>,
    published: u64,
    dropped_subscribers: u64,
}

pub struct EventHub {
    started: Instant,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new(Arc::default())
    }
}

impl EventHub {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        EventHub {
            started: Instant::now(),
            metrics,
            inner: Mutex::new(Inner {
                next_id: 1,
                subscribers: Vec::new(),
                backlog: Some(Vec::new()),
                published: 0,
                dropped_subscribers: 0,
            }),
        }
    }

    /// A new subscriber of `kind` (a constant naming the code that
    /// subscribes, for metrics) named `name` (for logs); its receiver ends
    /// when it is dropped for falling behind.
    pub fn subscribe(&self, kind: &'static str, name: &str) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let mut inner = self.inner.lock().unwrap();
        self.expire_backlog(&mut inner);
        for event in inner.backlog.take().unwrap_or_default() {
            let _ = tx.try_send(event);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        tracing::debug!(subscriber = id, name, "event subscriber added");
        inner.subscribers.push(Subscriber {
            id,
            kind,
            name: name.to_string(),
            tx,
        });
        rx
    }

    /// Hands `event` to every subscriber without waiting for any.
    pub fn publish(&self, event: Event) {
        let mut inner = self.inner.lock().unwrap();
        inner.published += 1;
        self.metrics.event_published();
        self.expire_backlog(&mut inner);
        if let Some(backlog) = &mut inner.backlog
            && backlog.len() < SUBSCRIBER_BUFFER
        {
            backlog.push(event.clone());
        }
        let mut dropped = 0;
        inner
            .subscribers
            .retain(|s| match s.tx.try_send(event.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(
                        subscriber = s.id,
                        name = %s.name,
                        buffered = SUBSCRIBER_BUFFER,
                        "event subscriber does not keep up; dropping it"
                    );
                    dropped += 1;
                    self.metrics.event_dropped(s.kind);
                    false
                }
            });
        inner.dropped_subscribers += dropped;
    }

    pub fn subscriber_count(&self) -> usize {
        self.inner.lock().unwrap().subscribers.len()
    }

    /// Events published and subscribers dropped for falling behind.
    pub fn counters(&self) -> (u64, u64) {
        let inner = self.inner.lock().unwrap();
        (inner.published, inner.dropped_subscribers)
    }

    fn expire_backlog(&self, inner: &mut Inner) {
        if inner.backlog.is_some() && self.started.elapsed() > STARTUP_REPLAY {
            inner.backlog = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str, kind: EventKind) -> Event {
        Event {
            kind,
            id: id.into(),
            sandbox_id: "p".into(),
            at_ns: 1,
            container: None,
        }
    }

    #[test]
    fn every_subscriber_gets_events_in_order() {
        let hub = EventHub::default();
        let mut a = hub.subscribe("test", "a");
        let mut b = hub.subscribe("test", "b");
        for kind in [
            EventKind::Created,
            EventKind::Started,
            EventKind::Stopped,
            EventKind::Deleted,
        ] {
            hub.publish(event("c", kind));
        }
        for rx in [&mut a, &mut b] {
            let kinds: Vec<EventKind> = std::iter::from_fn(|| rx.try_recv().ok())
                .map(|e| e.kind)
                .collect();
            assert_eq!(
                kinds,
                [
                    EventKind::Created,
                    EventKind::Started,
                    EventKind::Stopped,
                    EventKind::Deleted
                ]
            );
        }
    }

    #[test]
    fn a_stuck_subscriber_is_dropped_and_others_keep_receiving() {
        let hub = EventHub::default();
        let _stuck = hub.subscribe("test", "stuck");
        let mut live = hub.subscribe("test", "live");
        for i in 0..SUBSCRIBER_BUFFER * 3 {
            hub.publish(event(&i.to_string(), EventKind::Created));
            while live.try_recv().is_ok() {}
        }
        assert_eq!(hub.subscriber_count(), 1);
        assert_eq!(hub.counters().1, 1);
        hub.publish(event("last", EventKind::Created));
        assert_eq!(live.try_recv().unwrap().id, "last");
    }

    #[test]
    fn start_up_events_reach_the_first_subscriber_only() {
        let hub = EventHub::default();
        hub.publish(event("exited-while-down", EventKind::Stopped));
        let mut first = hub.subscribe("test", "kubelet");
        assert_eq!(first.try_recv().unwrap().id, "exited-while-down");
        hub.publish(event("later", EventKind::Stopped));
        let mut second = hub.subscribe("test", "crictl");
        assert_eq!(first.try_recv().unwrap().id, "later");
        assert!(second.try_recv().is_err());
    }

    #[test]
    fn a_gone_subscriber_is_forgotten() {
        let hub = EventHub::default();
        drop(hub.subscribe("test", "gone"));
        hub.publish(event("c", EventKind::Created));
        assert_eq!(hub.subscriber_count(), 0);
        assert_eq!(hub.counters().1, 0);
    }
}
