//! The metadata store: what berthd restarts from.
//!
//! One redb file under the root dir. Every record is stored as JSON inside a
//! small envelope carrying its schema version, so a newer berthd can read and
//! migrate records written by an older one. redb commits are durable (fsync
//! before `commit` returns) and copy-on-write, so a SIGKILL at any moment
//! leaves either the old or the new state, never a torn one.
//!
//! I/O errors: redb latches the first I/O error of a database handle and then
//! fails every call with "Previous I/O error" until the handle is reopened.
//! The store reopens it right after such an error: the failing call returns
//! the error, the next one runs against the reopened file (which holds the
//! last commit).
//!
//! Space: a delete is a copy-on-write commit too and writes new pages, so on a
//! full filesystem it fails like any write (measured on tmpfs: after a put
//! failed with ENOSPC and the file was reopened, the next delete also failed
//! with ENOSPC in 11 of 12 layouts) and nothing could be removed to free
//! space. Preallocating inside meta.redb does not help: redb grows its file
//! sparsely, doubling it, and its free pages may lie in the holes. So the
//! store keeps a reserve file of `RESERVE_BYTES` next to meta.redb. A delete
//! that fails for space releases the reserve and is retried once; writes that
//! may grow the store (put, insert, update, setting) are refused with
//! `Error::NoSpace` until the reserve can be allocated again, so they do not
//! eat what was released for deletes. The released space is free for any
//! process: one writing non-stop in the same filesystem can take it first.
//!
//! Reads: every table's records are also kept decoded in memory, as last
//! committed, so gets and lists (ListContainers, the stats lists, a scrape)
//! neither open a transaction nor decode JSON. Writers update that copy after
//! their commit, one writer at a time, so it follows commit order.

mod records;

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};

pub use records::{
    ContainerRecord, ContainerState, ImageRecord, ImageVolume, KeyValue, ProcessUser,
    SandboxRecord, SandboxState,
};

/// A typed record kept in its own table, keyed by its id.
pub trait Record: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    const TABLE: &'static str;
    /// Bumped whenever the stored shape changes incompatibly.
    const VERSION: u32;
    /// What the record is called in messages ("pod sandbox", "container").
    const KIND: &'static str = Self::TABLE;
    fn key(&self) -> &str;
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    record: T,
}

/// Why a stored record could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("has version {version} but this berthd only knows up to {known}")]
    TooNew { version: u32, known: u32 },
}

/// Runtime-wide settings (pod CIDR, ...), as plain strings.
const SETTINGS: TableDefinition<&str, &str> = TableDefinition::new("settings");

/// The setting `is_writable` writes to find out whether writes work again.
const WRITE_PROBE_SETTING: &str = "berth.write_probe";

/// The size of the reserve file released for deletes when the filesystem is
/// full. A delete writes a few pages per tree level: room for dozens.
pub const RESERVE_BYTES: u64 = 1 << 20;

pub struct Store {
    path: PathBuf,
    /// None after a reopen failed; the next call tries again.
    db: RwLock<Option<redb::Database>>,
    /// Bumped by every reopen, so that calls which failed on the same handle
    /// reopen it once, not once each.
    generation: AtomicU64,
    /// Whether the last write committed.
    writable: AtomicBool,
    reserve: Reserve,
    /// Where write latency goes; `None` for stores outside a daemon.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    cache: Cache,
}

/// The decoded records of each table read so far, as last committed.
#[derive(Default)]
struct Cache {
    /// `BTreeMap<String, R>` by `R::TABLE` (key order, as redb lists them).
    tables: RwLock<HashMap<&'static str, Box<dyn Any + Send + Sync>>>,
    /// Bumped under `tables`' write lock by every change a writer makes, so
    /// a table loaded from a snapshot older than a change is loaded again.
    changes: AtomicU64,
    /// Held by a writer from its transaction until its change is in
    /// `tables`, so that changes reach it in commit order.
    writing: Mutex<()>,
}

