//! RunPodSandbox, CreateContainer, removal and recovery driven against the
//! recording host: no root, every kernel step observed, a failure injected
//! at every step, and each earlier step checked to be undone in reverse.

use std::path::Path;
use std::sync::Arc;

use berth_cri::v1::{
    ContainerConfig, ContainerMetadata, ImageSpec, PodSandboxConfig, PodSandboxMetadata,
};

use crate::config::Config;
use crate::daemon::Daemon;
use crate::error::Error;
use crate::events::EventKind;
use crate::host::fake::RecordingHost;
use crate::store::{ContainerRecord, ImageRecord, SandboxRecord, SandboxState};
use crate::{container, recovery, sandbox};

struct Fixture {
    _dir: tempfile::TempDir,
    host: Arc<RecordingHost>,
    daemon: Arc<Daemon>,
    rt: tokio::runtime::Runtime,
}

const IMAGE: &str = "docker.io/library/busybox:latest";

fn fixture() -> Fixture {
    fixture_on(berth_cgroup::Version::V1)
}

fn fixture_on(version: berth_cgroup::Version) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        root_dir: dir.path().join("root"),
        state_dir: dir.path().join("state"),
        ..Default::default()
    };
    config.cni.write_default_conflist = false;
    let host = Arc::new(RecordingHost::new(&config.state_dir.join("cni")));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // The cgroup tree is only read (stats, checks); writes go through the
    // recording host.
    let cgroups = berth_cgroup::Cgroups::at(&dir.path().join("cgroup"), version);
    let daemon = Daemon::with_host(config, Arc::new(cgroups), host.clone()).unwrap();
    let image = ImageRecord {
        id: "sha256:0123456789abcdef".into(),
        repo_tags: vec![IMAGE.into()],
        chain_ids: vec!["sha256:aaaa".into()],
        config_json: r#"{"config":{"Cmd":["sh"]}}"#.into(),
        ..Default::default()
    };
    daemon.store.put(&image).unwrap();
    // Its snapshot, empty: a create holds it against garbage collection.
    for dir in daemon.images.lower_dirs(&image) {
        std::fs::create_dir_all(dir).unwrap();
    }
    Fixture {
        _dir: dir,
        host,
        daemon,
        rt,
    }
}

fn pod_config(name: &str) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            namespace: "default".into(),
            uid: format!("uid-{name}"),
            attempt: 0,
        }),
        hostname: name.into(),
        ..Default::default()
    }
}

fn container_config(name: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["sleep".into(), "60".into()],
        ..Default::default()
    }
}

/// The operation names of `calls`.
fn ops(calls: &[String]) -> Vec<&str> {
    calls
        .iter()
        .map(|c| c.split(' ').next().unwrap_or_default())
        .collect()
}

