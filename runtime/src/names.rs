//! Ids and names of sandboxes and containers: new random ids, and the
//! names kubelet requires to be unique (one sandbox per
//! namespace/name/uid/attempt, one container per sandbox/name/attempt).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::store::{ContainerRecord, SandboxRecord};

/// A new object id: 32 random bytes in hex, as containerd's.
pub fn new_id() -> String {
    let mut bytes = [0u8; 32];
    // SAFETY: getrandom writes at most bytes.len() bytes into bytes.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    assert_eq!(n as usize, bytes.len(), "getrandom failed");
    hex::encode(bytes)
}

/// The longest metadata name, namespace or uid: Kubernetes' bound on an
/// object name (a DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// Labels and annotations of one object together, keys and values: twice
/// Kubernetes' bound on a pod's annotations, so whatever kubelet passes
/// fits, while a list of many objects stays far below gRPC's message
/// limit.
pub const MAX_LABELS_BYTES: usize = 512 << 10;

/// A name, namespace or uid from CRI metadata: it becomes part of keys,
/// log paths and log lines, so no `/`, no control character, bounded.
pub fn check_name(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{what} is required")));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes long; at most {MAX_NAME_LEN} are allowed",
            value.len()
        )));
    }
    if value.contains('/') || value.chars().any(char::is_control) || value == "." || value == ".." {
        return Err(Error::InvalidArgument(format!(
            "{what} {value:?} may not contain '/' or control characters"
        )));
    }
    Ok(())
}

/// The labels and annotations of one object fit [`MAX_LABELS_BYTES`].
pub fn check_labels(
    what: &str,
    labels: &std::collections::HashMap<String, String>,
    annotations: &std::collections::HashMap<String, String>,
) -> Result<()> {
    let bytes: usize = labels
        .iter()
        .chain(annotations)
        .map(|(k, v)| k.len() + v.len())
        .sum();
    if bytes > MAX_LABELS_BYTES {
        return Err(Error::InvalidArgument(format!(
            "{what}: labels and annotations take {bytes} bytes; at most {MAX_LABELS_BYTES} are allowed"
        )));
    }
    Ok(())
}

pub fn sandbox_key(namespace: &str, name: &str, uid: &str, attempt: u32) -> String {
    format!("sandbox/{namespace}/{name}/{uid}/{attempt}")
}

pub fn sandbox_record_key(s: &SandboxRecord) -> String {
    sandbox_key(&s.namespace, &s.name, &s.uid, s.attempt)
}

pub fn container_key(sandbox_id: &str, name: &str, attempt: u32) -> String {
    format!("container/{sandbox_id}/{name}/{attempt}")
}

/// Names in use, name → owner id.
#[derive(Default, Clone)]
pub struct Names {
    taken: Arc<Mutex<HashMap<String, String>>>,
}

/// A name held for an object being created; released on drop unless kept.
pub struct NameReservation {
    names: Names,
    key: String,
    kept: bool,
}

impl NameReservation {
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for NameReservation {
    fn drop(&mut self) {
        if !self.kept {
            self.names.taken.lock().unwrap().remove(&self.key);
        }
    }
}

impl Names {
    /// The names of the recorded objects.
    pub fn of_records(sandboxes: &[SandboxRecord], containers: &[ContainerRecord]) -> Names {
        let names = Names::default();
        {
            let mut taken = names.taken.lock().unwrap();
            for s in sandboxes {
                taken.insert(sandbox_record_key(s), s.id.clone());
            }
            for c in containers {
                taken.insert(
                    container_key(&c.sandbox_id, &c.name, c.attempt),
                    c.id.clone(),
                );
            }
        }
        names
    }

    /// Reserves `key` for `id`; AlreadyExists when taken.
    pub fn reserve(&self, key: &str, id: &str) -> Result<NameReservation> {
        let mut taken = self.taken.lock().unwrap();
        if let Some(owner) = taken.get(key) {
            return Err(Error::AlreadyExists(format!(
                "name {key} is already in use by {owner}"
            )));
        }
        taken.insert(key.to_string(), id.to_string());
        Ok(NameReservation {
            names: self.clone(),
            key: key.to_string(),
            kept: false,
        })
    }

    /// Frees every name held by `id`.
    pub fn release(&self, id: &str) {
        self.taken.lock().unwrap().retain(|_, owner| owner != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_are_bounded() {
        check_name("n", "web-1.example_x").unwrap();
        check_name("n", &"a".repeat(MAX_NAME_LEN)).unwrap();
        for bad in ["", "a/b", "..", ".", "a\nb", "a\u{0}"] {
            assert!(check_name("n", bad).is_err(), "{bad:?}");
        }
        assert!(check_name("n", &"a".repeat(10_000)).is_err());
        let mut labels = HashMap::new();
        labels.insert("k".to_string(), "v".repeat(MAX_LABELS_BYTES / 2));
        let mut annotations = HashMap::new();
        check_labels("c", &labels, &annotations).unwrap();
        annotations.insert("a".to_string(), "v".repeat(MAX_LABELS_BYTES / 2));
        let err = check_labels("c", &labels, &annotations).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }

    #[test]
    fn a_name_is_held_until_released_or_dropped() {
        let names = Names::default();
        let r = names.reserve("k", "a").unwrap();
        assert!(names.reserve("k", "b").is_err());
        drop(r);
        names.reserve("k", "b").unwrap().keep();
        assert!(names.reserve("k", "c").is_err());
        names.release("b");
        assert!(names.reserve("k", "c").is_ok());
    }

    #[test]
    fn ids_are_random_hex() {
        let (a, b) = (new_id(), new_id());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}