/// Which writes a call makes, for the space check.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    /// Frees space (delete): runs even without the reserve.
    Shrink,
    /// May grow the file: refused while the reserve cannot be allocated.
    Grow,
}

/// How a closure run against the database failed: in redb (which may call
/// for a reopen) or for a reason of berthd's own.
enum Failure {
    Db(redb::Error),
    Berth(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Berth(e)
    }
}

macro_rules! redb_failure {
    ($($t:ty),*) => {$(
        impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                Failure::Db(e.into())
            }
        }
    )*};
}
redb_failure!(
    redb::Error,
    redb::StorageError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError
);

fn table<R: Record>() -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(R::TABLE)
}

fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Errors after which redb's handle is unusable until reopened.
fn needs_reopen(e: &redb::Error) -> bool {
    matches!(
        e,
        redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
    )
}

fn store_error(op: String, e: redb::Error) -> Error {
    match e {
        redb::Error::Io(source) if is_no_space(&source) => Error::NoSpace {
            what: format!("metadata store: no space left on device for {op}"),
            source,
        },
        source => Error::StoreDb { op, source },
    }
}

fn open_db(path: &Path) -> Result<redb::Database> {
    redb::Database::create(path)
        .map_err(|e| store_error(format!("open {}", path.display()), e.into()))
}

impl Store {
    /// Opens (or creates) the store. Fails if another process holds it. A
    /// full filesystem does not stop the open: reads and deletes still work.
    pub fn open(path: &Path) -> Result<Store> {
        Self::open_with_metrics(path, None)
    }

    /// [`Store::open`], timing each write transaction into `metrics`.
    pub fn open_with_metrics(
        path: &Path,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Result<Store> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        let db = open_db(path)?;
        let mut reserve_path = path.as_os_str().to_owned();
        reserve_path.push(".reserve");
        let store = Store {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            generation: AtomicU64::new(0),
            writable: AtomicBool::new(true),
            reserve: Reserve {
                path: reserve_path.into(),
                held: Mutex::new(false),
            },
            metrics,
            cache: Cache::default(),
        };
        if let Err(e) = store.reserve.ensure() {
            tracing::warn!(path = %store.reserve.path.display(), error = %e, "metadata store: cannot allocate the reserve file");
        }
        store.create_tables()?;
        Ok(store)
    }

    /// Creates missing tables. Only writes when one is missing, so that a
    /// restart on a full filesystem needs no space.
    fn create_tables(&self) -> Result<()> {
        let missing = self.run(
            Access::Read,
            || "check tables".into(),
            |db| {
                let txn = db.begin_read()?;
                for name in [
                    SandboxRecord::TABLE,
                    ContainerRecord::TABLE,
                    ImageRecord::TABLE,
                ] {
                    match txn.open_table(TableDefinition::<&str, &[u8]>::new(name)) {
                        Ok(_) => {}
                        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(true),
                        Err(e) => return Err(e.into()),
                    }
                }
                match txn.open_table(SETTINGS) {
                    Ok(_) => Ok(false),
                    Err(redb::TableError::TableDoesNotExist(_)) => Ok(true),
                    Err(e) => Err(e.into()),
                }
            },
        )?;
        if !missing {
            return Ok(());
        }
        self.run(
            Access::Grow,
            || "create tables".into(),
            |db| {
                let txn = db.begin_write()?;
                txn.open_table(table::<SandboxRecord>())?;
                txn.open_table(table::<ContainerRecord>())?;
                txn.open_table(table::<ImageRecord>())?;
                txn.open_table(SETTINGS)?;
                txn.commit()?;
                Ok(())
            },
        )
    }

