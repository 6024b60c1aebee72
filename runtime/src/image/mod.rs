//! Images: references, registry pulls, the content store, snapshots, and
//! the image records that tie them together.
//!
//! A pull resolves the manifest (through mirrors, picking the host platform
//! out of an index), stores the config, then streams every layer, in
//! parallel, into the content store and through the decompressor into a new
//! snapshot at the same time. Nothing is visible until verified: a blob is
//! published after its digest and size check, a snapshot after its blob and
//! diff id check, and the image record, written last, is the commit point.

pub mod content;
pub mod reference;
pub mod registry;
pub mod snapshot;
pub mod unpack;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::RegistryConfig;
use crate::error::{Error, IoContext, Result};
use crate::store::{ContainerRecord, ImageRecord, Store};
use content::{BlobWriter, ContentStore};
use reference::ImageName;
use registry::{Registries, Source};
use snapshot::SnapshotStore;

pub use registry::Credentials;

/// Layers downloaded at once per daemon.
const PARALLEL_LAYERS: usize = 4;
/// Chunks buffered between the download and the unpacking thread.
const PIPE_CHUNKS: usize = 64;

pub struct Images {
    store: Arc<Store>,
    content: ContentStore,
    snapshots: SnapshotStore,
    registries: Registries,
    containers_dir: PathBuf,
    /// Per digest or chain id: one download or unpack at a time, so
    /// concurrent pulls of one image fetch each blob once.
    locks: KeyedLocks,
    /// Pulls hold it shared; garbage collection exclusively, so it never
    /// deletes what a pull has written but not yet recorded.
    gc_lock: tokio::sync::RwLock<()>,
    /// A garbage collection is queued and has not begun.
    gc_queued: std::sync::atomic::AtomicBool,
    downloads: tokio::sync::Semaphore,
    records_lock: Mutex<()>,
    /// Snapshots of containers being created, before their records exist
    /// (one entry per create). Garbage collection keeps them, and deletes
    /// only while holding this, so a create either sees its snapshots gone
    /// or has them kept.
    creating: Mutex<Vec<Vec<String>>>,
    metrics: Arc<crate::metrics::Metrics>,
}

/// Keeps snapshots from garbage collection until dropped: for a container
/// create, from the moment its images are resolved until its record (which
/// then keeps them) is stored.
pub struct SnapshotHold<'a> {
    images: &'a Images,
    chains: Vec<String>,
}

impl Drop for SnapshotHold<'_> {
    fn drop(&mut self) {
        let mut creating = self.images.creating.lock().unwrap();
        if let Some(i) = creating.iter().position(|c| *c == self.chains) {
            creating.swap_remove(i);
        }
    }
}

#[derive(Default)]
struct KeyedLocks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl KeyedLocks {
    async fn lock(&self, key: &str) -> KeyedGuard<'_> {
        let m = self
            .0
            .lock()
            .unwrap()
            .entry(key.to_string())
            .or_default()
            .clone();
        let guard = m.clone().lock_owned().await;
        KeyedGuard {
            locks: self,
            key: key.to_string(),
            _guard: guard,
        }
    }
}

struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: String,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.0.lock().unwrap();
        // Two references: the map's and ours (the guard holds the mutex's Arc).
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) <= 2)
        {
            map.remove(&self.key);
        }
    }
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct ConfigDoc {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// The parts of an image config containers need.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ProcessConfig {
    #[serde(rename = "User")]
    pub user: String,
    #[serde(rename = "Env")]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd")]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir")]
    pub working_dir: String,
    #[serde(rename = "ExposedPorts")]
    pub exposed_ports: Option<HashMap<String, serde_json::Value>>,
    #[serde(rename = "Volumes")]
    pub volumes: Option<HashMap<String, serde_json::Value>>,
    #[serde(rename = "StopSignal")]
    pub stop_signal: String,
    #[serde(rename = "Labels")]
    pub labels: Option<HashMap<String, String>>,
}

/// Disk usage of a directory tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub bytes: u64,
    pub inodes: u64,
}

