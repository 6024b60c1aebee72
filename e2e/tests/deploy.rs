//! The operator path (issue 13), offline: the Kubernetes manifests against
//! the Kubernetes OpenAPI schemas and the invariants a node installer
//! needs; the node image built with scripts/build-image, pushed to the
//! harness registry, pulled by Berth and its installer run by Berth as the
//! DaemonSet's pod into a temporary host root (a second run changes
//! nothing, the uninstaller removes it all); the installer's rules about
//! what is not Berth's; and an upgrade in which berthd is swapped and
//! restarted the way its systemd unit runs it while a container keeps
//! running.
//!
//! The images hold the debug binaries `cargo build --workspace --bins`
//! built (release builds are too slow here); nothing touches the host's
//! /usr/local/bin, /etc/berth, /opt/cni/bin, /etc/systemd or systemd.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use berth_cri::v1::*;
use berth_e2e::berthd::bin_dir;
use berth_e2e::cri::CriClient;
use berth_e2e::deploy::{self, MountNs, Unit, UnitProcess};
use berth_e2e::images::{Image, ImageSettings, busybox_layer};
use berth_e2e::pods::*;
use berth_e2e::{Registry, require_root};
use serde_json::Value;

const RUNNING: ContainerState = ContainerState::ContainerRunning;

fn repo() -> PathBuf {
    deploy::repo_root()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("run {:?}: {e}", cmd.get_program()))
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    assert!(out.status.success(), "{cmd:?} failed: {}", text(&out));
    out
}

