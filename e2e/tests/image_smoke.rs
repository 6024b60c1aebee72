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
    // Its files go after the answer.
    let root = d.root_dir();
    let left = || {
        std::fs::read_dir(root.join("snapshots")).unwrap().count()
            + std::fs::read_dir(root.join("content/sha256"))
                .unwrap()
                .count()
    };
    assert!(
        berth_e2e::pods::eventually(std::time::Duration::from_secs(10), || left() == 0).await,
        "{} snapshots and blobs left after RemoveImage",
        left()
    );
}

/// RemoveImage deletes the image's files after its answer. berthd killed
/// with SIGKILL right after the answer, at a different moment in every
/// round, leaves files without a record, which its next start deletes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_remove_image_leaves_no_files_after_the_restart() {
    require_root();
    let registry = Registry::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let images = TestImages::push_all(&registry, work.path()).unwrap();
    let mut d = Berthd::start(BerthdOptions::default()).await.unwrap();
    let root = d.root_dir();
    let files = || {
        std::fs::read_dir(root.join("snapshots"))
            .map(|d| d.count())
            .unwrap_or(0)
            + std::fs::read_dir(root.join("content/sha256"))
                .map(|d| d.count())
                .unwrap_or(0)
    };
    for round in 0..4u64 {
        let mut c = d.client().await.unwrap();
        c.image
            .pull_image(PullImageRequest {
                image: spec(&images.config.reference),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(files() > 0, "round {round}: the pull left no files");
        c.image
            .remove_image(RemoveImageRequest {
                image: spec(&images.config.reference),
            })
            .await
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(round * 700));
        d.kill9();
        d.restart().await.unwrap();
        let mut c = d.client().await.unwrap();
        let listed = c
            .image
            .list_images(ListImagesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .images;
        assert!(listed.is_empty(), "round {round}: {listed:?}");
        assert!(
            berth_e2e::pods::eventually(std::time::Duration::from_secs(10), || files() == 0).await,
            "round {round}: {} snapshots and blobs left after the restart",
            files()
        );
    }
    d.stop();
}