/// The calls made after the first call of `op`.
fn after(calls: &[String], op: &str) -> Vec<String> {
    let at = calls
        .iter()
        .position(|c| c.split(' ').next() == Some(op))
        .unwrap_or_else(|| panic!("{op} was never called: {calls:?}"));
    calls[at + 1..].to_vec()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

impl Fixture {
    fn run_pod(&self, name: &str) -> crate::error::Result<String> {
        self.run_pod_with(&pod_config(name))
    }

    fn run_pod_with(&self, config: &PodSandboxConfig) -> crate::error::Result<String> {
        let mut config = config.clone();
        let name = config.metadata.as_ref().unwrap().name.clone();
        config.log_directory = self
            ._dir
            .path()
            .join("logs")
            .join(name)
            .display()
            .to_string();
        sandbox::run(&self.daemon, config, "")
    }

    fn create(
        &self,
        pod: &str,
        name: &str,
        config: ContainerConfig,
    ) -> crate::error::Result<String> {
        let _ = name;
        let guard = self.rt.block_on(self.daemon.locks.sandbox_shared(pod));
        container::create(&self.daemon, &guard, config)
    }

    fn start(&self, pod: &str, id: &str) {
        let guard = self.rt.block_on(self.daemon.locks.container(pod, id));
        container::start(&self.daemon, &guard).unwrap();
    }

    fn try_start(&self, pod: &str, id: &str) -> crate::error::Result<()> {
        let guard = self.rt.block_on(self.daemon.locks.container(pod, id));
        container::start(&self.daemon, &guard)
    }

    /// RemoveImage: the record, then the garbage collection it queues.
    fn remove_image(&self, reference: &str) -> Option<ImageRecord> {
        let removed = self.daemon.images.forget(reference).unwrap();
        self.rt
            .block_on(self.daemon.images.collect_garbage())
            .unwrap();
        removed
    }

    fn container(&self, id: &str) -> ContainerRecord {
        self.daemon
            .store
            .get::<ContainerRecord>(id)
            .unwrap()
            .unwrap()
    }

    fn remove_pod(&self, pod: &str) {
        let guard = self.rt.block_on(self.daemon.locks.sandbox(pod));
        crate::pod::remove(&self.daemon, &guard).unwrap();
    }

    /// Nothing of any pod or container is left: no simulated process, pin,
    /// mount, cgroup or network, no dir, no record.
    fn assert_nothing_left(&self) {
        assert_eq!(self.host.leftovers(), Vec::<String>::new());
        let layout = &self.daemon.layout;
        for dir in [layout.sandboxes(), layout.shims(), layout.containers()] {
            assert_eq!(entries(&dir), Vec::<String>::new(), "{}", dir.display());
        }
        assert_eq!(
            entries(&layout.cni_cache()),
            Vec::<String>::new(),
            "CNI cache"
        );
        assert!(
            self.daemon
                .store
                .list::<SandboxRecord>()
                .unwrap()
                .is_empty()
        );
        assert!(
            self.daemon
                .store
                .list::<ContainerRecord>()
                .unwrap()
                .is_empty()
        );
    }
}

#[test]
fn run_pod_sandbox_makes_every_step_in_order() {
    let f = fixture();
    let id = f.run_pod("web").unwrap();
    assert_eq!(
        ops(&f.host.calls()),
        [
            "pin_namespaces",
            "network_setup",
            "create_cgroup",
            "start_infra",
            "add_to_cgroup"
        ]
    );
    let record = f.daemon.store.get::<SandboxRecord>(&id).unwrap().unwrap();
    assert_eq!(record.state, SandboxState::Ready);
    assert_eq!(record.pod_ips, ["10.88.0.7"]);
    assert!(f.host.is_alive(&record.infra));
    let breadcrumb =
        std::fs::read_to_string(f.daemon.layout.sandbox(&id).join("infra.pid")).unwrap();
    assert_eq!(
        crate::process::ProcessIdentity::parse_breadcrumb(&breadcrumb),
        Some(record.infra)
    );
}

use crate::host::Host as _;

#[test]
fn a_failing_run_pod_sandbox_step_undoes_every_earlier_one_in_reverse() {
    let cases: [(&str, &[&str]); 5] = [
        ("pin_namespaces", &[]),
        (
            "network_setup",
            &[
                "network_teardown",
                "unpin_namespace",
                "unpin_namespace",
                "unpin_namespace",
            ],
        ),
        (
            "create_cgroup",
            &[
                "network_teardown",
                "unpin_namespace",
                "unpin_namespace",
                "unpin_namespace",
            ],
        ),
        (
            "start_infra",
            &[
                "remove_cgroup",
                "network_teardown",
                "unpin_namespace",
                "unpin_namespace",
                "unpin_namespace",
            ],
        ),
        (
            "add_to_cgroup",
            &[
                "stop_infra",
                "remove_cgroup",
                "network_teardown",
                "unpin_namespace",
                "unpin_namespace",
                "unpin_namespace",
            ],
        ),
    ];
    for (failing, undo) in cases {
        let f = fixture();
        f.host.fail_next(failing);
        let err = f.run_pod("web").unwrap_err();
        assert!(err.to_string().contains("injected"), "{failing}: {err}");
        let calls = f.host.calls();
        assert_eq!(
            ops(&after(&calls, failing)),
            undo,
            "failing {failing}: {calls:?}"
        );
        // Pins are undone latest first.
        let unpins: Vec<String> = calls
            .iter()
            .filter(|c| c.starts_with("unpin_namespace"))
            .cloned()
            .collect();
        if !unpins.is_empty() {
            assert_eq!(
                unpins,
                [
                    "unpin_namespace ipc",
                    "unpin_namespace uts",
                    "unpin_namespace net"
                ]
            );
        }
        f.assert_nothing_left();
        // The name is free again.
        f.host.clear_calls();
        f.run_pod("web").unwrap();
    }
}

#[test]
fn a_failing_create_container_step_undoes_every_earlier_one() {
    let bad_log = {
        let mut c = container_config("app");
        c.log_path = "../escape.log".into();
        c
    };
    let cases: [(&str, Option<ContainerConfig>, &[&str]); 2] = [
        ("mount_overlay", None, &["unmount_all_under"]),
        // A bad request found after the rootfs was mounted.
        (
            "mount_overlay",
            Some(bad_log),
            &["unmount", "unmount_all_under"],
        ),
    ];
    for (step, config, undo) in cases {
        let f = fixture();
        let pod = f.run_pod("web").unwrap();
        f.host.clear_calls();
        let injected = config.is_none();
        if injected {
            f.host.fail_next(step);
        }
        let err = f
            .create(
                &pod,
                "app",
                config.unwrap_or_else(|| container_config("app")),
            )
            .unwrap_err();
        if !injected {
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        }
        let calls = f.host.calls();
        assert_eq!(ops(&after(&calls, step)), undo, "{step}: {calls:?}");
        let layout = &f.daemon.layout;
        assert_eq!(entries(&layout.containers()), Vec::<String>::new());
        assert_eq!(entries(&layout.shims()), Vec::<String>::new());
        assert!(f.daemon.store.list::<ContainerRecord>().unwrap().is_empty());
        // The name is free again and the pod still works.
        f.create(&pod, "app", container_config("app")).unwrap();
        f.remove_pod(&pod);
        f.assert_nothing_left();
    }
}

#[test]
fn remove_pod_sandbox_releases_everything_and_publishes_events() {
    let f = fixture();
    let mut events = f.daemon.events.subscribe("test", "test");
    let pod = f.run_pod("web").unwrap();
    let c = f.create(&pod, "app", container_config("app")).unwrap();
    f.start(&pod, &c);
    f.host.clear_calls();
    f.remove_pod(&pod);
    let calls = f.host.calls();
    for op in [
        "call_shim kill",
        "call_shim shutdown",
        "network_teardown",
        "stop_infra",
        "remove_cgroup",
    ] {
        assert!(calls.iter().any(|c| c.starts_with(op)), "{op}: {calls:?}");
    }
    f.assert_nothing_left();
    let seen: Vec<(String, EventKind)> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|e| (e.id, e.kind))
        .collect();
    let of = |id: &str| -> Vec<EventKind> {
        seen.iter()
            .filter(|(i, _)| i == id)
            .map(|(_, k)| *k)
            .collect()
    };
    use EventKind::*;
    assert_eq!(of(&c), [Created, Started, Stopped, Deleted]);
    assert_eq!(of(&pod), [Created, Started, Stopped, Deleted]);
}

