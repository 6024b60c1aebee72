//! OCI test images built from Debian's busybox-static, without internet:
//! tar layers (gzip, zstd or uncompressed), an image config and a manifest
//! (OCI or Docker schema 2) in an OCI image layout, pushed to the harness
//! registry with skopeo; multi-platform indexes; hostile layers for the
//! unpacker's safety tests; large incompressible images.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use serde_json::json;
use sha2::{Digest, Sha256};

use crate::registry::Registry;

pub const BUSYBOX_BIN: &str = "/bin/busybox";
/// Every file in a test image gets this mtime, so builds are reproducible.
const MTIME: u64 = 1_700_000_000;
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MEDIA_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const MEDIA_DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One file-system entry of a layer.
#[derive(Debug, Clone)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    /// A hard link to `target`, a path earlier in the same layer.
    Hardlink {
        path: String,
        target: String,
    },
    /// A header written with exactly these name and link-name bytes (at
    /// most 100 each), unchecked: `..`, absolute names, anything. For
    /// hostile layers only.
    Raw {
        name: Vec<u8>,
        entry_type: tar::EntryType,
        link_name: Vec<u8>,
        mode: u32,
        data: Vec<u8>,
    },
}

impl Entry {
    pub fn dir(path: &str) -> Entry {
        Entry::Dir {
            path: path.into(),
            mode: 0o755,
        }
    }
    pub fn file(path: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o644,
            data: data.into(),
        }
    }
    pub fn exec(path: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry::File {
            path: path.into(),
            mode: 0o755,
            data: data.into(),
        }
    }
    pub fn symlink(path: &str, target: &str) -> Entry {
        Entry::Symlink {
            path: path.into(),
            target: target.into(),
        }
    }
    pub fn hardlink(path: &str, target: &str) -> Entry {
        Entry::Hardlink {
            path: path.into(),
            target: target.into(),
        }
    }
    /// A regular file under a raw, unchecked name.
    pub fn raw_file(name: &str, data: impl Into<Vec<u8>>) -> Entry {
        Entry::Raw {
            name: name.as_bytes().to_vec(),
            entry_type: tar::EntryType::Regular,
            link_name: Vec::new(),
            mode: 0o644,
            data: data.into(),
        }
    }
    /// A symlink or hard link with raw, unchecked name and target.
    pub fn raw_link(kind: tar::EntryType, name: &str, target: &str) -> Entry {
        Entry::Raw {
            name: name.as_bytes().to_vec(),
            entry_type: kind,
            link_name: target.as_bytes().to_vec(),
            mode: 0o777,
            data: Vec::new(),
        }
    }
    /// An OCI whiteout deleting `path` from the layers below.
    pub fn whiteout(path: &str) -> Entry {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let wh = if dir.is_empty() {
            format!(".wh.{name}")
        } else {
            format!("{dir}/.wh.{name}")
        };
        Entry::file(&wh, Vec::new())
    }
    /// An OCI opaque marker: `dir` shows only this layer's entries.
    pub fn opaque(dir: &str) -> Entry {
        Entry::file(&format!("{dir}/.wh..wh..opq"), Vec::new())
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
    /// A plain tar: blob digest == diff id.
    None,
}

impl Compression {
    /// The OCI layer media type.
    pub fn oci_media_type(self) -> &'static str {
        match self {
            Compression::Gzip => MEDIA_LAYER_GZIP,
            Compression::Zstd => MEDIA_LAYER_ZSTD,
            Compression::None => MEDIA_LAYER_TAR,
        }
    }

    /// The Docker schema 2 layer media type (Docker has none for zstd).
    pub fn docker_media_type(self) -> Option<&'static str> {
        match self {
            Compression::Gzip => Some(MEDIA_DOCKER_LAYER_GZIP),
            Compression::Zstd => None,
            Compression::None => Some(MEDIA_DOCKER_LAYER_TAR),
        }
    }

    /// Compresses a tar stream (fast levels: test builds stay quick).
    pub fn compress(self, tar_bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Compression::Gzip => {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(tar_bytes)?;
                gz.finish()?
            }
            Compression::Zstd => zstd::stream::encode_all(tar_bytes, 1)?,
            Compression::None => tar_bytes.to_vec(),
        })
    }

    /// Undoes [`Compression::compress`] (to check blobs read back).
    pub fn decompress(self, blob: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            Compression::Gzip => {
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(blob), &mut out)?;
                out
            }
            Compression::Zstd => zstd::stream::decode_all(blob)?,
            Compression::None => blob.to_vec(),
        })
    }
}

