//! Where a request's time goes: named phases logged at debug level, so a
//! slow RPC can be broken down without a profiler.

use std::time::Instant;

/// Wall-clock time in nanoseconds since the epoch, as CRI timestamps are.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or_default()
}

pub struct Phases {
    what: &'static str,
    started: Instant,
    last: Instant,
    parts: Vec<(&'static str, u64)>,
}

impl Phases {
    pub fn start(what: &'static str) -> Phases {
        let now = Instant::now();
        Phases {
            what,
            started: now,
            last: now,
            parts: Vec::new(),
        }
    }

    /// Closes the phase that ran since the previous mark.
    pub fn mark(&mut self, phase: &'static str) {
        let now = Instant::now();
        self.parts
            .push((phase, (now - self.last).as_micros() as u64));
        self.last = now;
    }

    pub fn log(&self) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            let parts: Vec<String> = self
                .parts
                .iter()
                .map(|(p, us)| format!("{p}={us}us"))
                .collect();
            tracing::debug!(
                total_us = self.started.elapsed().as_micros() as u64,
                phases = %parts.join(" "),
                "{} timing",
                self.what
            );
        }
    }
}