#[test]
fn a_removed_record_is_never_written_back() {
    let f = fixture();
    let pod = f.run_pod("web").unwrap();
    f.remove_pod(&pod);
    let err = sandbox::mark_not_ready(&f.daemon, &pod, "late").unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    assert!(f.daemon.store.get::<SandboxRecord>(&pod).unwrap().is_none());
}

#[test]
fn recovery_discards_what_has_no_record() {
    let f = fixture();
    let pod = f.run_pod("web").unwrap();
    let c = f.create(&pod, "app", container_config("app")).unwrap();
    f.start(&pod, &c);
    // berthd died before either record was committed.
    f.daemon.store.delete::<ContainerRecord>(&c).unwrap();
    f.daemon.store.delete::<SandboxRecord>(&pod).unwrap();
    f.host.clear_calls();
    recovery::recover(&f.daemon).unwrap();
    let calls = f.host.calls();
    for op in [
        "call_shim shutdown",
        "unmount",
        "network_teardown",
        "stop_infra",
        "remove_cgroup",
        "unpin_namespace net",
    ] {
        assert!(calls.iter().any(|c| c.starts_with(op)), "{op}: {calls:?}");
    }
    f.assert_nothing_left();
}

#[test]
fn recovery_removes_the_v2_infra_leaf_of_a_pod_cgroup_kubelet_owns() {
    let f = fixture_on(berth_cgroup::Version::V2);
    let mut config = pod_config("web");
    config.linux = Some(berth_cri::v1::LinuxPodSandboxConfig {
        cgroup_parent: "/kubepods/pod-web".into(),
        ..Default::default()
    });
    // kubelet made the pod cgroup: Berth neither owns nor removes it.
    f.host.create_cgroup("/kubepods/pod-web").unwrap();
    let pod = f.run_pod_with(&config).unwrap();
    assert!(
        f.host
            .calls()
            .contains(&"create_cgroup /kubepods/pod-web/infra".to_string()),
        "{:?}",
        f.host.calls()
    );
    // berthd died before the record was committed.
    f.daemon.store.delete::<SandboxRecord>(&pod).unwrap();
    f.host.clear_calls();
    recovery::recover(&f.daemon).unwrap();
    let calls = f.host.calls();
    assert!(
        calls.contains(&"remove_cgroup /kubepods/pod-web/infra".to_string()),
        "{calls:?}"
    );
    assert!(!calls.contains(&"remove_cgroup /kubepods/pod-web".to_string()));
    assert_eq!(f.host.leftovers(), ["cgroup /kubepods/pod-web"]);
}