/// A layer as it goes into the image: the (compressed) blob and the tar's
/// diff id.
#[derive(Debug, Clone)]
pub struct Layer {
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
    pub compression: Compression,
}

/// A gzip'd layer of `entries`.
pub fn build_layer(entries: &[Entry]) -> anyhow::Result<Layer> {
    build_layer_with(entries, Compression::Gzip)
}

/// The uncompressed tar of `entries`, in order.
pub fn build_tar(entries: &[Entry]) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        match entry {
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                builder.append_data(
                    &mut h,
                    format!("{}/", path.trim_end_matches('/')),
                    std::io::empty(),
                )?;
            }
            Entry::File { path, mode, data } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                builder.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                builder.append_link(&mut h, path, target)?;
            }
            Entry::Hardlink { path, target } => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.set_size(0);
                builder.append_link(&mut h, path, target)?;
            }
            Entry::Raw {
                name,
                entry_type,
                link_name,
                mode,
                data,
            } => {
                anyhow::ensure!(
                    name.len() <= 100 && link_name.len() <= 100,
                    "raw tar names are limited to 100 bytes"
                );
                h.set_entry_type(*entry_type);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                let old = h.as_old_mut();
                old.name = [0; 100];
                old.name[..name.len()].copy_from_slice(name);
                old.linkname = [0; 100];
                old.linkname[..link_name.len()].copy_from_slice(link_name);
                h.set_cksum();
                builder.append(&h, data.as_slice())?;
            }
        }
    }
    Ok(builder.into_inner()?)
}

/// A layer of `entries` compressed with `compression`.
pub fn build_layer_with(entries: &[Entry], compression: Compression) -> anyhow::Result<Layer> {
    layer_from_tar(&build_tar(entries)?, compression)
}

/// A layer from a ready tar stream.
pub fn layer_from_tar(tar_bytes: &[u8], compression: Compression) -> anyhow::Result<Layer> {
    let blob = compression.compress(tar_bytes)?;
    Ok(Layer {
        digest: sha256_digest(&blob),
        diff_id: sha256_digest(tar_bytes),
        blob,
        compression,
    })
}

/// The process settings an image config carries.
#[derive(Debug, Clone, Default)]
pub struct ImageSettings {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// The manifest flavour of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ManifestFormat {
    #[default]
    Oci,
    /// Docker image manifest v2 schema 2.
    Docker,
}

/// An OCI platform (`os`/`architecture`[/`variant`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            os: os.into(),
            architecture: architecture.into(),
            variant: variant.map(Into::into),
        }
    }
    pub fn linux_amd64() -> Platform {
        Platform::new("linux", "amd64", None)
    }
    pub fn linux_arm64() -> Platform {
        Platform::new("linux", "arm64", Some("v8"))
    }
    pub fn linux_arm_v7() -> Platform {
        Platform::new("linux", "arm", Some("v7"))
    }
    /// The platform of this machine, in OCI (GOARCH) names.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform::new("linux", arch, None)
    }
    /// The OCI `platform` object of an index entry.
    pub fn to_json(&self) -> serde_json::Value {
        let mut p = json!({"architecture": self.architecture, "os": self.os});
        if let Some(v) = &self.variant {
            p["variant"] = json!(v);
        }
        p
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An image held in memory, ready to be written as an OCI layout.
#[derive(Debug, Clone)]
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
    /// The manifest's media type (OCI manifest or Docker schema 2).
    pub manifest_media_type: &'static str,
}

impl Image {
    /// An OCI image for linux/amd64.
    pub fn new(layers: Vec<Layer>, settings: &ImageSettings) -> Image {
        Image::build(
            layers,
            settings,
            ManifestFormat::Oci,
            &Platform::linux_amd64(),
        )
        .expect("every compression has an OCI media type")
    }

