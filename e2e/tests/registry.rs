//! The harness's own registry and test images: what every later image and
//! container test stands on.

use berth_e2e::images::sha256_digest;
use berth_e2e::{Registry, TestImages};

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