#[test]
fn recovery_marks_a_broken_ready_sandbox_not_ready_with_the_reason() {
    let f = fixture();
    let healthy = f.run_pod("healthy").unwrap();
    let no_network = f.run_pod("no-network").unwrap();
    let no_infra = f.run_pod("no-infra").unwrap();
    // The network of one pod vanished (its teardown ran, the record was
    // never marked), the infra process of another died.
    f.host.network_teardown(&no_network).unwrap();
    let infra = f
        .daemon
        .store
        .get::<SandboxRecord>(&no_infra)
        .unwrap()
        .unwrap()
        .infra;
    f.host.kill(infra.pid);
    recovery::recover(&f.daemon).unwrap();
    let state = |id: &str| {
        let r = f.daemon.store.get::<SandboxRecord>(id).unwrap().unwrap();
        (r.state, r.reason)
    };
    assert_eq!(state(&healthy), (SandboxState::Ready, String::new()));
    let (s, reason) = state(&no_network);
    assert_eq!(s, SandboxState::NotReady);
    assert!(reason.contains("CNI"), "{reason}");
    let (s, reason) = state(&no_infra);
    assert_eq!(s, SandboxState::NotReady);
    assert!(reason.contains("infra"), "{reason}");
}

#[test]
fn a_shim_that_dies_makes_the_container_unknown_and_stopped_once() {
    let f = fixture();
    let pod = f.run_pod("web").unwrap();
    let c = f.create(&pod, "app", container_config("app")).unwrap();
    f.start(&pod, &c);
    let mut events = f.daemon.events.subscribe("test", "test");
    // The first subscriber gets what happened before it: skip that.
    while events.try_recv().is_ok() {}
    let shim = f
        .daemon
        .store
        .get::<ContainerRecord>(&c)
        .unwrap()
        .unwrap()
        .shim;
    f.host.kill(shim.pid);
    // A read computes the state without writing it.
    let seen = container::current(
        &f.daemon,
        f.daemon.store.get::<ContainerRecord>(&c).unwrap().unwrap(),
    );
    assert_eq!(seen.state, crate::store::ContainerState::Unknown);
    assert_eq!(
        f.daemon
            .store
            .get::<ContainerRecord>(&c)
            .unwrap()
            .unwrap()
            .state,
        crate::store::ContainerState::Running
    );
    // The owner records it, once.
    container::observe_exit(&f.daemon, &c).unwrap();
    container::observe_exit(&f.daemon, &c).unwrap();
    let kinds: Vec<EventKind> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, [EventKind::Stopped]);
    f.remove_pod(&pod);
    f.assert_nothing_left();
}

const DATA_IMAGE: &str = "example.com/data:1";
const DATA_IMAGE_ID: &str =
    "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

impl Fixture {
    /// A second image, of two layers, to mount as a volume; its snapshot
    /// dirs exist (empty), so garbage collection sees them.
    fn add_data_image(&self) -> ImageRecord {
        let image = ImageRecord {
            id: DATA_IMAGE_ID.into(),
            repo_tags: vec![DATA_IMAGE.into()],
            chain_ids: vec!["sha256:d1".into(), "sha256:d2".into()],
            config_json: "{}".into(),
            ..Default::default()
        };
        self.daemon.store.put(&image).unwrap();
        for dir in self.daemon.images.lower_dirs(&image) {
            std::fs::create_dir_all(dir).unwrap();
        }
        image
    }
}

fn with_image_volume(name: &str, image: &str, sub_path: &str) -> ContainerConfig {
    let mut c = container_config(name);
    c.mounts.push(berth_cri::v1::Mount {
        container_path: "/data".into(),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        image_sub_path: sub_path.into(),
        ..Default::default()
    });
    c
}

