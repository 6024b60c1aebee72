//! Tests of the whole translation (the submodules test their own parts).

use std::os::unix::fs::PermissionsExt;

use berth_cri::v1::security_profile::ProfileType;
use berth_cri::v1::{
    Capability as CriCaps, ContainerMetadata, ImageSpec, Int64Value, KeyValue,
    LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount as CriMount, MountPropagation,
    NamespaceOption, PodSandboxMetadata, SecurityProfile, UserNamespace,
};
use oci_spec::runtime::LinuxSeccompAction;
use serde_json::Value;

use super::*;
use crate::image::ProcessConfig;

fn host() -> Host {
    Host {
        caps: security::caps_from_mask(0x1fffeffffff), // everything but SYS_RESOURCE
        nofile: NOFILE_LIMIT,
        nofile_in_userns: 4096,
        swap: true,
        cgroups: berth_cgroup::Cgroups::at(Path::new("/nonexistent"), berth_cgroup::Version::V2),
        apparmor: false,
        hostname: "node-1".into(),
    }
}

fn image(entrypoint: Option<&[&str]>, cmd: Option<&[&str]>) -> ProcessConfig {
    ProcessConfig {
        entrypoint: entrypoint.map(|v| v.iter().map(|s| s.to_string()).collect()),
        cmd: cmd.map(|v| v.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

struct Fixture {
    rootfs: tempfile::TempDir,
    config: ContainerConfig,
    sandbox: PodSandboxConfig,
    image: ProcessConfig,
    namespaces: NamespacePaths,
    pid: PidMode,
    files: SandboxFiles,
    oom_min: i32,
    user_namespace: Option<UserNamespaceInput>,
}

impl Fixture {
    fn new() -> Fixture {
        let rootfs = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(rootfs.path().join("etc")).unwrap();
        std::fs::write(
            rootfs.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n",
        )
        .unwrap();
        std::fs::write(
            rootfs.path().join("etc/group"),
            "root:x:0:\nnogroup:x:65534:\n",
        )
        .unwrap();
        Fixture {
            rootfs,
            config: ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "app".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: "busybox:1.36".into(),
                    ..Default::default()
                }),
                command: strings(&["/bin/sh", "-c", "sleep 1"]),
                ..Default::default()
            },
            sandbox: PodSandboxConfig {
                metadata: Some(PodSandboxMetadata {
                    name: "pod".into(),
                    uid: "uid-1".into(),
                    namespace: "default".into(),
                    attempt: 0,
                }),
                hostname: "pod-host".into(),
                ..Default::default()
            },
            image: ProcessConfig::default(),
            namespaces: NamespacePaths {
                network: Some("/run/berth/sandboxes/s1/ns/net".into()),
                ipc: Some("/run/berth/sandboxes/s1/ns/ipc".into()),
                uts: Some("/run/berth/sandboxes/s1/ns/uts".into()),
            },
            pid: PidMode::Container,
            files: SandboxFiles {
                hosts: Some("/run/berth/sandboxes/s1/hosts".into()),
                resolv_conf: Some("/run/berth/sandboxes/s1/resolv.conf".into()),
                hostname: Some("/run/berth/sandboxes/s1/hostname".into()),
            },
            oom_min: 0,
            user_namespace: None,
        }
    }

    fn security(&mut self) -> &mut LinuxContainerSecurityContext {
        self.config
            .linux
            .get_or_insert_with(LinuxContainerConfig::default)
            .security_context
            .get_or_insert_with(Default::default)
    }

    fn resources(&mut self) -> &mut LinuxContainerResources {
        self.config
            .linux
            .get_or_insert_with(LinuxContainerConfig::default)
            .resources
            .get_or_insert_with(Default::default)
    }

    fn privileged_sandbox(&mut self) {
        self.sandbox.linux = Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                privileged: true,
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    fn build(&self) -> Result<Spec> {
        self.build_on(&host())
    }

    fn build_on(&self, host: &Host) -> Result<Spec> {
        build_spec_on(
            &SpecInput {
                container_id: "c1",
                config: &self.config,
                sandbox: &self.sandbox,
                image: &self.image,
                rootfs: self.rootfs.path(),
                namespaces: self.namespaces.clone(),
                pid: self.pid.clone(),
                files: self.files.clone(),
                cgroups_path: "/kubepods/pod1/c1".into(),
                oom_score_adj_min: self.oom_min,
                user_namespace: self.user_namespace.clone(),
                image_volumes: &[],
            },
            host,
        )
    }

    fn json(&self) -> Value {
        serde_json::to_value(self.build().unwrap()).unwrap()
    }
}

fn process(spec: &Spec) -> &Process {
    spec.process().as_ref().unwrap()
}

fn linux(spec: &Spec) -> &Linux {
    spec.linux().as_ref().unwrap()
}

#[test]
fn args_follow_docker_rules() {
    let img = image(Some(&["/bin/echo", "E"]), Some(&["C"]));
    let cfg = |command: &[&str], args: &[&str]| ContainerConfig {
        command: strings(command),
        args: strings(args),
        ..Default::default()
    };
    assert_eq!(
        process_args(&cfg(&[], &[]), &img).unwrap(),
        ["/bin/echo", "E", "C"]
    );
    assert_eq!(
        process_args(&cfg(&[], &["A"]), &img).unwrap(),
        ["/bin/echo", "E", "A"]
    );
    assert_eq!(
        process_args(&cfg(&["/bin/echo", "X"], &[]), &img).unwrap(),
        ["/bin/echo", "X"]
    );
    assert_eq!(
        process_args(&cfg(&["/bin/echo", "X"], &["A"]), &img).unwrap(),
        ["/bin/echo", "X", "A"]
    );
    // An Entrypoint of [""] is no entrypoint.
    let img2 = image(Some(&[""]), Some(&["/bin/true"]));
    assert_eq!(process_args(&cfg(&[], &[]), &img2).unwrap(), ["/bin/true"]);
    let err = process_args(&cfg(&[], &[]), &image(None, None)).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(ref m) if m == "no command specified"));
}

