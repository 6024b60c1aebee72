//! The CRI ImageService against real registries on loopback: pulls (tag,
//! digest, multi-platform index, Docker schema 2, zstd and plain tar
//! layers, basic auth over TLS, mirrors), what ListImages/ImageStatus/
//! RemoveImage/ImageFsInfo report, whiteouts in the snapshots, hostile
//! layers, error codes, concurrent pulls and a crash in the middle of one.
//!
//! Every registry here listens on 127.0.0.1. `registry.k8s.io` appears only
//! as an image name berthd maps to a loopback mirror that holds the image.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::cri::CriClient;
use berth_e2e::images::{
    Compression, Entry, Image as TestImage, ImageSettings, Malicious, Platform, build_layer_with,
    busybox_layer, busybox_layer_with, incompressible_image, malicious_image, push_index,
};
use berth_e2e::{Berthd, BerthdOptions, Registry, RegistryOptions, TestImages, require_root};
use tonic::{Code, Status};

const PULL_TIMEOUT: Duration = Duration::from_secs(180);

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

/// `[registry]` for a plain-HTTP harness registry.
fn plain_registry_toml(registry: &Registry) -> String {
    format!("[registry]\ninsecure = [\"{}\"]\n", registry.addr)
}

async fn berthd(extra_toml: String) -> (Berthd, CriClient) {
    require_root();
    let d = Berthd::start(BerthdOptions { extra_toml })
        .await
        .expect("start berthd");
    let c = d.client().await.expect("connect to berthd");
    (d, c)
}

/// A plain registry with the standard test images, and a berthd for it.
struct Setup {
    registry: Registry,
    work: tempfile::TempDir,
    images: TestImages,
    d: Berthd,
    c: CriClient,
}

async fn setup() -> Setup {
    require_root();
    let registry = Registry::start().expect("start registry");
    let work = tempfile::tempdir().unwrap();
    let images = TestImages::push_all(&registry, work.path()).expect("push test images");
    let (d, c) = berthd(plain_registry_toml(&registry)).await;
    Setup {
        registry,
        work,
        images,
        d,
        c,
    }
}

async fn try_pull(
    c: &mut CriClient,
    image: &str,
    auth: Option<AuthConfig>,
) -> Result<String, Status> {
    let req = PullImageRequest {
        image: spec(image),
        auth,
        sandbox_config: None,
    };
    match tokio::time::timeout(PULL_TIMEOUT, c.image.pull_image(req)).await {
        Ok(r) => r.map(|r| r.into_inner().image_ref),
        Err(_) => panic!("PullImage {image} took more than {PULL_TIMEOUT:?}"),
    }
}

async fn pull(c: &mut CriClient, image: &str) -> String {
    try_pull(c, image, None)
        .await
        .unwrap_or_else(|s| panic!("PullImage {image}: {:?}: {}", s.code(), s.message()))
}

/// A pull that must fail, and not because berthd lacks the RPC.
async fn pull_err(c: &mut CriClient, image: &str, auth: Option<AuthConfig>) -> Status {
    match try_pull(c, image, auth).await {
        Ok(id) => panic!("PullImage {image} succeeded ({id}), expected an error"),
        Err(s) => {
            assert_ne!(
                s.code(),
                Code::Unimplemented,
                "PullImage is not implemented: {}",
                s.message()
            );
            s
        }
    }
}

async fn status(c: &mut CriClient, image: &str, verbose: bool) -> ImageStatusResponse {
    c.image
        .image_status(ImageStatusRequest {
            image: spec(image),
            verbose,
        })
        .await
        .unwrap_or_else(|s| panic!("ImageStatus {image}: {:?}: {}", s.code(), s.message()))
        .into_inner()
}

async fn image_of(c: &mut CriClient, image: &str) -> Image {
    status(c, image, false)
        .await
        .image
        .unwrap_or_else(|| panic!("ImageStatus {image}: no image"))
}

async fn list(c: &mut CriClient) -> Vec<Image> {
    c.image
        .list_images(ListImagesRequest { filter: None })
        .await
        .unwrap_or_else(|s| panic!("ListImages: {:?}: {}", s.code(), s.message()))
        .into_inner()
        .images
}

async fn remove(c: &mut CriClient, image: &str) {
    c.image
        .remove_image(RemoveImageRequest { image: spec(image) })
        .await
        .unwrap_or_else(|s| panic!("RemoveImage {image}: {:?}: {}", s.code(), s.message()));
}