impl Images {
    pub fn open(
        root: &Path,
        config: &RegistryConfig,
        store: Arc<Store>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Images> {
        let containers_dir = root.join("containers");
        std::fs::create_dir_all(&containers_dir)
            .context(|| format!("create {}", containers_dir.display()))?;
        Ok(Images {
            store,
            content: ContentStore::open(&root.join("content"))?,
            snapshots: SnapshotStore::open(&root.join("snapshots"))?,
            registries: Registries::new(config)?,
            containers_dir,
            locks: KeyedLocks::default(),
            gc_lock: tokio::sync::RwLock::new(()),
            gc_queued: std::sync::atomic::AtomicBool::new(false),
            downloads: tokio::sync::Semaphore::new(PARALLEL_LAYERS),
            records_lock: Mutex::new(()),
            creating: Mutex::new(Vec::new()),
            metrics,
        })
    }

    /// Pulls `reference` and records it; returns the image record.
    pub async fn pull(&self, reference: &str, creds: &Credentials) -> Result<ImageRecord> {
        let started = Instant::now();
        let result = self.pull_and_record(reference, creds, started).await;
        self.metrics.pull_done(result.is_ok(), started.elapsed());
        result
    }

    async fn pull_and_record(
        &self,
        reference: &str,
        creds: &Credentials,
        started: Instant,
    ) -> Result<ImageRecord> {
        let name = ImageName::parse(reference)?;
        let _shared = self.gc_lock.read().await;
        let (source, top) = self.registries.resolve(&name, creds).await?;
        let top_digest = sha256_digest(&top);
        if let Some(want) = &name.digest
            && *want != top_digest
        {
            return Err(Error::BadImage(format!(
                "{name}: registry {} served a manifest with digest {top_digest}",
                source.host()
            )));
        }
        let top_doc: ManifestDoc = parse_json(&top, &format!("manifest of {name}"))?;
        let mut manifest_digests = vec![top_digest.clone()];
        let (manifest, manifest_doc) = if top_doc.manifests.is_some() {
            let chosen = select_platform(&top_doc, &name)?;
            let bytes = source.manifest(&chosen).await?;
            let got = sha256_digest(&bytes);
            if got != chosen {
                return Err(Error::BadImage(format!(
                    "{name}: manifest {chosen} from {} has digest {got}",
                    source.host()
                )));
            }
            self.store_blob(&top_digest, &top).await?;
            manifest_digests.push(chosen.clone());
            let doc: ManifestDoc = parse_json(&bytes, &format!("manifest {chosen}"))?;
            (bytes, doc)
        } else {
            (top, top_doc)
        };
        let manifest_digest = sha256_digest(&manifest);
        self.store_blob(&manifest_digest, &manifest).await?;
        check_manifest_type(&manifest_doc, &name)?;

        let config_desc = manifest_doc
            .config
            .as_ref()
            .ok_or_else(|| Error::BadImage(format!("{name}: manifest has no config")))?;
        let config_bytes = self.fetch_small_blob(&source, config_desc).await?;
        let config: ConfigDoc = parse_json(&config_bytes, &format!("config of {name}"))?;
        if config.rootfs.diff_ids.len() != manifest_doc.layers.len() {
            return Err(Error::BadImage(format!(
                "{name}: config lists {} diff ids for {} layers",
                config.rootfs.diff_ids.len(),
                manifest_doc.layers.len()
            )));
        }
        for layer in &manifest_doc.layers {
            layer_format(&layer.media_type).map_err(|m| Error::BadImage(format!("{name}: {m}")))?;
            reference::parse_digest(&layer.digest)
                .map_err(|m| Error::BadImage(format!("{name}: {m}")))?;
        }
        let chain = snapshot::chain_ids(&config.rootfs.diff_ids);

        // Downloads are bounded by `self.downloads`; layers already stored
        // unpack straight away.
        let jobs: Vec<_> = manifest_doc
            .layers
            .iter()
            .zip(config.rootfs.diff_ids.iter().zip(&chain))
            .map(|(layer, (diff_id, chain_id))| {
                self.ensure_snapshot(&source, layer, diff_id, chain_id)
            })
            .collect();
        // Every layer task is awaited, also after a failure, so a failed
        // pull returns only once its temporary files are gone.
        for result in futures_util::future::join_all(jobs).await {
            result?;
        }

        let record = ImageRecord {
            id: config_desc.digest.clone(),
            repo_tags: name.repo_tag().into_iter().collect(),
            repo_digests: vec![name.repo_digest(&top_digest)],
            size: config_desc.size + manifest_doc.layers.iter().map(|l| l.size).sum::<u64>(),
            pinned: false,
            layers: manifest_doc
                .layers
                .iter()
                .map(|l| l.digest.clone())
                .collect(),
            chain_ids: chain,
            diff_ids: config.rootfs.diff_ids.clone(),
            manifest_digests,
            config_json: String::from_utf8_lossy(&config_bytes).into_owned(),
        };
        let record = self.commit_record(record)?;
        tracing::info!(
            image = %name,
            id = %record.id,
            size = record.size,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "image pulled"
        );
        Ok(record)
    }

    /// Merges a pulled image into the store: its tag moves to it from any
    /// other image, and an image left with no name is dropped.
    fn commit_record(&self, pulled: ImageRecord) -> Result<ImageRecord> {
        let _guard = self.records_lock.lock().unwrap();
        let mut record = self
            .store
            .get::<ImageRecord>(&pulled.id)?
            .unwrap_or_else(|| pulled.clone());
        for tag in &pulled.repo_tags {
            if !record.repo_tags.contains(tag) {
                record.repo_tags.push(tag.clone());
            }
        }
        for digest in &pulled.repo_digests {
            if !record.repo_digests.contains(digest) {
                record.repo_digests.push(digest.clone());
            }
        }
        for digest in &pulled.manifest_digests {
            if !record.manifest_digests.contains(digest) {
                record.manifest_digests.push(digest.clone());
            }
        }
        for mut other in self.store.list::<ImageRecord>()? {
            if other.id == record.id
                || !other.repo_tags.iter().any(|t| pulled.repo_tags.contains(t))
            {
                continue;
            }
            other.repo_tags.retain(|t| !pulled.repo_tags.contains(t));
            if other.repo_tags.is_empty() {
                tracing::info!(id = %other.id, "image lost its last tag; removing its record");
                self.store.delete::<ImageRecord>(&other.id)?;
            } else {
                self.store.put(&other)?;
            }
        }
        self.store.put(&record)?;
        Ok(record)
    }

    async fn store_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let _g = self.locks.lock(digest).await;
        if !self.content.exists(digest) {
            self.content.put(digest, bytes)?;
        }
        Ok(())
    }