#[test]
fn env_merges_image_then_request() {
    let mut f = Fixture::new();
    f.image.env = Some(strings(&["A=1", "B=2", "PATH=/image/bin"]));
    f.config.envs = vec![
        KeyValue {
            key: "B".into(),
            value: "3".into(),
        },
        KeyValue {
            key: "C".into(),
            value: "4=x".into(),
        },
    ];
    f.config.tty = true;
    let spec = f.build().unwrap();
    let env = process(&spec).env().clone().unwrap();
    assert_eq!(
        env,
        [
            "PATH=/image/bin",
            "HOSTNAME=pod-host",
            "TERM=xterm",
            "A=1",
            "B=3",
            "C=4=x"
        ]
    );

    f.image.env = None;
    f.config.envs.clear();
    f.config.tty = false;
    let env = process(&f.build().unwrap()).env().clone().unwrap();
    assert_eq!(
        env,
        [format!("PATH={DEFAULT_PATH}"), "HOSTNAME=pod-host".into()]
    );

    f.config.envs = vec![KeyValue {
        key: "A=B".into(),
        value: "1".into(),
    }];
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));
}

#[test]
fn host_network_pod_gets_the_node_hostname_env() {
    let mut f = Fixture::new();
    f.sandbox.hostname.clear();
    f.namespaces = NamespacePaths {
        network: None,
        ipc: None,
        uts: None,
    };
    let spec = f.build().unwrap();
    assert!(
        process(&spec)
            .env()
            .as_ref()
            .unwrap()
            .contains(&"HOSTNAME=node-1".to_string())
    );
    assert_eq!(
        spec.hostname(),
        &None,
        "no hostname without a UTS namespace"
    );
}

#[test]
fn cwd_terminal_user_and_root() {
    let mut f = Fixture::new();
    let spec = f.build().unwrap();
    assert_eq!(process(&spec).cwd(), Path::new("/"));
    assert_eq!(process(&spec).terminal(), Some(false));
    assert_eq!(process(&spec).user().uid(), 0);
    assert_eq!(spec.root().as_ref().unwrap().path(), f.rootfs.path());
    assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(false));
    assert_eq!(spec.hostname().as_deref(), Some("pod-host"));

    f.image.working_dir = "/srv".into();
    f.image.user = "nobody".into();
    assert_eq!(process(&f.build().unwrap()).cwd(), Path::new("/srv"));
    assert_eq!(process(&f.build().unwrap()).user().uid(), 65534);
    f.config.working_dir = "/work".into();
    f.config.tty = true;
    let spec = f.build().unwrap();
    assert_eq!(process(&spec).cwd(), Path::new("/work"));
    assert_eq!(process(&spec).terminal(), Some(true));
    f.config.working_dir = "rel".into();
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));

    f.config.working_dir.clear();
    f.image.user = "ghost".into();
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));
}

