//! Image volumes (CRI `Mount.image`, KEP-4639): the files of a pulled image
//! mounted read-only into a container, as kubelet asks for them, seen from
//! inside the container through ExecSync.

use std::io::Write;
use std::time::Duration;

use berth_cri::v1::*;
use berth_e2e::images::{Entry, Image, ImageSettings, build_layer};
use berth_e2e::pods::{PodEnv, mounts_under, sh_config};
use berth_e2e::streaming::Crictl;

/// A two-layer data image (`/data/hello.txt`, `/data/second.txt`, a
/// subdirectory `/sub` with one file, and `/escape -> /` to try to leave
/// the image with) and a one-layer one (`/one.txt`), pushed and pulled;
/// their references and ids.
async fn data_images(env: &mut PodEnv) -> [(String, String); 2] {
    let layouts = env.work.path().join("data-layouts");
    std::fs::create_dir_all(&layouts).unwrap();
    let l1 = build_layer(&[
        Entry::dir("data"),
        Entry::file("data/hello.txt", "hello from the volume\n"),
        Entry::dir("sub"),
        Entry::file("sub/inner.txt", "inner\n"),
        Entry::symlink("escape", "/"),
    ])
    .unwrap();
    let l2 = build_layer(&[
        Entry::dir("data"),
        Entry::file("data/second.txt", "from the second layer\n"),
    ])
    .unwrap();
    let two = Image::new(vec![l1, l2], &ImageSettings::default())
        .push(&env.registry, "berth-test/volume-data", "v1", &layouts)
        .unwrap();
    let one = Image::new(
        vec![build_layer(&[Entry::file("one.txt", "a single layer\n")]).unwrap()],
        &ImageSettings::default(),
    )
    .push(&env.registry, "berth-test/volume-one", "v1", &layouts)
    .unwrap();
    let mut out = Vec::new();
    for reference in [two.reference, one.reference] {
        let id = env.pull(&reference).await;
        out.push((reference, id));
    }
    out.try_into().unwrap()
}