/// The verbose ImageStatus `info["info"]` JSON.
async fn verbose_info(c: &mut CriClient, image: &str) -> serde_json::Value {
    let r = status(c, image, true).await;
    assert!(r.image.is_some(), "ImageStatus {image}: no image");
    let raw = r.info.get("info").unwrap_or_else(|| {
        panic!(
            "verbose ImageStatus {image} has no info[\"info\"]: {:?}",
            r.info
        )
    });
    serde_json::from_str(raw).unwrap_or_else(|e| panic!("info[\"info\"] is not JSON ({e}): {raw}"))
}

/// The image's snapshot directories (overlay lower dirs), base first, from
/// the verbose info's `snapshotDirs`; each must be under
/// `<root_dir>/snapshots/`.
async fn snapshot_dirs(c: &mut CriClient, d: &Berthd, image: &str) -> Vec<PathBuf> {
    let info = verbose_info(c, image).await;
    let dirs: Vec<PathBuf> = info["snapshotDirs"]
        .as_array()
        .unwrap_or_else(|| panic!("no snapshotDirs array in {info}"))
        .iter()
        .map(|v| PathBuf::from(v.as_str().expect("snapshot dir is a string")))
        .collect();
    let snapshots = d.root_dir().join("snapshots");
    for dir in &dirs {
        assert!(
            dir.starts_with(&snapshots),
            "{} is not under {}",
            dir.display(),
            snapshots.display()
        );
        assert!(dir.is_dir(), "{} is missing", dir.display());
    }
    dirs
}

/// Every path under `dir` (not following symlinks).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Bytes of regular files under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    walk(dir)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.size())
        .sum()
}

fn looks_temporary(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.ends_with(".tmp")
        || n.ends_with(".partial")
        || n.ends_with(".part")
        || n.starts_with(".tmp")
        || n.starts_with("tmp-")
        || n.starts_with("tmp.")
        || n.contains("incomplete")
        || n.contains("ingest-")
}

/// Half-written state left under `root`: temp-looking names in
/// `<root>/content` or at the top of `<root>/snapshots`, and anything in
/// the temp dirs berthd may use (`<root>/tmp`, `<root>/content/tmp`,
/// `<root>/content/ingest`, `<root>/snapshots/tmp`), which must be empty if
/// they exist.
fn partial_files(root: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for tmp in [
        "tmp",
        "content/tmp",
        "content/ingest",
        "snapshots/tmp",
        "snapshots/.tmp",
    ] {
        let dir = root.join(tmp);
        if dir.is_dir() {
            for p in walk(&dir) {
                found.push(format!("left in {}: {}", dir.display(), p.display()));
            }
        }
    }
    for p in walk(&root.join("content")) {
        let name = p.file_name().unwrap().to_string_lossy();
        if looks_temporary(&name) && !p.starts_with(root.join("content/tmp")) {
            found.push(format!("partial file left: {}", p.display()));
        }
    }
    if let Ok(entries) = std::fs::read_dir(root.join("snapshots")) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name != "tmp" && name != ".tmp" && looks_temporary(&name) {
                found.push(format!("partial snapshot left: {}", e.path().display()));
            }
        }
    }
    found
}

