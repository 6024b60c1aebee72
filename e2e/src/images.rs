//! OCI test images built from Debian's busybox-static, without internet:
//! gzip'd tar layers, an image config and a manifest in an OCI image layout,
//! then pushed to the harness registry with skopeo.

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
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

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

/// A layer as it goes into the image: the gzip blob and the tar's diff id.
pub struct Layer {
    pub blob: Vec<u8>,
    pub digest: String,
    pub diff_id: String,
}

pub fn build_layer(entries: &[Entry]) -> anyhow::Result<Layer> {
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
        }
    }
    let tar_bytes = builder.into_inner()?;
    let diff_id = sha256_digest(&tar_bytes);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar_bytes)?;
    let blob = gz.finish()?;
    Ok(Layer {
        digest: sha256_digest(&blob),
        diff_id,
        blob,
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

/// An image held in memory, ready to be written as an OCI layout.
pub struct Image {
    pub layers: Vec<Layer>,
    pub config: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl Image {
    pub fn new(layers: Vec<Layer>, settings: &ImageSettings) -> Image {
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
        let config = serde_json::to_vec(&json!({
            "created": "2023-11-14T22:13:20Z",
            "architecture": "amd64",
            "os": "linux",
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
        }))
        .expect("config serializes");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": sha256_digest(&config), "size": config.len()},
            "layers": layers.iter().map(|l| json!({"mediaType": MEDIA_LAYER_GZIP, "digest": l.digest, "size": l.blob.len()})).collect::<Vec<_>>(),
        }))
        .expect("manifest serializes");
        Image {
            layers,
            config,
            manifest,
        }
    }

    pub fn manifest_digest(&self) -> String {
        sha256_digest(&self.manifest)
    }

    pub fn config_digest(&self) -> String {
        sha256_digest(&self.config)
    }

    /// Writes an OCI image layout at `dir` holding this image as `tag`.
    pub fn write_layout(&self, dir: &Path, tag: &str) -> anyhow::Result<()> {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs)?;
        let put = |bytes: &[u8]| -> anyhow::Result<()> {
            let digest = sha256_digest(bytes);
            std::fs::write(blobs.join(digest.trim_start_matches("sha256:")), bytes)?;
            Ok(())
        };
        for l in &self.layers {
            put(&l.blob)?;
        }
        put(&self.config)?;
        put(&self.manifest)?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        std::fs::write(
            dir.join("index.json"),
            serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "manifests": [{
                    "mediaType": MEDIA_MANIFEST,
                    "digest": self.manifest_digest(),
                    "size": self.manifest.len(),
                    "annotations": {"org.opencontainers.image.ref.name": tag},
                }],
            }))?,
        )?;
        Ok(())
    }

    /// Pushes this image to `registry` as `repo:tag` with skopeo, a client
    /// independent of Berth. The manifest bytes are kept as built.
    pub fn push(
        &self,
        registry: &Registry,
        repo: &str,
        tag: &str,
        work: &Path,
    ) -> anyhow::Result<BuiltImage> {
        let layout = work.join(format!("layout-{}", repo.replace('/', "_")));
        self.write_layout(&layout, tag)?;
        let reference = registry.reference(repo, tag);
        let out = Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "--quiet",
                "--dest-tls-verify=false",
                "--preserve-digests",
            ])
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .map_err(|e| anyhow::anyhow!("run skopeo (install Debian's skopeo): {e}"))?;
        anyhow::ensure!(
            out.status.success(),
            "skopeo copy to {reference} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&layout)?;
        Ok(BuiltImage {
            reference,
            repo: repo.to_string(),
            tag: tag.to_string(),
            manifest_digest: self.manifest_digest(),
            config_digest: self.config_digest(),
            layer_digests: self.layers.iter().map(|l| l.digest.clone()).collect(),
        })
    }
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

/// The base layer: busybox with every applet linked in /bin, and the files
/// a container expects (/etc/passwd, /etc/group, /tmp, ...).
pub fn busybox_layer() -> anyhow::Result<Layer> {
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
    build_layer(&entries)
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
            vec![clone_layer(&base)],
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
            vec![clone_layer(&base), app],
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

fn clone_layer(l: &Layer) -> Layer {
    Layer {
        blob: l.blob.clone(),
        digest: l.digest.clone(),
        diff_id: l.diff_id.clone(),
    }
}