    /// A Docker schema 2 image for linux/amd64 (gzip or uncompressed layers).
    pub fn docker(layers: Vec<Layer>, settings: &ImageSettings) -> anyhow::Result<Image> {
        Image::build(
            layers,
            settings,
            ManifestFormat::Docker,
            &Platform::linux_amd64(),
        )
    }

    /// An image in `format` whose config names `platform`.
    pub fn build(
        layers: Vec<Layer>,
        settings: &ImageSettings,
        format: ManifestFormat,
        platform: &Platform,
    ) -> anyhow::Result<Image> {
        let mut cfg = serde_json::Map::new();
        if !settings.entrypoint.is_empty() {
            cfg.insert("Entrypoint".into(), json!(settings.entrypoint));
        }
        if !settings.cmd.is_empty() {
            cfg.insert("Cmd".into(), json!(settings.cmd));
        }
        let mut env =
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()];
        env.extend(settings.env.iter().cloned());
        cfg.insert("Env".into(), json!(env));
        if !settings.working_dir.is_empty() {
            cfg.insert("WorkingDir".into(), json!(settings.working_dir));
        }
        if !settings.user.is_empty() {
            cfg.insert("User".into(), json!(settings.user));
        }
        let mut config = json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": platform.architecture,
            "os": platform.os,
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        });
        if let Some(v) = &platform.variant {
            config["variant"] = json!(v);
        }
        let config = serde_json::to_vec(&config)?;
        let (manifest_media_type, config_media_type) = match format {
            ManifestFormat::Oci => (MEDIA_MANIFEST, MEDIA_CONFIG),
            ManifestFormat::Docker => (MEDIA_DOCKER_MANIFEST, MEDIA_DOCKER_CONFIG),
        };
        let mut layer_descs = Vec::new();
        for l in &layers {
            let media_type = match format {
                ManifestFormat::Oci => l.compression.oci_media_type(),
                ManifestFormat::Docker => l.compression.docker_media_type().ok_or_else(|| {
                    anyhow::anyhow!(
                        "Docker schema 2 has no media type for {:?} layers",
                        l.compression
                    )
                })?,
            };
            layer_descs
                .push(json!({"mediaType": media_type, "digest": l.digest, "size": l.blob.len()}));
        }
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": manifest_media_type,
            "config": {"mediaType": config_media_type, "digest": sha256_digest(&config), "size": config.len()},
            "layers": layer_descs,
        }))?;
        Ok(Image {
            layers,
            config,
            manifest,
            manifest_media_type,
        })
    }

    /// busybox (the shared base layer) with Cmd `sh`, its config naming
    /// `platform`. Other platforms' images won't run here, but pull fine.
    pub fn busybox_for(platform: &Platform) -> anyhow::Result<Image> {
        Image::build(
            vec![busybox_layer()?],
            &ImageSettings {
                cmd: vec!["sh".into()],
                ..Default::default()
            },
            ManifestFormat::Oci,
            platform,
        )
    }

    pub fn manifest_digest(&self) -> String {
        sha256_digest(&self.manifest)
    }

    pub fn config_digest(&self) -> String {
        sha256_digest(&self.config)
    }

    /// Every blob and manifest of this image into `blobs` (an OCI layout's
    /// `blobs/sha256`).
    fn write_blobs(&self, blobs: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(blobs)?;
        for bytes in self
            .layers
            .iter()
            .map(|l| l.blob.as_slice())
            .chain([self.config.as_slice(), self.manifest.as_slice()])
        {
            let path = blobs.join(sha256_digest(bytes).trim_start_matches("sha256:"));
            if !path.exists() {
                std::fs::write(path, bytes)?;
            }
        }
        Ok(())
    }

    /// Writes an OCI image layout at `dir` holding this image as `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> anyhow::Result<()> {
        self.write_blobs(&dir.join("blobs/sha256"))?;
        write_layout_index(
            dir,
            self.manifest_media_type,
            &self.manifest_digest(),
            self.manifest.len(),
            tag,
        )
    }

    /// Writes this image as skopeo's `dir:` transport wants it:
    /// `manifest.json`, blobs named by their hex digest, `version`.
    pub fn write_dir(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        for bytes in self
            .layers
            .iter()
            .map(|l| l.blob.as_slice())
            .chain([self.config.as_slice()])
        {
            std::fs::write(
                dir.join(sha256_digest(bytes).trim_start_matches("sha256:")),
                bytes,
            )?;
        }
        std::fs::write(dir.join("manifest.json"), &self.manifest)?;
        std::fs::write(dir.join("version"), "Directory Transport Version: 1.1\n")?;
        Ok(())
    }

    /// Pushes this image to `registry` as `repo:tag` with skopeo, a client
    /// independent of Berth, with the registry's own credentials (if it
    /// has any). The manifest bytes are kept as built.
    pub fn push(
        &self,
        registry: &Registry,
        repo: &str,
        tag: &str,
        work: &Path,
    ) -> anyhow::Result<BuiltImage> {
        self.push_with_creds(registry, repo, tag, work, registry.credentials())
    }

    /// [`Image::push`] with explicit credentials (`None`: anonymous), to see
    /// a registry refuse wrong ones.
    pub fn push_with_creds(
        &self,
        registry: &Registry,
        repo: &str,
        tag: &str,
        work: &Path,
        creds: Option<(&str, &str)>,
    ) -> anyhow::Result<BuiltImage> {
        let layout = work.join(format!("layout-{}-{tag}", repo.replace('/', "_")));
        let _ = std::fs::remove_dir_all(&layout);
        // skopeo's OCI layout source only takes OCI manifests; its `dir:`
        // transport keeps any manifest as it is.
        let source = if self.manifest_media_type == MEDIA_MANIFEST {
            self.write_layout(&layout, tag)?;
            format!("oci:{}:{tag}", layout.display())
        } else {
            self.write_dir(&layout)?;
            format!("dir:{}", layout.display())
        };
        let reference = registry.reference(repo, tag);
        let pushed = skopeo_push(registry, &source, &reference, creds, false);
        std::fs::remove_dir_all(&layout)?;
        pushed?;
        Ok(self.built(&reference, repo, tag))
    }

    fn built(&self, reference: &str, repo: &str, tag: &str) -> BuiltImage {
        BuiltImage {
            reference: reference.to_string(),
            repo: repo.to_string(),
            tag: tag.to_string(),
            manifest_digest: self.manifest_digest(),
            config_digest: self.config_digest(),
            layer_digests: self.layers.iter().map(|l| l.digest.clone()).collect(),
        }
    }
}