fn manifest(rel: &str) -> Value {
    deploy::yaml_document(&repo().join(rel)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The Kubernetes objects shipped: every YAML file of deploy/kubernetes
/// and below except the kustomizations.
fn kubernetes_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in ["deploy/kubernetes", "deploy/kubernetes/uninstall"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml")
                && p.file_name().is_some_and(|n| n != "kustomization.yaml")
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

// ---- manifests ----

/// Kubernetes versions the manifests must be valid for: the oldest whose
/// KubeletConfiguration takes containerRuntimeEndpoint, one in between,
/// and the newest the validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.27.0", "1.32.0", "1.37.0"];

#[test]
fn manifests_validate_against_the_kubernetes_schemas() {
    let validator = match deploy::kubernetes_validate() {
        Ok(v) => v,
        Err(e) => {
            eprintln!(
                "SKIPPED manifests_validate_against_the_kubernetes_schemas: no schema validator: {e:#}"
            );
            return;
        }
    };
    let files = kubernetes_files();
    assert!(files.len() >= 4, "manifests: {files:?}");
    for version in KUBERNETES_VERSIONS {
        let out = run(Command::new(&validator)
            .args(["--strict", "--kubernetes-version", version])
            .args(&files));
        assert!(
            out.status.success(),
            "the manifests are not valid Kubernetes {version} (strict: no unknown fields): {}",
            text(&out)
        );
        let said = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        for f in &files {
            assert!(
                said.contains(&format!("{} passed", f.display())),
                "{} was not validated against {version}: {said}",
                f.display()
            );
        }
    }
    // The validator is strict: a misspelt field fails it.
    let work = tempfile::tempdir().unwrap();
    let bad = work.path().join("daemonset.yaml");
    let ds = std::fs::read_to_string(repo().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    std::fs::write(&bad, ds.replace("hostPID: true", "hostPid: true")).unwrap();
    let out = run(Command::new(&validator)
        .args(["--strict", "--kubernetes-version", "1.37.0"])
        .arg(&bad));
    assert!(
        !out.status.success(),
        "a DaemonSet with `hostPid` passed: {}",
        text(&out)
    );
}

/// The DaemonSet's pod spec.
fn pod_spec(ds: &Value) -> &Value {
    &ds["spec"]["template"]["spec"]
}

fn container<'a>(ds: &'a Value, list: &str, name: &str) -> &'a Value {
    pod_spec(ds)[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {list} entry {name:?}"))
}

fn env_of(c: &Value) -> BTreeMap<String, String> {
    c["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["name"].as_str().unwrap().to_string(),
                        e["value"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The hostPath of every volume mount of container `c`: (mount path, host
/// path, volume).
fn host_mounts<'a>(ds: &'a Value, c: &'a Value) -> Vec<(String, String, &'a Value, &'a Value)> {
    let volumes = pod_spec(ds)["volumes"].as_array().expect("volumes");
    c["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .map(|m| {
            let v = volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .unwrap_or_else(|| panic!("volume mount {m} names no volume"));
            let path = v["hostPath"]["path"]
                .as_str()
                .unwrap_or_else(|| panic!("volume {v} is not a hostPath"));
            (
                m["mountPath"].as_str().unwrap().to_string(),
                path.to_string(),
                m,
                v,
            )
        })
        .collect()
}

/// The node installer's needs, on the parsed manifests.
#[test]
fn manifests_keep_the_node_installer_invariants() {
    let ns = manifest("deploy/kubernetes/namespace.yaml");
    assert_eq!(ns["kind"], "Namespace");
    let namespace = ns["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "privileged pods need a privileged Pod Security level"
    );
    let sa = manifest("deploy/kubernetes/serviceaccount.yaml");
    assert_eq!(sa["kind"], "ServiceAccount");
    assert_eq!(sa["metadata"]["namespace"], namespace);
    assert_eq!(sa["automountServiceAccountToken"], false);
    for f in kubernetes_files() {
        for doc in deploy::yaml_documents(&f).unwrap() {
            let kind = doc["kind"].as_str().unwrap_or_default();
            assert!(
                !kind.contains("Role"),
                "{}: the installer calls no API, it needs no {kind}",
                f.display()
            );
        }
    }

    let files = deploy::image_files(&repo()).unwrap();
    let in_image = |p: &str| files.iter().any(|f| format!("/{}", f.path) == p);
    let image_config = repo().join("deploy/image/config.toml");

    for (rel, init, main, label, subcommand) in [
        (
            "deploy/kubernetes/daemonset.yaml",
            "install",
            "health",
            "berth.dev/runtime",
            "install",
        ),
        (
            "deploy/kubernetes/uninstall/daemonset.yaml",
            "uninstall",
            "done",
            "berth.dev/uninstall",
            "uninstall",
        ),
    ] {
        let ds = manifest(rel);
        assert_eq!(ds["kind"], "DaemonSet", "{rel}");
        assert_eq!(ds["metadata"]["namespace"], namespace, "{rel}");
        let spec = &ds["spec"];
        for (k, v) in spec["selector"]["matchLabels"].as_object().unwrap() {
            assert_eq!(
                &spec["template"]["metadata"]["labels"][k], v,
                "{rel}: selector {k}"
            );
        }
        assert_eq!(spec["updateStrategy"]["type"], "RollingUpdate", "{rel}");
        let pod = pod_spec(&ds);
        assert_eq!(pod["nodeSelector"][label], "true", "{rel}: node label");
        assert_eq!(
            pod["hostPID"], true,
            "{rel}: nsenter --target 1 needs hostPID"
        );
        assert_eq!(pod["hostNetwork"], true, "{rel}: no pod network needed");
        assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"], "{rel}");
        assert_eq!(pod["automountServiceAccountToken"], false, "{rel}");
        assert!(
            pod["tolerations"].as_array().is_some_and(|t| t
                .iter()
                .any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
            "{rel}: a node's runtime installer tolerates every taint"
        );
        let c = container(&ds, "initContainers", init);
        assert_eq!(
            strings(&c["command"]),
            ["/berth/berth-node", subcommand],
            "{rel}: {init}"
        );
        assert!(in_image("/berth/berth-node"));
        assert_eq!(c["securityContext"]["privileged"], true, "{rel}: {init}");
        let env = env_of(c);
        assert_eq!(env["BERTH_HOST_ROOT"], "/host", "{rel}");
        assert_eq!(
            env["BERTH_SYSTEMD"], "yes",
            "{rel}: a node without systemd must fail loudly"
        );
        let mounts = host_mounts(&ds, c);
        for dir in deploy::HOST_DIRS {
            let m = mounts
                .iter()
                .find(|(_, host, _, _)| host == dir)
                .unwrap_or_else(|| panic!("{rel}: {init} does not mount the host's {dir}"));
            assert_eq!(
                m.0,
                format!("/host{dir}"),
                "{rel}: {dir} seen at BERTH_HOST_ROOT{dir}"
            );
            let writable = *dir != "/var/lib/berth";
            assert_eq!(
                m.2["readOnly"].as_bool().unwrap_or(false),
                !writable,
                "{rel}: {dir} writable: {writable}"
            );
            if dir.starts_with("/run/") || dir.starts_with("/var/lib/") {
                assert_eq!(
                    m.2["mountPropagation"], "HostToContainer",
                    "{rel}: {dir} holds berthd's mounts: their unmounts must reach the pod"
                );
            }
        }
        let main_c = container(&ds, "containers", main);
        assert_eq!(main_c["image"], c["image"], "{rel}: one image");
        assert!(
            c["image"]
                .as_str()
                .unwrap()
                .starts_with("registry.invalid/berth/berth:"),
            "{rel}: the placeholder image kustomization.yaml sets"
        );
        let kustomization = manifest(&format!(
            "{}/kustomization.yaml",
            Path::new(rel).parent().unwrap().display()
        ));
        let resources = strings(&kustomization["resources"]);
        assert!(
            resources.contains(
                &Path::new(rel)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            ),
            "{rel} is not in its kustomization: {resources:?}"
        );
        assert_eq!(
            kustomization["images"][0]["name"],
            c["image"].as_str().unwrap().split(':').next().unwrap(),
            "{rel}: kustomization.yaml sets the image"
        );
    }
    let kustomization = manifest("deploy/kubernetes/kustomization.yaml");
    let mut resources = strings(&kustomization["resources"]);
    resources.sort();
    let mut shipped: Vec<String> = kubernetes_files()
        .iter()
        .filter(|p| p.parent().unwrap().ends_with("deploy/kubernetes"))
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    shipped.sort();
    assert_eq!(
        resources, shipped,
        "kustomization.yaml lists every manifest"
    );

    let ds = manifest("deploy/kubernetes/daemonset.yaml");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1,
        "one node's runtime restarts at a time"
    );
    let health = container(&ds, "containers", "health");
    assert_eq!(
        strings(&health["command"]),
        ["/berth/berth-node", "health", "--loop"]
    );
    assert_eq!(
        strings(&health["readinessProbe"]["exec"]["command"]),
        ["/berth/berth-node", "health"]
    );
    let mounts = host_mounts(&ds, health);
    for dir in ["/usr/local/bin", "/etc/berth", "/run/berth"] {
        assert!(
            mounts.iter().any(|(at, host, m, _)| host == dir
                && *at == format!("/host{dir}")
                && m["readOnly"] == true),
            "the health check reads the host's {dir}, read-only"
        );
    }

    // The unit.
    let unit = Unit::load(&repo().join("deploy/systemd/berthd.service")).unwrap();
    let s = |k: &str| {
        unit.get("Service", k)
            .unwrap_or_else(|| panic!("the unit has no {k}"))
    };
    assert_eq!(
        s("KillMode"),
        "process",
        "restarts must leave shims and containers"
    );
    assert_eq!(s("Delegate"), "yes");
    assert!(s("LimitNOFILE").parse::<u64>().unwrap() >= 1 << 20);
    assert!(s("OOMScoreAdjust").parse::<i32>().unwrap() <= -900);
    assert_eq!(s("Restart"), "on-failure");
    assert_eq!(s("RuntimeDirectory"), "berth");
    assert_eq!(
        s("RuntimeDirectoryPreserve"),
        "yes",
        "containers outlive a stop: so must their state"
    );
    assert_eq!(s("StateDirectory"), "berth");
    assert_eq!(
        unit.exec_start().unwrap(),
        [
            "/usr/local/bin/berthd",
            "--config",
            "/etc/berth/config.toml"
        ]
    );
    assert_eq!(unit.get("Install", "WantedBy"), Some("multi-user.target"));

    // The config berthd gets on a node: berthd itself parses it (unknown
    // keys are refused), and its dirs are the unit's.
    let out = run_ok(
        Command::new(bin_dir().join("berthd"))
            .arg("--config")
            .arg(&image_config)
            .args(["config", "show"]),
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("root_dir = \"/var/lib/berth\""), "{shown}");
    assert!(shown.contains("state_dir = \"/run/berth\""), "{shown}");
    assert!(shown.contains("conf_dir = \"/etc/cni/net.d\""), "{shown}");
    assert!(shown.contains("\"/opt/cni/bin\""), "{shown}");

    // The conflist names only plugins the image installs.
    let conflist: Value = serde_json::from_slice(
        &std::fs::read(repo().join("deploy/image/99-berth.conflist")).unwrap(),
    )
    .unwrap();
    let mut types = vec![];
    for p in conflist["plugins"].as_array().unwrap() {
        types.push(p["type"].as_str().unwrap().to_string());
        if let Some(ipam) = p["ipam"]["type"].as_str() {
            types.push(ipam.to_string());
        }
    }
    for t in &types {
        assert!(
            in_image(&format!("/berth/cni/bin/{t}")),
            "the image has no CNI plugin {t}"
        );
    }

    // Kubelet and crictl talk to the socket the config gives.
    let socket = "unix:///run/berth/berth.sock";
    let kubelet = manifest("deploy/kubelet/kubelet-config.yaml");
    assert_eq!(kubelet["kind"], "KubeletConfiguration");
    assert_eq!(kubelet["apiVersion"], "kubelet.config.k8s.io/v1beta1");
    assert_eq!(kubelet["containerRuntimeEndpoint"], socket);
    assert_eq!(kubelet["imageServiceEndpoint"], socket);
    assert_eq!(kubelet["cgroupDriver"], "cgroupfs");
    let crictl = manifest("deploy/kubelet/crictl.yaml");
    assert_eq!(crictl["runtime-endpoint"], socket);
    assert_eq!(crictl["image-endpoint"], socket);

    // berth-node is plain POSIX sh, for the image's busybox and the host's
    // dash alike.
    let script = repo().join("deploy/image/berth-node");
    for shell in [vec!["sh", "-n"], vec!["busybox", "sh", "-n"]] {
        run_ok(Command::new(shell[0]).args(&shell[1..]).arg(&script));
    }
    // The image's other sources are there.
    for f in &files {
        if let deploy::Source::Repo(rel) = &f.source {
            assert!(
                repo().join(rel).is_file(),
                "{} names a missing {}",
                f.path,
                rel.display()
            );
        }
    }
}

/// The guide names the commands and paths the tests use.
#[test]
fn the_operator_guide_shows_what_the_tests_run() {
    let guide = std::fs::read_to_string(repo().join("deploy/README.md")).unwrap();
    for needle in [
        "scripts/build-image REGISTRY/berth/berth:TAG",
        "scripts/build-image --tree DIR",
        "kubectl label node NODE berth.dev/runtime=true",
        "kubectl apply -k deploy/kubernetes",
        "kubectl apply -k deploy/kubernetes/uninstall",
        "kubectl label node NODE berth.dev/uninstall=true",
        "crictl --config /etc/berth/crictl.yaml info",
        "berth-node health",
        "berth-node uninstall",
        "berth-node uninstall --force",
        "--purge",
        "BERTH_SYSTEMD=no DIR/berth/berth-node install",
        "BERTH_SYSTEMD=no berth-node uninstall",
        "/usr/local/bin/berthd --config /etc/berth/config.toml",
        "kubectl -n berth-system rollout undo daemonset/berth",
        "journalctl -u berthd",
        "/etc/berth/install-manifest",
    ] {
        assert!(
            guide.contains(needle),
            "deploy/README.md does not show {needle:?}"
        );
    }
    for f in expected_install() {
        assert!(
            guide.contains(&f.0),
            "deploy/README.md does not say where {} goes",
            f.0
        );
    }
}

// ---- the image, run by Berth as the DaemonSet's pod ----

/// Every file `berth-node install` puts on a plain node (no other CNI
/// config, no foreign plugins): host path, mode, and where it comes from.
fn expected_install() -> Vec<(String, u32, PathBuf)> {
    let bins = bin_dir();
    let r = repo();
    let mut v: Vec<(String, u32, PathBuf)> = vec![];
    for b in ["berthd", "berth-shim", "berth-container"] {
        v.push((format!("/usr/local/bin/{b}"), 0o755, bins.join(b)));
    }
    v.push((
        "/usr/local/bin/berth-node".into(),
        0o755,
        r.join("deploy/image/berth-node"),
    ));
    for p in ["bridge", "host-local", "portmap", "loopback"] {
        v.push((format!("/opt/cni/bin/{p}"), 0o755, bins.join(p)));
    }
    v.push((
        "/etc/systemd/system/berthd.service".into(),
        0o644,
        r.join("deploy/systemd/berthd.service"),
    ));
    v.push((
        "/etc/berth/config.toml".into(),
        0o644,
        r.join("deploy/image/config.toml"),
    ));
    v.push((
        "/etc/berth/crictl.yaml".into(),
        0o644,
        r.join("deploy/kubelet/crictl.yaml"),
    ));
    v.push((
        "/etc/cni/net.d/99-berth.conflist".into(),
        0o644,
        r.join("deploy/image/99-berth.conflist"),
    ));
    v
}

fn sha_of(p: &Path) -> String {
    berth_e2e::images::sha256_digest(
        &std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())),
    )
}

/// The files under `host` are exactly the expected install plus the
/// manifest, with the expected content and modes.
fn assert_installed(host: &Path) {
    let mut want: Vec<String> = expected_install()
        .iter()
        .map(|(p, _, _)| p.trim_start_matches('/').to_string())
        .collect();
    want.push("etc/berth/install-manifest".into());
    want.sort();
    assert_eq!(
        deploy::files_under(host).unwrap(),
        want,
        "files installed under {}",
        host.display()
    );
    let manifest = std::fs::read_to_string(host.join("etc/berth/install-manifest")).unwrap();
    for (path, mode, src) in expected_install() {
        let at = host.join(path.trim_start_matches('/'));
        assert_eq!(sha_of(&at), sha_of(&src), "{path} is not {}", src.display());
        let got = std::fs::metadata(&at).unwrap().permissions().mode() & 0o7777;
        assert_eq!(got, mode, "{path} mode {got:o}");
        let sha = sha_of(&src);
        let line = format!("{} {mode:04o} {path}", sha.trim_start_matches("sha256:"));
        assert!(
            manifest.lines().any(|l| l == line),
            "the manifest lacks {line:?}:\n{manifest}"
        );
    }
}

/// A Berth container config for `c` (an entry of a DaemonSet's pod), as
/// kubelet would send it, with its host paths under `host`: command, env
/// (`overrides` on top), privileged, host PID/network namespaces, mounts.
fn daemonset_container(
    ds: &Value,
    c: &Value,
    image: &str,
    attempt: u32,
    host: &Path,
    overrides: &[(&str, &str)],
) -> ContainerConfig {
    let mut cmd = strings(&c["command"]);
    if let Some(args) = c.get("args") {
        cmd.extend(strings(args));
    }
    let name = c["name"].as_str().unwrap();
    let mut config = container_config(
        name,
        image,
        &cmd.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    config.metadata.as_mut().unwrap().attempt = attempt;
    config.log_path = format!("{name}-{attempt}.log");
    let mut vars = env_of(c);
    for (k, v) in overrides {
        vars.insert(k.to_string(), v.to_string());
    }
    config.envs = vars
        .into_iter()
        .map(|(key, value)| KeyValue { key, value })
        .collect();
    for (at, path, m, v) in host_mounts(ds, c) {
        let on_host = host.join(path.trim_start_matches('/'));
        match v["hostPath"]["type"].as_str().unwrap_or_default() {
            "DirectoryOrCreate" => std::fs::create_dir_all(&on_host).unwrap(),
            "Directory" => assert!(
                on_host.is_dir(),
                "hostPath {path} (type Directory) is missing"
            ),
            other => panic!("hostPath type {other:?} is not handled here"),
        }
        let propagation = match m["mountPropagation"].as_str() {
            Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => MountPropagation::PropagationBidirectional,
            _ => MountPropagation::PropagationPrivate,
        };
        config.mounts.push(Mount {
            container_path: at,
            host_path: on_host.display().to_string(),
            readonly: m["readOnly"].as_bool().unwrap_or(false),
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    let sc = security_context(&mut config);
    sc.privileged = c["securityContext"]["privileged"]
        .as_bool()
        .unwrap_or(false);
    let pod = pod_spec(ds);
    sc.namespace_options = Some(NamespaceOption {
        network: if pod["hostNetwork"] == true {
            NamespaceMode::Node
        } else {
            NamespaceMode::Pod
        } as i32,
        pid: if pod["hostPID"] == true {
            NamespaceMode::Node
        } else {
            NamespaceMode::Container
        } as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    });
    config
}

/// A pod config for a DaemonSet's pod: host network and PID as it asks,
/// privileged when a container is.
fn daemonset_pod(env: &PodEnv, ds: &Value, name: &str) -> PodSandboxConfig {
    let mut pod = env.pod_config(name);
    let spec = pod_spec(ds);
    let ns = pod_namespace_options(&mut pod);
    if spec["hostNetwork"] == true {
        ns.network = NamespaceMode::Node as i32;
    }
    if spec["hostPID"] == true {
        ns.pid = NamespaceMode::Node as i32;
    }
    pod.linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .privileged = true;
    pod
}

/// Runs a container to its exit; returns its exit code and log text.
async fn run_to_exit(env: &mut PodEnv, pod: &str, config: &ContainerConfig) -> (i32, String) {
    let id = env.run(pod, config).await;
    let status = env.wait_exited(&id).await;
    let log = stream_text(&read_cri_log(&env.log_file(pod, config)), "stdout")
        + &stream_text(&read_cri_log(&env.log_file(pod, config)), "stderr");
    env.remove_container(&id).await.unwrap();
    (status.exit_code, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_image_installs_as_the_daemonset_pod_and_uninstalls() {
    require_root();
    let mut env = PodEnv::start().await;
    // The documented build, from the debug binaries, to the harness registry.
    let reference = format!("{}/berth/berth:e2e", env.registry.addr);
    let started = std::time::Instant::now();
    let out = run_ok(
        Command::new(repo().join("scripts/build-image"))
            .arg("--bin-dir")
            .arg(bin_dir())
            .arg("--insecure")
            .arg(&reference),
    );
    let pushed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        pushed.starts_with(&format!("{reference}@sha256:")),
        "build-image printed {pushed:?}"
    );
    eprintln!("image built and pushed in {:?}", started.elapsed());
    // Pulled by Berth.
    let pulled = env.pull(&reference).await;
    eprintln!("pulled {pulled} after {:?}", started.elapsed());

    let host = tempfile::Builder::new()
        .prefix("berth-deploy-host-")
        .tempdir()
        .unwrap();
    // A systemd host has /etc/systemd/system (the DaemonSet wants it).
    std::fs::create_dir_all(host.path().join("etc/systemd/system")).unwrap();
    let ds = manifest("deploy/kubernetes/daemonset.yaml");
    let install = container(&ds, "initContainers", "install");
    // The test host's PID 1 is not this root's: never reach for systemd.
    let no_systemd = [("BERTH_SYSTEMD", "no")];
    let pod = env.run_pod(&daemonset_pod(&env, &ds, "berth")).await;

    let config = daemonset_container(&ds, install, &reference, 0, host.path(), &no_systemd);
    let (code, log) = run_to_exit(&mut env, &pod, &config).await;
    assert_eq!(code, 0, "the install container failed:\n{log}");
    assert!(log.contains("installed /usr/local/bin/berthd"), "{log}");
    assert!(
        log.contains("berthd is not running; without systemd start it with"),
        "{log}"
    );
    assert_installed(host.path());

    // Once more, as a restarted pod: nothing changes.
    let before = deploy::snapshot(host.path()).unwrap();
    let config = daemonset_container(&ds, install, &reference, 1, host.path(), &no_systemd);
    let (code, log) = run_to_exit(&mut env, &pod, &config).await;
    assert_eq!(code, 0, "the second install failed:\n{log}");
    assert!(log.contains("0 file(s) changed"), "{log}");
    let after = deploy::snapshot(host.path()).unwrap();
    for (path, was) in &before {
        assert_eq!(
            after.get(path),
            Some(was),
            "the second install changed {path}"
        );
    }
    assert_eq!(before.len(), after.len(), "the second install added files");

    // The uninstall DaemonSet's container removes it all.
    let uds = manifest("deploy/kubernetes/uninstall/daemonset.yaml");
    let uninstall = container(&uds, "initContainers", "uninstall");
    let config = daemonset_container(&uds, uninstall, &reference, 0, host.path(), &no_systemd);
    let (code, log) = run_to_exit(&mut env, &pod, &config).await;
    assert_eq!(code, 0, "the uninstall container failed:\n{log}");
    assert!(log.contains("uninstalled"), "{log}");
    assert_eq!(
        deploy::files_under(host.path()).unwrap(),
        Vec::<String>::new(),
        "left after uninstall:\n{log}"
    );
    // /etc/berth itself is the pod's hostPath mount point: only the host's
    // side (through nsenter, with systemd) can remove it.
    assert!(
        !host.path().join("etc/berth").exists()
            || std::fs::read_dir(host.path().join("etc/berth"))
                .unwrap()
                .next()
                .is_none(),
        "/etc/berth is left with files"
    );
    env.stop_pod(&pod).await.unwrap();
    env.remove_pod(&pod).await.unwrap();
}

// ---- the installer's rules, on a tree of stand-in binaries ----

/// Stand-in binaries (shell scripts; the CNI ones carry Berth's plugin
/// marker) in `dir`, one of them with `tag` in it.
fn fake_bins(dir: &Path, tag: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for b in [
        "berthd",
        "berth-shim",
        "berth-container",
        "bridge",
        "host-local",
        "portmap",
        "loopback",
    ] {
        std::fs::write(
            dir.join(b),
            format!("#!/bin/sh\n# {b} {tag}\n# berth-cni-plugin-binary/v1\necho {b} --version\n"),
        )
        .unwrap();
        std::fs::set_permissions(dir.join(b), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn berth_node(tree: &Path, host: &Path, args: &[&str]) -> Output {
    run(Command::new(tree.join("berth/berth-node"))
        .args(args)
        .env("BERTH_HOST_ROOT", host)
        .env("BERTH_SYSTEMD", "no"))
}

#[test]
fn installer_keeps_what_is_not_berths() {
    require_root();
    let work = tempfile::Builder::new()
        .prefix("berth-deploy-rules-")
        .tempdir()
        .unwrap();
    let (bins, tree) = (work.path().join("bin"), work.path().join("tree"));
    fake_bins(&bins, "v1");
    deploy::write_tree(&repo(), &bins, &tree).unwrap();
    let host = work.path().join("host");
    // A node with the cluster's CNI: its config and a reference bridge.
    std::fs::create_dir_all(host.join("etc/cni/net.d")).unwrap();
    std::fs::write(
        host.join("etc/cni/net.d/10-cluster.conflist"),
        "{\"cniVersion\":\"1.0.0\",\"name\":\"cluster\",\"plugins\":[{\"type\":\"bridge\"}]}",
    )
    .unwrap();
    std::fs::create_dir_all(host.join("opt/cni/bin")).unwrap();
    std::fs::write(
        host.join("opt/cni/bin/bridge"),
        "#!/bin/sh\necho the reference bridge\n",
    )
    .unwrap();

    let out = berth_node(&tree, &host, &["install"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("kept /opt/cni/bin/bridge: a CNI plugin that is not Berth's"),
        "{said}"
    );
    assert!(
        said.contains("not installing /etc/cni/net.d/99-berth.conflist"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("opt/cni/bin/bridge")).unwrap(),
        "#!/bin/sh\necho the reference bridge\n"
    );
    assert!(!host.join("etc/cni/net.d/99-berth.conflist").exists());
    let manifest = std::fs::read_to_string(host.join("etc/berth/install-manifest")).unwrap();
    assert!(!manifest.contains("/opt/cni/bin/bridge"), "{manifest}");
    assert!(manifest.contains("/opt/cni/bin/portmap"), "{manifest}");

    // The operator edits the config; a file an earlier version shipped
    // sits in the manifest; a new berthd comes.
    let config = host.join("etc/berth/config.toml");
    let edited = std::fs::read_to_string(&config).unwrap()
        + "\n[streaming]\naddress = \"127.0.0.1:10010\"\n";
    std::fs::write(&config, &edited).unwrap();
    let old_tool = host.join("usr/local/bin/berth-old-tool");
    std::fs::write(&old_tool, "old\n").unwrap();
    std::fs::write(
        host.join("etc/berth/install-manifest"),
        format!(
            "{manifest}{} 0755 /usr/local/bin/berth-old-tool\n",
            sha_of(&old_tool).trim_start_matches("sha256:")
        ),
    )
    .unwrap();
    fake_bins(&bins, "v2");
    std::fs::remove_dir_all(&tree).unwrap();
    deploy::write_tree(&repo(), &bins, &tree).unwrap();
    let out = berth_node(&tree, &host, &["install"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("installed /usr/local/bin/berthd"), "{said}");
    assert!(
        said.contains("removed /usr/local/bin/berth-old-tool (no longer shipped)"),
        "{said}"
    );
    assert!(!old_tool.exists());
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        edited,
        "an upgrade overwrote the operator's config"
    );
    assert!(
        std::fs::read_to_string(host.join("usr/local/bin/berthd"))
            .unwrap()
            .contains("v2")
    );

    // Berth still has a container here (a live shim): uninstall refuses.
    let shim_dir = host.join("run/berth/shims/c0ffee");
    std::fs::create_dir_all(&shim_dir).unwrap();
    let mut shim = Command::new("bash")
        .args(["-c", "exec -a berth-shim sleep 60"])
        .spawn()
        .unwrap();
    std::fs::write(shim_dir.join("shim.pid"), shim.id().to_string()).unwrap();
    assert!(
        eventually_sync(|| cmdline(shim.id() as i32).is_some_and(|c| c.starts_with("berth-shim"))),
        "the stand-in shim did not start"
    );
    let out = berth_node(&tree, &host, &["uninstall"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("refusing to uninstall"), "{said}");
    assert!(said.contains("container c0ffee (running"), "{said}");
    assert!(
        host.join("usr/local/bin/berthd").exists(),
        "a refused uninstall removed files"
    );
    // --force goes on and leaves the container be.
    let out = berth_node(&tree, &host, &["uninstall", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("--force: uninstalling although"), "{said}");
    assert!(
        said.contains("kept /etc/berth/config.toml: changed since it was installed"),
        "{said}"
    );
    assert!(
        pid_alive(shim.id() as i32),
        "--force killed the container's shim"
    );
    let _ = shim.kill();
    let _ = shim.wait();
    std::fs::remove_dir_all(host.join("run")).unwrap();
    let mut left = deploy::files_under(&host).unwrap();
    left.sort();
    assert_eq!(
        left,
        [
            "etc/berth/config.toml",
            "etc/cni/net.d/10-cluster.conflist",
            "opt/cni/bin/bridge"
        ],
        "only the operator's and the cluster's files stay:\n{said}"
    );
    let out = berth_node(&tree, &host, &["uninstall"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("nothing to uninstall"),
        "{}",
        text(&out)
    );
}

fn eventually_sync(mut check: impl FnMut() -> bool) -> bool {
    berth_e2e::process::wait_until(Duration::from_secs(5), &mut check)
}

// ---- an upgrade under a running container ----

/// What the upgrade test leaves behind if it fails: processes in the
/// namespace (the MountNs drop), the container's cgroups.
struct CgroupCleanup(String);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        for _ in 0..100 {
            let pids = cgroup_tree_pids(&self.0);
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for dir in cgroup_dirs(&self.0) {
            remove_tree(&dir);
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// berth-node from the host's /usr/local/bin (or `program`), inside `ns`,
/// on a host without systemd.
fn in_ns(ns: &MountNs, program: &str, args: &[&str]) -> Output {
    run(ns
        .command(program)
        .args(args)
        .env("BERTH_SYSTEMD", "no")
        .env_remove("BERTH_HOST_ROOT"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_swaps_berthd_under_a_running_container() {
    require_root();
    let work = tempfile::Builder::new()
        .prefix("berth-deploy-upgrade-")
        .tempdir()
        .unwrap();
    let registry = Registry::start().unwrap();
    let busybox = Image::new(
        vec![busybox_layer().unwrap()],
        &ImageSettings {
            cmd: vec!["sh".into()],
            ..Default::default()
        },
    )
    .push(&registry, "berth-test/busybox", "latest", work.path())
    .unwrap();

    // The "old" release: the same binaries, berthd with a few bytes more.
    let new_bins = bin_dir();
    let old_bins = old_release(work.path(), &["berth-image"]);
    // The documented tree build (an image's files, for a host without Kubernetes).
    let (old_tree, new_tree) = (work.path().join("old"), work.path().join("new"));
    for (bins, tree) in [(&old_bins, &old_tree), (&new_bins, &new_tree)] {
        run_ok(
            Command::new(repo().join("scripts/build-image"))
                .arg("--bin-dir")
                .arg(bins)
                .arg("--tree")
                .arg(tree),
        );
    }

    let host = work.path().join("host");
    let ns = MountNs::new(&host).unwrap();
    let cgroup_parent = format!("/berth-e2e/deploy-upgrade-{}", random_hex(4));
    let _cgroups = CgroupCleanup(cgroup_parent.clone());

    // Install the old release and start berthd as its unit does.
    let out = in_ns(
        &ns,
        &old_tree.join("berth/berth-node").display().to_string(),
        &["install"],
    );
    assert!(
        out.status.success(),
        "install the old release: {}",
        text(&out)
    );
    assert_eq!(
        std::fs::read(host.join("usr/local/bin/berthd")).unwrap(),
        std::fs::read(old_bins.join("berthd")).unwrap()
    );
    let unit = Unit::load(&host.join("etc/systemd/system/berthd.service")).unwrap();
    let socket = host.join("run/berth/berth.sock");
    let log = work.path().join("berthd.log");
    let mut old = UnitProcess::start(&ns, &unit, &log).unwrap();
    old.wait_ready(&socket, Duration::from_secs(30)).unwrap();
    let old_pid = old.pid().unwrap() as i32;
    if old.not_applied.is_empty() {
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{old_pid}/oom_score_adj"))
                .unwrap()
                .trim(),
            unit.get("Service", "OOMScoreAdjust").unwrap()
        );
        let limits = std::fs::read_to_string(format!("/proc/{old_pid}/limits")).unwrap();
        let nofile = unit.get("Service", "LimitNOFILE").unwrap();
        assert!(
            limits
                .lines()
                .any(|l| l.starts_with("Max open files")
                    && l.split_whitespace().nth(3) == Some(nofile)),
            "{limits}"
        );
    } else {
        eprintln!("this machine did not allow: {:?}", old.not_applied);
    }
    let health = in_ns(&ns, "/usr/local/bin/berth-node", &["health"]);
    assert!(
        health.status.success(),
        "health with the old berthd: {}",
        text(&health)
    );
    assert!(
        text(&health).contains(&format!("ok: berthd (pid {old_pid})")),
        "{}",
        text(&health)
    );

    // A container under the old berthd.
    let mut client = CriClient::connect(&socket).await.unwrap();
    client
        .image
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: busybox.reference.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let logs = work.path().join("pod-logs");
    let pod_config = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "app".into(),
            uid: format!("uid-{}", random_hex(4)),
            namespace: "berth-e2e".into(),
            attempt: 0,
        }),
        hostname: "app".into(),
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: cgroup_parent.clone(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = client
        .runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(pod_config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .pod_sandbox_id;
    let ctr_config = sh_config(
        "app",
        &busybox.reference,
        "trap 'exit 0' TERM; echo started; while :; do sleep 0.2; done",
    );
    let ctr = client
        .runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ctr_config.clone()),
            sandbox_config: Some(pod_config.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    client
        .runtime
        .start_container(StartContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .unwrap();
    let status = |resp: ContainerStatusResponse| {
        let info: Value = serde_json::from_str(&resp.info["info"]).unwrap();
        (resp.status.unwrap(), info["pid"].as_i64().unwrap() as i32)
    };
    let verbose = ContainerStatusRequest {
        container_id: ctr.clone(),
        verbose: true,
    };
    let (s, pid) = status(
        client
            .runtime
            .container_status(verbose.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(s.state, RUNNING as i32);
    let shim = shim_pid(&host.join("run/berth"), &ctr).expect("the container's shim pid");

    // The new release goes in while the old berthd runs.
    let out = in_ns(
        &ns,
        &new_tree.join("berth/berth-node").display().to_string(),
        &["install"],
    );
    assert!(
        out.status.success(),
        "install the new release: {}",
        text(&out)
    );
    let said = text(&out);
    assert!(said.contains("installed /usr/local/bin/berthd"), "{said}");
    assert!(
        said.contains("1 file(s) changed"),
        "only berthd differs: {said}"
    );
    assert!(
        said.contains(&format!("berthd (pid {old_pid}) still runs the old binary")),
        "{said}"
    );
    assert_eq!(
        sha_of(&host.join("usr/local/bin/berthd")),
        sha_of(&new_bins.join("berthd"))
    );
    let health = in_ns(&ns, "/usr/local/bin/berth-node", &["health"]);
    assert!(
        !health.status.success(),
        "health must see the stale berthd: {}",
        text(&health)
    );
    assert!(
        text(&health).contains("does not run the installed /usr/local/bin/berthd"),
        "{}",
        text(&health)
    );

    // systemctl restart with KillMode=process: SIGTERM to berthd alone,
    // then ExecStart again.
    let stopped = old
        .stop(Duration::from_secs(15))
        .expect("the old berthd stopped");
    assert!(
        stopped.success(),
        "the old berthd exited with {stopped}:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(pid_alive(pid), "the container died with the old berthd");
    assert!(pid_alive(shim), "the shim died with the old berthd");
    let mut new = UnitProcess::start(&ns, &unit, &log).unwrap();
    new.wait_ready(&socket, Duration::from_secs(30)).unwrap();
    let health = in_ns(&ns, "/usr/local/bin/berth-node", &["health"]);
    assert!(
        health.status.success(),
        "health with the new berthd: {}",
        text(&health)
    );

    // The new berthd manages the container: same process, status, exec,
    // then (after a refused uninstall) stop and remove.
    let mut client = CriClient::connect(&socket).await.unwrap();
    let (s, pid_now) = status(
        client
            .runtime
            .container_status(verbose.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(s.state, RUNNING as i32, "after the upgrade: {s:?}");
    assert_eq!(pid_now, pid, "the container's pid changed over the upgrade");
    assert_eq!(shim_pid(&host.join("run/berth"), &ctr), Some(shim));
    let exec = client
        .runtime
        .exec_sync(ExecSyncRequest {
            container_id: ctr.clone(),
            cmd: vec!["echo".into(), "still here".into()],
            timeout: 30,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(String::from_utf8_lossy(&exec.stdout), "still here\n");

    let out = in_ns(&ns, "/usr/local/bin/berth-node", &["uninstall"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "uninstall with a running container: {}",
        text(&out)
    );
    assert!(
        text(&out).contains(&format!("container {ctr} (running")),
        "{}",
        text(&out)
    );
    assert!(
        new.try_status().is_none(),
        "a refused uninstall stopped berthd"
    );
    assert!(host.join("usr/local/bin/berthd").exists());

    client
        .runtime
        .stop_container(StopContainerRequest {
            container_id: ctr.clone(),
            timeout: 10,
        })
        .await
        .unwrap();
    let (s, _) = status(
        client
            .runtime
            .container_status(verbose.clone())
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(s.state, ContainerState::ContainerExited as i32, "{s:?}");
    assert_eq!(s.exit_code, 0, "the container's TERM trap ran: {s:?}");
    assert!(!pid_alive(pid));
    client
        .runtime
        .remove_container(RemoveContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .unwrap();
    client
        .runtime
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    client
        .runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    drop(client);

    // Now uninstall (with berthd's data) stops berthd and leaves nothing.
    let out = in_ns(&ns, "/usr/local/bin/berth-node", &["uninstall", "--purge"]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    let exited = new
        .wait_exit(Duration::from_secs(20))
        .expect("uninstall stopped berthd");
    assert!(exited.success(), "berthd exited with {exited}");
    let left = deploy::files_under(&host).unwrap();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "left after uninstall --purge: {}",
        text(&out)
    );
    assert!(
        eventually_sync(|| ns.processes().is_empty()),
        "processes left in the namespace: {:?}",
        ns.processes()
    );
}

// ---- the systemd path: nsenter from a pod to the host's systemctl ----

/// berth-node run as the DaemonSet runs it (host root seen elsewhere,
/// BERTH_SYSTEMD=yes) against a host whose PID 1 is a stand-in systemd.
fn from_pod(host: &deploy::FakeSystemdHost, root: &Path, program: &Path, args: &[&str]) -> Output {
    run(host
        .command(&program.display().to_string())
        .args(args)
        .env("BERTH_HOST_ROOT", root)
        .env("BERTH_SYSTEMD", "yes"))
}

#[test]
fn systemd_path_starts_restarts_and_stops_berthd_through_nsenter() {
    require_root();
    let work = tempfile::Builder::new()
        .prefix("berth-deploy-systemd-")
        .tempdir()
        .unwrap();
    let new_bins = bin_dir();
    let old_bins = old_release(work.path(), &[]);
    let (old_tree, new_tree) = (work.path().join("old"), work.path().join("new"));
    for (bins, tree) in [(&old_bins, &old_tree), (&new_bins, &new_tree)] {
        deploy::write_tree(&repo(), bins, tree).unwrap();
    }
    let root = work.path().join("host");
    let ns = MountNs::new(&root).unwrap();
    let host = deploy::FakeSystemdHost::new(&ns, &work.path().join("systemd")).unwrap();
    let old_node = old_tree.join("berth/berth-node");
    let new_node = new_tree.join("berth/berth-node");

    // First install: the unit is new (daemon-reload), enabled, and berthd
    // started; the installer waits until it serves.
    let out = from_pod(&host, &root, &old_node, &["install"]);
    assert!(
        out.status.success(),
        "install: {}\n{}",
        text(&out),
        host.journal()
    );
    let said = text(&out);
    assert!(said.contains("ok: berthd (pid"), "{said}");
    assert_eq!(
        host.take_calls(),
        [
            "daemon-reload",
            "enable --quiet berthd.service",
            "restart berthd.service"
        ]
    );
    let first = host.main_pid().unwrap();

    // The same image again (a restarted pod): berthd is only asked to be
    // running.
    let out = from_pod(&host, &root, &old_node, &["install"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("0 file(s) changed"), "{}", text(&out));
    assert_eq!(
        host.take_calls(),
        ["enable --quiet berthd.service", "start berthd.service"]
    );
    assert_eq!(
        host.main_pid(),
        Some(first),
        "an unchanged install restarted berthd"
    );

    // A new berthd: checked on the host (--version, through nsenter),
    // swapped, berthd restarted; the unit did not change.
    let out = from_pod(&host, &root, &new_node, &["install"]);
    assert!(
        out.status.success(),
        "upgrade: {}\n{}",
        text(&out),
        host.journal()
    );
    let said = text(&out);
    assert!(said.contains("installed /usr/local/bin/berthd"), "{said}");
    assert!(
        said.contains("restarting berthd (KillMode=process"),
        "{said}"
    );
    assert_eq!(
        host.take_calls(),
        ["enable --quiet berthd.service", "restart berthd.service"]
    );
    assert_ne!(host.main_pid(), Some(first), "berthd was not restarted");
    let health = from_pod(&host, &root, &new_node, &["health"]);
    assert!(health.status.success(), "{}", text(&health));

    // A new berthd the host cannot run never replaces the working one.
    let broken = work.path().join("broken-bin");
    std::fs::create_dir_all(&broken).unwrap();
    for b in [
        "berth-container",
        "bridge",
        "host-local",
        "portmap",
        "loopback",
    ] {
        std::os::unix::fs::symlink(new_bins.join(b), broken.join(b)).unwrap();
    }
    // A new shim comes with it: it must not go in either.
    let mut shim = std::fs::read(new_bins.join("berth-shim")).unwrap();
    shim.extend_from_slice(b"\n# berth e2e: a shim for the broken berthd\n");
    std::fs::write(broken.join("berth-shim"), shim).unwrap();
    std::fs::set_permissions(
        broken.join("berth-shim"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(
        broken.join("berthd"),
        "#!/bin/sh\necho 'berthd: cannot run here' >&2\nexit 127\n",
    )
    .unwrap();
    std::fs::set_permissions(
        broken.join("berthd"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let broken_tree = work.path().join("broken");
    deploy::write_tree(&repo(), &broken, &broken_tree).unwrap();
    let out = from_pod(
        &host,
        &root,
        &broken_tree.join("berth/berth-node"),
        &["install"],
    );
    assert!(
        !out.status.success(),
        "a berthd that does not run was installed: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("/usr/local/bin/berthd does not run on this host"),
        "{}",
        text(&out)
    );
    assert_eq!(
        sha_of(&root.join("usr/local/bin/berthd")),
        sha_of(&new_bins.join("berthd"))
    );
    assert_eq!(
        sha_of(&root.join("usr/local/bin/berth-shim")),
        sha_of(&new_bins.join("berth-shim")),
        "the shim of a berthd that does not run went in"
    );
    for b in ["berthd", "berth-shim"] {
        assert!(!root.join(format!("usr/local/bin/{b}.berth-new")).exists());
    }
    assert!(
        host.take_calls().is_empty(),
        "systemd was asked to act on a failed install"
    );

    // Uninstall: stopped and disabled, the files gone, systemd reloaded.
    let out = from_pod(&host, &root, &new_node, &["uninstall"]);
    assert!(out.status.success(), "uninstall: {}", text(&out));
    assert_eq!(
        host.take_calls(),
        ["disable --now --quiet berthd.service", "daemon-reload"]
    );
    assert_eq!(
        deploy::files_under(&root.join("usr")).unwrap(),
        Vec::<String>::new()
    );
    assert_eq!(
        deploy::files_under(&root.join("etc")).unwrap(),
        Vec::<String>::new()
    );
    assert!(!host.journal().is_empty());
}

/// An "old" release in `<work>/old-bin`: the workspace's binaries (and
/// `extra` ones) linked, berthd copied with a few bytes more, so an upgrade
/// to the real binaries changes berthd's checksum.
fn old_release(work: &Path, extra: &[&str]) -> PathBuf {
    let new_bins = bin_dir();
    let old_bins = work.join("old-bin");
    std::fs::create_dir_all(&old_bins).unwrap();
    let shared = [
        "berth-shim",
        "berth-container",
        "bridge",
        "host-local",
        "portmap",
        "loopback",
    ];
    for b in shared.iter().chain(extra) {
        std::os::unix::fs::symlink(new_bins.join(b), old_bins.join(b)).unwrap();
    }
    let mut old_berthd = std::fs::read(new_bins.join("berthd")).unwrap();
    old_berthd.extend_from_slice(b"\n# berth e2e: the old build\n");
    std::fs::write(old_bins.join("berthd"), &old_berthd).unwrap();
    std::fs::set_permissions(
        old_bins.join("berthd"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    old_bins
}