    async fn fetch_small_blob(&self, source: &Source, desc: &Descriptor) -> Result<Vec<u8>> {
        reference::parse_digest(&desc.digest).map_err(Error::BadImage)?;
        let _g = self.locks.lock(&desc.digest).await;
        if self.content.exists(&desc.digest) {
            return self.content.read(&desc.digest);
        }
        if desc.size > 16 << 20 {
            return Err(Error::BadImage(format!(
                "config blob {} is {} bytes",
                desc.digest, desc.size
            )));
        }
        let mut writer = self.content.writer(&desc.digest, Some(desc.size))?;
        let mut stream = source.blob_stream(&desc.digest).await?.stream;
        let mut data = Vec::with_capacity(desc.size as usize);
        while let Some(chunk) = self.next_chunk(&mut stream, source, &desc.digest).await? {
            writer.write(&chunk)?;
            data.extend_from_slice(&chunk);
        }
        tokio::task::spawn_blocking(move || writer.commit())
            .await
            .map_err(|e| Error::Internal(format!("blob commit task: {e}")))??;
        Ok(data)
    }

    async fn next_chunk(
        &self,
        stream: &mut futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
        source: &Source,
        digest: &str,
    ) -> Result<Option<Bytes>> {
        let stall = self.registries.stall_timeout();
        match tokio::time::timeout(stall, stream.next()).await {
            Err(_) => Err(Error::Unavailable(format!(
                "pull of {digest} from {} stalled: no data for {} s",
                source.host(),
                stall.as_secs()
            ))),
            Ok(None) => Ok(None),
            Ok(Some(Ok(b))) => {
                self.metrics.pulled_bytes(b.len() as u64);
                Ok(Some(b))
            }
            Ok(Some(Err(e))) => Err(Error::Unavailable(format!(
                "download of {digest} from {} failed: {e}",
                source.host()
            ))),
        }
    }