fn write_layout_index(
    dir: &Path,
    media_type: &str,
    digest: &str,
    size: usize,
    tag: &str,
) -> anyhow::Result<()> {
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    std::fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }],
        }))?,
    )?;
    Ok(())
}

/// `skopeo copy --preserve-digests <source> docker://<reference>`.
fn skopeo_push(
    registry: &Registry,
    source: &str,
    reference: &str,
    creds: Option<(&str, &str)>,
    all: bool,
) -> anyhow::Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["--insecure-policy", "copy", "--quiet", "--preserve-digests"])
        .args(registry.skopeo_dest_args(creds));
    if all {
        cmd.arg("--all");
    }
    cmd.arg(source).arg(format!("docker://{reference}"));
    let out = cmd
        .output()
        .map_err(|e| anyhow::anyhow!("run skopeo (install Debian's skopeo): {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "skopeo copy to {reference} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// An image the harness pushed, and what a pull must give back.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// `127.0.0.1:PORT/repo:tag`
    pub reference: String,
    pub repo: String,
    pub tag: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digests: Vec<String>,
}

impl BuiltImage {
    /// `127.0.0.1:PORT/repo` (the reference without its tag).
    pub fn name(&self) -> String {
        match self.reference.split_once('@') {
            Some((name, _)) => name.to_string(),
            None => self
                .reference
                .strip_suffix(&format!(":{}", self.tag))
                .unwrap_or(&self.reference)
                .to_string(),
        }
    }

    /// `127.0.0.1:PORT/repo@sha256:<manifest digest>`: the repo digest a
    /// runtime reports for it.
    pub fn digest_reference(&self) -> String {
        format!("{}@{}", self.name(), self.manifest_digest)
    }
}

/// A multi-platform OCI image index the harness pushed.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    /// `127.0.0.1:PORT/repo:tag`
    pub reference: String,
    pub repo: String,
    pub tag: String,
    pub index_digest: String,
    /// Each platform's image (their `reference` is `...repo@<manifest digest>`,
    /// `tag` the index's tag).
    pub manifests: Vec<(Platform, BuiltImage)>,
}

