//! The development default networks pods, and a config without a usable
//! network refuses them (issue 13, "Dev default with a network").
//!
//! - berthd on `deploy/dev.toml` (what `scripts/run-berthd` runs), on
//!   temporary dirs with a bridge and subnet of the test's own, finds
//!   Berth's plugins beside its binary, writes its default conflist into
//!   its (temporary) conf dir, and gives a pod an address the host reaches.
//! - With an empty conf dir, a pod that is not host-network is refused with
//!   FailedPrecondition naming the conf dir, and nothing of it is left; a
//!   host-network pod still runs.
//! - A conflist naming a plugin (or an IPAM plugin) that is in no bin dir
//!   is refused naming the plugin before any plugin runs.
//!
//! Traffic goes only to the test pod's address, after net-guard is on and
//! the host routes the address through the test bridge
//! ([`TestNet::assert_routed`]); the [`TestNet`] removes the bridge and any
//! rule naming its subnet when dropped (declared first, dropped last).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::berthd::{ConfigBase, berthd_bin, dev_config, toml_path};
use berth_e2e::net::*;
use berth_e2e::pods::*;
use berth_e2e::{BerthdOptions, CniOptions};
use tonic::Code;

// ---- helpers ----

fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn status(env: &mut PodEnv) -> StatusResponse {
    env.client
        .runtime
        .status(StatusRequest { verbose: true })
        .await
        .expect("Status")
        .into_inner()
}