#[test]
fn run_as_user_group_and_supplemental_groups() {
    let mut f = Fixture::new();
    let sc = f.security();
    sc.run_as_user = Some(Int64Value { value: 1001 });
    sc.run_as_group = Some(Int64Value { value: 1002 });
    sc.supplemental_groups = vec![1234, 5678];
    let spec = f.build().unwrap();
    let u = process(&spec).user();
    assert_eq!((u.uid(), u.gid()), (1001, 1002));
    assert_eq!(
        u.additional_gids().as_deref(),
        Some(&[1002, 1234, 5678][..])
    );
}

#[test]
fn mounts_in_the_spec() {
    let host_dir = tempfile::tempdir().unwrap();
    let mut f = Fixture::new();
    f.config.mounts = vec![
        CriMount {
            container_path: "/etc/resolv.conf".into(),
            host_path: host_dir.path().to_str().unwrap().into(),
            readonly: true,
            ..Default::default()
        },
        CriMount {
            container_path: "/shared".into(),
            host_path: host_dir.path().to_str().unwrap().into(),
            propagation: MountPropagation::PropagationHostToContainer as i32,
            ..Default::default()
        },
    ];
    let spec = f.build().unwrap();
    let mounts = spec.mounts().as_ref().unwrap();
    let resolv: Vec<_> = mounts
        .iter()
        .filter(|m| m.destination() == Path::new("/etc/resolv.conf"))
        .collect();
    assert_eq!(resolv.len(), 1, "the CRI mount replaces the pod's file");
    assert_eq!(
        resolv[0].options().as_deref(),
        Some(&strings(&["rbind", "rprivate", "ro"])[..])
    );
    let shared = mounts
        .iter()
        .find(|m| m.destination() == Path::new("/shared"))
        .unwrap();
    assert_eq!(
        shared.options().as_deref(),
        Some(&strings(&["rbind", "rslave", "rw"])[..])
    );
    assert_eq!(linux(&spec).rootfs_propagation().as_deref(), Some("slave"));

    f.config.mounts[0].container_path = "/a/../../etc".into();
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));
    f.config.mounts[0].container_path = "data".into();
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));
}

#[test]
fn resources_and_oom_clamp() {
    let mut f = Fixture::new();
    let r = f.resources();
    r.cpu_shares = 1024;
    r.cpu_quota = 50_000;
    r.cpu_period = 100_000;
    r.memory_limit_in_bytes = 15 << 20;
    r.oom_score_adj = -997;
    f.oom_min = -500;
    let spec = f.build().unwrap();
    let res = linux(&spec).resources().as_ref().unwrap();
    assert_eq!(res.cpu().as_ref().unwrap().shares(), Some(1024));
    assert_eq!(res.memory().as_ref().unwrap().limit(), Some(15 << 20));
    assert_eq!(res.memory().as_ref().unwrap().swap(), Some(15 << 20));
    assert_eq!(
        process(&spec).oom_score_adj(),
        Some(-500),
        "clamped to berthd's own value"
    );

    f.resources().oom_score_adj = 1000;
    assert_eq!(process(&f.build().unwrap()).oom_score_adj(), Some(1000));
    f.resources().oom_score_adj = 1001;
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));

    let f = Fixture::new();
    let spec = f.build().unwrap();
    assert_eq!(process(&spec).oom_score_adj(), Some(0));
    let rl = &process(&spec).rlimits().as_ref().unwrap()[0];
    assert_eq!(
        (rl.typ(), rl.soft(), rl.hard()),
        (PosixRlimitType::RlimitNofile, NOFILE_LIMIT, NOFILE_LIMIT)
    );
}

#[test]
fn unprivileged_defaults() {
    let f = Fixture::new();
    let spec = f.build().unwrap();
    let caps = process(&spec).capabilities().as_ref().unwrap();
    assert_eq!(
        caps.bounding().clone().unwrap(),
        DEFAULT_CAPS.iter().copied().collect()
    );
    assert_eq!(
        process(&spec).no_new_privileges(),
        None,
        "absent, not false: see build_spec_on"
    );
    assert!(
        linux(&spec).seccomp().is_none(),
        "no profile asked: unconfined, as the CRI says"
    );
    assert_eq!(
        linux(&spec).masked_paths().as_ref().unwrap().len(),
        DEFAULT_MASKED_PATHS.len()
    );
    assert_eq!(
        linux(&spec).readonly_paths().as_ref().unwrap().len(),
        DEFAULT_READONLY_PATHS.len()
    );
    let devices = linux(&spec)
        .resources()
        .as_ref()
        .unwrap()
        .devices()
        .clone()
        .unwrap();
    assert!(!devices[0].allow());
}