impl BuiltIndex {
    /// The image for `os`/`architecture` (any variant).
    pub fn for_platform(&self, os: &str, architecture: &str) -> Option<&BuiltImage> {
        self.manifests
            .iter()
            .find(|(p, _)| p.os == os && p.architecture == architecture)
            .map(|(_, b)| b)
    }

    /// `127.0.0.1:PORT/repo@<index digest>`
    pub fn digest_reference(&self) -> String {
        let name = self
            .reference
            .strip_suffix(&format!(":{}", self.tag))
            .unwrap_or(&self.reference);
        format!("{name}@{}", self.index_digest)
    }
}

/// Builds the OCI index of `entries` and pushes it with every image to
/// `registry` as `repo:tag` (`skopeo copy --all --preserve-digests` from an
/// OCI layout whose index.json points to the index manifest).
pub fn push_index(
    registry: &Registry,
    repo: &str,
    tag: &str,
    work: &Path,
    entries: &[(Platform, &Image)],
) -> anyhow::Result<BuiltIndex> {
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": entries.iter().map(|(p, img)| json!({
            "mediaType": img.manifest_media_type,
            "digest": img.manifest_digest(),
            "size": img.manifest.len(),
            "platform": p.to_json(),
        })).collect::<Vec<_>>(),
    }))?;
    let index_digest = sha256_digest(&index);
    let layout = work.join(format!("index-{}-{tag}", repo.replace('/', "_")));
    let _ = std::fs::remove_dir_all(&layout);
    let blobs = layout.join("blobs/sha256");
    for (_, img) in entries {
        img.write_blobs(&blobs)?;
    }
    std::fs::write(
        blobs.join(index_digest.trim_start_matches("sha256:")),
        &index,
    )?;
    write_layout_index(&layout, MEDIA_INDEX, &index_digest, index.len(), tag)?;
    let reference = registry.reference(repo, tag);
    let pushed = skopeo_push(
        registry,
        &format!("oci:{}:{tag}", layout.display()),
        &reference,
        registry.credentials(),
        true,
    );
    std::fs::remove_dir_all(&layout)?;
    pushed?;
    Ok(BuiltIndex {
        reference: reference.clone(),
        repo: repo.to_string(),
        tag: tag.to_string(),
        index_digest,
        manifests: entries
            .iter()
            .map(|(p, img)| {
                (
                    p.clone(),
                    img.built(
                        &registry.digest_reference(repo, &img.manifest_digest()),
                        repo,
                        tag,
                    ),
                )
            })
            .collect(),
    })
}

/// The base layer: busybox with every applet linked in /bin, and the files
/// a container expects (/etc/passwd, /etc/group, /tmp, ...); gzip'd.
pub fn busybox_layer() -> anyhow::Result<Layer> {
    busybox_layer_with(Compression::Gzip)
}