/// [`partial_files`] once none are left, or after `grace` what still is:
/// work that outlives a failed pull (a sibling layer still being fetched or
/// unpacked) may finish or clean up shortly after, but not leave debris.
async fn settled_partial_files(root: &Path, grace: Duration) -> Vec<String> {
    let deadline = Instant::now() + grace;
    loop {
        let found = partial_files(root);
        if found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_no_partial_files(root: &Path) {
    let found = partial_files(root);
    assert!(found.is_empty(), "{}", found.join("\n"));
}

fn find<'a>(images: &'a [Image], id: &str) -> Option<&'a Image> {
    images.iter().find(|i| i.id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_tag_then_list_and_status_report_it() {
    let Setup {
        registry,
        work,
        images,
        d,
        mut c,
    } = setup().await;
    let busybox = &images.busybox;

    let id = pull(&mut c, &busybox.reference).await;
    assert_eq!(
        id, busybox.config_digest,
        "image_ref is the image id (config digest)"
    );

    let listed = list(&mut c).await;
    let img = find(&listed, &id).unwrap_or_else(|| panic!("{id} not in {listed:?}"));
    assert_eq!(img.repo_tags, vec![busybox.reference.clone()]);
    assert_eq!(img.repo_digests, vec![busybox.digest_reference()]);
    assert!(img.size > 0, "{img:?}");

    // By tag, by id and by digest reference: the same image.
    for name in [
        busybox.reference.clone(),
        id.clone(),
        busybox.digest_reference(),
    ] {
        let got = image_of(&mut c, &name).await;
        assert_eq!(got.id, id, "ImageStatus {name}");
        assert_eq!(got.repo_tags, img.repo_tags, "ImageStatus {name}");
        assert_eq!(got.repo_digests, img.repo_digests, "ImageStatus {name}");
        assert_eq!(got.size, img.size, "ImageStatus {name}");
    }

    // Unknown images: OK with no image.
    for unknown in [
        format!("{}/berth-test/nothing:latest", registry.addr),
        format!("{}/berth-test/busybox:other", registry.addr),
        format!("sha256:{}", "0".repeat(64)),
    ] {
        let r = status(&mut c, &unknown, false).await;
        assert!(r.image.is_none(), "ImageStatus {unknown}: {r:?}");
    }

    // Verbose: info["info"] is JSON; the base snapshot holds busybox.
    let dirs = snapshot_dirs(&mut c, &d, &busybox.reference).await;
    assert_eq!(dirs.len(), 1);
    assert!(dirs[0].join("bin/busybox").is_file());
    assert!(
        status(&mut c, &busybox.reference, false)
            .await
            .info
            .is_empty()
    );

    // USER by name → username; numeric USER → uid.
    let config_id = pull(&mut c, &images.config.reference).await;
    assert_eq!(config_id, images.config.config_digest);
    let config = image_of(&mut c, &images.config.reference).await;
    assert_eq!(config.username, "berth");
    assert_eq!(config.uid, None);
    assert_eq!(img.username, "");
    assert_eq!(img.uid, None);

    let numeric = TestImage::new(
        vec![busybox_layer().unwrap()],
        &ImageSettings {
            cmd: vec!["sh".into()],
            user: "1000:2000".into(),
            ..Default::default()
        },
    )
    .push(&registry, "berth-test/numeric-user", "latest", work.path())
    .unwrap();
    pull(&mut c, &numeric.reference).await;
    let got = image_of(&mut c, &numeric.reference).await;
    assert_eq!(got.uid, Some(Int64Value { value: 1000 }));
    assert_eq!(got.username, "");

    let all = list(&mut c).await;
    assert_eq!(all.len(), 3, "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_digest() {
    let Setup {
        registry: _registry,
        work: _work,
        images,
        d: _d,
        mut c,
    } = setup().await;
    let by_digest = images.busybox.digest_reference();
    let id = pull(&mut c, &by_digest).await;
    assert_eq!(id, images.busybox.config_digest);
    let img = image_of(&mut c, &by_digest).await;
    assert_eq!(img.repo_digests, vec![by_digest.clone()]);
    assert!(
        img.repo_tags.is_empty(),
        "a pull by digest names no tag: {:?}",
        img.repo_tags
    );
    // The tag isn't known until pulled by tag; then both are listed.
    assert!(
        status(&mut c, &images.busybox.reference, false)
            .await
            .image
            .is_none()
    );
    assert_eq!(pull(&mut c, &images.busybox.reference).await, id);
    let img = image_of(&mut c, &id).await;
    assert_eq!(img.repo_tags, vec![images.busybox.reference.clone()]);
    assert_eq!(img.repo_digests, vec![by_digest]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_of_an_index_takes_this_machines_platform() {
    let Setup {
        registry,
        work,
        images: _images,
        d: _d,
        mut c,
    } = setup().await;
    let platforms = [
        Platform::linux_amd64(),
        Platform::linux_arm64(),
        Platform::linux_arm_v7(),
    ];
    let built: Vec<TestImage> = platforms
        .iter()
        .map(|p| TestImage::busybox_for(p).unwrap())
        .collect();
    let entries: Vec<(Platform, &TestImage)> =
        platforms.iter().cloned().zip(built.iter()).collect();
    let index = push_index(
        &registry,
        "berth-test/multi",
        "latest",
        work.path(),
        &entries,
    )
    .unwrap();
    let host = Platform::host();
    let mine = index
        .for_platform(&host.os, &host.architecture)
        .unwrap_or_else(|| panic!("no {host} image in the test index"))
        .clone();

    let id = pull(&mut c, &index.reference).await;
    assert_eq!(id, mine.config_digest, "the {host} image's config digest");
    let img = image_of(&mut c, &index.reference).await;
    assert_eq!(img.id, id);
    assert_eq!(img.repo_tags, vec![index.reference.clone()]);
    assert_eq!(
        img.repo_digests,
        vec![index.digest_reference()],
        "the repo digest names the index that was pulled"
    );
    assert_eq!(list(&mut c).await.len(), 1, "only this platform's image");

    // By index digest: the same image.
    assert_eq!(pull(&mut c, &index.digest_reference()).await, id);
    assert_eq!(image_of(&mut c, &index.digest_reference()).await.id, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_schema2_zstd_and_plain_tar_images_pull() {
    let Setup {
        registry,
        work,
        images: _images,
        d,
        mut c,
    } = setup().await;
    let settings = ImageSettings {
        cmd: vec!["sh".into()],
        ..Default::default()
    };
    // Each image's app layer differs, so each is an image of its own.
    let app = |compression, name: &str| {
        build_layer_with(
            &[
                Entry::dir("app"),
                Entry::file("app/hello.txt", "hello\n"),
                Entry::file("app/name.txt", name),
            ],
            compression,
        )
        .unwrap()
    };
    let mut pushed = Vec::new();
    let docker = TestImage::docker(
        vec![busybox_layer().unwrap(), app(Compression::Gzip, "docker")],
        &settings,
    )
    .unwrap()
    .push(&registry, "berth-test/docker", "latest", work.path())
    .unwrap();
    pushed.push(docker);
    for (compression, repo) in [
        (Compression::Zstd, "berth-test/zstd"),
        (Compression::None, "berth-test/plain-tar"),
    ] {
        let image = TestImage::new(
            vec![
                busybox_layer_with(compression).unwrap(),
                app(compression, repo),
            ],
            &settings,
        );
        pushed.push(image.push(&registry, repo, "latest", work.path()).unwrap());
    }
    for built in &pushed {
        let id = pull(&mut c, &built.reference).await;
        assert_eq!(id, built.config_digest, "{}", built.reference);
        let img = image_of(&mut c, &built.reference).await;
        assert_eq!(img.repo_digests, vec![built.digest_reference()]);
        let dirs = snapshot_dirs(&mut c, &d, &built.reference).await;
        assert_eq!(dirs.len(), 2, "{}", built.reference);
        assert!(dirs[0].join("bin/busybox").is_file(), "{}", built.reference);
        assert_eq!(
            std::fs::read_to_string(dirs[1].join("app/hello.txt")).unwrap(),
            "hello\n",
            "{}",
            built.reference
        );
    }
    // The zstd and plain busybox layers unpack to the same files as gzip.
    assert_eq!(list(&mut c).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_over_tls() {
    require_root();
    let password = "Pa55-berth-e2e-xyzzy";
    let wrong = "Wr0ng-berth-e2e-plugh";
    let registry = Registry::start_with(RegistryOptions::tls_with_auth("berth", password)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let built = TestImage::busybox_for(&Platform::linux_amd64())
        .unwrap()
        .push(&registry, "berth-test/private", "latest", work.path())
        .unwrap();
    let ca = registry.ca_cert_path().unwrap();
    let (d, mut c) = berthd(format!("[registry]\nca_files = [\"{}\"]\n", ca.display())).await;
    let auth = |user: &str, pass: &str| AuthConfig {
        username: user.into(),
        password: pass.into(),
        ..Default::default()
    };

    // No credentials, then a wrong password: refused, and the error names
    // authentication without echoing the password.
    pull_err(&mut c, &built.reference, None).await;
    let s = pull_err(&mut c, &built.reference, Some(auth("berth", wrong))).await;
    assert!(
        s.message().to_lowercase().contains("authentication"),
        "{:?}: {}",
        s.code(),
        s.message()
    );
    assert!(!s.message().contains(wrong), "{}", s.message());
    assert!(list(&mut c).await.is_empty());

    // The right username and password.
    let id = try_pull(&mut c, &built.reference, Some(auth("berth", password)))
        .await
        .unwrap_or_else(|s| panic!("{:?}: {}", s.code(), s.message()));
    assert_eq!(id, built.config_digest);
    remove(&mut c, &built.reference).await;
    assert!(list(&mut c).await.is_empty());

    // `auth` alone: base64 of "user:password".
    let encoded = berth_e2e::http::basic_auth_header("berth", password)
        .trim_start_matches("Basic ")
        .to_string();
    let id = try_pull(
        &mut c,
        &built.reference,
        Some(AuthConfig {
            auth: encoded.clone(),
            ..Default::default()
        }),
    )
    .await
    .unwrap_or_else(|s| panic!("{:?}: {}", s.code(), s.message()));
    assert_eq!(id, built.config_digest);

    let log = d.log();
    for secret in [password, wrong, encoded.as_str()] {
        assert!(!log.contains(secret), "berthd logged a credential");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_serves_registry_k8s_io_names() {
    require_root();
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let images = TestImages::push_all(&registry, work.path()).unwrap();
    // The mirror must hold the image, so berthd never needs the upstream.
    registry
        .fetch_manifest("berth-test/busybox", "latest")
        .expect("the mirror holds berth-test/busybox:latest");
    let (_d, mut c) = berthd(format!(
        "[registry]\ninsecure = [\"{addr}\"]\n\n[registry.mirrors.\"registry.k8s.io\"]\nendpoints = [\"{url}\"]\n",
        addr = registry.addr,
        url = registry.url()
    ))
    .await;

    let name = "registry.k8s.io/berth-test/busybox:latest";
    let id = pull(&mut c, name).await;
    assert_eq!(id, images.busybox.config_digest);
    let img = image_of(&mut c, name).await;
    assert_eq!(img.repo_tags, vec![name.to_string()]);
    assert_eq!(
        img.repo_digests,
        vec![format!(
            "registry.k8s.io/berth-test/busybox@{}",
            images.busybox.manifest_digest
        )]
    );
    assert_eq!(list(&mut c).await.len(), 1);
    assert_eq!(
        registry.blob_fetches(&images.busybox.layer_digests[0]),
        1,
        "the layer came from the mirror"
    );
}

/// A read-only overlay of lower dirs, unmounted on drop.
struct Overlay {
    target: tempfile::TempDir,
}

impl Overlay {
    /// `lowers` base first, as snapshotDirs lists them.
    fn mount(lowers: &[PathBuf]) -> Overlay {
        let target = tempfile::tempdir().unwrap();
        let lowerdir: Vec<String> = lowers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let data = format!("lowerdir={}", lowerdir.join(":"));
        nix::mount::mount(
            Some("overlay"),
            target.path(),
            Some("overlay"),
            nix::mount::MsFlags::MS_RDONLY,
            Some(data.as_str()),
        )
        .unwrap_or_else(|e| panic!("mount overlay {data}: {e}"));
        Overlay { target }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(self.target.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whiteouts_and_opaque_dirs_hold_in_an_overlay_of_the_snapshots() {
    let Setup {
        registry: _registry,
        work: _work,
        images,
        d,
        mut c,
    } = setup().await;
    pull(&mut c, &images.layers.reference).await;
    let dirs = snapshot_dirs(&mut c, &d, &images.layers.reference).await;
    assert_eq!(dirs.len(), 4, "{dirs:?}");
    assert!(dirs[0].join("bin/busybox").is_file(), "base first");

    let overlay = Overlay::mount(&dirs);
    let root = overlay.target.path();
    assert!(root.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_to_string(root.join("data/keep.txt")).unwrap(),
        "keep\n"
    );
    assert!(
        std::fs::symlink_metadata(root.join("data/remove-me.txt")).is_err(),
        "the whiteout hides data/remove-me.txt"
    );
    let mut opaque: Vec<String> = std::fs::read_dir(root.join("opaque"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    opaque.sort();
    assert_eq!(
        opaque,
        vec!["new.txt".to_string()],
        "the opaque dir shows only its layer"
    );
    for dir in ["data", "opaque", ""] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".wh."),
                "whiteout file {dir}/{name} shows"
            );
        }
    }
    drop(overlay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_layers_are_refused_and_leave_nothing() {
    let Setup {
        registry,
        work,
        images: _images,
        d,
        mut c,
    } = setup().await;
    // Every kind is tried (and the host checked and cleaned) before the
    // test fails, so one run shows every problem.
    let mut problems = Vec::new();
    for kind in Malicious::ALL {
        kind.prepare_host().unwrap();
        let image = malicious_image(kind).unwrap();
        let built = image
            .push(
                &registry,
                &format!("berth-test/evil-{}", kind.name()),
                "latest",
                work.path(),
            )
            .unwrap();
        match try_pull(&mut c, &built.reference, None).await {
            Ok(id) => problems.push(format!("{kind:?}: the pull succeeded ({id})")),
            Err(s) if s.code() == Code::Unimplemented => {
                problems.push(format!("{kind:?}: PullImage is not implemented"))
            }
            Err(s) => eprintln!("{kind:?}: refused: {:?}: {}", s.code(), s.message()),
        }
        if let Err(e) = kind.check_host_untouched() {
            problems.push(format!("{kind:?}: {e:#}"));
        }
        if find(&list(&mut c).await, &built.config_digest).is_some() {
            problems.push(format!("{kind:?}: listed after a failed pull"));
        }
        if status(&mut c, &built.reference, false)
            .await
            .image
            .is_some()
        {
            problems.push(format!("{kind:?}: ImageStatus finds it"));
        }
        // No snapshot (whole or partial) of the hostile layer.
        let layer_dir = kind.layer_dir();
        for p in walk(&d.root_dir().join("snapshots")) {
            if p.file_name().unwrap().to_string_lossy() == layer_dir {
                problems.push(format!(
                    "{kind:?}: the hostile layer's files are left at {}",
                    p.display()
                ));
            }
        }
        for p in settled_partial_files(&d.root_dir(), Duration::from_secs(10)).await {
            problems.push(format!("{kind:?}: {p}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_errors_carry_their_codes() {
    let Setup {
        mut registry,
        work: _work,
        images,
        d: _d,
        mut c,
    } = setup().await;
    let addr = registry.addr.clone();

    for unknown in [
        format!("{addr}/berth-test/busybox:no-such-tag"),
        format!("{addr}/berth-test/no-such-repo:latest"),
        format!("{addr}/berth-test/busybox@sha256:{}", "1".repeat(64)),
    ] {
        let s = pull_err(&mut c, &unknown, None).await;
        assert_eq!(s.code(), Code::NotFound, "{unknown}: {}", s.message());
    }

    // Malformed references, all on a loopback host so that no parser,
    // however lenient, looks anywhere else.
    for bad in [
        format!("{addr}/UPPER/Case::bad"),
        format!("{addr}/berth-test/busybox@sha256:not-a-digest"),
        format!("{addr}/berth-test/busybox:bad tag"),
        String::new(),
    ] {
        let s = pull_err(&mut c, &bad, None).await;
        assert_eq!(s.code(), Code::InvalidArgument, "{bad:?}: {}", s.message());
    }

    registry.kill();
    let s = pull_err(&mut c, &images.busybox.reference, None).await;
    assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
    assert!(s.message().contains(&addr), "names {addr}: {}", s.message());
    assert!(list(&mut c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_of_one_image_fetch_each_blob_once() {
    let Setup {
        registry,
        work: _work,
        images,
        d: _d,
        c,
    } = setup().await;
    let reference = images.layers.reference.clone();
    let (mut a, mut b) = (c.clone(), c.clone());
    let (ra, rb) = tokio::join!(pull(&mut a, &reference), pull(&mut b, &reference));
    assert_eq!(ra, images.layers.config_digest);
    assert_eq!(rb, images.layers.config_digest);
    for layer in &images.layers.layer_digests {
        assert_eq!(registry.blob_fetches(layer), 1, "layer {layer}");
    }
    let mut c = c;
    assert_eq!(list(&mut c).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_image_by_tag_removes_every_tag() {
    let Setup {
        registry,
        work,
        images,
        d: _d,
        mut c,
    } = setup().await;
    // The busybox image under a second tag: the same manifest.
    let second = TestImage::new(
        vec![busybox_layer().unwrap()],
        &ImageSettings {
            cmd: vec!["sh".into()],
            ..Default::default()
        },
    )
    .push(&registry, "berth-test/busybox", "second", work.path())
    .unwrap();
    assert_eq!(second.manifest_digest, images.busybox.manifest_digest);

    let id = pull(&mut c, &images.busybox.reference).await;
    assert_eq!(pull(&mut c, &second.reference).await, id);
    let listed = list(&mut c).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    let mut tags = listed[0].repo_tags.clone();
    tags.sort();
    let mut want = vec![images.busybox.reference.clone(), second.reference.clone()];
    want.sort();
    assert_eq!(tags, want);

    remove(&mut c, &images.busybox.reference).await;
    for name in [&images.busybox.reference, &second.reference, &id] {
        assert!(
            status(&mut c, name, false).await.image.is_none(),
            "{name} still there"
        );
    }
    assert!(list(&mut c).await.is_empty());

    // Idempotent: removing what isn't there is OK.
    remove(&mut c, &images.busybox.reference).await;
    remove(
        &mut c,
        &format!("{}/berth-test/never:pulled", registry.addr),
    )
    .await;

    // By id too.
    let id = pull(&mut c, &images.config.reference).await;
    remove(&mut c, &id).await;
    assert!(
        status(&mut c, &images.config.reference, false)
            .await
            .image
            .is_none()
    );
    assert!(list(&mut c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_fs_info_reports_the_root_dir() {
    let Setup {
        registry: _registry,
        work: _work,
        images,
        d,
        mut c,
    } = setup().await;
    pull(&mut c, &images.busybox.reference).await;
    let info = c
        .image
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap_or_else(|s| panic!("ImageFsInfo: {:?}: {}", s.code(), s.message()))
        .into_inner();
    assert!(!info.image_filesystems.is_empty(), "{info:?}");
    let fs = &info.image_filesystems[0];
    let mountpoint = &fs.fs_id.as_ref().expect("fs_id").mountpoint;
    assert!(
        Path::new(mountpoint).starts_with(d.root_dir()),
        "{mountpoint} is not under {}",
        d.root_dir().display()
    );
    assert!(
        fs.used_bytes.as_ref().expect("used_bytes").value > 0,
        "{fs:?}"
    );
    assert!(fs.timestamp > 0, "{fs:?}");
    assert!(!info.container_filesystems.is_empty(), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_during_a_pull_leaves_all_or_nothing() {
    require_root();
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let big = incompressible_image(100 << 20, 4, 0xbe27)
        .unwrap()
        .push(&registry, "berth-test/big", "latest", work.path())
        .unwrap();
    let (mut d, c) = berthd(plain_registry_toml(&registry)).await;
    let root = d.root_dir();

    let reference = big.reference.clone();
    let mut pulling = c.clone();
    let task = tokio::spawn(async move { try_pull(&mut pulling, &reference, None).await });
    // Kill once some of it is on disk (or when it is done already).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !task.is_finished()
        && Instant::now() < deadline
        && disk_bytes(&root.join("content"))
            + disk_bytes(&root.join("snapshots"))
            + disk_bytes(&root.join("tmp"))
            < 10 << 20
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let finished_before_kill = task.is_finished();
    d.kill9();
    let _ = task.await;
    drop(c);
    eprintln!("killed berthd (pull finished before: {finished_before_kill})");

    d.restart().await.unwrap();
    let mut c = d.client().await.unwrap();
    let listed = list(&mut c).await;
    match find(&listed, &big.config_digest) {
        Some(img) => {
            assert_eq!(img.repo_tags, vec![big.reference.clone()]);
            let dirs = snapshot_dirs(&mut c, &d, &big.reference).await;
            assert_eq!(dirs.len(), 5);
            for (i, dir) in dirs.iter().enumerate().skip(1) {
                assert!(dir.join(format!("random/{}", i - 1)).is_dir());
            }
        }
        None => {
            assert!(listed.is_empty(), "{listed:?}");
            assert!(status(&mut c, &big.reference, false).await.image.is_none());
        }
    }
    assert_no_partial_files(&root);

    let id = pull(&mut c, &big.reference).await;
    assert_eq!(id, big.config_digest);
    let img = image_of(&mut c, &big.reference).await;
    assert!(img.size >= 100 << 20, "{img:?}");
    let dirs = snapshot_dirs(&mut c, &d, &big.reference).await;
    let random: u64 = dirs.iter().skip(1).map(|d| disk_bytes(d)).sum();
    assert_eq!(random, 100 << 20, "every random byte unpacked");
    assert_no_partial_files(&root);
}
