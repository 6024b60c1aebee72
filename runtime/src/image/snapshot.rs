//! Snapshots: each layer unpacked once into `<root>/snapshots/<chain id>/`,
//! shared by every image that has the same chain, and used as an overlayfs
//! lower dir. A snapshot is unpacked into a temporary dir and renamed into
//! place, so a visible snapshot is always complete.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};

const TMP_PREFIX: &str = "tmp-";

#[derive(Clone)]
pub struct SnapshotStore {
    root: PathBuf,
}

/// Chain ids per the OCI image spec: the first is the first diff id, each
/// next one is `sha256(previous + " " + diff id)`.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match out.last() {
            None => diff.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {diff}")))
            ),
        };
        out.push(next);
    }
    out
}

impl SnapshotStore {
    pub fn open(root: &Path) -> Result<SnapshotStore> {
        std::fs::create_dir_all(root).context(|| format!("create {}", root.display()))?;
        let store = SnapshotStore {
            root: root.to_path_buf(),
        };
        for entry in std::fs::read_dir(root).context(|| format!("list {}", root.display()))? {
            let entry = entry.context(|| format!("list {}", root.display()))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                tracing::info!(dir = %entry.path().display(), "removing unfinished snapshot");
                remove_tree(&entry.path())?;
            }
        }
        Ok(store)
    }

    pub fn dir(&self, chain_id: &str) -> PathBuf {
        self.root
            .join(chain_id.strip_prefix("sha256:").unwrap_or(chain_id))
    }

    pub fn exists(&self, chain_id: &str) -> bool {
        self.dir(chain_id).is_dir()
    }

    /// Creates the snapshot `chain_id` by running `fill` on an empty temp
    /// dir, then publishing it. On error nothing is left behind.
    pub fn create<T>(
        &self,
        chain_id: &str,
        fill: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<Option<T>> {
        if self.exists(chain_id) {
            return Ok(None);
        }
        let tmp = tempfile::Builder::new()
            .prefix(TMP_PREFIX)
            .tempdir_in(&self.root)
            .context(|| format!("create temp snapshot in {}", self.root.display()))?
            .keep();
        let result = fill(&tmp).and_then(|value| {
            syncfs(&tmp)?;
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .context(|| format!("chmod {}", tmp.display()))?;
            Ok(value)
        });
        match result {
            Ok(value) => {
                let dest = self.dir(chain_id);
                if let Err(e) = std::fs::rename(&tmp, &dest) {
                    let _ = remove_tree(&tmp);
                    if dest.is_dir() {
                        return Ok(None); // someone else published it first
                    }
                    return Err(Error::io(format!("publish snapshot {chain_id}"), e));
                }
                super::content::sync_dir(&self.root)?;
                Ok(Some(value))
            }
            Err(e) => {
                let _ = remove_tree(&tmp);
                Err(e)
            }
        }
    }

    /// Removes a snapshot; it disappears at once (renamed away first).
    pub fn remove(&self, chain_id: &str) -> Result<()> {
        let dir = self.dir(chain_id);
        if !dir.exists() {
            return Ok(());
        }
        let doomed = self.root.join(format!(
            "{TMP_PREFIX}rm-{}",
            dir.file_name().unwrap().to_string_lossy()
        ));
        std::fs::rename(&dir, &doomed).context(|| format!("remove snapshot {chain_id}"))?;
        remove_tree(&doomed)
    }

    /// Chain ids of every published snapshot.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in
            std::fs::read_dir(&self.root).context(|| format!("list {}", self.root.display()))?
        {
            let entry = entry.context(|| format!("list {}", self.root.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(TMP_PREFIX) {
                out.push(format!("sha256:{name}"));
            }
        }
        Ok(out)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

fn remove_tree(path: &Path) -> Result<()> {
    match std::fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), e)),
    }
}

/// One sync for the whole unpacked tree instead of one per file.
fn syncfs(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).context(|| format!("open {}", dir.display()))?;
    nix::unistd::syncfs(&f).map_err(|e| Error::io(format!("syncfs {}", dir.display()), e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_spec() {
        let a = "sha256:aaaa".to_string();
        let b = "sha256:bbbb".to_string();
        let ids = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(ids[0], a);
        assert_eq!(
            ids[1],
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest("sha256:aaaa sha256:bbbb"))
            )
        );
    }

    #[test]
    fn create_publishes_or_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let id = "sha256:1111";
        store
            .create(id, |d| {
                std::fs::write(d.join("f"), b"x").context(|| "w".into())
            })
            .unwrap();
        assert!(store.dir(id).join("f").exists());
        assert!(
            store
                .create(id, |_| -> Result<()> { panic!("not called again") })
                .unwrap()
                .is_none()
        );

        let err = store
            .create("sha256:2222", |d| {
                std::fs::write(d.join("partial"), b"x").unwrap();
                Err::<(), _>(Error::BadImage("evil entry".into()))
            })
            .unwrap_err();
        assert!(err.to_string().contains("evil"));
        assert_eq!(store.list().unwrap(), vec![id.to_string()]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

        store.remove(id).unwrap();
        store.remove(id).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn unfinished_snapshots_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tmp-abc/x")).unwrap();
        SnapshotStore::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
