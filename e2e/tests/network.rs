//! Pod networking through CNI, as kubelet drives it: pods on a bridge
//! network talking TCP to each other, a host port on 127.0.0.1, host-network
//! pods, failing and hanging plugins, a berthd crash between RunPodSandbox
//! and StopPodSandbox, and many pods coming and going, first with Debian's
//! reference plugins (/usr/lib/cni), then the core checks with Berth's own
//! (crate `cni`, built next to berthd).
//!
//! Every test has a bridge, a 10.223.N.0/24 subnet and a host-local dataDir
//! of its own ([`TestNet`]); no masquerade and no routes beyond the subnet in
//! the pods. Traffic goes only to 127.0.0.1 and to pod addresses, and only
//! after net-guard is on and the host routes the pod address through the
//! test bridge ([`TestNet::assert_routed`]).
//!
//! NetworkReady following the conf dir is covered in foundation.rs.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_cri::v1::*;
use berth_e2e::net::*;
use berth_e2e::pods::*;
use tonic::Code;

// ---- helpers ----

/// A PodEnv whose berthd runs `net`'s plugins. Declare the TestNet first so
/// it is dropped after the PodEnv (berthd's DEL runs before the bridge goes).
async fn start_env(net: &TestNet, plugin_timeout_secs: Option<u64>) -> PodEnv {
    PodEnv::start_with_cni(
        berth_e2e::BerthdOptions::default(),
        net.cni_options(plugin_timeout_secs),
    )
    .await
}

fn cache_file(env: &PodEnv, pod_id: &str) -> PathBuf {
    env.d.state_dir().join("cni").join(format!("{pod_id}.json"))
}