/// [`busybox_layer`] compressed with `compression`.
pub fn busybox_layer_with(compression: Compression) -> anyhow::Result<Layer> {
    let busybox = std::fs::read(BUSYBOX_BIN).map_err(|e| {
        anyhow::anyhow!("read {BUSYBOX_BIN} ({e}): install Debian's busybox-static (the README's test command does)")
    })?;
    let list = Command::new(BUSYBOX_BIN).arg("--list").output()?;
    anyhow::ensure!(list.status.success(), "busybox --list failed");
    let mut entries = vec![
        Entry::dir("bin"),
        Entry::dir("etc"),
        Entry::dir("root"),
        Entry::dir("home"),
        Entry::dir("home/berth"),
        Entry::Dir {
            path: "tmp".into(),
            mode: 0o1777,
        },
        Entry::dir("proc"),
        Entry::dir("sys"),
        Entry::dir("dev"),
        Entry::dir("usr"),
        Entry::symlink("usr/bin", "../bin"),
        Entry::symlink("sbin", "bin"),
        Entry::exec("bin/busybox", busybox),
        Entry::file(
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nberth:x:1000:1000:berth:/home/berth:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        ),
        Entry::file(
            "etc/group",
            "root:x:0:\nberth:x:1000:\nextra:x:2000:berth\nnogroup:x:65534:\n",
        ),
    ];
    for applet in String::from_utf8(list.stdout)?.lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.contains('/') || applet == "busybox" {
            continue;
        }
        entries.push(Entry::symlink(&format!("bin/{applet}"), "busybox"));
    }
    build_layer_with(&entries, compression)
}

/// The images every scenario uses, pushed to one registry.
pub struct TestImages {
    /// `berth-test/busybox:latest`: busybox, Cmd `sh`.
    pub busybox: BuiltImage,
    /// `berth-test/config:latest`: USER, Env, WorkingDir, Entrypoint and Cmd.
    pub config: BuiltImage,
    /// `berth-test/layers:latest`: three layers; the upper ones delete
    /// `/data/remove-me.txt` and make `/opaque` opaque (only `new.txt` left).
    pub layers: BuiltImage,
}

impl TestImages {
    /// Builds and pushes the test images; `work` holds temporary layouts.
    pub fn push_all(registry: &Registry, work: &Path) -> anyhow::Result<TestImages> {
        let base = busybox_layer()?;
        let busybox = Image::new(
            vec![base.clone()],
            &ImageSettings {
                cmd: vec!["sh".into()],
                ..Default::default()
            },
        )
        .push(registry, "berth-test/busybox", "latest", work)?;

        let app = build_layer(&[
            Entry::dir("work"),
            Entry::file("work/greeting.txt", "hello from the image\n"),
        ])?;
        let config = Image::new(
            vec![base.clone(), app],
            &ImageSettings {
                entrypoint: vec!["/bin/sh".into(), "-c".into()],
                cmd: vec!["echo \"$GREETING from $(pwd) as $(id -u):$(id -g)\"".into()],
                env: vec!["GREETING=hello".into(), "BERTH_TEST=1".into()],
                working_dir: "/work".into(),
                user: "berth".into(),
            },
        )
        .push(registry, "berth-test/config", "latest", work)?;

        let l1 = build_layer(&[
            Entry::dir("data"),
            Entry::file("data/keep.txt", "keep\n"),
            Entry::file("data/remove-me.txt", "gone in a later layer\n"),
            Entry::dir("opaque"),
            Entry::file("opaque/old.txt", "hidden by the opaque marker\n"),
        ])?;
        let l2 = build_layer(&[Entry::dir("data"), Entry::whiteout("data/remove-me.txt")])?;
        let l3 = build_layer(&[
            Entry::dir("opaque"),
            Entry::opaque("opaque"),
            Entry::file("opaque/new.txt", "only this\n"),
        ])?;
        let layers = Image::new(
            vec![base, l1, l2, l3],
            &ImageSettings {
                cmd: vec!["sh".into()],
                ..Default::default()
            },
        )
        .push(registry, "berth-test/layers", "latest", work)?;

        Ok(TestImages {
            busybox,
            config,
            layers,
        })
    }
}