#[test]
fn privileged_containers() {
    let mut f = Fixture::new();
    f.security().privileged = true;
    f.security().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    f.security().masked_paths = strings(&["/proc/kcore"]);
    let err = f.build().unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument(_)),
        "needs a privileged sandbox: {err}"
    );

    f.privileged_sandbox();
    let spec = f.build().unwrap();
    let caps = process(&spec).capabilities().as_ref().unwrap();
    assert_eq!(
        caps.bounding().as_ref().unwrap().len(),
        40,
        "everything berthd holds"
    );
    assert!(linux(&spec).seccomp().is_none());
    assert!(linux(&spec).masked_paths().is_none());
    assert!(linux(&spec).readonly_paths().is_none());
    assert!(
        linux(&spec)
            .resources()
            .as_ref()
            .unwrap()
            .devices()
            .as_ref()
            .unwrap()[0]
            .allow()
    );
    let sys = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == Path::new("/sys"))
        .unwrap();
    assert!(sys.options().as_ref().unwrap().contains(&"rw".to_string()));
}

#[test]
fn capabilities_add_drop_all() {
    let mut f = Fixture::new();
    f.security().capabilities = Some(CriCaps {
        add_capabilities: strings(&["NET_ADMIN"]),
        drop_capabilities: strings(&["NET_RAW"]),
        add_ambient_capabilities: vec![],
    });
    let spec = f.build().unwrap();
    let b = process(&spec)
        .capabilities()
        .as_ref()
        .unwrap()
        .bounding()
        .clone()
        .unwrap();
    assert!(b.contains(&Capability::NetAdmin) && !b.contains(&Capability::NetRaw));

    f.security().capabilities = Some(CriCaps {
        add_capabilities: strings(&["ALL"]),
        ..Default::default()
    });
    let spec = f.build().unwrap();
    assert_eq!(
        process(&spec)
            .capabilities()
            .as_ref()
            .unwrap()
            .bounding()
            .as_ref()
            .unwrap()
            .len(),
        40
    );

    f.security().capabilities = Some(CriCaps {
        drop_capabilities: strings(&["ALL"]),
        ..Default::default()
    });
    let spec = f.build().unwrap();
    let caps = process(&spec).capabilities().as_ref().unwrap();
    assert!(
        caps.bounding().as_ref().unwrap().is_empty()
            && caps.effective().as_ref().unwrap().is_empty()
    );

    f.security().capabilities = Some(CriCaps {
        add_capabilities: strings(&["NOT_A_CAP"]),
        ..Default::default()
    });
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));
}

#[test]
fn readonly_rootfs_and_no_new_privs() {
    let mut f = Fixture::new();
    f.security().readonly_rootfs = true;
    f.security().no_new_privs = true;
    let spec = f.build().unwrap();
    assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
    assert_eq!(process(&spec).no_new_privileges(), Some(true));
    let hosts = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == Path::new("/etc/hosts"))
        .unwrap();
    assert!(
        hosts
            .options()
            .as_ref()
            .unwrap()
            .contains(&"ro".to_string())
    );
}