    /// Makes sure the snapshot `chain_id` exists, downloading and unpacking
    /// the layer if needed.
    async fn ensure_snapshot(
        &self,
        source: &Source,
        layer: &Descriptor,
        diff_id: &str,
        chain_id: &str,
    ) -> Result<()> {
        let _chain = self.locks.lock(chain_id).await;
        if self.snapshots.exists(chain_id) {
            return Ok(());
        }
        let format = layer_format(&layer.media_type).map_err(Error::BadImage)?;
        let _blob = self.locks.lock(&layer.digest).await;
        let unpack_ctx = UnpackJob {
            digest: layer.digest.clone(),
            diff_id: diff_id.to_string(),
            format,
        };
        if self.content.exists(&layer.digest) {
            let path = self.content.path(&layer.digest);
            let store = self.snapshots.clone();
            let chain = chain_id.to_string();
            return tokio::task::spawn_blocking(move || {
                let file =
                    std::fs::File::open(&path).context(|| format!("open {}", path.display()))?;
                store.create(&chain, |dir| {
                    unpack_ctx.run(std::io::BufReader::with_capacity(1 << 20, file), dir)
                })
            })
            .await
            .map_err(|e| Error::Internal(format!("unpack task: {e}")))?
            .map(|_| ());
        }

        let _permit = self.downloads.acquire().await.expect("semaphore open");
        let writer = self.content.writer(&layer.digest, Some(layer.size))?;
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(PIPE_CHUNKS);
        let store = self.snapshots.clone();
        let chain = chain_id.to_string();
        let unpacker = tokio::task::spawn_blocking(move || {
            store.create(&chain, |dir| {
                let mut pipe = PipeReader {
                    rx,
                    current: Bytes::new(),
                    blob: Some(writer),
                };
                unpack_ctx.run(&mut pipe, dir)?;
                // The rest of the blob (tar padding, compression trailer).
                std::io::copy(&mut pipe, &mut std::io::sink())
                    .context(|| format!("read {}", unpack_ctx.digest))?;
                pipe.blob.take().expect("blob writer").commit()
            })
        });

        let download = async {
            let mut stream = source.blob_stream(&layer.digest).await?.stream;
            let mut received = 0u64;
            let mut last_log = Instant::now();
            while let Some(chunk) = self.next_chunk(&mut stream, source, &layer.digest).await? {
                received += chunk.len() as u64;
                if last_log.elapsed() >= Duration::from_secs(2) {
                    last_log = Instant::now();
                    tracing::info!(layer = %layer.digest, received, total = layer.size, "pulling layer");
                }
                if tx.send(Ok(chunk)).await.is_err() {
                    break; // the unpacker failed; its error is the one to report
                }
            }
            tracing::info!(layer = %layer.digest, received, total = layer.size, "layer downloaded");
            Ok::<(), Error>(())
        };
        let downloaded = download.await;
        if let Err(e) = &downloaded {
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
        drop(tx);
        let unpacked = unpacker
            .await
            .map_err(|e| Error::Internal(format!("unpack task: {e}")))?;
        downloaded?;
        unpacked.map(|_| ())
    }

    /// The image a CRI reference names: an id (or unique id prefix), a
    /// `repo@digest` or a tag.
    pub fn resolve(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let images = self.store.list::<ImageRecord>()?;
        if let Some(id) = reference::as_image_id(reference)
            && let Some(found) = images.iter().find(|i| i.id == id)
        {
            return Ok(Some(found.clone()));
        }
        if reference.len() >= 6 && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
            let matches: Vec<&ImageRecord> = images
                .iter()
                .filter(|i| i.id.trim_start_matches("sha256:").starts_with(reference))
                .collect();
            if matches.len() == 1 {
                return Ok(Some(matches[0].clone()));
            }
        }
        let Ok(name) = ImageName::parse(reference) else {
            return Ok(None);
        };
        if let Some(d) = &name.digest {
            let wanted = name.repo_digest(d);
            return Ok(images
                .into_iter()
                .find(|i| i.repo_digests.contains(&wanted)));
        }
        let tag = name.repo_tag().unwrap_or_default();
        Ok(images.into_iter().find(|i| i.repo_tags.contains(&tag)))
    }

    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        self.store.list::<ImageRecord>()
    }

    /// Removes the image's record (all its tags); what it alone used goes
    /// with the next garbage collection. Removing an unknown image
    /// succeeds.
    pub fn forget(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let Some(image) = self.resolve(reference)? else {
            return Ok(None);
        };
        {
            let _guard = self.records_lock.lock().unwrap();
            self.store.delete::<ImageRecord>(&image.id)?;
        }
        tracing::info!(id = %image.id, tags = ?image.repo_tags, "image removed");
        Ok(Some(image))
    }

    /// Whether a garbage collection should be queued: not while one queued
    /// earlier has not begun (it sees every change made before it begins).
    pub fn queue_garbage_collection(&self) -> bool {
        !self
            .gc_queued
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// Keeps the snapshots `chains` from garbage collection until the hold
    /// is dropped; NotFound if one is already gone (its image was removed
    /// since it was resolved).
    pub fn hold_snapshots(&self, chains: Vec<String>) -> Result<SnapshotHold<'_>> {
        let mut creating = self.creating.lock().unwrap();
        if let Some(gone) = chains.iter().find(|c| !self.snapshots.exists(c)) {
            return Err(Error::NotFound(format!(
                "snapshot {gone} was removed with its image; pull the image again"
            )));
        }
        creating.push(chains.clone());
        Ok(SnapshotHold {
            images: self,
            chains,
        })
    }

    /// Deletes blobs and snapshots no image and no container references (as
    /// its rootfs or as an image volume), nor a container being created.
    pub async fn collect_garbage(&self) -> Result<()> {
        let _exclusive = self.gc_lock.write().await;
        // From here on every removal is seen: a later one queues another.
        self.gc_queued
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let mut blobs = BTreeSet::new();
        let mut chains = BTreeSet::new();
        for image in self.store.list::<ImageRecord>()? {
            blobs.insert(image.id.clone());
            blobs.extend(image.layers.iter().cloned());
            blobs.extend(image.manifest_digests.iter().cloned());
            chains.extend(image.chain_ids.iter().cloned());
        }
        // Held from before the containers are listed until the snapshots
        // are deleted: a create drops its hold only once its record is
        // stored, so each is seen as a hold or as a record.
        let creating = self.creating.lock().unwrap();
        chains.extend(creating.iter().flatten().cloned());
        for container in self.store.list::<ContainerRecord>()? {
            chains.extend(container.snapshot_chain_ids.iter().cloned());
            for volume in &container.image_volumes {
                chains.extend(volume.chain_ids.iter().cloned());
            }
        }
        let (mut blobs_removed, mut snapshots_removed) = (0, 0);
        for chain in self.snapshots.list()? {
            if !chains.contains(&chain) {
                self.snapshots.remove(&chain)?;
                snapshots_removed += 1;
            }
        }
        drop(creating);
        for digest in self.content.list()? {
            if !blobs.contains(&digest) {
                self.content.delete(&digest)?;
                blobs_removed += 1;
            }
        }
        if blobs_removed + snapshots_removed > 0 {
            tracing::info!(blobs_removed, snapshots_removed, "garbage collected");
        }
        Ok(())
    }

    /// Overlayfs lower dirs of an image, top layer first (as `lowerdir=`
    /// wants them).
    pub fn lower_dirs(&self, image: &ImageRecord) -> Vec<PathBuf> {
        image
            .chain_ids
            .iter()
            .rev()
            .map(|c| self.snapshots.dir(c))
            .collect()
    }

    /// Snapshot dirs of an image, base layer first.
    pub fn snapshot_dirs(&self, image: &ImageRecord) -> Vec<PathBuf> {
        image
            .chain_ids
            .iter()
            .map(|c| self.snapshots.dir(c))
            .collect()
    }

    pub fn image_fs_usage(&self) -> (PathBuf, Usage) {
        let root = self
            .snapshots
            .root()
            .parent()
            .unwrap_or(self.snapshots.root())
            .to_path_buf();
        let mut usage = dir_usage(self.snapshots.root());
        let content = dir_usage(self.content.dir());
        usage.bytes += content.bytes;
        usage.inodes += content.inodes;
        (root, usage)
    }

    pub fn container_fs_usage(&self) -> (PathBuf, Usage) {
        (self.containers_dir.clone(), dir_usage(&self.containers_dir))
    }
}

