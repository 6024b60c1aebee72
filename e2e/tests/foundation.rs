//! berthd as a user meets it: the CRI socket, Version/Status/RuntimeConfig,
//! refusals, config handling and restarts. Real process, real socket.

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use berth_cri::v1::*;
use berth_e2e::berthd::berthd_bin;
use berth_e2e::{Berthd, BerthdOptions, require_root};
use tonic::Code;

async fn started() -> Berthd {
    require_root();
    Berthd::start(BerthdOptions::default())
        .await
        .expect("start berthd")
}

fn condition(status: &StatusResponse, kind: &str) -> RuntimeCondition {
    status
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {status:?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_status_and_runtime_config_answer() {
    let d = started().await;
    let mut c = d.client().await.unwrap();

    let v = c
        .runtime
        .version(VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_name, "berth");
    assert_eq!(v.runtime_api_version, "v1");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));

    let s = c
        .runtime
        .status(StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let runtime = condition(&s, "RuntimeReady");
    assert!(runtime.status, "{runtime:?}");
    let network = condition(&s, "NetworkReady");
    assert!(
        !network.status,
        "no CNI config yet, so not ready: {network:?}"
    );
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(
        network.message.contains("no CNI network config"),
        "{}",
        network.message
    );
    assert!(s.info.is_empty(), "info only when verbose");
    assert_eq!(s.runtime_handlers.len(), 1);
    assert_eq!(s.runtime_handlers[0].name, "");
    assert!(s.runtime_handlers[0].features.is_some());

    let verbose = c
        .runtime
        .status(StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let config: serde_json::Value = serde_json::from_str(&verbose.info["config"]).unwrap();
    assert_eq!(config["root_dir"], d.root_dir().display().to_string());
    let cgroup: serde_json::Value = serde_json::from_str(&verbose.info["cgroup"]).unwrap();
    assert_eq!(cgroup["driver"], "cgroupfs");
    let version = if berth_e2e::pods::cgroup_v2() {
        "v2"
    } else {
        "v1"
    };
    assert_eq!(cgroup["version"], version, "the cgroup version in use");

    let rc = c
        .runtime
        .runtime_config(RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rc.linux.unwrap().cgroup_driver(), CgroupDriver::Cgroupfs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_cidr_is_stored_validated_and_survives_restart() {
    let mut d = started().await;
    let mut c = d.client().await.unwrap();
    let update = |cidr: &str| UpdateRuntimeConfigRequest {
        runtime_config: Some(RuntimeConfig {
            network_config: Some(NetworkConfig {
                pod_cidr: cidr.into(),
            }),
        }),
    };
    c.runtime
        .update_runtime_config(update("10.244.1.0/24"))
        .await
        .unwrap();
    let err = c
        .runtime
        .update_runtime_config(update("10.244.1.0/99"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    // kubelet sends an empty CIDR on syncs that change nothing.
    c.runtime.update_runtime_config(update("")).await.unwrap();

    d.stop();
    d.restart().await.unwrap();
    let mut c = d.client().await.unwrap();
    let s = c
        .runtime
        .status(StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.info["podCIDR"], "\"10.244.1.0/24\"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_ready_follows_the_cni_conf_dir_without_restart() {
    require_root();
    let d = Berthd::start_with_cni(
        BerthdOptions::default(),
        berth_e2e::CniOptions {
            bin_dirs: vec!["/usr/lib/cni".into()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut c = d.client().await.unwrap();
    let ready = |s: &StatusResponse| condition(s, "NetworkReady").status;
    let s = c
        .runtime
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!ready(&s));

    // A config naming a plugin that is not installed is not ready either.
    let conf = d.cni_conf_dir().join("10-berth.conflist");
    std::fs::write(
        &conf,
        r#"{"cniVersion":"1.0.0","name":"berth","plugins":[{"type":"bridge","bridge":"berth0"},{"type":"no-such-plugin"}]}"#,
    )
    .unwrap();
    let s = c
        .runtime
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!ready(&s));
    let message = condition(&s, "NetworkReady").message;
    assert!(message.contains("no-such-plugin"), "{message}");

    std::fs::write(
        &conf,
        r#"{"cniVersion":"1.0.0","name":"berth","plugins":[{"type":"bridge","bridge":"berth0"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
    )
    .unwrap();
    let s = c
        .runtime
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(ready(&s), "{s:?}");

    std::fs::remove_file(&conf).unwrap();
    let s = c
        .runtime
        .status(StatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!ready(&s));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwired_rpcs_answer_unimplemented_with_their_name() {
    let d = started().await;
    let mut c = d.client().await.unwrap();
    // Streaming is served now: a bad request is refused as such.
    let err = c
        .runtime
        .attach(AttachRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let err = c
        .runtime
        .checkpoint_container(CheckpointContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(
        err.message().contains("CheckpointContainer"),
        "{}",
        err.message()
    );
    // The daemon is still fine afterwards.
    c.runtime.version(VersionRequest::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_root_only() {
    let d = started().await;
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(
        meta.mode() & 0o7777,
        0o660,
        "socket mode {:o}",
        meta.mode() & 0o7777
    );
    assert_eq!((meta.uid(), meta.gid()), (0, 0));
    let dir = std::fs::metadata(d.socket.parent().unwrap()).unwrap();
    assert_eq!(dir.uid(), 0);
    assert_eq!(
        dir.mode() & 0o022,
        0,
        "socket dir mode {:o}",
        dir.mode() & 0o7777
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_writable_socket_dir_is_refused() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "root_dir = \"{0}/root\"\nstate_dir = \"{0}/state\"\nsocket_path = \"{0}/open/berth.sock\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(berthd_bin().unwrap())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("writable only by root"), "{stderr}");
    assert!(!open.join("berth.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_socket_exits_with_a_clear_message() {
    let d = started().await;
    let (status, stderr) = d.run_once(&[]).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("another berthd is already serving"),
        "{stderr}"
    );
    assert!(stderr.contains(&d.socket.display().to_string()), "{stderr}");
    // The first one is unharmed and its socket still there.
    let mut c = d.client().await.unwrap();
    c.runtime.version(VersionRequest::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_and_sigkill_leaves_a_stale_socket_that_is_replaced() {
    let mut d = started().await;
    let status = d.stop().expect("berthd stopped");
    assert!(status.success(), "SIGTERM exit: {status}");
    assert!(!d.socket.exists(), "socket removed on clean exit");

    d.restart().await.unwrap();
    d.kill9();
    assert!(d.socket.exists(), "a killed daemon leaves its socket file");
    d.restart().await.unwrap();
    let mut c = d.client().await.unwrap();
    c.runtime.version(VersionRequest::default()).await.unwrap();
    assert!(d.log().contains("removing stale socket"));
}

/// Socket inodes of `pid` that are listening TCP sockets.
fn tcp_listeners(pid: u32) -> Vec<String> {
    let mut inodes = std::collections::HashSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(fd.path()) {
            let t = target.display().to_string();
            if let Some(inode) = t.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) {
                inodes.insert(inode.to_string());
            }
        }
    }
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // st 0A is LISTEN; column 9 is the inode.
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                found.push(format!("{table}: {}", cols[1]));
            }
        }
    }
    found
}

/// By default berthd's only TCP listener is the streaming server, on
/// loopback: nothing is reachable from another machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_listens_on_a_non_loopback_tcp_port() {
    let d = started().await;
    let listeners = tcp_listeners(d.pid().unwrap());
    let loopback = |l: &String| {
        l.contains("/proc/net/tcp: 0100007F:")
            || l.contains("/proc/net/tcp6: 00000000000000000000000001000000:")
    };
    assert!(
        listeners.iter().all(loopback),
        "berthd listens beyond loopback: {listeners:?}"
    );
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    // And that listener is the streaming server of the URLs it hands out.
    let mut c = d.client().await.unwrap();
    let err = c
        .runtime
        .port_forward(PortForwardRequest {
            pod_sandbox_id: "no-such-pod".into(),
            port: vec![80],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[test]
fn config_default_is_complete_and_parses_back() {
    let out = Command::new(berthd_bin().unwrap())
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "root_dir = \"/var/lib/berth\"",
        "state_dir = \"/run/berth\"",
        "[log]",
        "format = \"text\"",
        "driver = \"cgroupfs\"",
        "conf_dir = \"/etc/cni/net.d\"",
        "bin_dirs",
        "[registry]",
        "insecure",
        "ca_files",
        "[streaming]",
    ] {
        assert!(text.contains(key), "default config lacks {key}:\n{text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, &text).unwrap();
    let shown = Command::new(berthd_bin().unwrap())
        .arg("--config")
        .arg(&file)
        .args(["config", "show"])
        .output()
        .unwrap();
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
}

#[test]
fn config_overrides_apply_and_bad_keys_are_named_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "state_dir = \"/tmp/berth-x\"\n[log]\nformat = \"json\"\n",
    )
    .unwrap();
    let out = Command::new(berthd_bin().unwrap())
        .arg("--config")
        .arg(&file)
        .args(["config", "show"])
        .output()
        .unwrap();
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(shown.contains("state_dir = \"/tmp/berth-x\""), "{shown}");
    assert!(shown.contains("format = \"json\""), "{shown}");
    assert!(
        shown.contains("root_dir = \"/var/lib/berth\""),
        "defaults kept: {shown}"
    );

    std::fs::write(
        &file,
        "root_dir = \"/tmp/r\"\n\n[cni]\nconf_dirr = \"/x\"\n",
    )
    .unwrap();
    let out = Command::new(berthd_bin().unwrap())
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("conf_dirr") && stderr.contains("line 4"),
        "{stderr}"
    );

    let out = Command::new(berthd_bin().unwrap())
        .args(["--config", "/nonexistent/berth.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/berth.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_an_rpc_span() {
    let mut d = started().await;
    // Rewrite the config for JSON logs and restart on the same dirs.
    let text = std::fs::read_to_string(&d.config_path)
        .unwrap()
        .replace("[log]\n", "[log]\nformat = \"json\"\n");
    std::fs::write(&d.config_path, text).unwrap();
    d.stop();
    d.restart().await.unwrap();
    let mut c = d.client().await.unwrap();
    set_pod_cidr(&mut c, "10.9.0.0/16").await;
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("pod CIDR updated"))
        .unwrap_or_else(|| panic!("no log line for the update:\n{log}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(
        v["span"]["rpc"], "/runtime.v1.RuntimeService/UpdateRuntimeConfig",
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_log_file_holds_no_escape_sequence() {
    let d = started().await;
    let mut c = d.client().await.unwrap();
    set_pod_cidr(&mut c, "10.9.0.0/16").await;
    let log = d.log();
    assert!(log.contains("pod CIDR updated"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "berthd wrote terminal escape codes into its log file:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cri_call_is_logged_with_its_code_and_duration() {
    let d = started().await;
    let mut c = d.client().await.unwrap();
    c.runtime.version(VersionRequest::default()).await.unwrap();
    let err = c
        .runtime
        .container_status(ContainerStatusRequest {
            container_id: "no-such-container".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let log = d.log();
    let line = |method: &str| {
        log.lines()
            .find(|l| l.contains("CRI call") && l.contains(method))
            .unwrap_or_else(|| panic!("no log line for {method}:\n{log}"))
            .to_string()
    };
    let ok = line("/runtime.v1.RuntimeService/Version");
    assert!(
        ok.contains("DEBUG") && ok.contains("code=Ok") && ok.contains("duration_us="),
        "{ok}"
    );
    let failed = line("/runtime.v1.RuntimeService/ContainerStatus");
    assert!(
        failed.contains("WARN")
            && failed.contains("code=NotFound")
            && failed.contains("no-such-container"),
        "the failure, its code and its message: {failed}"
    );
}

/// UpdateRuntimeConfig with `cidr` as the pod CIDR.
async fn set_pod_cidr(c: &mut berth_e2e::cri::CriClient, cidr: &str) {
    c.runtime
        .update_runtime_config(UpdateRuntimeConfigRequest {
            runtime_config: Some(RuntimeConfig {
                network_config: Some(NetworkConfig {
                    pod_cidr: cidr.into(),
                }),
            }),
        })
        .await
        .unwrap();
}
