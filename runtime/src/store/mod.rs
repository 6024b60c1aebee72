//! The metadata store: what berthd restarts from.
//!
//! One redb file under the root dir. Every record is stored as JSON inside a
//! small envelope carrying its schema version, so a newer berthd can read and
//! migrate records written by an older one. redb commits are durable (fsync
//! before `commit` returns) and copy-on-write, so a SIGKILL at any moment
//! leaves either the old or the new state, never a torn one.

mod records;
mod txn;

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};

pub use records::{
    ContainerRecord, ContainerState, ImageRecord, KeyValue, SandboxRecord, SandboxState,
};

/// A typed record kept in its own table, keyed by its id.
pub trait Record: Serialize + DeserializeOwned {
    const TABLE: &'static str;
    /// Bumped whenever the stored shape changes incompatibly.
    const VERSION: u32;
    fn key(&self) -> &str;
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    record: T,
}

/// Runtime-wide settings (pod CIDR, ...), as plain strings.
const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");

pub struct Store {
    db: redb::Database,
}

fn store_err(e: impl std::fmt::Display) -> Error {
    Error::Store(e.to_string())
}

fn table<R: Record>() -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(R::TABLE)
}

impl Store {
    /// Opens (or creates) the store. Fails if another process holds it.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let db = redb::Database::create(path)
            .map_err(|e| Error::Store(format!("open {}: {e}", path.display())))?;
        let store = Store { db };
        store.create_tables()?;
        Ok(store)
    }

    fn create_tables(&self) -> Result<()> {
        let txn = self.db.begin_write().map_err(store_err)?;
        txn.open_table(table::<SandboxRecord>())
            .map_err(store_err)?;
        txn.open_table(table::<ContainerRecord>())
            .map_err(store_err)?;
        txn.open_table(table::<ImageRecord>()).map_err(store_err)?;
        txn.open_table(SETTINGS).map_err(store_err)?;
        txn.commit().map_err(store_err)
    }

    /// Inserts or replaces a record; durable when this returns.
    pub fn put<R: Record>(&self, record: &R) -> Result<()> {
        let bytes = serde_json::to_vec(&Envelope {
            version: R::VERSION,
            record,
        })
        .map_err(store_err)?;
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut t = txn.open_table(table::<R>()).map_err(store_err)?;
            t.insert(record.key(), bytes.as_slice())
                .map_err(store_err)?;
        }
        txn.commit().map_err(store_err)
    }

    pub fn get<R: Record>(&self, key: &str) -> Result<Option<R>> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let t = txn.open_table(table::<R>()).map_err(store_err)?;
        match t.get(key).map_err(store_err)? {
            Some(v) => decode::<R>(key, v.value()).map(Some),
            None => Ok(None),
        }
    }

    /// Removes a record; returns whether it existed.
    pub fn delete<R: Record>(&self, key: &str) -> Result<bool> {
        let txn = self.db.begin_write().map_err(store_err)?;
        let existed = {
            let mut t = txn.open_table(table::<R>()).map_err(store_err)?;
            t.remove(key).map_err(store_err)?.is_some()
        };
        txn.commit().map_err(store_err)?;
        Ok(existed)
    }

    pub fn list<R: Record>(&self) -> Result<Vec<R>> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let t = txn.open_table(table::<R>()).map_err(store_err)?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(store_err)? {
            let (k, v) = entry.map_err(store_err)?;
            out.push(decode::<R>(k.value(), v.value())?);
        }
        Ok(out)
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let txn = self.db.begin_write().map_err(store_err)?;
        {
            let mut t = txn.open_table(SETTINGS).map_err(store_err)?;
            t.insert(key, value).map_err(store_err)?;
        }
        txn.commit().map_err(store_err)
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        let txn = self.db.begin_read().map_err(store_err)?;
        let t = txn.open_table(SETTINGS).map_err(store_err)?;
        Ok(t.get(key)
            .map_err(store_err)?
            .map(|v| v.value().to_string()))
    }
}

fn decode<R: Record>(key: &str, bytes: &[u8]) -> Result<R> {
    #[derive(Deserialize)]
    struct Head {
        version: u32,
    }
    let head: Head = serde_json::from_slice(bytes)
        .map_err(|e| Error::Store(format!("{} record {key}: {e}", R::TABLE)))?;
    if head.version > R::VERSION {
        return Err(Error::Store(format!(
            "{} record {key} has version {} but this berthd only knows up to {}",
            R::TABLE,
            head.version,
            R::VERSION
        )));
    }
    let env: Envelope<R> = serde_json::from_slice(bytes)
        .map_err(|e| Error::Store(format!("{} record {key}: {e}", R::TABLE)))?;
    Ok(env.record)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str) -> SandboxRecord {
        SandboxRecord {
            id: id.into(),
            name: "web".into(),
            namespace: "default".into(),
            uid: "u1".into(),
            attempt: 0,
            state: SandboxState::Ready,
            created_at_ns: 42,
            labels: vec![KeyValue::new("app", "web")],
            ..Default::default()
        }
    }

    #[test]
    fn round_trip_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let store = Store::open(&path).unwrap();
            store.put(&sandbox("a")).unwrap();
            store.put(&sandbox("b")).unwrap();
            assert!(store.delete::<SandboxRecord>("b").unwrap());
            assert!(!store.delete::<SandboxRecord>("b").unwrap());
            store.set_setting("pod_cidr", "10.88.0.0/16").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let all = store.list::<SandboxRecord>().unwrap();
        assert_eq!(all, vec![sandbox("a")]);
        assert_eq!(store.get::<SandboxRecord>("a").unwrap(), Some(sandbox("a")));
        assert_eq!(store.get::<ContainerRecord>("a").unwrap(), None);
        assert_eq!(
            store.setting("pod_cidr").unwrap().as_deref(),
            Some("10.88.0.0/16")
        );
    }

    #[test]
    fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let _first = Store::open(&path).unwrap();
        assert!(Store::open(&path).is_err());
    }

    #[test]
    fn newer_record_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("m.redb")).unwrap();
        let err = decode::<SandboxRecord>("x", br#"{"version":999,"record":{}}"#).unwrap_err();
        assert!(err.to_string().contains("version 999"), "{err}");
        drop(store);
    }
}