impl ImageRecord {
    /// The process settings from the image config.
    pub fn process_config(&self) -> ProcessConfig {
        #[derive(Deserialize)]
        struct Doc {
            #[serde(default)]
            config: Option<ProcessConfig>,
        }
        serde_json::from_str::<Doc>(&self.config_json)
            .ok()
            .and_then(|d| d.config)
            .unwrap_or_default()
    }
}

/// Reads a layer blob from the download channel, storing every byte in the
/// content store as it passes.
struct PipeReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
    blob: Option<BlobWriter>,
}

impl Read for PipeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(e),
                Some(Ok(chunk)) => {
                    if let Some(blob) = self.blob.as_mut() {
                        blob.write(&chunk).map_err(std::io::Error::other)?;
                    }
                    self.current = chunk;
                }
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerFormat {
    Tar,
    Gzip,
    Zstd,
}

fn layer_format(media_type: &str) -> std::result::Result<LayerFormat, String> {
    match media_type {
        "application/vnd.oci.image.layer.v1.tar"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar"
        | "application/vnd.docker.image.rootfs.diff.tar" => Ok(LayerFormat::Tar),
        "application/vnd.oci.image.layer.v1.tar+gzip"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
        | "application/vnd.docker.image.rootfs.diff.tar.gzip"
        | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => Ok(LayerFormat::Gzip),
        "application/vnd.oci.image.layer.v1.tar+zstd"
        | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => Ok(LayerFormat::Zstd),
        other => Err(format!("unsupported layer media type {other:?}")),
    }
}