#[test]
fn an_image_volume_is_mounted_under_the_container_dir_and_recorded() {
    let f = fixture();
    let image = f.add_data_image();
    let pod = f.run_pod("web").unwrap();
    f.host.clear_calls();
    let id = f
        .create(&pod, "app", with_image_volume("app", DATA_IMAGE, ""))
        .unwrap();
    let target = f.daemon.layout.container(&id).join("image-volumes/0");
    let calls = f.host.calls();
    let at = |op: &str| calls.iter().position(|c| c.starts_with(op)).unwrap();
    assert!(
        at("mount_overlay") < at("mount_readonly_layers"),
        "{calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.starts_with("launch_shim")),
        "{calls:?}"
    );
    assert!(calls.contains(&format!("mount_readonly_layers {}", target.display())));
    let record = f.daemon.store.get::<ContainerRecord>(&id).unwrap().unwrap();
    assert_eq!(
        record.image_volumes,
        [crate::store::ImageVolume {
            container_path: "/data".into(),
            image_id: image.id.clone(),
            chain_ids: image.chain_ids.clone(),
        }]
    );
    // The spec bind-mounts it read-only although readonly was not asked.
    let spec =
        std::fs::read_to_string(f.daemon.layout.shim(&id).join("bundle/config.json")).unwrap();
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let mount = spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "/data")
        .unwrap();
    assert_eq!(mount["source"], target.display().to_string());
    assert_eq!(
        mount["options"],
        serde_json::json!(["rbind", "rprivate", "ro"])
    );
    f.remove_pod(&pod);
    f.assert_nothing_left();
}

#[test]
fn image_ref_names_the_image_before_image() {
    let f = fixture();
    let image = f.add_data_image();
    let pod = f.run_pod("web").unwrap();
    let mut config = with_image_volume("app", "example.com/renamed:2", "");
    config.image = Some(ImageSpec {
        image: "example.com/renamed:2".into(),
        // The fixture's busybox id is short: as a unique id prefix.
        image_ref: "0123456789abcdef".into(),
        ..Default::default()
    });
    config.mounts[0].image.as_mut().unwrap().image_ref = image.id.clone();
    let id = f.create(&pod, "app", config).unwrap();
    let record = f.daemon.store.get::<ContainerRecord>(&id).unwrap().unwrap();
    assert_eq!(record.image_id, "sha256:0123456789abcdef");
    assert_eq!(record.image_ref, "example.com/renamed:2");
    assert_eq!(record.image_volumes[0].image_id, image.id);
    // An image_ref that is not here is NotFound, whatever `image` says.
    let mut config = with_image_volume("other", DATA_IMAGE, "");
    config.mounts[0].image.as_mut().unwrap().image_ref = "sha256:99999999".into();
    let err = f.create(&pod, "other", config).unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    f.remove_pod(&pod);
    f.assert_nothing_left();
}

#[test]
fn a_bad_image_volume_is_refused_before_anything_is_made() {
    let f = fixture();
    f.add_data_image();
    let pod = f.run_pod("web").unwrap();
    for (image, sub_path, not_found) in [
        ("example.com/absent:1", "", true),
        ("Not A Reference", "", false),
        (DATA_IMAGE, "../etc", false),
        (DATA_IMAGE, "a/../../b", false),
        (DATA_IMAGE, "/etc", false),
    ] {
        f.host.clear_calls();
        let err = f
            .create(&pod, "app", with_image_volume("app", image, sub_path))
            .unwrap_err();
        if not_found {
            assert!(matches!(err, Error::NotFound(_)), "{image}: {err}");
        } else {
            assert!(
                matches!(err, Error::InvalidArgument(_)),
                "{image} {sub_path}: {err}"
            );
        }
        assert!(err.to_string().contains("/data"), "{err}");
        assert_eq!(f.host.calls(), Vec::<String>::new(), "{image} {sub_path}");
    }
    let mut config = with_image_volume("app", DATA_IMAGE, "");
    config.mounts[0].host_path = "/etc".into();
    assert!(matches!(
        f.create(&pod, "app", config),
        Err(Error::InvalidArgument(_))
    ));
    f.remove_pod(&pod);
    f.assert_nothing_left();
}

