//! The content store: blobs by digest under `<root>/content/sha256/`.
//!
//! A blob is written to `<root>/content/tmp/`, verified (size and digest),
//! fsynced and renamed into place, so a blob that is visible is complete and
//! correct. Whatever a killed pull left in `tmp/` is removed at start.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

pub struct ContentStore {
    blobs: PathBuf,
    tmp: PathBuf,
}

impl ContentStore {
    pub fn open(root: &Path) -> Result<ContentStore> {
        let blobs = root.join("sha256");
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&blobs).context(|| format!("create {}", blobs.display()))?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).context(|| format!("clean {}", tmp.display()))?;
        }
        std::fs::create_dir_all(&tmp).context(|| format!("create {}", tmp.display()))?;
        Ok(ContentStore { blobs, tmp })
    }

    pub fn path(&self, digest: &str) -> PathBuf {
        self.blobs.join(hex_of(digest))
    }

    pub fn exists(&self, digest: &str) -> bool {
        self.path(digest).exists()
    }

    pub fn read(&self, digest: &str) -> Result<Vec<u8>> {
        std::fs::read(self.path(digest)).context(|| format!("read blob {digest}"))
    }

    /// Stores `bytes` if they hash to `digest`.
    pub fn put(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let mut w = self.writer(digest, Some(bytes.len() as u64))?;
        w.write(bytes)?;
        w.commit()
    }

    /// Starts writing a blob that must end up with `digest` (and `size`).
    pub fn writer(&self, digest: &str, size: Option<u64>) -> Result<BlobWriter> {
        let tmp = tempfile::Builder::new()
            .prefix(&hex_of(digest)[..12.min(hex_of(digest).len())])
            .tempfile_in(&self.tmp)
            .context(|| format!("create temp blob in {}", self.tmp.display()))?;
        Ok(BlobWriter {
            file: tmp,
            hasher: Sha256::new(),
            written: 0,
            digest: digest.to_string(),
            size,
            dest: self.path(digest),
        })
    }

    pub fn delete(&self, digest: &str) -> Result<()> {
        match std::fs::remove_file(self.path(digest)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove blob {digest}"), e)),
        }
    }

    /// Every stored digest.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(&self.blobs).context(|| format!("list {}", self.blobs.display()))?
        {
            let entry = entry.context(|| format!("list {}", self.blobs.display()))?;
            if let Some(name) = entry.file_name().to_str() {
                out.push(format!("sha256:{name}"));
            }
        }
        Ok(out)
    }

    pub fn dir(&self) -> &Path {
        &self.blobs
    }
}

fn hex_of(digest: &str) -> String {
    digest.strip_prefix("sha256:").unwrap_or(digest).to_string()
}

/// A blob being written. Dropped without `commit`, it leaves nothing.
pub struct BlobWriter {
    file: tempfile::NamedTempFile,
    hasher: Sha256,
    written: u64,
    digest: String,
    size: Option<u64>,
    dest: PathBuf,
}

impl BlobWriter {
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.written += chunk.len() as u64;
        if let Some(size) = self.size
            && self.written > size
        {
            return Err(Error::BadImage(format!(
                "blob {} is larger than the {size} bytes its descriptor declares",
                self.digest
            )));
        }
        self.hasher.update(chunk);
        self.file
            .write_all(chunk)
            .context(|| format!("write blob {}", self.digest))
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies, syncs and publishes the blob.
    pub fn commit(self) -> Result<()> {
        if let Some(size) = self.size
            && self.written != size
        {
            return Err(Error::BadImage(format!(
                "blob {} has {} bytes, its descriptor declares {size}",
                self.digest, self.written
            )));
        }
        let got = format!("sha256:{}", hex::encode(self.hasher.finalize()));
        if got != self.digest {
            return Err(Error::BadImage(format!(
                "blob digest mismatch: expected {}, got {got}",
                self.digest
            )));
        }
        self.file
            .as_file()
            .sync_all()
            .context(|| format!("sync blob {}", self.digest))?;
        let digest = self.digest;
        self.file
            .persist(&self.dest)
            .map_err(|e| Error::io(format!("publish blob {digest}"), e.error))?;
        sync_dir(self.dest.parent().expect("blob has a dir"))
    }
}

/// Makes a rename in `dir` durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .context(|| format!("sync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest_of(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    #[test]
    fn verified_blobs_are_published_bad_ones_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::open(dir.path()).unwrap();
        let d = digest_of(b"hello");
        store.put(&d, b"hello").unwrap();
        assert_eq!(store.read(&d).unwrap(), b"hello");
        assert_eq!(store.list().unwrap(), vec![d.clone()]);

        let other = digest_of(b"other");
        let err = store.put(&other, b"hellO").unwrap_err();
        assert!(err.to_string().contains("mismatch"), "{err}");
        let mut w = store.writer(&other, Some(3)).unwrap();
        assert!(
            w.write(b"other")
                .unwrap_err()
                .to_string()
                .contains("larger")
        );
        drop(w);
        assert!(!store.exists(&other));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );

        store.delete(&d).unwrap();
        store.delete(&d).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn leftovers_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        std::fs::write(dir.path().join("tmp/partial"), b"x").unwrap();
        ContentStore::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