struct UnpackJob {
    digest: String,
    diff_id: String,
    format: LayerFormat,
}

impl UnpackJob {
    /// Decompresses `blob` into `dir`, checking the diff id.
    fn run(&self, blob: impl Read, dir: &Path) -> Result<()> {
        let decoded: Box<dyn Read> = match self.format {
            LayerFormat::Tar => Box::new(blob),
            LayerFormat::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            LayerFormat::Zstd => Box::new(
                zstd::stream::read::Decoder::new(blob)
                    .map_err(|e| Error::BadImage(format!("layer {}: zstd: {e}", self.digest)))?,
            ),
        };
        let mut hashing = HashingReader {
            inner: decoded,
            hasher: Sha256::new(),
        };
        unpack::unpack_layer(&mut hashing, dir).map_err(|e| match e {
            Error::BadImage(m) => Error::BadImage(format!("layer {}: {m}", self.digest)),
            Error::Io { context, source } if source.kind() == std::io::ErrorKind::InvalidData => {
                Error::BadImage(format!("layer {}: {context}: {source}", self.digest))
            }
            other => other,
        })?;
        std::io::copy(&mut hashing, &mut std::io::sink())
            .map_err(|e| Error::BadImage(format!("layer {}: {e}", self.digest)))?;
        let got = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if got != self.diff_id {
            return Err(Error::BadImage(format!(
                "layer {} unpacks to {got}, the config says {}",
                self.digest, self.diff_id
            )));
        }
        Ok(())
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn check_manifest_type(doc: &ManifestDoc, name: &ImageName) -> Result<()> {
    match doc.media_type.as_str() {
        "" | registry::MEDIA_OCI_MANIFEST | registry::MEDIA_DOCKER_MANIFEST => Ok(()),
        other => Err(Error::BadImage(format!(
            "{name}: unsupported manifest type {other}"
        ))),
    }
}

/// The host's platform in OCI terms.
fn host_platform() -> (&'static str, Option<&'static str>) {
    match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "arm" => ("arm", Some("v7")),
        "x86" => ("386", None),
        other => (other, None),
    }
}

/// Picks the manifest for this host from an index.
fn select_platform(index: &ManifestDoc, name: &ImageName) -> Result<String> {
    let (arch, variant) = host_platform();
    let entries = index.manifests.as_deref().unwrap_or_default();
    let candidates: Vec<&Descriptor> = entries
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == "linux" && p.architecture == arch)
        })
        .collect();
    // An exact variant match wins, then an entry without variant, then any.
    let pick = candidates
        .iter()
        .find(|d| d.platform.as_ref().and_then(|p| p.variant.as_deref()) == variant)
        .or_else(|| {
            candidates
                .iter()
                .find(|d| d.platform.as_ref().is_some_and(|p| p.variant.is_none()))
        })
        .or_else(|| candidates.first());
    match pick {
        Some(d) => Ok(d.digest.clone()),
        None => Err(Error::NotFound(format!(
            "{name}: no manifest for linux/{arch} in the index (has: {})",
            entries
                .iter()
                .filter_map(|d| d
                    .platform
                    .as_ref()
                    .map(|p| format!("{}/{}", p.os, p.architecture)))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::BadImage(format!("{what} is malformed: {e}")))
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Bytes (allocated blocks) and inodes under `dir`, not following symlinks.
pub fn dir_usage(dir: &Path) -> Usage {
    use std::os::unix::fs::MetadataExt;
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            usage.inodes += 1;
            usage.bytes += meta.blocks() * 512;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    usage
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(platforms: &[(&str, &str, Option<&str>)]) -> ManifestDoc {
        let manifests = platforms
            .iter()
            .enumerate()
            .map(|(i, (os, arch, variant))| Descriptor {
                media_type: registry::MEDIA_OCI_MANIFEST.into(),
                digest: format!("sha256:{i:064}"),
                size: 1,
                platform: Some(Platform {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: variant.map(str::to_string),
                }),
            })
            .collect();
        ManifestDoc {
            media_type: registry::MEDIA_OCI_INDEX.into(),
            manifests: Some(manifests),
            config: None,
            layers: vec![],
        }
    }

    #[test]
    fn platform_selection_prefers_the_host() {
        let name = ImageName::parse("x").unwrap();
        let (arch, _) = host_platform();
        let idx = index(&[
            ("linux", "s390x", None),
            ("windows", arch, None),
            ("linux", arch, None),
        ]);
        assert_eq!(
            select_platform(&idx, &name).unwrap(),
            format!("sha256:{:064}", 2)
        );
        let idx = index(&[("linux", "s390x", None)]);
        assert!(matches!(
            select_platform(&idx, &name),
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn layer_formats() {
        assert_eq!(
            layer_format("application/vnd.oci.image.layer.v1.tar+zstd"),
            Ok(LayerFormat::Zstd)
        );
        assert_eq!(
            layer_format("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Ok(LayerFormat::Gzip)
        );
        assert!(layer_format("application/x-evil").is_err());
    }

    #[test]
    fn process_config_from_record() {
        let rec = ImageRecord {
            config_json: r#"{"config":{"User":"berth","Cmd":["sh"],"WorkingDir":"/w","StopSignal":"SIGQUIT"}}"#.into(),
            ..Default::default()
        };
        let p = rec.process_config();
        assert_eq!(p.user, "berth");
        assert_eq!(p.cmd, Some(vec!["sh".to_string()]));
        assert_eq!(p.stop_signal, "SIGQUIT");
    }
}