/// On cgroup v1 the container's cgroups are read-only binds of its own
/// cgroup dirs below a tmpfs that is read-only too (no `cgroup` mount).
#[test]
fn cgroup_v1_is_bind_mounted_read_only() {
    let tree = tempfile::tempdir().unwrap();
    for h in ["memory", "cpu,cpuacct", "systemd"] {
        std::fs::create_dir(tree.path().join(h)).unwrap();
    }
    let mut v1 = host();
    v1.cgroups = berth_cgroup::Cgroups::at(tree.path(), berth_cgroup::Version::V1);
    let mut f = Fixture::new();
    let spec = f.build_on(&v1).unwrap();
    let mounts = spec.mounts().as_ref().unwrap();
    let under: Vec<_> = mounts
        .iter()
        .filter(|m| m.destination().starts_with("/sys/fs/cgroup"))
        .map(|m| {
            (
                m.destination().display().to_string(),
                m.typ().clone().unwrap(),
                m.source().as_ref().unwrap().display().to_string(),
                m.options().clone().unwrap().contains(&"ro".to_string()),
            )
        })
        .collect();
    let bind = |h: &str| {
        (
            format!("/sys/fs/cgroup/{h}"),
            "bind".to_string(),
            tree.path()
                .join(h)
                .join("kubepods/pod1/c1")
                .display()
                .to_string(),
            true,
        )
    };
    assert_eq!(
        under,
        [
            (
                "/sys/fs/cgroup".into(),
                "tmpfs".into(),
                "tmpfs".into(),
                false
            ),
            bind("cpu,cpuacct"),
            bind("memory"),
        ]
    );
    let readonly = linux(&spec).readonly_paths().clone().unwrap();
    assert_eq!(readonly.last().unwrap(), "/sys/fs/cgroup", "the tmpfs too");

    f.security().privileged = true;
    f.privileged_sandbox();
    let spec = f.build_on(&v1).unwrap();
    let memory = spec
        .mounts()
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.destination() == Path::new("/sys/fs/cgroup/memory"))
        .unwrap()
        .clone();
    assert!(
        memory
            .options()
            .as_ref()
            .unwrap()
            .contains(&"rw".to_string())
    );
    assert!(linux(&spec).readonly_paths().is_none());
}

#[test]
fn masked_paths_explicit() {
    let mut f = Fixture::new();
    f.security().masked_paths = strings(&["/bin/ls"]);
    f.security().readonly_paths = strings(&["/tmp"]);
    let spec = f.build().unwrap();
    assert_eq!(
        linux(&spec).masked_paths().as_deref(),
        Some(&strings(&["/bin/ls"])[..])
    );
    assert_eq!(
        linux(&spec).readonly_paths().as_deref(),
        Some(&strings(&["/tmp"])[..])
    );
}

#[test]
fn seccomp_unconfined_default_localhost() {
    let mut f = Fixture::new();
    f.security().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Unconfined as i32,
        localhost_ref: String::new(),
    });
    assert!(linux(&f.build().unwrap()).seccomp().is_none());

    f.security().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::RuntimeDefault as i32,
        localhost_ref: String::new(),
    });
    let spec = f.build().unwrap();
    let s = linux(&spec).seccomp().as_ref().unwrap();
    assert_eq!(s.default_action(), LinuxSeccompAction::ScmpActAllow);
    let denied: Vec<String> = s
        .syscalls()
        .iter()
        .flatten()
        .flat_map(|r| r.names().clone())
        .collect();
    assert!(denied.contains(&"mount".to_string()) && denied.contains(&"keyctl".to_string()));

    // Adding SYS_ADMIN lifts the mount rules of the default profile.
    f.security().capabilities = Some(CriCaps {
        add_capabilities: strings(&["SYS_ADMIN"]),
        ..Default::default()
    });
    let spec = f.build().unwrap();
    let denied: Vec<String> = linux(&spec)
        .seccomp()
        .as_ref()
        .unwrap()
        .syscalls()
        .iter()
        .flatten()
        .flat_map(|r| r.names().clone())
        .collect();
    assert!(!denied.contains(&"mount".to_string()));

    let dir = tempfile::tempdir().unwrap();
    let profile = dir.path().join("deny-chmod.json");
    std::fs::write(
        &profile,
        r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chmod","fchmodat"],"action":"SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();
    f.security().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: profile.to_str().unwrap().into(),
    });
    let spec = f.build().unwrap();
    let s = linux(&spec).seccomp().as_ref().unwrap();
    assert_eq!(
        s.syscalls().as_ref().unwrap()[0].names(),
        &strings(&["chmod", "fchmodat"])
    );

    f.security().seccomp = Some(SecurityProfile {
        profile_type: ProfileType::Localhost as i32,
        localhost_ref: dir.path().join("missing.json").to_str().unwrap().into(),
    });
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));
}

fn ns_of(spec: &Spec) -> Vec<(String, Option<PathBuf>)> {
    linux(spec)
        .namespaces()
        .as_ref()
        .unwrap()
        .iter()
        .map(|n| (n.typ().to_string(), n.path().clone()))
        .collect()
}