#[test]
fn a_failing_image_volume_step_undoes_every_earlier_one() {
    let cases: [(&str, bool, &str, &[&str]); 2] = [
        (
            "mount_readonly_layers",
            true,
            "",
            &["unmount", "unmount_all_under"],
        ),
        // The sub path is looked for in the mounted image: the fake's is
        // empty.
        (
            "mount_readonly_layers",
            false,
            "missing/dir",
            &["unmount", "unmount", "unmount_all_under"],
        ),
    ];
    for (step, inject, sub_path, undo) in cases {
        let f = fixture();
        f.add_data_image();
        let pod = f.run_pod("web").unwrap();
        f.host.clear_calls();
        if inject {
            f.host.fail_next(step);
        }
        let err = f
            .create(&pod, "app", with_image_volume("app", DATA_IMAGE, sub_path))
            .unwrap_err();
        if !inject {
            assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
            assert!(
                err.to_string().contains("does not exist in the image"),
                "{err}"
            );
        }
        let calls = f.host.calls();
        assert_eq!(ops(&after(&calls, step)), undo, "{step}: {calls:?}");
        let layout = &f.daemon.layout;
        assert_eq!(entries(&layout.containers()), Vec::<String>::new());
        assert_eq!(entries(&layout.shims()), Vec::<String>::new());
        assert!(f.daemon.store.list::<ContainerRecord>().unwrap().is_empty());
        assert_eq!(
            f.host
                .leftovers()
                .iter()
                .filter(|l| l.starts_with("mount"))
                .count(),
            0
        );
        f.create(&pod, "app", with_image_volume("app", DATA_IMAGE, ""))
            .unwrap();
        f.remove_pod(&pod);
        f.assert_nothing_left();
    }
}

#[test]
fn an_image_used_as_a_volume_keeps_its_snapshots_until_its_container_goes() {
    let f = fixture();
    let image = f.add_data_image();
    let pod = f.run_pod("web").unwrap();
    f.create(&pod, "app", with_image_volume("app", DATA_IMAGE, ""))
        .unwrap();
    // As for a container's own image: the record goes, the files stay.
    let removed = f.remove_image(DATA_IMAGE);
    assert_eq!(removed.map(|i| i.id), Some(image.id.clone()));
    assert!(f.daemon.images.resolve(DATA_IMAGE).unwrap().is_none());
    for dir in f.daemon.images.lower_dirs(&image) {
        assert!(dir.is_dir(), "{} was collected", dir.display());
    }
    f.remove_pod(&pod);
    f.rt.block_on(f.daemon.images.collect_garbage()).unwrap();
    for dir in f.daemon.images.lower_dirs(&image) {
        assert!(!dir.exists(), "{} outlived its last user", dir.display());
    }
    f.assert_nothing_left();
}

#[test]
fn container_records_without_image_volumes_still_decode() {
    let old = r#"{"id":"c1","sandbox_id":"p1","snapshot_chain_ids":["sha256:a"]}"#;
    let record: ContainerRecord = serde_json::from_str(old).unwrap();
    assert!(record.image_volumes.is_empty());
    assert_eq!(record.snapshot_chain_ids, ["sha256:a"]);
}

#[test]
fn snapshots_held_by_a_create_outlive_garbage_collection_until_released() {
    let f = fixture();
    let image = f.add_data_image();
    // What a create holds between resolving its images and storing its
    // record, while a RemoveImage runs.
    let hold = f
        .daemon
        .images
        .hold_snapshots(image.chain_ids.clone())
        .unwrap();
    f.remove_image(DATA_IMAGE);
    for dir in f.daemon.images.lower_dirs(&image) {
        assert!(dir.is_dir(), "{} was collected while held", dir.display());
    }
    drop(hold);
    f.rt.block_on(f.daemon.images.collect_garbage()).unwrap();
    for dir in f.daemon.images.lower_dirs(&image) {
        assert!(!dir.exists(), "{} outlived its hold", dir.display());
    }
    // A create that resolved the image before it went finds out now.
    let err = f
        .daemon
        .images
        .hold_snapshots(image.chain_ids.clone())
        .err()
        .unwrap();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
}

#[test]
fn recovery_unmounts_the_image_volumes_of_a_container_without_record() {
    let f = fixture();
    f.add_data_image();
    let pod = f.run_pod("web").unwrap();
    let c = f
        .create(&pod, "app", with_image_volume("app", DATA_IMAGE, ""))
        .unwrap();
    // berthd died before the record was committed.
    f.daemon.store.delete::<ContainerRecord>(&c).unwrap();
    f.host.clear_calls();
    recovery::recover(&f.daemon).unwrap();
    let dir = f.daemon.layout.container(&c);
    assert!(
        f.host
            .calls()
            .contains(&format!("unmount_all_under {}", dir.display())),
        "{:?}",
        f.host.calls()
    );
    assert!(!dir.exists());
    f.remove_pod(&pod);
    f.assert_nothing_left();
}

