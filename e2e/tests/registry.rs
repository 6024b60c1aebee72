//! The harness's own registry and test images: what every later image and
//! container test stands on.

use berth_e2e::http::{self, Target};
use berth_e2e::images::*;
use berth_e2e::{Registry, RegistryOptions};

#[test]
fn pushed_images_pull_back_with_matching_digests() {
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let images = TestImages::push_all(&registry, work.path()).unwrap();

    for image in [&images.busybox, &images.config, &images.layers] {
        let by_tag = registry.fetch_manifest(&image.repo, &image.tag).unwrap();
        assert_eq!(
            sha256_digest(&by_tag),
            image.manifest_digest,
            "{}",
            image.reference
        );
        let by_digest = registry
            .fetch_manifest(&image.repo, &image.manifest_digest)
            .unwrap();
        assert_eq!(by_digest, by_tag);

        let manifest: serde_json::Value = serde_json::from_slice(&by_tag).unwrap();
        assert_eq!(manifest["config"]["digest"], image.config_digest);
        let config = registry
            .fetch_blob(&image.repo, &image.config_digest)
            .unwrap();
        assert_eq!(sha256_digest(&config), image.config_digest);
        for layer in &image.layer_digests {
            let blob = registry.fetch_blob(&image.repo, layer).unwrap();
            assert_eq!(&sha256_digest(&blob), layer);
        }
    }

    assert_eq!(images.layers.layer_digests.len(), 4);
    // The busybox layer is shared, byte for byte, by all three images.
    assert_eq!(
        images.busybox.layer_digests[0],
        images.layers.layer_digests[0]
    );
    assert_eq!(
        images.busybox.layer_digests[0],
        images.config.layer_digests[0]
    );
    let config: serde_json::Value = serde_json::from_slice(
        &registry
            .fetch_blob(&images.config.repo, &images.config.config_digest)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(config["config"]["User"], "berth");
    assert_eq!(config["config"]["WorkingDir"], "/work");
    assert_eq!(config["config"]["Entrypoint"][0], "/bin/sh");
}

#[test]
fn registry_is_gone_after_drop() {
    let registry = Registry::start().unwrap();
    let addr = registry.addr.clone();
    let storage = registry.storage_dir();
    drop(registry);
    assert!(
        std::net::TcpStream::connect(&addr).is_err(),
        "registry still listening on {addr}"
    );
    assert!(!storage.exists());
}

#[test]
fn tls_basic_auth_registry_takes_the_right_credentials_only() {
    let registry =
        Registry::start_with(RegistryOptions::tls_with_auth("berth", "s3cret-pw")).unwrap();
    assert_eq!(registry.url_scheme(), "https");
    assert_eq!(registry.url(), format!("https://{}", registry.addr));
    let ca = registry.ca_cert_path().unwrap();
    assert!(
        std::fs::read_to_string(&ca)
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    let work = tempfile::tempdir().unwrap();
    let image = Image::busybox_for(&Platform::linux_amd64()).unwrap();

    // Wrong password, and no credentials at all: refused.
    let wrong = image
        .push_with_creds(
            &registry,
            "berth-test/busybox",
            "latest",
            work.path(),
            Some(("berth", "wrong")),
        )
        .unwrap_err();
    assert!(wrong.to_string().contains("skopeo copy"), "{wrong:#}");
    image
        .push_with_creds(&registry, "berth-test/busybox", "latest", work.path(), None)
        .unwrap_err();

    // The registry's own credentials: accepted, and readable back over TLS.
    let built = image
        .push(&registry, "berth-test/busybox", "latest", work.path())
        .unwrap();
    let manifest = registry
        .fetch_manifest("berth-test/busybox", "latest")
        .unwrap();
    assert_eq!(sha256_digest(&manifest), built.manifest_digest);

    // Anonymous and wrong-password reads get 401; plain HTTP gets no answer
    // a registry client would accept.
    let anon = Target {
        basic_auth: None,
        ..registry.http_target()
    };
    assert_eq!(
        http::request(&anon, "GET", "/v2/", &[], &[])
            .unwrap()
            .status,
        401
    );
    let bad = Target {
        basic_auth: Some(("berth".into(), "wrong".into())),
        ..registry.http_target()
    };
    assert_eq!(
        http::request(&bad, "GET", "/v2/", &[], &[]).unwrap().status,
        401
    );
    assert_eq!(
        http::request(&registry.http_target(), "GET", "/v2/", &[], &[])
            .unwrap()
            .status,
        200
    );
    assert!(http::get(&registry.addr, "/v2/", &[]).is_ok_and(|r| r.status != 200));
}

#[test]
fn tls_registry_without_auth_serves_anonymously() {
    let registry = Registry::start_with(RegistryOptions {
        tls: true,
        basic_auth: None,
    })
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let built = Image::busybox_for(&Platform::linux_amd64())
        .unwrap()
        .push(&registry, "berth-test/busybox", "latest", work.path())
        .unwrap();
    let blob = registry
        .fetch_blob("berth-test/busybox", &built.layer_digests[0])
        .unwrap();
    assert_eq!(sha256_digest(&blob), built.layer_digests[0]);
}

#[test]
fn index_push_reads_back_with_every_platform() {
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let platforms = [
        Platform::linux_amd64(),
        Platform::linux_arm64(),
        Platform::linux_arm_v7(),
    ];
    let images: Vec<Image> = platforms
        .iter()
        .map(|p| Image::busybox_for(p).unwrap())
        .collect();
    let entries: Vec<(Platform, &Image)> = platforms.iter().cloned().zip(images.iter()).collect();
    let index = push_index(
        &registry,
        "berth-test/multi",
        "latest",
        work.path(),
        &entries,
    )
    .unwrap();
    assert_eq!(
        index.reference,
        registry.reference("berth-test/multi", "latest")
    );

    let (bytes, content_type) = registry
        .fetch_manifest_typed("berth-test/multi", "latest")
        .unwrap();
    assert_eq!(sha256_digest(&bytes), index.index_digest);
    assert_eq!(content_type, MEDIA_INDEX);
    let parsed: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let listed = parsed["manifests"].as_array().unwrap();
    assert_eq!(listed.len(), 3);
    for ((platform, built), desc) in index.manifests.iter().zip(listed) {
        assert_eq!(desc["digest"], built.manifest_digest.as_str());
        assert_eq!(desc["platform"], platform.to_json());
        let m = registry
            .fetch_manifest("berth-test/multi", &built.manifest_digest)
            .unwrap();
        assert_eq!(sha256_digest(&m), built.manifest_digest);
        let config: serde_json::Value = serde_json::from_slice(
            &registry
                .fetch_blob("berth-test/multi", &built.config_digest)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(config["architecture"], platform.architecture.as_str());
        assert_eq!(
            built.reference,
            format!(
                "{}/berth-test/multi@{}",
                registry.addr, built.manifest_digest
            )
        );
    }
    assert_eq!(listed[2]["platform"]["variant"], "v7");
    // All three differ (the configs name different architectures).
    let amd64 = index.for_platform("linux", "amd64").unwrap();
    let arm64 = index.for_platform("linux", "arm64").unwrap();
    assert_ne!(amd64.manifest_digest, arm64.manifest_digest);
    assert_eq!(amd64.layer_digests, arm64.layer_digests);
    assert_eq!(
        index.digest_reference(),
        format!("{}/berth-test/multi@{}", registry.addr, index.index_digest)
    );
}

#[test]
fn docker_schema2_and_compressions_push_with_digests_kept() {
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let settings = ImageSettings {
        cmd: vec!["sh".into()],
        ..Default::default()
    };

    let docker = Image::docker(vec![busybox_layer().unwrap()], &settings).unwrap();
    let built = docker
        .push(&registry, "berth-test/docker", "latest", work.path())
        .unwrap();
    let (bytes, content_type) = registry
        .fetch_manifest_typed("berth-test/docker", "latest")
        .unwrap();
    assert_eq!(content_type, MEDIA_DOCKER_MANIFEST);
    assert_eq!(sha256_digest(&bytes), built.manifest_digest);
    let m: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(m["config"]["mediaType"], MEDIA_DOCKER_CONFIG);
    assert_eq!(m["layers"][0]["mediaType"], MEDIA_DOCKER_LAYER_GZIP);
    assert!(
        Image::docker(
            vec![build_layer_with(&[Entry::file("a", "a")], Compression::Zstd).unwrap()],
            &settings
        )
        .is_err()
    );

    for (compression, media_type) in [
        (Compression::Zstd, MEDIA_LAYER_ZSTD),
        (Compression::None, MEDIA_LAYER_TAR),
        (Compression::Gzip, MEDIA_LAYER_GZIP),
    ] {
        let app = build_layer_with(
            &[Entry::dir("app"), Entry::file("app/hello.txt", "hello\n")],
            compression,
        )
        .unwrap();
        let image = Image::new(
            vec![busybox_layer_with(compression).unwrap(), app],
            &settings,
        );
        let repo = format!("berth-test/{compression:?}").to_lowercase();
        let built = image.push(&registry, &repo, "latest", work.path()).unwrap();
        let m: serde_json::Value =
            serde_json::from_slice(&registry.fetch_manifest(&repo, "latest").unwrap()).unwrap();
        for (i, layer) in image.layers.iter().enumerate() {
            assert_eq!(m["layers"][i]["mediaType"], media_type);
            let blob = registry.fetch_blob(&repo, &built.layer_digests[i]).unwrap();
            assert_eq!(blob, layer.blob);
            let tar = compression.decompress(&blob).unwrap();
            assert_eq!(sha256_digest(&tar), layer.diff_id);
        }
        if compression == Compression::None {
            assert_eq!(image.layers[1].digest, image.layers[1].diff_id);
        }
    }
}

#[test]
fn blob_fetches_count_gets_not_heads() {
    let mut registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let images = TestImages::push_all(&registry, work.path()).unwrap();
    let layer = &images.layers.layer_digests[1];
    // skopeo checks for existing blobs with HEAD only.
    assert_eq!(registry.blob_fetches(layer), 0);

    let path = format!("/v2/berth-test/layers/blobs/{layer}");
    let head = http::request(&registry.http_target(), "HEAD", &path, &[], &[]).unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(registry.blob_fetches(layer), 0);
    registry.fetch_blob("berth-test/layers", layer).unwrap();
    assert_eq!(registry.blob_fetches(layer), 1);
    // Any repo counts, a missing blob doesn't.
    registry
        .fetch_blob("berth-test/busybox", &images.busybox.layer_digests[0])
        .unwrap();
    registry.fetch_blob("berth-test/config", layer).unwrap_err();
    assert_eq!(registry.blob_fetches(layer), 1);
    assert_eq!(registry.blob_fetches(&images.busybox.layer_digests[0]), 1);
    assert!(
        registry
            .access_log()
            .iter()
            .any(|e| e.method == "HEAD" && e.path == path)
    );

    // Registry down: nothing listens on its address; it comes back with
    // its content and its log.
    let addr = registry.addr.clone();
    registry.kill();
    assert!(!registry.is_running());
    assert!(std::net::TcpStream::connect(&addr).is_err());
    registry.restart().unwrap();
    assert_eq!(registry.addr, addr);
    registry.fetch_blob("berth-test/layers", layer).unwrap();
    assert_eq!(registry.blob_fetches(layer), 2);
}

#[test]
fn hostile_layers_hold_the_raw_names() {
    for kind in Malicious::ALL {
        let layer = kind.layer().unwrap();
        let tar = Compression::Gzip.decompress(&layer.blob).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let names: Vec<(String, String)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
                let link = e
                    .link_name_bytes()
                    .map(|l| String::from_utf8_lossy(&l).into_owned())
                    .unwrap_or_default();
                (name, link)
            })
            .collect();
        let evil_name = format!("berth-evil-{}", kind.name());
        let hit = names
            .iter()
            .any(|(n, l)| n.ends_with(&evil_name) || l.ends_with(&evil_name));
        assert!(hit, "{kind:?}: {names:?}");
        assert_eq!(names[1].0, format!("evil-{}/ok.txt", kind.name()));
        match kind {
            Malicious::DotDot => assert!(names[2].0.starts_with("../../")),
            Malicious::Absolute => assert_eq!(names[2].0, "/tmp/berth-evil-absolute"),
            Malicious::SymlinkParent | Malicious::SymlinkThenHardlink => {
                assert_eq!(names[2].1, "/tmp")
            }
            Malicious::HardlinkOutside => assert!(names[2].1.starts_with("../../")),
        }
        let image = malicious_image(kind).unwrap();
        assert_eq!(image.layers.len(), 2);
        assert_eq!(
            image.layers[1].digest, layer.digest,
            "builds are reproducible"
        );
    }
    // The host checks: untouched passes, a planted file fails (and is
    // cleaned up).
    let kind = Malicious::DotDot;
    kind.prepare_host().unwrap();
    kind.check_host_untouched().unwrap();
    std::fs::write(kind.evil_path(), "x").unwrap();
    kind.check_host_untouched().unwrap_err();
    assert!(!std::path::Path::new(&kind.evil_path()).exists());
    let kind = Malicious::HardlinkOutside;
    kind.prepare_host().unwrap();
    kind.check_host_untouched().unwrap();
    assert!(!std::path::Path::new(&kind.evil_path()).exists());
}

#[test]
fn incompressible_images_are_random_and_reproducible() {
    let a = incompressible_image(3 << 20, 2, 7).unwrap();
    let b = incompressible_image(3 << 20, 2, 7).unwrap();
    let c = incompressible_image(3 << 20, 2, 8).unwrap();
    assert_eq!(a.layers.len(), 3, "busybox + 2 random layers");
    assert_eq!(a.manifest_digest(), b.manifest_digest());
    assert_ne!(a.manifest_digest(), c.manifest_digest());
    let random: usize = a.layers[1..].iter().map(|l| l.blob.len()).sum();
    assert!(random >= 3 << 20, "{random}");
    let gz = Compression::Gzip.compress(&a.layers[1].blob).unwrap();
    assert!(
        gz.len() as f64 > a.layers[1].blob.len() as f64 * 0.99,
        "not compressible"
    );
    let m: serde_json::Value = serde_json::from_slice(&a.manifest).unwrap();
    assert_eq!(m["layers"][1]["mediaType"], MEDIA_LAYER_TAR);
}