    /// Runs `f` against the open database: reopens it first if a reopen is
    /// pending, and after an I/O error, so that the next call works.
    fn run<T>(
        &self,
        access: Access,
        op: impl FnOnce() -> String,
        f: impl FnOnce(&redb::Database) -> Result<T, Failure>,
    ) -> Result<T> {
        if access == Access::Grow
            && let Err(source) = self.reserve.ensure()
        {
            self.writable.store(false, Ordering::SeqCst);
            return Err(if is_no_space(&source) {
                Error::NoSpace {
                    what: format!("metadata store: no space left on device for {}", op()),
                    source,
                }
            } else {
                Error::io(
                    format!("metadata store: allocate {}", self.reserve.path.display()),
                    source,
                )
            });
        }
        let (generation, result) = {
            let (guard, generation) = self.handle()?;
            let db = guard.as_ref().expect("handle() returns an open database");
            let started = std::time::Instant::now();
            let result = f(db);
            if access != Access::Read
                && let Some(m) = &self.metrics
            {
                m.store_write(started.elapsed());
            }
            (generation, result)
        };
        match result {
            Ok(v) => {
                if access != Access::Read {
                    self.writable.store(true, Ordering::SeqCst);
                }
                Ok(v)
            }
            Err(Failure::Berth(e)) => Err(e),
            Err(Failure::Db(e)) => {
                let reopen = needs_reopen(&e);
                let err = store_error(op(), e);
                if reopen {
                    if access != Access::Read {
                        self.writable.store(false, Ordering::SeqCst);
                    }
                    tracing::warn!(error = %err, "metadata store: reopening after an I/O error");
                    if let Err(e) = self.reopen(generation) {
                        tracing::error!(error = %e, "metadata store: reopen failed; retrying on the next call");
                    }
                }
                Err(err)
            }
        }
    }

    /// The open database, reopening it if an earlier reopen failed.
    fn handle(&self) -> Result<(RwLockReadGuard<'_, Option<redb::Database>>, u64)> {
        loop {
            let guard = self.db.read().unwrap_or_else(PoisonError::into_inner);
            // Read under the lock: reopen bumps it under the write lock.
            let generation = self.generation.load(Ordering::SeqCst);
            if guard.is_some() {
                return Ok((guard, generation));
            }
            drop(guard);
            self.reopen(generation)?;
        }
    }

    /// Replaces the handle of `generation` by a freshly opened one (unless
    /// another call already did).
    fn reopen(&self, generation: u64) -> Result<()> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if self.generation.load(Ordering::SeqCst) != generation {
            return Ok(());
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
        // redb holds a lock on the file until its handle is gone.
        drop(db.take());
        *db = Some(open_db(&self.path)?);
        Ok(())
    }

    /// Whether writes work: the filesystem has room to grow the store, and
    /// the last write committed or, after a failed one, a probe write commits
    /// now. For `Status` (RuntimeReady). The room check is there because a
    /// small probe can commit into free pages of the file while a put that
    /// needs the file to grow still fails.
    pub fn is_writable(&self) -> bool {
        self.has_room()
            && (self.writable.load(Ordering::SeqCst)
                || self.set_setting(WRITE_PROBE_SETTING, "ok").is_ok())
    }

    fn has_room(&self) -> bool {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        match nix::sys::statvfs::statvfs(dir) {
            Ok(fs) => {
                // Root may also use the blocks kept for it (ext4's 5 %).
                let blocks = if nix::unistd::geteuid().is_root() {
                    fs.blocks_free()
                } else {
                    fs.blocks_available()
                };
                blocks as u64 * fs.fragment_size() >= RESERVE_BYTES
            }
            // Unknown: let the writes tell.
            Err(_) => true,
        }
    }

    /// Inserts or replaces a record; durable when this returns.
    pub fn put<R: Record>(&self, record: &R) -> Result<()> {
        let key = record.key();
        let bytes = encode(record)?;
        let _writing = self.writing();
        self.run(
            Access::Grow,
            || format!("put {} {key}", R::TABLE),
            |db| {
                let txn = db.begin_write()?;
                txn.open_table(table::<R>())?
                    .insert(key, bytes.as_slice())?;
                txn.commit()?;
                Ok(())
            },
        )?;
        self.remember(key, Some(record.clone()));
        Ok(())
    }