/// Hostile layers for the unpacker's safety tests. Each one, unpacked by a
/// naive unpacker running as root, would create or overwrite a file on the
/// host under `/tmp`; a safe runtime must refuse the pull. Every layer
/// starts with harmless entries (`evil-<name>/ok.txt`), so a partial unpack
/// leaves something to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Malicious {
    /// A file named `../../../../../../../../tmp/berth-evil-dotdot`.
    DotDot,
    /// A file named `/tmp/berth-evil-absolute`.
    Absolute,
    /// A symlink `evil-symlink-parent/escape -> /tmp`, then a file
    /// `evil-symlink-parent/escape/berth-evil-symlink-parent` through it.
    SymlinkParent,
    /// A hard link `evil-hardlink-outside/link` to
    /// `../../../../../../../../tmp/berth-evil-hardlink-outside` (an
    /// existing host file, the victim), then a regular file of the same
    /// name written over it.
    HardlinkOutside,
    /// A symlink `evil-symlink-then-hardlink/escape -> /tmp`, a hard link
    /// `evil-symlink-then-hardlink/link` to
    /// `evil-symlink-then-hardlink/escape/berth-evil-symlink-then-hardlink`
    /// (the victim), then a regular file written over the link.
    SymlinkThenHardlink,
}

/// What the hard-link variants' victim file holds; it must stay so.
pub const VICTIM_CONTENT: &str = "berth e2e victim: must stay unchanged\n";
const PWNED: &str = "pwned by a hostile layer\n";
const UP: &str = "../../../../../../../..";

impl Malicious {
    pub const ALL: [Malicious; 5] = [
        Malicious::DotDot,
        Malicious::Absolute,
        Malicious::SymlinkParent,
        Malicious::HardlinkOutside,
        Malicious::SymlinkThenHardlink,
    ];

    /// `dotdot`, `absolute`, `symlink-parent`, `hardlink-outside`,
    /// `symlink-then-hardlink`.
    pub fn name(self) -> &'static str {
        match self {
            Malicious::DotDot => "dotdot",
            Malicious::Absolute => "absolute",
            Malicious::SymlinkParent => "symlink-parent",
            Malicious::HardlinkOutside => "hardlink-outside",
            Malicious::SymlinkThenHardlink => "symlink-then-hardlink",
        }
    }

    /// The host path the layer attacks: `/tmp/berth-evil-<name>`.
    pub fn evil_path(self) -> String {
        format!("/tmp/berth-evil-{}", self.name())
    }

    /// True when the attack needs an existing host file (the hard-link
    /// variants): [`Malicious::prepare_host`] creates it.
    pub fn has_victim(self) -> bool {
        matches!(
            self,
            Malicious::HardlinkOutside | Malicious::SymlinkThenHardlink
        )
    }

    /// The layer's top directory (harmless entries go there).
    pub fn layer_dir(self) -> String {
        format!("evil-{}", self.name())
    }

    /// Before a pull: removes what an earlier run may have left at
    /// [`Malicious::evil_path`] and, for the hard-link variants, creates
    /// the victim there holding [`VICTIM_CONTENT`].
    pub fn prepare_host(self) -> anyhow::Result<()> {
        let path = self.evil_path();
        let _ = std::fs::remove_file(&path);
        if self.has_victim() {
            std::fs::write(&path, VICTIM_CONTENT)?;
        }
        Ok(())
    }

    /// After a pull: the host is as [`Malicious::prepare_host`] left it (no
    /// file at the evil path, or the victim unchanged with one link); then
    /// removes the victim. Errors describe what the layer did.
    pub fn check_host_untouched(self) -> anyhow::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let path = self.evil_path();
        let result = if self.has_victim() {
            match std::fs::symlink_metadata(&path) {
                Err(e) => Err(anyhow::anyhow!("victim {path} is gone: {e}")),
                Ok(m) if m.nlink() != 1 => Err(anyhow::anyhow!(
                    "victim {path} got {} hard links: the layer linked to a host file",
                    m.nlink()
                )),
                Ok(_) => {
                    let content = std::fs::read_to_string(&path).unwrap_or_default();
                    if content == VICTIM_CONTENT {
                        Ok(())
                    } else {
                        Err(anyhow::anyhow!(
                            "victim {path} was overwritten: {content:?}"
                        ))
                    }
                }
            }
        } else if std::fs::symlink_metadata(&path).is_ok() {
            Err(anyhow::anyhow!("the layer created {path} on the host"))
        } else {
            Ok(())
        };
        if self.has_victim() || result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    /// The hostile layer's entries, in order.
    pub fn entries(self) -> Vec<Entry> {
        use tar::EntryType::{Link, Symlink};
        let dir = self.layer_dir();
        let mut e = vec![
            Entry::dir(&dir),
            Entry::file(&format!("{dir}/ok.txt"), "harmless\n"),
        ];
        let evil = self.evil_path();
        let evil_name = evil.trim_start_matches("/tmp/");
        match self {
            Malicious::DotDot => e.push(Entry::raw_file(&format!("{UP}{evil}"), PWNED)),
            Malicious::Absolute => e.push(Entry::raw_file(&evil, PWNED)),
            Malicious::SymlinkParent => {
                e.push(Entry::raw_link(Symlink, &format!("{dir}/escape"), "/tmp"));
                e.push(Entry::raw_file(&format!("{dir}/escape/{evil_name}"), PWNED));
            }
            Malicious::HardlinkOutside => {
                e.push(Entry::raw_link(
                    Link,
                    &format!("{dir}/link"),
                    &format!("{UP}{evil}"),
                ));
                e.push(Entry::raw_file(&format!("{dir}/link"), PWNED));
            }
            Malicious::SymlinkThenHardlink => {
                e.push(Entry::raw_link(Symlink, &format!("{dir}/escape"), "/tmp"));
                e.push(Entry::raw_link(
                    Link,
                    &format!("{dir}/link"),
                    &format!("{dir}/escape/{evil_name}"),
                ));
                e.push(Entry::raw_file(&format!("{dir}/link"), PWNED));
            }
        }
        e
    }

    /// The hostile layer, gzip'd.
    pub fn layer(self) -> anyhow::Result<Layer> {
        build_layer(&self.entries())
    }
}