#[test]
fn namespaces_host_pod_and_container() {
    let mut f = Fixture::new();
    let ns = ns_of(&f.build().unwrap());
    assert_eq!(
        ns,
        vec![
            ("pid".to_string(), None),
            (
                "net".to_string(),
                Some("/run/berth/sandboxes/s1/ns/net".into())
            ),
            (
                "ipc".to_string(),
                Some("/run/berth/sandboxes/s1/ns/ipc".into())
            ),
            (
                "uts".to_string(),
                Some("/run/berth/sandboxes/s1/ns/uts".into())
            ),
            ("mnt".to_string(), None),
            ("cgroup".to_string(), None),
        ]
    );

    f.pid = PidMode::Pod("/proc/4242/ns/pid".into());
    let ns = ns_of(&f.build().unwrap());
    assert_eq!(ns[0], ("pid".to_string(), Some("/proc/4242/ns/pid".into())));

    f.pid = PidMode::Host;
    f.namespaces = NamespacePaths {
        network: None,
        ipc: None,
        uts: None,
    };
    let spec = f.build().unwrap();
    let kinds: Vec<String> = ns_of(&spec).into_iter().map(|(k, _)| k).collect();
    assert_eq!(kinds, ["mnt", "cgroup"], "host namespaces are omitted");
    assert_eq!(spec.hostname(), &None);
}

fn pod_userns() -> UserNamespaceInput {
    UserNamespaceInput {
        path: "/run/berth/sandboxes/s1/ns/user".into(),
        mappings: crate::userns::IdMappings {
            uids: vec![crate::userns::IdMap {
                container_id: 0,
                host_id: 100000,
                length: 65536,
            }],
            gids: vec![crate::userns::IdMap {
                container_id: 0,
                host_id: 100000,
                length: 65536,
            }],
        },
    }
}

fn userns_option(mode: NamespaceMode) -> Option<NamespaceOption> {
    Some(NamespaceOption {
        userns_options: Some(UserNamespace {
            mode: mode as i32,
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[test]
fn a_container_joins_its_pods_user_namespace_first() {
    let mut f = Fixture::new();
    f.user_namespace = Some(pod_userns());
    let spec = f.build().unwrap();
    let ns = ns_of(&spec);
    assert_eq!(
        ns[0],
        (
            "user".to_string(),
            Some("/run/berth/sandboxes/s1/ns/user".into())
        )
    );
    let linux = spec.linux().as_ref().unwrap();
    assert_eq!(linux.uid_mappings(), &None, "the joined namespace has them");
    let nofile = process(&spec).rlimits().as_ref().unwrap()[0].hard();
    assert_eq!(nofile, 4096, "never above berthd's own hard limit");

    // kubelet repeats the pod's mode on the container.
    f.security().namespace_options = userns_option(NamespaceMode::Pod);
    assert!(f.build().is_ok());
    f.security().namespace_options = userns_option(NamespaceMode::Node);
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));
    f.security().namespace_options = userns_option(NamespaceMode::Container);
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));
}

#[test]
fn without_a_pod_user_namespace_a_container_cannot_ask_for_one() {
    let mut f = Fixture::new();
    f.security().namespace_options = userns_option(NamespaceMode::Node);
    let spec = f.build().unwrap();
    assert!(ns_of(&spec).iter().all(|(k, _)| k != "user"));
    f.security().namespace_options = userns_option(NamespaceMode::Pod);
    assert!(matches!(f.build(), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_user_outside_the_pods_mapping_is_refused() {
    let mut f = Fixture::new();
    f.user_namespace = Some(pod_userns());
    f.security().run_as_user = Some(Int64Value { value: 70000 });
    let err = f.build().unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("uid 70000")),
        "{err}"
    );
    f.security().run_as_user = Some(Int64Value { value: 1000 });
    f.security().supplemental_groups = vec![65536];
    let err = f.build().unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("gid 65536")),
        "{err}"
    );
    f.security().supplemental_groups = vec![65535];
    assert!(f.build().is_ok());
}

#[test]
fn annotations() {
    let mut f = Fixture::new();
    f.config.annotations = [("a".to_string(), "b".to_string())].into();
    let spec = f.build().unwrap();
    let a = spec.annotations().as_ref().unwrap();
    assert_eq!(a["a"], "b");
    assert_eq!(a[ANNOTATION_CONTAINER_TYPE], "container");
    assert_eq!(a[ANNOTATION_CONTAINER_NAME], "app");
    assert_eq!(a[ANNOTATION_SANDBOX_UID], "uid-1");
    assert_eq!(a[ANNOTATION_IMAGE_NAME], "busybox:1.36");
}