fn network_condition(s: &StatusResponse) -> RuntimeCondition {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.iter().find(|c| c.r#type == "NetworkReady"))
        .cloned()
        .unwrap_or_else(|| panic!("no NetworkReady condition: {s:?}"))
}

/// The pod's IPv4 address from PodSandboxStatus.
async fn pod_ip(env: &mut PodEnv, pod_id: &str) -> String {
    env.pod_status(pod_id)
        .await
        .unwrap_or_else(|e| panic!("PodSandboxStatus {pod_id}: {e:?}"))
        .network
        .unwrap_or_else(|| panic!("pod {pod_id} has no network status"))
        .ip
}

/// From the host: connect to `addr`, send `line`, read the reply to EOF.
fn exchange(addr: SocketAddr, line: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("{line}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// `berthd config show` on a harness berthd's config: the effective config.
fn config_show(d: &berth_e2e::Berthd) -> String {
    let out = std::process::Command::new(berthd_bin().unwrap())
        .arg("--config")
        .arg(&d.config_path)
        .args(["config", "show"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "berthd config show: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What a refused RunPodSandbox must not leave: a sandbox dir, a CNI
/// cache file, a mount (the namespace pins) under the state dir, the pod's
/// cgroup, a record.
async fn assert_pod_left_nothing(env: &mut PodEnv, config: &PodSandboxConfig) {
    let state = env.d.state_dir();
    assert_eq!(
        dir_names(&state.join("sandboxes")),
        Vec::<String>::new(),
        "sandbox dirs left"
    );
    assert_eq!(
        dir_names(&state.join("cni")),
        Vec::<String>::new(),
        "CNI cache files left"
    );
    let mounts = mounts_under(&state);
    assert!(
        mounts.is_empty(),
        "mounts (namespace pins) left: {mounts:?}"
    );
    let parent = &config.linux.as_ref().unwrap().cgroup_parent;
    assert_eq!(
        cgroup_dirs(parent),
        Vec::<PathBuf>::new(),
        "the pod cgroup {parent} was made"
    );
    let pods = env.list_pods(None).await;
    assert!(pods.is_empty(), "sandboxes are listed: {pods:?}");
}

// ---- the development default ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_config_gives_a_pod_an_address_the_host_reaches() {
    let net = TestNet::new(Plugins::Berth);
    let mut env = PodEnv::start().await;
    // berthd again, on deploy/dev.toml with the test's dirs, bridge and
    // subnet (the harness sets root_dir, state_dir and cni.conf_dir).
    env.d
        .reconfigure(ConfigBase {
            toml: dev_config().unwrap(),
            cni: vec![
                ("default_bridge".into(), quoted(&net.bridge)),
                ("default_subnet".into(), quoted(&net.subnet())),
            ],
        })
        .await
        .expect("restart berthd on deploy/dev.toml");
    env.reconnect().await;
    let config_text = std::fs::read_to_string(&env.d.config_path).unwrap();
    assert!(
        !config_text.contains("bin_dirs") && !config_text.contains("allow_loopback_only"),
        "the test config sets what dev.toml should decide:\n{config_text}"
    );

    // The conflist berthd wrote into its conf dir.
    let conflist_path = env.d.cni_conf_dir().join("10-berth.conflist");
    let conflist: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&conflist_path)
            .unwrap_or_else(|e| panic!("{}: {e}", conflist_path.display())),
    )
    .unwrap();
    let bridge = &conflist["plugins"][0];
    assert_eq!(bridge["type"], "bridge", "{conflist}");
    assert_eq!(bridge["bridge"], net.bridge.as_str(), "{conflist}");
    assert_eq!(bridge["isGateway"], true, "{conflist}");
    assert_eq!(bridge["ipam"]["type"], "host-local", "{conflist}");
    assert_eq!(
        bridge["ipam"]["ranges"][0][0]["subnet"],
        net.subnet().as_str(),
        "{conflist}"
    );
    let ipam_dir = PathBuf::from(bridge["ipam"]["dataDir"].as_str().unwrap_or_default());
    assert!(
        ipam_dir.starts_with(env.d.state_dir()),
        "host-local keeps its data outside berthd's state dir: {conflist}"
    );

    // NetworkReady, with Berth's plugins found beside berthd first.
    let s = status(&mut env).await;
    let ready = network_condition(&s);
    assert!(ready.status, "NetworkReady is false: {ready:?}");
    let effective: serde_json::Value = serde_json::from_str(&s.info["config"]).unwrap();
    let beside = berthd_bin()
        .unwrap()
        .parent()
        .unwrap()
        .display()
        .to_string();
    assert_eq!(
        effective["cni"]["bin_dirs"][0].as_str(),
        Some(beside.as_str()),
        "berthd's dir is not searched first: {}",
        effective["cni"]
    );
    for plugin in CORE_PLUGINS {
        assert!(Path::new(&beside).join(plugin).is_file(), "{plugin}");
    }

    let pod = env.run_pod(&env.pod_config("dev-net")).await;
    let ip = pod_ip(&mut env, &pod).await;
    assert!(
        net.contains(&ip),
        "pod ip {ip:?} is not in the test subnet {}",
        net.subnet()
    );
    assert_ne!(ip, net.gateway().to_string());
    let (_, bridge_addrs, _) = run("ip", &["-4", "-o", "addr", "show", "dev", &net.bridge]);
    assert_eq!(
        parse_inet(&bridge_addrs).as_deref(),
        Some(net.gateway().to_string().as_str()),
        "the bridge {} has no host address: {bridge_addrs:?}",
        net.bridge
    );
    assert_eq!(
        dir_names(&ipam_dir.join("berth"))
            .into_iter()
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect::<Vec<_>>(),
        vec![ip.clone()],
        "host-local allocations in {}",
        ipam_dir.display()
    );

    // The pod answers each line it is sent on :8080.
    let server = env
        .run(
            &pod,
            &container_config(
                "server",
                &env.busybox(),
                &[
                    "nc",
                    "-ll",
                    "-p",
                    "8080",
                    "-e",
                    "sh",
                    "-c",
                    "read l; echo \"pod got $l\"",
                ],
            ),
        )
        .await;
    env.wait_listening(&server, 8080).await;

    net.assert_routed(&ip);
    let addr = SocketAddr::new(ip.parse().unwrap(), 8080);
    let token = format!("hello-{}", random_hex(6));
    let deadline = Instant::now() + Duration::from_secs(15);
    let reply = loop {
        let line = token.clone();
        let got = tokio::task::spawn_blocking(move || exchange(addr, &line))
            .await
            .unwrap();
        match got {
            Ok(s) if s.contains(&token) => break s,
            other => assert!(
                Instant::now() < deadline,
                "the host could not talk to {addr}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reply.trim(), format!("pod got {token}"));

    env.stop_pod(&pod).await.unwrap();
    env.remove_pod(&pod).await.unwrap();
    assert_eq!(net.bridge_ports(), Vec::<String>::new(), "links left");
    assert_eq!(
        dir_names(&ipam_dir.join("berth"))
            .into_iter()
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect::<Vec<_>>(),
        Vec::<String>::new(),
        "addresses left allocated"
    );
    let rules = net.rules_mentioning(&[&pod]);
    assert!(rules.is_empty(), "rules left: {rules:?}");
}

// ---- refusals ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_conf_dir_refuses_pods_naming_it_and_host_network_pods_run() {
    // Plugins configured, no loopback opt-in, nothing in the conf dir.
    let mut env = PodEnv::start_with_cni(
        BerthdOptions::default(),
        CniOptions {
            bin_dirs: vec![Plugins::Berth.dir()],
            ..Default::default()
        },
    )
    .await;
    assert!(config_show(&env.d).contains("allow_loopback_only = false"));
    let conf_dir = env.d.cni_conf_dir().display().to_string();
    assert_eq!(dir_names(&env.d.cni_conf_dir()), Vec::<String>::new());

    let ready = network_condition(&status(&mut env).await);
    assert!(!ready.status);
    assert!(ready.message.contains(&conf_dir), "{ready:?}");

    let config = env.pod_config("dev-no-net");
    let err = env
        .try_run_pod(&config)
        .await
        .expect_err("RunPodSandbox without a network config");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&conf_dir),
        "the refusal does not name the conf dir {conf_dir}: {err:?}"
    );
    assert_pod_left_nothing(&mut env, &config).await;
    // Refused again the same way: the name was released.
    let err = env.try_run_pod(&config).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_pod_left_nothing(&mut env, &config).await;

    // A host-network pod needs no CNI: it runs, and so does its container.
    let mut host = env.pod_config("dev-host-net");
    pod_namespace_options(&mut host).network = NamespaceMode::Node as i32;
    let pod = env.run_pod(&host).await;
    let ctr = env
        .run(
            &pod,
            &container_config("sleeper", &env.busybox(), &["sleep", "3600"]),
        )
        .await;
    assert_eq!(
        env.status(&ctr).await.state,
        ContainerState::ContainerRunning as i32
    );
    env.stop_pod(&pod).await.unwrap();
    env.remove_pod(&pod).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflist_naming_a_missing_plugin_refuses_the_pod_naming_it() {
    let net = TestNet::new(Plugins::Berth);
    let mut env = PodEnv::start_with_cni(BerthdOptions::default(), net.cni_options(None)).await;
    let dirs = [net.fake_bin_dir(), Plugins::Berth.dir()];

    // A missing plugin in the chain, then a missing IPAM plugin.
    let mut missing_plugin = net.standard_plugins(false);
    missing_plugin.insert(1, serde_json::json!({"type": "e2e-no-such-plugin"}));
    let mut missing_ipam = net.standard_plugins(false);
    missing_ipam[0]["ipam"]["type"] = "e2e-no-such-ipam".into();
    let config = env.pod_config("dev-missing");
    for (list, name) in [
        (missing_plugin, "e2e-no-such-plugin"),
        (missing_ipam, "e2e-no-such-ipam"),
    ] {
        let conflist = net.write_conflist(&env.d.cni_conf_dir(), list);
        let ready = network_condition(&status(&mut env).await);
        assert!(!ready.status && ready.message.contains(name), "{ready:?}");

        let err = env
            .try_run_pod(&config)
            .await
            .expect_err("RunPodSandbox with a missing plugin");
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let message = err.message();
        assert!(
            message.contains(&format!("\"{name}\"")),
            "does not name {name}: {err:?}"
        );
        assert!(
            message.contains(&conflist.display().to_string()),
            "does not name the conflist: {err:?}"
        );
        for dir in &dirs {
            assert!(
                message.contains(&dir.display().to_string()),
                "does not name the searched dir {}: {err:?}",
                dir.display()
            );
        }
        // No plugin ran: the bridge plugin (first in the list) made nothing.
        assert!(!net.bridge_exists(), "the bridge plugin ran");
        assert_eq!(net.allocations(), Vec::<String>::new());
        assert_pod_left_nothing(&mut env, &config).await;
    }

    // With the plugins there, the same pod gets its address.
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(false));
    let pod = env.run_pod(&config).await;
    let ip = pod_ip(&mut env, &pod).await;
    assert!(net.contains(&ip), "{ip}");
    assert_eq!(net.allocations(), vec![ip]);
    env.stop_pod(&pod).await.unwrap();
    env.remove_pod(&pod).await.unwrap();
    assert_eq!(net.allocations(), Vec::<String>::new());
    assert_eq!(net.bridge_ports(), Vec::<String>::new());
}

/// The config the harness gives a test that asked for no CNI opts in to
/// loopback-only pods; asking for plugins, or a config base, does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_opts_in_to_loopback_only_only_without_cni() {
    berth_e2e::require_root();
    let plain = berth_e2e::Berthd::start(BerthdOptions::default())
        .await
        .unwrap();
    let with_cni = berth_e2e::Berthd::start_with_cni(
        BerthdOptions::default(),
        CniOptions {
            bin_dirs: vec![Plugins::Berth.dir()],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let dev = berth_e2e::Berthd::start_from(
        ConfigBase {
            toml: dev_config().unwrap(),
            cni: vec![
                ("write_default_conflist".into(), "false".into()),
                ("search_berthd_dir".into(), "false".into()),
            ],
        },
        BerthdOptions::default(),
        CniOptions::default(),
    )
    .await
    .unwrap();
    assert!(config_show(&plain).contains("allow_loopback_only = true"));
    assert!(config_show(&with_cni).contains("allow_loopback_only = false"));
    let dev_shown = config_show(&dev);
    assert!(
        dev_shown.contains("allow_loopback_only = false"),
        "{dev_shown}"
    );
    // The harness's dirs replaced dev.toml's.
    assert!(
        dev_shown.contains(&format!("conf_dir = {}", toml_path(&dev.cni_conf_dir()))),
        "{dev_shown}"
    );
    assert!(!dev_shown.contains("/var/lib/berth"), "{dev_shown}");
}