    /// Inserts a record that must not exist yet (`Error::AlreadyExists`).
    pub fn insert_new<R: Record>(&self, record: &R) -> Result<()> {
        let key = record.key();
        let bytes = encode(record)?;
        let _writing = self.writing();
        self.run(
            Access::Grow,
            || format!("insert {} {key}", R::TABLE),
            |db| {
                let txn = db.begin_write()?;
                {
                    let mut t = txn.open_table(table::<R>())?;
                    if t.get(key)?.is_some() {
                        return Err(Error::AlreadyExists(format!(
                            "{} {key} already exists",
                            R::KIND
                        ))
                        .into());
                    }
                    t.insert(key, bytes.as_slice())?;
                }
                txn.commit()?;
                Ok(())
            },
        )?;
        self.remember(key, Some(record.clone()));
        Ok(())
    }

    /// Reads, changes and writes back one record in one transaction, and
    /// returns it as written. A missing record is `Error::NotFound` (so an
    /// update cannot resurrect a removed object); when `f` fails nothing is
    /// written.
    pub fn update<R: Record>(&self, key: &str, f: impl FnOnce(&mut R) -> Result<()>) -> Result<R> {
        let _writing = self.writing();
        let record = self.run(
            Access::Grow,
            || format!("update {} {key}", R::TABLE),
            |db| {
                let txn = db.begin_write()?;
                let record = {
                    let mut t = txn.open_table(table::<R>())?;
                    let current = t
                        .get(key)?
                        .map(|v| decode::<R>(key, v.value()))
                        .transpose()?;
                    let Some(mut record) = current else {
                        return Err(Error::NotFound(format!("{} {key} not found", R::KIND)).into());
                    };
                    f(&mut record)?;
                    if record.key() != key {
                        return Err(Error::Internal(format!(
                            "update of {} {key} changed its key to {}",
                            R::KIND,
                            record.key()
                        ))
                        .into());
                    }
                    t.insert(key, encode(&record)?.as_slice())?;
                    record
                };
                txn.commit()?;
                Ok(record)
            },
        )?;
        self.remember(key, Some(record.clone()));
        Ok(record)
    }

    pub fn get<R: Record>(&self, key: &str) -> Result<Option<R>> {
        self.cached(|t: &BTreeMap<String, R>| t.get(key).cloned())
    }

    /// Whether record `key` exists.
    pub fn contains<R: Record>(&self, key: &str) -> Result<bool> {
        self.cached(|t: &BTreeMap<String, R>| t.contains_key(key))
    }

    /// Removes a record; returns whether it existed. Works while the
    /// filesystem is full, as long as the reserve lasts (see the module doc).
    pub fn delete<R: Record>(&self, key: &str) -> Result<bool> {
        let _writing = self.writing();
        let attempt = || {
            self.run(
                Access::Shrink,
                || format!("delete {} {key}", R::TABLE),
                |db| {
                    let txn = db.begin_write()?;
                    let existed = txn.open_table(table::<R>())?.remove(key)?.is_some();
                    txn.commit()?;
                    Ok(existed)
                },
            )
        };
        let result = match attempt() {
            // run() has reopened the database; the retry commits into the
            // space the reserve held.
            Err(Error::NoSpace { .. }) if self.reserve.release() => {
                tracing::warn!(
                    "metadata store: filesystem full, released the reserve for a delete"
                );
                attempt()
            }
            result => result,
        };
        if result.is_ok() {
            self.remember::<R>(key, None);
        }
        result
    }

    pub fn list<R: Record>(&self) -> Result<Vec<R>> {
        self.cached(|t: &BTreeMap<String, R>| t.values().cloned().collect())
    }

    /// What `f` makes of each record, in key order, leaving out the ones it
    /// maps to `None`. `f` sees the in-memory copy: nothing is cloned that
    /// it does not take.
    pub fn list_map<R: Record, T>(&self, f: impl Fn(&R) -> Option<T>) -> Result<Vec<T>> {
        self.cached(|t: &BTreeMap<String, R>| t.values().filter_map(&f).collect())
    }