/// An image volume as kubelet sends it: not read-only (kubelet leaves that
/// to the runtime), the image by reference and by id.
fn image_mount(container_path: &str, image: &str, image_ref: &str, sub_path: &str) -> Mount {
    Mount {
        container_path: container_path.into(),
        image: Some(ImageSpec {
            image: image.into(),
            image_ref: image_ref.into(),
            ..Default::default()
        }),
        image_sub_path: sub_path.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_reads_an_image_volume_it_cannot_write() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    let [(two, two_id), (one, one_id)] = data_images(&mut env).await;
    let pod = env.run_pod(&env.pod_config("imgvol")).await;
    let mut config = sh_config("reader", &env.busybox(), "sleep 1000");
    config.mounts = vec![
        image_mount("/vol", &two, "", ""),
        image_mount("/one", &one, &one_id, ""),
        image_mount("/sub", &two, &two_id, "sub"),
    ];
    let id = env.run(&pod, &config).await;
    // ContainerStatus names the image behind each volume by its id, also
    // where kubelet gave only a name.
    let refs: Vec<String> = env
        .status(&id)
        .await
        .mounts
        .iter()
        .map(|m| m.image.as_ref().unwrap().image_ref.clone())
        .collect();
    assert_eq!(refs, [two_id.clone(), one_id.clone(), two_id.clone()]);

    // Both layers of the overlay, and the single layer, are there.
    assert_eq!(
        env.sh(&id, "cat /vol/data/hello.txt /vol/data/second.txt")
            .await,
        "hello from the volume\nfrom the second layer\n"
    );
    assert_eq!(env.sh(&id, "cat /one/one.txt").await, "a single layer\n");
    // The sub path alone.
    assert_eq!(env.sh(&id, "ls -A /sub").await, "inner.txt\n");
    assert_eq!(env.sh(&id, "cat /sub/inner.txt").await, "inner\n");

    // Read-only, although the request did not say so.
    for path in [
        "/vol/new.txt",
        "/vol/data/hello.txt",
        "/one/new.txt",
        "/sub/new.txt",
    ] {
        let (out, err, code) = env
            .exec(&id, &["sh", "-c", &format!("echo x > {path}")])
            .await;
        assert_ne!(code, 0, "writing {path} succeeded: {out:?}");
        assert!(err.contains("Read-only file system"), "{path}: {err:?}");
    }
    assert_eq!(
        env.sh(&id, "cat /vol/data/hello.txt").await,
        "hello from the volume\n"
    );

    // RemoveImage while the container uses it does what it does for a
    // container's own image: the image goes, its files stay while used.
    env.client
        .image
        .remove_image(RemoveImageRequest {
            image: Some(ImageSpec {
                image: two.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("RemoveImage");
    let status = env
        .client
        .image
        .image_status(ImageStatusRequest {
            image: Some(ImageSpec {
                image: two.clone(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.image.is_none(), "{status:?}");
    assert_eq!(
        env.sh(&id, "cat /vol/data/hello.txt /sub/inner.txt").await,
        "hello from the volume\ninner\n"
    );

    // A SIGKILLed berthd finds the container as it was.
    env.d.kill9();
    env.d.restart().await.expect("restart berthd");
    env.reconnect().await;
    assert_eq!(
        env.sh(&id, "cat /vol/data/second.txt").await,
        "from the second layer\n"
    );

    let container_dir = env.d.root_dir().join("containers").join(&id);
    assert!(
        !mounts_under(&container_dir).is_empty(),
        "the volumes are mounted under the container's dir"
    );
    env.stop_container(&id, 0).await.unwrap();
    env.remove_container(&id).await.unwrap();
    // RemoveContainer unmounts and deletes after its answer.
    let gone =
        berth_e2e::pods::eventually(Duration::from_secs(10), || !container_dir.exists()).await;
    assert_eq!(
        mounts_under(&env.d.root_dir()),
        Vec::<String>::new(),
        "nothing stays mounted under berthd's root after RemoveContainer"
    );
    assert!(gone, "{} is left", container_dir.display());
    env.remove_everything().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_image_volumes_are_refused_and_leave_nothing() {
    berth_e2e::require_root();
    let mut env = PodEnv::start().await;
    let [(two, two_id), _] = data_images(&mut env).await;
    let pod = env.run_pod(&env.pod_config("imgvolbad")).await;
    let absent = env.registry.reference("berth-test/not-pulled", "v1");
    let cases = [
        (
            image_mount("/vol", &absent, "", ""),
            tonic::Code::NotFound,
            "not found",
        ),
        (
            image_mount(
                "/vol",
                &two,
                "sha256:0000000000000000000000000000000000000000000000000000000000000000",
                "",
            ),
            tonic::Code::NotFound,
            "not found",
        ),
        (
            image_mount("/vol", "Not//A Reference", "", ""),
            tonic::Code::InvalidArgument,
            "not a valid image reference",
        ),
        (
            image_mount("/vol", &two, &two_id, "../etc"),
            tonic::Code::InvalidArgument,
            "must not contain \"..\"",
        ),
        (
            image_mount("/vol", &two, &two_id, "sub/../../etc"),
            tonic::Code::InvalidArgument,
            "must not contain \"..\"",
        ),
        (
            image_mount("/vol", &two, &two_id, "/sub"),
            tonic::Code::InvalidArgument,
            "must be relative",
        ),
        (
            image_mount("/vol", &two, &two_id, "missing"),
            tonic::Code::InvalidArgument,
            "does not exist in the image",
        ),
        // `/escape -> /` resolves to the image's own root, which has no etc.
        (
            image_mount("/vol", &two, &two_id, "escape/etc"),
            tonic::Code::InvalidArgument,
            "does not exist in the image",
        ),
    ];
    for (mount, code, message) in cases {
        let mut config = sh_config("bad", &env.busybox(), "sleep 1000");
        config.mounts = vec![mount.clone()];
        let err = env.try_create(&pod, &config).await.unwrap_err();
        assert_eq!(err.code(), code, "{mount:?}: {err:?}");
        assert!(err.message().contains(message), "{mount:?}: {err:?}");
        assert_eq!(
            mounts_under(&env.d.root_dir().join("containers")),
            Vec::<String>::new(),
            "{mount:?} left a mount"
        );
        assert!(env.list_containers(None).await.is_empty());
    }
    // A sub path through a symlink that stays inside the image is fine.
    let mut config = sh_config("good", &env.busybox(), "sleep 1000");
    config.mounts = vec![image_mount("/vol", &two, &two_id, "escape/sub")];
    let id = env.run(&pod, &config).await;
    assert_eq!(env.sh(&id, "ls -A /vol").await, "inner.txt\n");
    env.remove_everything().await.unwrap();
    assert_eq!(mounts_under(&env.d.root_dir()), Vec::<String>::new());
}

/// The real crictl sends the image volume of a container config file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crictl_creates_a_container_with_an_image_volume() {
    berth_e2e::require_root();
    let test = "crictl_creates_a_container_with_an_image_volume";
    let mut env = PodEnv::start().await;
    let Some(crictl) = Crictl::new(&env.d.socket, env.work.path()) else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: crictl not found (set $BERTH_CRICTL or put it in shared/tools beside the workspace)"
        );
        return;
    };
    let [(two, _), _] = data_images(&mut env).await;
    let pod = env.run_pod(&env.pod_config("crictl-imgvol")).await;
    let dir = env.work.path();
    let container = serde_json::json!({
        "metadata": {"name": "reader"},
        "image": {"image": env.busybox()},
        "command": ["sleep", "1000"],
        "log_path": "reader.log",
        "mounts": [{
            "container_path": "/vol",
            "image": {"image": two},
            "image_sub_path": "data",
        }],
    });
    // crictl wants the pod's config too; berthd uses its own record of it.
    let pod_meta = env.pod(&pod).metadata.clone().unwrap();
    let pod_json = serde_json::json!({
        "metadata": {
            "name": pod_meta.name,
            "namespace": pod_meta.namespace,
            "uid": pod_meta.uid,
            "attempt": pod_meta.attempt,
        },
    });
    std::fs::write(dir.join("reader.json"), container.to_string()).unwrap();
    std::fs::write(dir.join("pod.json"), pod_json.to_string()).unwrap();
    let ctr = dir.join("reader.json").display().to_string();
    let podf = dir.join("pod.json").display().to_string();
    let timeout = Duration::from_secs(30);
    let run = crictl
        .run(&["create", "--no-pull", &pod, &ctr, &podf], b"", timeout)
        .await;
    assert_eq!(run.code, Some(0), "crictl create: {run:?}");
    let id = run.stdout.trim().to_string();
    let run = crictl.run(&["start", &id], b"", timeout).await;
    assert_eq!(run.code, Some(0), "crictl start: {run:?}");
    let run = crictl
        .run(&["exec", &id, "ls", "-A", "/vol"], b"", timeout)
        .await;
    assert_eq!(run.code, Some(0), "crictl exec: {run:?}");
    assert_eq!(run.stdout, "hello.txt\nsecond.txt\n");
    let run = crictl
        .run(
            &["exec", &id, "sh", "-c", "echo x > /vol/hello.txt"],
            b"",
            timeout,
        )
        .await;
    assert_ne!(run.code, Some(0), "writing succeeded: {run:?}");
    assert!(run.stderr.contains("Read-only file system"), "{run:?}");
    let run = crictl.run(&["rm", "-f", &id], b"", timeout).await;
    assert_eq!(run.code, Some(0), "crictl rm: {run:?}");
    // RemoveContainer unmounts after its answer.
    let root = env.d.root_dir();
    berth_e2e::pods::eventually(timeout, || mounts_under(&root).is_empty()).await;
    assert_eq!(mounts_under(&root), Vec::<String>::new());
    env.remove_everything().await.unwrap();
}