fn userns_pod_config(name: &str) -> PodSandboxConfig {
    use berth_cri::v1::{
        IdMapping, LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode,
        NamespaceOption, UserNamespace,
    };
    let map = || {
        vec![IdMapping {
            container_id: 0,
            host_id: 100_000,
            length: 65536,
        }]
    };
    let mut config = pod_config(name);
    config.linux = Some(LinuxPodSandboxConfig {
        security_context: Some(LinuxSandboxSecurityContext {
            namespace_options: Some(NamespaceOption {
                pid: NamespaceMode::Pod as i32,
                userns_options: Some(UserNamespace {
                    mode: NamespaceMode::Pod as i32,
                    uids: map(),
                    gids: map(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    config
}

#[test]
fn a_user_namespaced_pod_and_its_container_see_files_through_idmapped_mounts() {
    let f = fixture();
    let pod = f.run_pod_with(&userns_pod_config("web")).unwrap();
    let user_ns = f.daemon.layout.sandbox(&pod).join("ns/user");
    let calls = f.host.calls();
    assert!(
        calls.contains(&"pin_namespaces user,net,uts,ipc".to_string()),
        "{calls:?}"
    );
    assert!(
        calls.contains(&format!("start_infra {}", user_ns.display())),
        "the infra process is made inside the user namespace: {calls:?}"
    );

    let vol = f._dir.path().join("vol");
    std::fs::create_dir_all(&vol).unwrap();
    let mut config = container_config("app");
    config.mounts.push(berth_cri::v1::Mount {
        container_path: "/data".into(),
        host_path: vol.display().to_string(),
        ..Default::default()
    });
    f.host.clear_calls();
    let id = f.create(&pod, "app", config).unwrap();
    let cdir = f.daemon.layout.container(&id);
    let calls = f.host.calls();
    // The one layer, the upper dir given to the namespace's root, the
    // overlay on the idmapped layer, then the three pod files and /data.
    let expected = [
        format!("idmapped_bind {}", cdir.join("lower/0").display()),
        format!("give_to {} 100000:100000", cdir.join("upper").display()),
        format!("mount_overlay {}", cdir.join("rootfs").display()),
    ];
    assert_eq!(calls[..3], expected, "{calls:?}");
    let binds: Vec<&String> = calls[3..]
        .iter()
        .filter(|c| c.starts_with("idmapped_bind"))
        .collect();
    assert_eq!(binds.len(), 4, "{calls:?}");

    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.daemon.layout.shim(&id).join("bundle/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(spec["linux"]["namespaces"][0]["type"], "user");
    assert_eq!(
        spec["linux"]["namespaces"][0]["path"],
        user_ns.display().to_string()
    );
    let data = spec["mounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["destination"] == "/data")
        .unwrap();
    let source = data["source"].as_str().unwrap();
    assert!(
        Path::new(source).starts_with(cdir.join("mounts")),
        "{source}"
    );

    f.remove_pod(&pod);
    f.assert_nothing_left();
}

#[test]
fn a_failing_idmapped_step_undoes_the_create() {
    for step in ["idmapped_bind", "give_to"] {
        let f = fixture();
        let pod = f.run_pod_with(&userns_pod_config("web")).unwrap();
        f.host.fail_next(step);
        let err = f.create(&pod, "app", container_config("app")).unwrap_err();
        assert!(matches!(err, Error::Internal(_)), "{step}: {err}");
        let calls = f.host.calls();
        assert!(
            ops(&after(&calls, step)).contains(&"unmount_all_under"),
            "{step}: {calls:?}"
        );
        assert_eq!(entries(&f.daemon.layout.containers()), Vec::<String>::new());
        assert!(
            f.host.leftovers().iter().all(|l| !l.starts_with("mount")),
            "{step}: {:?}",
            f.host.leftovers()
        );
        f.remove_pod(&pod);
        f.assert_nothing_left();
    }
}

#[test]
fn create_launches_nothing_and_start_launches_the_shim() {
    let f = fixture();
    let pod = f.run_pod("web").unwrap();
    f.host.clear_calls();
    let c = f.create(&pod, "app", container_config("app")).unwrap();
    let calls = f.host.calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("launch_shim")),
        "{calls:?}"
    );
    let record = f.container(&c);
    assert!(!record.has_shim(), "{record:?}");
    // A created container without a shim is created, not lost.
    assert_eq!(
        container::current(&f.daemon, record.clone()).state,
        crate::store::ContainerState::Created
    );
    assert!(f.daemon.layout.shim(&c).join("config.pb").exists());
    assert!(f.daemon.layout.shim(&c).join("bundle/config.json").exists());

    f.host.clear_calls();
    f.start(&pod, &c);
    assert_eq!(
        ops(&f.host.calls()),
        ["launch_shim", "call_shim", "call_shim"]
    );
    let record = f.container(&c);
    assert!(record.has_shim(), "{record:?}");
    assert_eq!(record.state, crate::store::ContainerState::Running);
    f.remove_pod(&pod);
    f.assert_nothing_left();
}

#[test]
fn a_failing_start_discards_its_launch_and_records_a_start_error() {
    for step in ["launch_shim", "call_shim"] {
        let f = fixture();
        let pod = f.run_pod("web").unwrap();
        let c = f.create(&pod, "app", container_config("app")).unwrap();
        let mut events = f.daemon.events.subscribe("test", "test");
        while events.try_recv().is_ok() {}
        f.host.fail_next(step);
        let err = f.try_start(&pod, &c).unwrap_err();
        assert!(
            err.to_string().contains("injected failure"),
            "{step}: {err}"
        );
        let record = f.container(&c);
        assert_eq!(record.state, crate::store::ContainerState::Exited, "{step}");
        assert_eq!(record.exit_code, 128, "{step}");
        assert_eq!(record.reason, "StartError", "{step}");
        assert!(
            record.message.contains("injected failure"),
            "{step}: {record:?}"
        );
        let kinds: Vec<EventKind> = std::iter::from_fn(|| events.try_recv().ok())
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, [EventKind::Stopped], "{step}");
        // No shim is left running: only the pod's infra process.
        assert!(
            f.host
                .leftovers()
                .iter()
                .filter(|l| l.starts_with("process"))
                .count()
                <= 1,
            "{step}: {:?}",
            f.host.leftovers()
        );
        assert!(f.try_start(&pod, &c).is_err(), "{step}: started again");
        f.remove_pod(&pod);
        f.assert_nothing_left();
    }
}

#[test]
fn stopping_an_unstarted_container_records_its_end_without_a_shim() {
    let f = fixture();
    let pod = f.run_pod("web").unwrap();
    let c = f.create(&pod, "app", container_config("app")).unwrap();
    f.host.clear_calls();
    let guard = f.rt.block_on(f.daemon.locks.container(&pod, &c));
    container::stop(&f.daemon, &guard, 10).unwrap();
    drop(guard);
    assert_eq!(f.host.calls(), Vec::<String>::new());
    let record = f.container(&c);
    assert_eq!(record.state, crate::store::ContainerState::Exited);
    assert_eq!(record.exit_code, 137);
    assert!(f.try_start(&pod, &c).is_err());
    f.remove_pod(&pod);
    f.assert_nothing_left();
}

#[test]
fn resources_updated_before_the_start_go_into_the_spec() {
    let f = fixture();
    let pod = f.run_pod("web").unwrap();
    let c = f.create(&pod, "app", container_config("app")).unwrap();
    f.host.clear_calls();
    let guard = f.rt.block_on(f.daemon.locks.container(&pod, &c));
    container::update_resources(
        &f.daemon,
        &guard,
        berth_cri::v1::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_shares: 512,
            ..Default::default()
        },
    )
    .unwrap();
    drop(guard);
    assert!(
        !f.host
            .calls()
            .iter()
            .any(|c| c.starts_with("apply_resources")),
        "{:?}",
        f.host.calls()
    );
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.daemon.layout.shim(&c).join("bundle/config.json")).unwrap(),
    )
    .unwrap();
    let resources = &spec["linux"]["resources"];
    assert_eq!(resources["memory"]["limit"], 64 << 20, "{resources}");
    assert_eq!(resources["cpu"]["shares"], 512, "{resources}");
    assert!(
        resources["devices"]
            .as_array()
            .is_some_and(|d| !d.is_empty()),
        "{resources}"
    );
    f.remove_pod(&pod);
    f.assert_nothing_left();
}

#[test]
fn recovery_discards_the_shim_of_an_unfinished_start() {
    let f = fixture();
    let pod = f.run_pod("web").unwrap();
    let c = f.create(&pod, "app", container_config("app")).unwrap();
    // berthd died after StartContainer launched the shim, before the record
    // named it.
    let dir = f.daemon.layout.shim(&c);
    f.host.launch_shim(&dir, &c).unwrap();
    f.host.clear_calls();
    recovery::recover(&f.daemon).unwrap();
    assert!(
        f.host
            .calls()
            .iter()
            .any(|c| c.starts_with("call_shim shutdown")),
        "{:?}",
        f.host.calls()
    );
    let record = f.container(&c);
    assert_eq!(record.state, crate::store::ContainerState::Created);
    assert!(!record.has_shim());
    // It starts anew.
    f.start(&pod, &c);
    assert_eq!(f.container(&c).state, crate::store::ContainerState::Running);
    f.remove_pod(&pod);
    f.assert_nothing_left();
}
