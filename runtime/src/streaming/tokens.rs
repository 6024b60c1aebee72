//! Single-use tokens for streaming URLs.
//!
//! `Exec`, `Attach` and `PortForward` answer a URL carrying a random token;
//! the request behind it is kept here until the client connects once, or
//! until it expires (kubelet's cache keeps them one minute).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use berth_cri::v1::{AttachRequest, ExecRequest, PortForwardRequest};
use rand::RngCore;

use crate::error::{Error, Result};

/// A request waiting for its client to connect.
#[derive(Debug, Clone, PartialEq)]
pub enum Pending {
    Exec(ExecRequest),
    Attach(AttachRequest),
    PortForward(PortForwardRequest),
}

impl Pending {
    /// The URL path segment of this kind of request.
    pub fn kind(&self) -> &'static str {
        match self {
            Pending::Exec(_) => "exec",
            Pending::Attach(_) => "attach",
            Pending::PortForward(_) => "portforward",
        }
    }
}

struct Entry {
    request: Pending,
    expires: Instant,
}

pub struct Tokens {
    entries: Mutex<HashMap<String, Entry>>,
    ttl: Duration,
    max: usize,
}

impl Tokens {
    pub fn new(ttl: Duration, max: usize) -> Tokens {
        Tokens {
            entries: Mutex::new(HashMap::new()),
            ttl,
            max,
        }
    }

    /// Keeps `request` and returns its token.
    pub fn insert(&self, request: Pending) -> Result<String> {
        let mut bytes = [0u8; 18];
        rand::rng().fill_bytes(&mut bytes);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|_, e| e.expires > now);
        if entries.len() >= self.max {
            return Err(Error::ResourceExhausted(format!(
                "{} streaming requests are waiting for their clients; try again later",
                entries.len()
            )));
        }
        entries.insert(
            token.clone(),
            Entry {
                request,
                expires: now + self.ttl,
            },
        );
        Ok(token)
    }

    /// Takes the request of `token` if it is of kind `kind` and has not
    /// expired. A token works once: a second use finds nothing.
    pub fn consume(&self, kind: &str, token: &str) -> Option<Pending> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries.remove(token)?;
        (entry.expires > Instant::now() && entry.request.kind() == kind).then_some(entry.request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec() -> Pending {
        Pending::Exec(ExecRequest {
            container_id: "c".into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
    }

    #[test]
    fn a_token_works_once() {
        let tokens = Tokens::new(Duration::from_secs(60), 10);
        let t = tokens.insert(exec()).unwrap();
        assert!(t.len() >= 24, "token {t} is too short to be unguessable");
        assert_eq!(tokens.consume("exec", &t), Some(exec()));
        assert_eq!(tokens.consume("exec", &t), None);
        assert_eq!(tokens.consume("exec", "unknown"), None);
    }

    #[test]
    fn a_token_is_bound_to_its_kind_and_spent_by_a_wrong_use() {
        let tokens = Tokens::new(Duration::from_secs(60), 10);
        let t = tokens.insert(exec()).unwrap();
        assert_eq!(tokens.consume("attach", &t), None);
        assert_eq!(tokens.consume("exec", &t), None);
    }

    #[test]
    fn tokens_expire() {
        let tokens = Tokens::new(Duration::from_millis(1), 10);
        let t = tokens.insert(exec()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(tokens.consume("exec", &t), None);
    }

    #[test]
    fn too_many_pending_requests_are_refused_until_some_expire() {
        let tokens = Tokens::new(Duration::from_millis(20), 2);
        tokens.insert(exec()).unwrap();
        tokens.insert(exec()).unwrap();
        assert!(matches!(
            tokens.insert(exec()),
            Err(Error::ResourceExhausted(_))
        ));
        std::thread::sleep(Duration::from_millis(30));
        tokens.insert(exec()).unwrap();
    }
}