/// busybox plus one hostile layer of `kind` (OCI, linux/amd64, Cmd `sh`).
pub fn malicious_image(kind: Malicious) -> anyhow::Result<Image> {
    Ok(Image::new(
        vec![busybox_layer()?, kind.layer()?],
        &ImageSettings {
            cmd: vec!["sh".into()],
            ..Default::default()
        },
    ))
}

/// SplitMix64: a tiny, fast, seedable PRNG (not for secrets).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let b = self.next_u64().to_le_bytes();
            rest.copy_from_slice(&b[..rest.len()]);
        }
    }
}

/// `len` pseudo-random (incompressible) bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0; len];
    SplitMix64::new(seed).fill(&mut v);
    v
}

/// The largest random file [`incompressible_image`] puts in a layer.
pub const RANDOM_FILE_MAX: u64 = 16 << 20;

/// busybox plus `layers` layers holding `total_bytes` of pseudo-random data
/// from `seed` in all (files of at most 16 MiB under `/random/<layer>/`),
/// for throughput and crash-during-pull tests. The random layers are
/// **uncompressed** tars (`application/vnd.oci.image.layer.v1.tar`): random
/// bytes don't compress anyway, and building stays fast (no gzip of 100s of
/// MB); the busybox layer stays gzip'd.
pub fn incompressible_image(total_bytes: u64, layers: usize, seed: u64) -> anyhow::Result<Image> {
    anyhow::ensure!(layers > 0, "at least one random layer");
    let mut rng = SplitMix64::new(seed);
    let mut built = vec![busybox_layer()?];
    let per_layer = total_bytes / layers as u64;
    for i in 0..layers {
        let mut size = if i + 1 == layers {
            total_bytes - per_layer * (layers as u64 - 1)
        } else {
            per_layer
        };
        let dir = format!("random/{i}");
        let mut entries = vec![Entry::dir("random"), Entry::dir(&dir)];
        let mut n = 0;
        while size > 0 {
            let len = size.min(RANDOM_FILE_MAX);
            let mut data = vec![0; len as usize];
            rng.fill(&mut data);
            entries.push(Entry::file(&format!("{dir}/{n}.bin"), data));
            size -= len;
            n += 1;
        }
        built.push(build_layer_with(&entries, Compression::None)?);
    }
    Ok(Image::new(
        built,
        &ImageSettings {
            cmd: vec!["sh".into()],
            ..Default::default()
        },
    ))
}