    /// Serializes writers until their change is in the cache.
    fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.cache
            .writing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a committed change of `key` (`None`: deleted) in the cache,
    /// if the table is loaded.
    fn remember<R: Record>(&self, key: &str, record: Option<R>) {
        let mut tables = self
            .cache
            .tables
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        self.cache.changes.fetch_add(1, Ordering::SeqCst);
        if let Some(t) = tables
            .get_mut(R::TABLE)
            .and_then(|t| t.downcast_mut::<BTreeMap<String, R>>())
        {
            match record {
                Some(r) => {
                    t.insert(key.to_string(), r);
                }
                None => {
                    t.remove(key);
                }
            }
        }
    }

    /// `f` over table `R` as last committed, loading it on first use.
    fn cached<R: Record, T>(&self, f: impl Fn(&BTreeMap<String, R>) -> T) -> Result<T> {
        loop {
            let changes = {
                let tables = self
                    .cache
                    .tables
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                if let Some(t) = tables
                    .get(R::TABLE)
                    .and_then(|t| t.downcast_ref::<BTreeMap<String, R>>())
                {
                    return Ok(f(t));
                }
                self.cache.changes.load(Ordering::SeqCst)
            };
            let loaded: BTreeMap<String, R> = self
                .read_all::<R>()?
                .into_iter()
                .map(|r| (r.key().to_string(), r))
                .collect();
            let mut tables = self
                .cache
                .tables
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            // A change committed after the snapshot but remembered before
            // this point is missing from it: load again.
            if self.cache.changes.load(Ordering::SeqCst) == changes {
                let out = f(&loaded);
                tables.entry(R::TABLE).or_insert_with(|| Box::new(loaded));
                return Ok(out);
            }
        }
    }

    /// Every record of table `R`, decoded from the database.
    fn read_all<R: Record>(&self) -> Result<Vec<R>> {
        self.run(
            Access::Read,
            || format!("list {}", R::TABLE),
            |db| {
                let txn = db.begin_read()?;
                let t = txn.open_table(table::<R>())?;
                let mut out = Vec::new();
                for entry in t.iter()? {
                    let (k, v) = entry?;
                    out.push(decode::<R>(k.value(), v.value())?);
                }
                Ok(out)
            },
        )
    }

    pub fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        self.run(
            Access::Grow,
            || format!("set setting {key}"),
            |db| {
                let txn = db.begin_write()?;
                txn.open_table(SETTINGS)?.insert(key, value)?;
                txn.commit()?;
                Ok(())
            },
        )
    }

    pub fn setting(&self, key: &str) -> Result<Option<String>> {
        self.run(
            Access::Read,
            || format!("get setting {key}"),
            |db| {
                let txn = db.begin_read()?;
                let t = txn.open_table(SETTINGS)?;
                let value = t.get(key)?;
                Ok(value.map(|v| v.value().to_string()))
            },
        )
    }
}

/// A file holding space for deletes on a full filesystem.
struct Reserve {
    path: PathBuf,
    /// Whether the file holds `RESERVE_BYTES`. Behind a mutex so that
    /// concurrent calls allocate and release it once.
    held: Mutex<bool>,
}

impl Reserve {
    /// Allocates the reserve unless it is held. On failure nothing of it is
    /// left behind, so a partial allocation does not eat the space either.
    fn ensure(&self) -> std::io::Result<()> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if *held {
            return Ok(());
        }
        let result = allocate(&self.path, RESERVE_BYTES);
        if result.is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
        *held = result.is_ok();
        result
    }

    /// Frees the reserve; returns whether it was held.
    fn release(&self) -> bool {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if !*held {
            return false;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "metadata store: cannot remove the reserve file");
            return false;
        }
        *held = false;
        true
    }
}

/// Makes `path` a file of `len` allocated bytes (not a sparse one).
fn allocate(path: &Path, len: u64) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    loop {
        // SAFETY: fallocate on a descriptor we own.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
        if rc == 0 {
            return file.sync_all();
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Filesystems without fallocate: blocks written out hold space too.
            Some(libc::EOPNOTSUPP) => break,
            _ => return Err(e),
        }
    }
    let chunk = vec![0xa5u8; 64 * 1024];
    let mut written = 0;
    while written < len {
        let n = chunk.len().min((len - written) as usize);
        file.write_all_at(&chunk[..n], written)?;
        written += n as u64;
    }
    file.sync_all()
}