#[test]
fn json_paths() {
    let mut f = Fixture::new();
    f.security().readonly_rootfs = true;
    f.security().seccomp = Some(SecurityProfile::default());
    f.resources().memory_limit_in_bytes = 1 << 30;
    f.resources().cpu_shares = 512;
    f.pid = PidMode::Pod("/proc/7/ns/pid".into());
    let j = f.json();
    assert_eq!(j["ociVersion"], OCI_VERSION);
    assert_eq!(j["root"]["readonly"], true);
    assert_eq!(j["root"]["path"], f.rootfs.path().to_str().unwrap());
    assert_eq!(
        j["process"]["args"],
        serde_json::json!(["/bin/sh", "-c", "sleep 1"])
    );
    assert_eq!(j["process"]["cwd"], "/");
    assert_eq!(j["process"]["user"]["uid"], 0);
    assert_eq!(j["process"]["oomScoreAdj"], 0);
    assert_eq!(j["process"]["rlimits"][0]["type"], "RLIMIT_NOFILE");
    assert!(
        j["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .contains(&Value::from("CAP_CHOWN"))
    );
    assert_eq!(j["hostname"], "pod-host");
    assert_eq!(j["linux"]["cgroupsPath"], "/kubepods/pod1/c1");
    assert_eq!(j["linux"]["resources"]["memory"]["limit"], 1 << 30);
    assert_eq!(j["linux"]["resources"]["cpu"]["shares"], 512);
    assert_eq!(
        j["linux"]["namespaces"][0],
        serde_json::json!({"type": "pid", "path": "/proc/7/ns/pid"})
    );
    assert_eq!(j["linux"]["namespaces"][1]["type"], "network");
    assert_eq!(
        j["linux"]["namespaces"][4],
        serde_json::json!({"type": "mount"})
    );
    assert_eq!(j["linux"]["seccomp"]["defaultAction"], "SCMP_ACT_ALLOW");
    assert_eq!(j["linux"]["maskedPaths"][0], "/proc/acpi");
    assert_eq!(
        j["mounts"][0],
        serde_json::json!({
            "destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]
        })
    );
    assert_eq!(j["annotations"][ANNOTATION_CONTAINER_TYPE], "container");
    assert!(j["linux"].get("uidMappings").is_none());

    // And it reads back as the same spec.
    let spec: Spec = serde_json::from_value(j).unwrap();
    assert_eq!(spec, f.build().unwrap());
}

#[test]
fn write_spec_is_0600_and_parses() {
    let f = Fixture::new();
    let spec = f.build().unwrap();
    let bundle = tempfile::tempdir().unwrap();
    write_spec(&spec, bundle.path()).unwrap();
    write_spec(&spec, bundle.path()).unwrap(); // overwrites
    let path = bundle.path().join("config.json");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(Spec::load(&path).unwrap(), spec);
    assert_eq!(
        std::fs::read_dir(bundle.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
}

#[test]
fn ensure_cwd_creates_inside_the_rootfs() {
    let mut f = Fixture::new();
    f.config.working_dir = "/app/data".into();
    let spec = f.build().unwrap();
    ensure_cwd(&spec, None).unwrap();
    assert!(f.rootfs.path().join("app/data").is_dir());
    ensure_cwd(&spec, None).unwrap(); // idempotent
}

#[test]
fn build_spec_reads_the_real_host() {
    // The public entry point, with the host facts detected for real.
    let f = Fixture::new();
    let spec = build_spec(&SpecInput {
        container_id: "c1",
        config: &f.config,
        sandbox: &f.sandbox,
        image: &f.image,
        rootfs: f.rootfs.path(),
        namespaces: f.namespaces.clone(),
        pid: PidMode::Container,
        files: SandboxFiles::default(),
        cgroups_path: "/x".into(),
        oom_score_adj_min: 0,
        user_namespace: None,
        image_volumes: &[],
    })
    .unwrap();
    let nofile = process(&spec).rlimits().as_ref().unwrap()[0].hard();
    assert!(nofile > 0 && nofile <= NOFILE_LIMIT);
    let own = own_capabilities().unwrap();
    for c in process(&spec)
        .capabilities()
        .as_ref()
        .unwrap()
        .bounding()
        .as_ref()
        .unwrap()
    {
        assert!(own.contains(c), "{c} is not held by the test process");
    }
}