/// Files left in berthd's CNI cache dir.
fn cache_files(env: &PodEnv) -> Vec<String> {
    std::fs::read_dir(env.d.state_dir().join("cni"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn sandbox_dirs(env: &PodEnv) -> Vec<String> {
    std::fs::read_dir(env.d.state_dir().join("sandboxes"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The host end of the pod's veth, from berthd's cached ADD result: the
/// interface with no sandbox that is not the bridge.
fn host_veth(env: &PodEnv, net: &TestNet, pod_id: &str) -> String {
    let path = cache_file(env, pod_id);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("CNI cache {} of a running pod: {e}", path.display()));
    let cached: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ifaces = cached["result"]["interfaces"]
        .as_array()
        .unwrap_or_else(|| panic!("cached result has no interfaces: {text}"));
    ifaces
        .iter()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .filter_map(|i| i["name"].as_str())
        .find(|n| *n != net.bridge)
        .unwrap_or_else(|| panic!("no host veth in the cached result: {text}"))
        .to_string()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Whether `line` names `ip` as a whole address (10.223.5.2 is not in
/// 10.223.5.20).
fn mentions_ip(line: &str, ip: &str) -> bool {
    line.match_indices(ip).any(|(i, _)| {
        let before = line[..i].chars().last();
        let after = line[i + ip.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_digit() || c == '.')
            && !after.is_some_and(|c| c.is_ascii_digit())
    })
}

/// Packet-filter rules naming the sandbox id or its address.
fn pod_rules(pod_id: &str, ip: &str) -> Vec<String> {
    let mut v = rules_mentioning(&[pod_id]);
    v.extend(
        rules_mentioning(&[ip])
            .into_iter()
            .filter(|l| mentions_ip(l, ip)),
    );
    v
}

/// The pod's IPv4 address from PodSandboxStatus; it must be in the test
/// subnet.
async fn pod_ip(env: &mut PodEnv, net: &TestNet, pod_id: &str) -> String {
    let status = env
        .pod_status(pod_id)
        .await
        .unwrap_or_else(|e| panic!("PodSandboxStatus {pod_id}: {e:?}"));
    let network = status
        .network
        .unwrap_or_else(|| panic!("pod {pod_id} has no network status"));
    assert!(
        net.contains(&network.ip),
        "pod {pod_id} ip {:?} is not in the test subnet {}",
        network.ip,
        net.subnet()
    );
    assert!(
        network.additional_ips.is_empty(),
        "an IPv4-only network gave additional ips {:?}",
        network.additional_ips
    );
    network.ip
}

/// One TCP exchange from the host: connect, read until EOF.
fn fetch(port: u16) -> std::io::Result<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Fetches 127.0.0.1:`port` until the reply holds `token`.
async fn fetch_until(port: u16, token: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let got = tokio::task::spawn_blocking(move || fetch(port))
            .await
            .unwrap();
        match got {
            Ok(s) if s.contains(token) => return s,
            other => assert!(
                Instant::now() < deadline,
                "127.0.0.1:{port} did not answer {token:?} within {timeout:?}; last: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn random_host_port() -> u16 {
    loop {
        let p = 20000 + u16::from_str_radix(&random_hex(2), 16).unwrap() % 20000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

fn tcp_mapping(host_port: u16, container_port: u16) -> PortMapping {
    PortMapping {
        protocol: Protocol::Tcp as i32,
        container_port: container_port as i32,
        host_port: host_port as i32,
        host_ip: "127.0.0.1".into(),
    }
}

/// What a pod's network left behind once it is stopped: its cache file,
/// address, veth and rules must all be gone.
fn assert_network_released(env: &PodEnv, net: &TestNet, pod_id: &str, ip: &str, veth: &str) {
    assert!(
        !cache_file(env, pod_id).exists(),
        "the CNI cache of stopped pod {pod_id} is still there"
    );
    assert!(
        !net.allocations().contains(&ip.to_string()),
        "{ip} of stopped pod {pod_id} is still allocated in {} (owner {:?})",
        net.data_dir().display(),
        net.allocation_owner(ip)
    );
    assert!(
        !link_exists(veth),
        "veth {veth} of stopped pod {pod_id} still exists"
    );
    let rules = pod_rules(pod_id, ip);
    assert!(
        rules.is_empty(),
        "rules of stopped pod {pod_id} ({ip}) are left:\n{}",
        rules.join("\n")
    );
}

/// Nothing of any pod is left: no sandbox listed, no link on the bridge,
/// no address allocated, no rule naming the network or its subnet, no
/// cache file, no sandbox dir, no mount under the state dir.
async fn assert_nothing_left(env: &mut PodEnv, net: &TestNet) {
    let pods = env.list_pods(None).await;
    assert!(pods.is_empty(), "sandboxes are listed: {pods:?}");
    assert_eq!(
        net.bridge_ports(),
        Vec::<String>::new(),
        "links left on {}",
        net.bridge
    );
    assert_eq!(
        net.allocations(),
        Vec::<String>::new(),
        "addresses left allocated in {}",
        net.data_dir().display()
    );
    let rules = net.rules_mentioning(&[]);
    assert!(
        rules.is_empty(),
        "rules naming {} or {} are left:\n{}",
        net.name,
        net.subnet(),
        rules.join("\n")
    );
    assert_eq!(
        cache_files(env),
        Vec::<String>::new(),
        "CNI cache files left"
    );
    assert_eq!(sandbox_dirs(env), Vec::<String>::new(), "sandbox dirs left");
    let mounts = mounts_under(&env.d.state_dir());
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
}

// ---- two pods talk TCP over the bridge ----

async fn two_pods_exchange_tcp(plugins: Plugins) {
    let net = TestNet::new(plugins);
    let mut env = start_env(&net, None).await;
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(false));
    let bb = env.busybox();

    let a = env.run_pod(&env.pod_config("net-a")).await;
    let b = env.run_pod(&env.pod_config("net-b")).await;
    let ip_a = pod_ip(&mut env, &net, &a).await;
    let ip_b = pod_ip(&mut env, &net, &b).await;
    assert_ne!(ip_a, ip_b, "two pods got the same address");
    assert_ne!(ip_a, net.gateway().to_string());
    assert_ne!(ip_b, net.gateway().to_string());
    assert!(
        net.bridge_exists(),
        "the bridge {} was not created",
        net.bridge
    );
    let veth_a = host_veth(&env, &net, &a);
    let veth_b = host_veth(&env, &net, &b);
    assert_eq!(net.bridge_ports(), {
        let mut v = vec![veth_a.clone(), veth_b.clone()];
        v.sort();
        v
    });
    assert_eq!(
        net.allocations(),
        {
            let mut v = vec![ip_a.clone(), ip_b.clone()];
            v.sort();
            v
        },
        "host-local allocations"
    );
    assert_eq!(net.allocation_owner(&ip_a).as_deref(), Some(a.as_str()));

    // Pod A serves: every connection's first line is answered and recorded.
    let server = env
        .run(
            &a,
            &container_config(
                "server",
                &bb,
                &[
                    "nc",
                    "-ll",
                    "-p",
                    "8080",
                    "-e",
                    "sh",
                    "-c",
                    "read l; echo \"pod-a got $l\"; echo \"$l\" >> /tmp/received",
                ],
            ),
        )
        .await;
    let client = env
        .run(&b, &container_config("client", &bb, &["sleep", "3600"]))
        .await;

    // The address berthd reports is the one on eth0 in the pod, and the
    // pod's /etc/hosts names it.
    for (pod, ctr, ip, host) in [(&a, &server, &ip_a, "net-a"), (&b, &client, &ip_b, "net-b")] {
        let out = env.sh(ctr, "ip -4 -o addr show dev eth0").await;
        assert_eq!(
            parse_inet(&out).as_deref(),
            Some(ip.as_str()),
            "pod {pod}: eth0 has {out:?}, PodSandboxStatus says {ip}"
        );
        let hosts = env.sh(ctr, "cat /etc/hosts").await;
        assert!(
            hosts.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(ip.as_str()) && w.any(|n| n == host)
            }),
            "/etc/hosts of pod {pod} does not map {host} to {ip}:\n{hosts}"
        );
    }

    net.assert_routed(&ip_a);
    net.assert_routed(&ip_b);
    env.wait_listening(&server, 8080).await;
    let script = format!("echo hello-from-b | nc -w 5 {ip_a} 8080");
    let deadline = Instant::now() + Duration::from_secs(15);
    let reply = loop {
        let (out, err, code) = env.exec(&client, &["sh", "-c", &script]).await;
        if code == 0 && out.contains("pod-a got") {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "pod B could not talk to {ip_a}:8080: exit {code}, stdout {out:?}, stderr {err:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reply.trim(), "pod-a got hello-from-b");
    let received = env.sh(&server, "cat /tmp/received").await;
    assert_eq!(received, "hello-from-b\n");

    for (pod, ip, veth) in [(&a, &ip_a, &veth_a), (&b, &ip_b, &veth_b)] {
        env.stop_pod(pod).await.unwrap();
        assert_network_released(&env, &net, pod, ip, veth);
        // Stop again: DEL is idempotent.
        env.stop_pod(pod).await.unwrap();
        env.remove_pod(pod).await.unwrap();
    }
    assert_nothing_left(&mut env, &net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_two_pods_exchange_tcp_over_the_bridge() {
    two_pods_exchange_tcp(Plugins::Reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_exec_two_pods_exchange_tcp_over_the_bridge() {
    two_pods_exchange_tcp(Plugins::BerthExec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_exec_host_port_on_loopback_reaches_the_pod() {
    host_port_on_loopback_reaches_the_pod(Plugins::BerthExec).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_two_pods_exchange_tcp_over_the_bridge() {
    two_pods_exchange_tcp(Plugins::Berth).await;
}

// ---- a host port on 127.0.0.1 ----

async fn host_port_on_loopback_reaches_the_pod(plugins: Plugins) {
    let net = TestNet::new(plugins);
    let mut env = start_env(&net, None).await;
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(true));
    let bb = env.busybox();

    let host_port = random_host_port();
    let token = format!("reply-{}", random_hex(6));
    let mut config = env.pod_config("net-hostport");
    config.port_mappings = vec![tcp_mapping(host_port, 80)];
    let pod = env.run_pod(&config).await;
    let ip = pod_ip(&mut env, &net, &pod).await;
    let veth = host_veth(&env, &net, &pod);
    let server = env
        .run(
            &pod,
            &container_config("web", &bb, &["nc", "-ll", "-p", "80", "-e", "echo", &token]),
        )
        .await;
    env.wait_listening(&server, 80).await;
    let rules = pod_rules(&pod, &ip);
    assert!(
        !rules.is_empty(),
        "no packet-filter rule names pod {pod} or {ip}: portmap did not run?"
    );

    net.assert_routed(&ip);
    let got = fetch_until(host_port, &token, Duration::from_secs(15)).await;
    assert_eq!(got.trim(), token);

    env.stop_pod(&pod).await.unwrap();
    assert_network_released(&env, &net, &pod, &ip, &veth);
    let after = tokio::task::spawn_blocking(move || fetch(host_port))
        .await
        .unwrap();
    assert!(
        !after.as_deref().is_ok_and(|s| s.contains(&token)),
        "127.0.0.1:{host_port} still reaches the stopped pod: {after:?}"
    );
    env.remove_pod(&pod).await.unwrap();
    assert_nothing_left(&mut env, &net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_host_port_on_loopback_reaches_the_pod() {
    host_port_on_loopback_reaches_the_pod(Plugins::Reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_host_port_on_loopback_reaches_the_pod() {
    host_port_on_loopback_reaches_the_pod(Plugins::Berth).await;
}

// ---- host network ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pod_sees_the_host_interfaces_and_gets_no_cni_call() {
    let net = TestNet::new(Plugins::Reference);
    let mut env = start_env(&net, None).await;
    // Every plugin is wrapped by a spy logging its calls.
    for p in ["bridge", "portmap", "loopback"] {
        net.spy_plugin(p);
    }
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(true));
    let bb = env.busybox();

    // A pod with its own network: the spy sees its ADD.
    let own = env.run_pod(&env.pod_config("net-own")).await;
    let own_ip = pod_ip(&mut env, &net, &own).await;
    assert!(
        net.fake_calls("bridge").contains(&format!("ADD {own}")),
        "the spy saw no ADD for a pod with its own network: {:?}",
        net.fake_calls("bridge")
    );

    let mut config = env.pod_config("net-host");
    pod_namespace_options(&mut config).network = NamespaceMode::Node as i32;
    let host = env.run_pod(&config).await;
    let status = env.pod_status(&host).await.unwrap();
    let host_ip = status.network.map(|n| n.ip).unwrap_or_default();
    assert!(
        host_ip.is_empty(),
        "a host-network pod got a pod address {host_ip:?}"
    );
    let ctr = env
        .run(&host, &container_config("main", &bb, &["sleep", "3600"]))
        .await;

    // Same network namespace as the host, whose interfaces it lists.
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let theirs = env.sh(&ctr, "readlink /proc/self/ns/net").await;
    assert_eq!(
        theirs.trim(),
        ours.display().to_string(),
        "the host-network container is not in the host's network namespace"
    );
    let dev = default_route_dev().expect("the host has a default route");
    let names = proc_net_dev_names(&env.sh(&ctr, "cat /proc/net/dev").await);
    assert!(
        names.contains(&dev),
        "/proc/net/dev in the host-network container lacks the host's {dev}: {names:?}"
    );
    assert!(
        names.contains(&net.bridge),
        "/proc/net/dev in the host-network container lacks the test bridge {}: {names:?}",
        net.bridge
    );
    let links = env.sh(&ctr, "ip -o link").await;
    assert!(
        links.contains(&format!(": {dev}")) || links.contains(&format!(": {dev}@")),
        "ip link in the host-network container lacks {dev}:\n{links}"
    );
    let hosts = env.sh(&ctr, "cat /etc/hosts").await;
    assert_eq!(
        hosts,
        std::fs::read_to_string("/etc/hosts").unwrap(),
        "a host-network pod gets the host's /etc/hosts"
    );

    // No CNI call, no cache, nothing on the bridge but the other pod.
    assert!(
        !cache_file(&env, &host).exists(),
        "a host-network pod has a CNI cache file"
    );
    let calls = net.fake_calls("bridge");
    assert!(
        !calls.iter().any(|c| c.contains(&host)),
        "the bridge plugin was called for the host-network pod: {calls:?}"
    );
    assert_eq!(net.allocations(), vec![own_ip.clone()]);
    assert_eq!(net.bridge_ports().len(), 1);

    env.stop_pod(&host).await.unwrap();
    env.remove_pod(&host).await.unwrap();
    let calls = net.fake_calls("bridge");
    assert!(
        !calls.iter().any(|c| c.contains(&host)),
        "the bridge plugin was called when the host-network pod went: {calls:?}"
    );
    env.stop_pod(&own).await.unwrap();
    env.remove_pod(&own).await.unwrap();
    // ADD in list order, DEL in reverse, and nothing for the host-network
    // pod.
    assert_eq!(
        net.all_calls(),
        [
            "bridge ADD",
            "portmap ADD",
            "loopback ADD",
            "loopback DEL",
            "portmap DEL",
            "bridge DEL",
        ]
        .iter()
        .map(|c| format!("{c} {own}"))
        .collect::<Vec<_>>(),
        "CNI calls"
    );
    assert_nothing_left(&mut env, &net).await;
}

// ---- failing plugins ----

/// A conflist whose 2nd plugin fails (`hang`: never answers ADD) makes
/// RunPodSandbox fail with its message, and everything the 1st plugin did
/// is undone.
async fn failing_plugin_leaves_nothing(plugins: Plugins, hang: bool) {
    let net = TestNet::new(plugins);
    let mut env = start_env(&net, hang.then_some(2)).await;
    let (name, on_add) = if hang {
        ("e2e-hang", "while :; do sleep 1; done")
    } else {
        (
            "e2e-fail",
            "echo '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"e2e-fail refuses ADD\",\"details\":\"on purpose\"}'; exit 1",
        )
    };
    let script = net.fake_plugin(name, on_add);
    let mut list = net.standard_plugins(true);
    list.insert(1, serde_json::json!({"type": name}));
    net.write_conflist(&env.d.cni_conf_dir(), list);

    let mut config = env.pod_config("net-fail");
    config.port_mappings = vec![tcp_mapping(random_host_port(), 80)];
    let started = Instant::now();
    let err = env
        .try_run_pod(&config)
        .await
        .expect_err("RunPodSandbox with a failing CNI plugin");
    let took = started.elapsed();
    if hang {
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(
            err.message().contains(name),
            "the error does not name the plugin {name}: {err:?}"
        );
        assert!(
            took < Duration::from_secs(20),
            "RunPodSandbox took {took:?} with a 2 s plugin timeout"
        );
    } else {
        assert!(
            err.message().contains("e2e-fail refuses ADD"),
            "the error does not carry the plugin's message: {err:?}"
        );
    }
    // The bridge plugin ran (the bridge exists), the failing one was called
    // for ADD, then DEL ran for the list.
    assert!(net.bridge_exists(), "the first plugin did not run");
    let calls = net.fake_calls(name);
    assert!(
        calls.first().is_some_and(|c| c.starts_with("ADD ")),
        "{name} calls: {calls:?}"
    );
    assert!(
        calls.iter().any(|c| c.starts_with("DEL ")),
        "no DEL after the failed ADD: {calls:?}"
    );
    let pod_id = calls[0].split_whitespace().nth(1).unwrap_or("").to_string();
    assert!(!pod_id.is_empty());
    let rules = rules_mentioning(&[&pod_id]);
    assert!(
        rules.is_empty(),
        "rules of the failed pod are left: {rules:?}"
    );
    if hang {
        let gone = eventually(Duration::from_secs(5), || {
            !all_pids()
                .into_iter()
                .any(|p| cmdline(p).is_some_and(|c| c.contains(&script.display().to_string())))
        })
        .await;
        assert!(
            gone,
            "the hanging plugin {name} still runs after its timeout"
        );
    }
    assert_nothing_left(&mut env, &net).await;

    // berthd goes on: without the failing plugin a pod gets an address.
    std::fs::remove_dir_all(env.d.cni_conf_dir()).unwrap();
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(true));
    let pod = env.run_pod(&env.pod_config("net-after")).await;
    let ip = pod_ip(&mut env, &net, &pod).await;
    assert_eq!(net.allocations(), vec![ip]);
    env.stop_pod(&pod).await.unwrap();
    env.remove_pod(&pod).await.unwrap();
    assert_nothing_left(&mut env, &net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_failing_plugin_fails_the_pod_and_leaves_nothing() {
    failing_plugin_leaves_nothing(Plugins::Reference, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_hanging_plugin_times_out_and_leaves_nothing() {
    failing_plugin_leaves_nothing(Plugins::Reference, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_failing_plugin_fails_the_pod_and_leaves_nothing() {
    failing_plugin_leaves_nothing(Plugins::Berth, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_hanging_plugin_times_out_and_leaves_nothing() {
    failing_plugin_leaves_nothing(Plugins::Berth, true).await;
}

// ---- berthd killed between RunPodSandbox and StopPodSandbox ----

async fn killed_berthd_still_releases_the_network(plugins: Plugins) {
    let net = TestNet::new(plugins);
    let mut env = start_env(&net, None).await;
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(true));
    let bb = env.busybox();

    let host_port = random_host_port();
    let token = format!("reply-{}", random_hex(6));
    let mut config = env.pod_config("net-crash");
    config.port_mappings = vec![tcp_mapping(host_port, 80)];
    let pod = env.run_pod(&config).await;
    let ip = pod_ip(&mut env, &net, &pod).await;
    let veth = host_veth(&env, &net, &pod);
    let server = env
        .run(
            &pod,
            &container_config("web", &bb, &["nc", "-ll", "-p", "80", "-e", "echo", &token]),
        )
        .await;
    env.wait_listening(&server, 80).await;
    net.assert_routed(&ip);
    fetch_until(host_port, &token, Duration::from_secs(15)).await;
    assert!(!pod_rules(&pod, &ip).is_empty(), "no rules for {pod}");

    env.d.kill9();
    env.d.restart().await.expect("restart berthd");
    env.reconnect().await;
    // The pod kept its network through the crash.
    assert_eq!(pod_ip(&mut env, &net, &pod).await, ip);
    net.assert_routed(&ip);
    fetch_until(host_port, &token, Duration::from_secs(15)).await;

    // Meanwhile another network config takes over (lexically first): DEL
    // must still use what ADD used (berthd's cache).
    let other_data = net.dir.path().join("ipam-other");
    let mut other = net.bridge_plugin();
    other["bridge"] = format!("{}x", net.bridge).into();
    other["ipam"]["dataDir"] = other_data.display().to_string().into();
    let other = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("{}-other", net.name),
        "plugins": [other, net.portmap_plugin()],
    });
    std::fs::write(
        env.d.cni_conf_dir().join("05-other.conflist"),
        serde_json::to_vec(&other).unwrap(),
    )
    .unwrap();

    env.stop_pod(&pod).await.unwrap();
    assert_network_released(&env, &net, &pod, &ip, &veth);
    assert!(
        !link_exists(&format!("{}x", net.bridge)),
        "DEL used the new network config"
    );
    env.remove_pod(&pod).await.unwrap();
    assert_nothing_left(&mut env, &net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_killed_berthd_still_releases_the_network() {
    killed_berthd_still_releases_the_network(Plugins::Reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_killed_berthd_still_releases_the_network() {
    killed_berthd_still_releases_the_network(Plugins::Berth).await;
}

/// berthd killed while a plugin of the list runs its ADD (the bridge
/// plugin already made the veth and took an address): once berthd is back,
/// the half-made sandbox is gone and so is its network.
async fn killed_during_add_leaves_nothing_after_restart(plugins: Plugins) {
    let net = TestNet::new(plugins);
    let mut env = start_env(&net, None).await;
    let script = net.fake_plugin("e2e-hang", "while :; do sleep 1; done");
    let mut list = net.standard_plugins(true);
    list.insert(1, serde_json::json!({"type": "e2e-hang"}));
    net.write_conflist(&env.d.cni_conf_dir(), list);

    let mut config = env.pod_config("net-midadd");
    config.port_mappings = vec![tcp_mapping(random_host_port(), 80)];
    let mut client = env.client.clone();
    let call = tokio::spawn(async move {
        client
            .runtime
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await
    });
    let started = eventually(Duration::from_secs(20), || {
        net.fake_calls("e2e-hang")
            .iter()
            .any(|c| c.starts_with("ADD "))
    })
    .await;
    assert!(started, "the hanging plugin was not called");
    assert_eq!(
        net.allocations().len(),
        1,
        "the bridge plugin took no address"
    );
    assert_eq!(
        net.bridge_ports().len(),
        1,
        "the bridge plugin made no veth"
    );

    env.d.kill9();
    let _ = call.await;
    net.kill_fake_plugins();
    // The plugin dies with berthd (parent-death signal); give the kernel a
    // moment to reap it.
    let script_path = script.display().to_string();
    let gone = eventually(Duration::from_secs(5), || {
        !all_pids()
            .into_iter()
            .any(|p| cmdline(p).is_some_and(|c| c.contains(&script_path)))
    })
    .await;
    assert!(gone, "the hanging plugin survived");
    // The operator fixes the config; berthd comes back.
    std::fs::remove_dir_all(env.d.cni_conf_dir()).unwrap();
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(true));
    env.d.restart().await.expect("restart berthd");
    env.reconnect().await;

    let clean = eventually(Duration::from_secs(10), || {
        net.bridge_ports().is_empty()
            && net.allocations().is_empty()
            && cache_files(&env).is_empty()
            && sandbox_dirs(&env).is_empty()
            && mounts_under(&env.d.state_dir()).is_empty()
    })
    .await;
    assert!(
        clean,
        "after the restart the half-made sandbox is left: ports {:?}, allocations {:?}, cache {:?}, sandbox dirs {:?}, mounts {:?}",
        net.bridge_ports(),
        net.allocations(),
        cache_files(&env),
        sandbox_dirs(&env),
        mounts_under(&env.d.state_dir())
    );
    assert_nothing_left(&mut env, &net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_killed_during_add_leaves_nothing_after_restart() {
    killed_during_add_leaves_nothing_after_restart(Plugins::Reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_killed_during_add_leaves_nothing_after_restart() {
    killed_during_add_leaves_nothing_after_restart(Plugins::Berth).await;
}

// ---- many pods ----

const CHURN_PODS: usize = 50;
const CHURN_BATCH: usize = 5;

async fn many_pods_leave_nothing(plugins: Plugins) {
    let net = TestNet::new(plugins);
    let mut env = start_env(&net, None).await;
    net.write_conflist(&env.d.cni_conf_dir(), net.standard_plugins(true));
    let base_port = 20000 + u16::from_str_radix(&random_hex(2), 16).unwrap() % 20000;

    // One pod alone first: the reference portmap checks for its top-level
    // iptables chains and then creates them, so the first ADDs running at
    // once on a host without them race ("CHAIN_USER_ADD failed (File
    // exists)"), a fault of that plugin, not of the runtime.
    let mut warm = env.pod_config("churn-warm");
    warm.port_mappings = vec![tcp_mapping(base_port.wrapping_sub(1).max(1024), 80)];
    let warm = env.run_pod(&warm).await;
    env.stop_pod(&warm).await.unwrap();
    env.remove_pod(&warm).await.unwrap();

    let mut seen_ids = Vec::new();
    for batch in 0..CHURN_PODS / CHURN_BATCH {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..CHURN_BATCH {
            let n = batch * CHURN_BATCH + i;
            let mut config = env.pod_config(&format!("churn-{n}"));
            config.port_mappings = vec![tcp_mapping(base_port + n as u16, 80)];
            let mut client = env.client.clone();
            set.spawn(async move {
                client
                    .runtime
                    .run_pod_sandbox(RunPodSandboxRequest {
                        config: Some(config),
                        runtime_handler: String::new(),
                    })
                    .await
                    .map(|r| r.into_inner().pod_sandbox_id)
            });
        }
        let mut ids = Vec::new();
        while let Some(r) = set.join_next().await {
            ids.push(
                r.unwrap()
                    .unwrap_or_else(|e| panic!("RunPodSandbox: {e:?}")),
            );
        }
        let mut ips = Vec::new();
        for id in &ids {
            ips.push(pod_ip(&mut env, &net, id).await);
            assert!(
                !rules_mentioning(&[id]).is_empty(),
                "no port rule for pod {id}"
            );
        }
        let mut distinct = ips.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), ips.len(), "addresses repeat: {ips:?}");
        assert_eq!(net.allocations(), distinct);
        assert_eq!(net.bridge_ports().len(), CHURN_BATCH);

        let mut set = tokio::task::JoinSet::new();
        for id in ids.clone() {
            let mut client = env.client.clone();
            set.spawn(async move {
                client
                    .runtime
                    .stop_pod_sandbox(StopPodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await?;
                client
                    .runtime
                    .remove_pod_sandbox(RemovePodSandboxRequest {
                        pod_sandbox_id: id.clone(),
                    })
                    .await?;
                Ok::<_, tonic::Status>(())
            });
        }
        while let Some(r) = set.join_next().await {
            r.unwrap()
                .unwrap_or_else(|e| panic!("stop/remove in batch {batch}: {e:?}"));
        }
        for (id, ip) in ids.iter().zip(&ips) {
            assert!(
                pod_rules(id, ip).is_empty(),
                "rules of removed pod {id} ({ip}) are left: {:?}",
                pod_rules(id, ip)
            );
        }
        assert_eq!(net.bridge_ports(), Vec::<String>::new(), "batch {batch}");
        seen_ids.extend(ids);
    }
    assert_eq!(seen_ids.len(), CHURN_PODS);
    assert_nothing_left(&mut env, &net).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_fifty_pods_come_and_go_without_leaks() {
    many_pods_leave_nothing(Plugins::Reference).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn berth_fifty_pods_come_and_go_without_leaks() {
    many_pods_leave_nothing(Plugins::Berth).await;
}

#[test]
fn ip_mentions_are_whole_addresses() {
    assert!(mentions_ip("dnat to 10.223.5.2:80", "10.223.5.2"));
    assert!(mentions_ip("-d 10.223.5.2/32", "10.223.5.2"));
    assert!(!mentions_ip("dnat to 10.223.5.20:80", "10.223.5.2"));
    assert!(!mentions_ip("110.223.5.2", "10.223.5.2"));
}