fn encode<R: Record>(record: &R) -> Result<Vec<u8>> {
    serde_json::to_vec(&Envelope {
        version: R::VERSION,
        record,
    })
    .map_err(|e| Error::StoreRecord {
        table: R::TABLE,
        key: record.key().to_string(),
        source: e.into(),
    })
}

fn decode<R: Record>(key: &str, bytes: &[u8]) -> Result<R> {
    #[derive(Deserialize)]
    struct Head {
        version: u32,
    }
    let fail = |source: RecordError| Error::StoreRecord {
        table: R::TABLE,
        key: key.to_string(),
        source,
    };
    let head: Head = serde_json::from_slice(bytes).map_err(|e| fail(e.into()))?;
    if head.version > R::VERSION {
        return Err(fail(RecordError::TooNew {
            version: head.version,
            known: R::VERSION,
        }));
    }
    let env: Envelope<R> = serde_json::from_slice(bytes).map_err(|e| fail(e.into()))?;
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

    /// Gets and lists answer from the decoded copy, which every kind of
    /// write keeps equal to what is committed (a reopened store decodes the
    /// file itself).
    #[test]
    fn reads_follow_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        let committed = |store: &Store| store.read_all::<SandboxRecord>().unwrap();
        {
            let store = Store::open(&path).unwrap();
            store.put(&sandbox("a")).unwrap();
            assert_eq!(store.list::<SandboxRecord>().unwrap(), vec![sandbox("a")]);
            store.insert_new(&sandbox("c")).unwrap();
            store.put(&sandbox("b")).unwrap();
            assert!(store.insert_new(&sandbox("b")).is_err());
            store
                .update::<SandboxRecord>("a", |r| {
                    r.attempt = 7;
                    Ok(())
                })
                .unwrap();
            // A failed update changes nothing, in memory either.
            assert!(
                store
                    .update::<SandboxRecord>("c", |r| {
                        r.attempt = 9;
                        Err(Error::Internal("no".into()))
                    })
                    .is_err()
            );
            assert!(store.delete::<SandboxRecord>("b").unwrap());
            let listed = store.list::<SandboxRecord>().unwrap();
            assert_eq!(listed, committed(&store));
            assert_eq!(
                listed
                    .iter()
                    .map(|r| (r.id.as_str(), r.attempt))
                    .collect::<Vec<_>>(),
                vec![("a", 7), ("c", 0)]
            );
            assert_eq!(store.get::<SandboxRecord>("a").unwrap().unwrap().attempt, 7);
            assert!(store.get::<SandboxRecord>("b").unwrap().is_none());
            assert!(!store.contains::<SandboxRecord>("b").unwrap());
            assert!(store.contains::<SandboxRecord>("c").unwrap());
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.list::<SandboxRecord>().unwrap(),
            committed(&store),
            "after a reopen"
        );
    }

    /// Loads racing writes: every list sees each finished write.
    #[test]
    fn concurrent_writes_reach_the_copy_in_commit_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.redb")).unwrap();
        store.put(&sandbox("x")).unwrap();
        std::thread::scope(|scope| {
            for t in 0..4u32 {
                let store = &store;
                scope.spawn(move || {
                    for i in 0..25u32 {
                        store
                            .update::<SandboxRecord>("x", |r| {
                                r.attempt += 1;
                                Ok(())
                            })
                            .unwrap();
                        let mut r = sandbox(&format!("t{t}-{i}"));
                        r.attempt = i;
                        store.put(&r).unwrap();
                        assert_eq!(store.get::<SandboxRecord>(&r.id).unwrap(), Some(r));
                    }
                });
            }
        });
        assert_eq!(
            store.get::<SandboxRecord>("x").unwrap().unwrap().attempt,
            100
        );
        assert_eq!(
            store.list::<SandboxRecord>().unwrap(),
            store.read_all().unwrap()
        );
        assert_eq!(store.list::<SandboxRecord>().unwrap().len(), 101);
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
    fn update_of_a_missing_record_is_not_found_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.redb")).unwrap();
        let mut called = false;
        let err = store
            .update::<SandboxRecord>("gone", |r| {
                called = true;
                r.state = SandboxState::NotReady;
                Ok(())
            })
            .unwrap_err();
        assert!(
            matches!(&err, Error::NotFound(m) if m == "pod sandbox gone not found"),
            "{err}"
        );
        assert!(!called);
        assert_eq!(store.get::<SandboxRecord>("gone").unwrap(), None);
        assert!(store.list::<SandboxRecord>().unwrap().is_empty());
    }

    #[test]
    fn failed_update_leaves_the_record_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.redb")).unwrap();
        store.put(&sandbox("a")).unwrap();
        let err = store
            .update::<SandboxRecord>("a", |r| {
                r.state = SandboxState::NotReady;
                Err(Error::FailedPrecondition("no".into()))
            })
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
        assert_eq!(store.get::<SandboxRecord>("a").unwrap(), Some(sandbox("a")));
        // An update may not move the record to another key.
        let err = store
            .update::<SandboxRecord>("a", |r| {
                r.id = "b".into();
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{err}");
        assert_eq!(store.get::<SandboxRecord>("a").unwrap(), Some(sandbox("a")));
        assert_eq!(store.get::<SandboxRecord>("b").unwrap(), None);
    }

    #[test]
    fn update_is_durable_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.redb");
        {
            let store = Store::open(&path).unwrap();
            store.put(&sandbox("a")).unwrap();
            let updated = store
                .update::<SandboxRecord>("a", |r| {
                    r.state = SandboxState::NotReady;
                    r.attempt += 1;
                    Ok(())
                })
                .unwrap();
            assert_eq!(updated.state, SandboxState::NotReady);
            assert_eq!(updated.attempt, 1);
        }
        let store = Store::open(&path).unwrap();
        let got = store.get::<SandboxRecord>("a").unwrap().unwrap();
        assert_eq!(got.state, SandboxState::NotReady);
        assert_eq!(got.attempt, 1);
    }

    #[test]
    fn insert_new_refuses_an_existing_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.redb")).unwrap();
        store.insert_new(&sandbox("a")).unwrap();
        let mut other = sandbox("a");
        other.name = "other".into();
        let err = store.insert_new(&other).unwrap_err();
        assert!(
            matches!(&err, Error::AlreadyExists(m) if m == "pod sandbox a already exists"),
            "{err}"
        );
        assert_eq!(store.get::<SandboxRecord>("a").unwrap(), Some(sandbox("a")));
        store.insert_new(&sandbox("b")).unwrap();
        assert_eq!(store.list::<SandboxRecord>().unwrap().len(), 2);
    }

    #[test]
    fn open_allocates_the_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.redb")).unwrap();
        assert!(store.is_writable());
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.path().join("meta.redb.reserve")).unwrap();
        assert_eq!(meta.len(), RESERVE_BYTES);
        assert!(meta.blocks() * 512 >= RESERVE_BYTES, "sparse: {meta:?}");
        assert!(store.reserve.release());
        assert!(!dir.path().join("meta.redb.reserve").exists());
        // The next write that may grow the store takes it back.
        store.put(&sandbox("a")).unwrap();
        assert!(dir.path().join("meta.redb.reserve").exists());
    }

    #[test]
    fn concurrent_calls() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("meta.redb")).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let store = &store;
                s.spawn(move || {
                    for n in 0..25 {
                        let id = format!("{t}-{n}");
                        store.insert_new(&sandbox(&id)).unwrap();
                        store
                            .update::<SandboxRecord>(&id, |r| {
                                r.attempt = n;
                                Ok(())
                            })
                            .unwrap();
                        assert!(store.list::<SandboxRecord>().unwrap().len() > n as usize);
                    }
                });
            }
        });
        assert_eq!(store.list::<SandboxRecord>().unwrap().len(), 100);
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
