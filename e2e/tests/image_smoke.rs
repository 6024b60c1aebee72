//! The basic image round trip through berthd: pull, list, status, inspect
//! the snapshots, remove, with nothing left behind.

use berth_cri::v1::*;
use berth_e2e::{Berthd, BerthdOptions, Registry, TestImages, require_root};

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_list_status_remove_round_trip() {
    require_root();
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let images = TestImages::push_all(&registry, work.path()).unwrap();
    let d = Berthd::start(BerthdOptions::default()).await.unwrap();
    let mut c = d.client().await.unwrap();

    let pulled = c
        .image
        .pull_image(PullImageRequest {
            image: spec(&images.config.reference),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pulled.image_ref, images.config.config_digest);

    let list = c
        .image
        .list_images(ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.images.len(), 1);
    let image = &list.images[0];
    assert_eq!(image.repo_tags, vec![images.config.reference.clone()]);
    let repo = images.config.reference.rsplit_once(':').unwrap().0;
    assert_eq!(
        image.repo_digests,
        vec![format!("{repo}@{}", images.config.manifest_digest)]
    );
    assert_eq!(image.username, "berth");
    assert!(image.size > 1_000_000);

    for by in [
        images.config.reference.clone(),
        images.config.config_digest.clone(),
        format!("{repo}@{}", images.config.manifest_digest),
    ] {
        let st = c
            .image
            .image_status(ImageStatusRequest {
                image: spec(&by),
                verbose: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.image.unwrap().id, images.config.config_digest, "by {by}");
        let info: serde_json::Value = serde_json::from_str(&st.info["info"]).unwrap();
        let dirs = info["snapshotDirs"].as_array().unwrap();
        assert_eq!(dirs.len(), 2);
        let top = std::path::Path::new(dirs[1].as_str().unwrap());
        assert_eq!(
            std::fs::read_to_string(top.join("work/greeting.txt")).unwrap(),
            "hello from the image\n"
        );
        let base = std::path::Path::new(dirs[0].as_str().unwrap());
        assert!(base.join("bin/busybox").is_file());
        assert_eq!(
            std::fs::read_link(base.join("bin/sh")).unwrap().to_str(),
            Some("busybox")
        );
    }
    let missing = c
        .image
        .image_status(ImageStatusRequest {
            image: spec("127.0.0.1:1/nothing:here"),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(missing.image.is_none());

    let fs = c
        .image
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(fs.image_filesystems[0].used_bytes.as_ref().unwrap().value > 1_000_000);

    c.image
        .remove_image(RemoveImageRequest {
            image: spec(&images.config.reference),
        })
        .await
        .unwrap();
    c.image
        .remove_image(RemoveImageRequest {
            image: spec(&images.config.reference),
        })
        .await
        .unwrap();
    assert!(
        c.image
            .list_images(ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .images
            .is_empty()
    );
    let root = d.root_dir();
    assert_eq!(
        std::fs::read_dir(root.join("snapshots")).unwrap().count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(root.join("content/sha256"))
            .unwrap()
            .count(),
        0
    );
}
