//! Berth's plugins against the reference plugins (Debian's
//! containernetworking-plugins in /usr/lib/cni, spec up to 1.0.0): every
//! mix of bridge and host-local gives the same result and the same state,
//! the two host-local implementations share one allocation store, and the
//! loopback results match. Needs root and the reference plugins.

mod common;

use std::net::IpAddr;
use std::path::Path;

use common::*;
use serde_json::{Value, json};

const VERSION: &str = "1.0.0";

/// The result with what legitimately differs between runs blanked: MACs,
/// the random host veth name, the per-run bridge and netns names, and an
/// empty `dns` object.
fn normalize(mut r: Value) -> Value {
    if let Some(ifaces) = r["interfaces"].as_array_mut() {
        for i in ifaces.iter_mut() {
            if i.get("mac").is_some() {
                i["mac"] = json!("<mac>");
            }
            if i["name"].as_str().is_some_and(|n| n.starts_with("veth")) {
                i["name"] = json!("<veth>");
            }
            if i["name"].as_str().is_some_and(|n| n.starts_with("bt")) {
                i["name"] = json!("<bridge>");
            }
            if i.get("sandbox").is_some() {
                i["sandbox"] = json!("<netns>");
            }
        }
    }
    if r.get("dns")
        .is_some_and(|d| d.as_object().is_some_and(|o| o.is_empty()))
    {
        r.as_object_mut().unwrap().remove("dns");
    }
    r
}

/// What the kernel and the store show for one attachment.
#[derive(Debug, PartialEq)]
struct Observed {
    pod_addr: String,
    default_route: String,
    bridge_addr: String,
    ports: usize,
    alloc_files: Vec<String>,
    alloc_content: Vec<u8>,
}

struct Run {
    result: Value,
    observed: Observed,
    after_del: (usize, Vec<String>, bool),
}

/// ADD (then observe), CHECK, DEL (then observe) one pod with the given
/// bridge and IPAM implementations.
fn attach(bridge_bin: &Path, cni_path: &str, subnet: &str, extra: impl Fn(&Env, &Value)) -> Run {
    let mut cleanup = Cleanup::default();
    let tag = rand4();
    let bridge = format!("bt{tag}");
    let net = "bt-interop";
    let data_dir = std::env::temp_dir().join(format!("berth-cni-interop-{tag}"));
    cleanup.links.push(bridge.clone());
    cleanup.dirs.push(data_dir.clone());
    let mut conf = bridge_conf(VERSION, net, &bridge, subnet, &data_dir, "host-local");
    conf["name"] = json!(net);
    let ns = Netns::new("btI");
    let env = Env::new("interop-pod-1", &ns.path, cni_path);
    cleanup.nft_comments.push(env.container_id.clone());

    let result = run(bridge_bin, "ADD", &env, &conf).ok().json();
    let pod = pod_ip(&result);
    let net_dir = data_dir.join(net);
    let observed = Observed {
        pod_addr: ns
            .exec("ip -4 -o addr show dev eth0")
            .split_whitespace()
            .nth(3)
            .unwrap()
            .to_string(),
        default_route: ns
            .exec("ip route show default")
            .trim()
            .replace(" proto static", ""),
        bridge_addr: sh(&format!("ip -4 -o addr show dev {bridge}"))
            .1
            .split_whitespace()
            .nth(3)
            .unwrap_or_default()
            .to_string(),
        ports: bridge_ports(&bridge).len(),
        alloc_files: ipam_files(&net_dir),
        alloc_content: std::fs::read(net_dir.join(pod.to_string())).unwrap_or_default(),
    };
    let mut check = conf.clone();
    check["prevResult"] = result.clone();
    run(bridge_bin, "CHECK", &env, &check).ok();
    extra(&env, &result);
    run(bridge_bin, "DEL", &env, &conf).ok();
    let after_del = (
        bridge_ports(&bridge).len(),
        ipam_files(&net_dir),
        sh(&format!("ip netns exec {} ip link show eth0", ns.name)).0,
    );
    Run {
        result,
        observed,
        after_del,
    }
}

#[test]
fn bridge_and_host_local_mix_and_match() {
    require_root!();
    if !have_reference_plugins() {
        eprintln!("skipped: no reference plugins in {REF_DIR}");
        return;
    }
    let subnet = free_subnet(41);
    let berth = berth_dir();
    let no_extra = |_: &Env, _: &Value| {};
    // (bridge, CNI_PATH that provides host-local)
    let runs = [
        (
            "berth bridge + berth host-local",
            attach(&bin("bridge"), &berth, &subnet, no_extra),
        ),
        (
            "berth bridge + reference host-local",
            attach(&bin("bridge"), REF_DIR, &subnet, no_extra),
        ),
        (
            "reference bridge + berth host-local",
            // Berth's portmap chained after the reference bridge.
            attach(&ref_bin("bridge"), &berth, &subnet, |env, prev| {
                let pm = json!({
                    "cniVersion": VERSION, "name": "bt-interop", "type": "portmap",
                    "runtimeConfig": {"portMappings": [
                        {"hostPort": 18951, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}]},
                    "prevResult": prev,
                });
                let out = run(&bin("portmap"), "ADD", env, &pm).ok().json();
                assert_eq!(normalize(out), normalize(prev.clone()));
                run(&bin("portmap"), "CHECK", env, &pm).ok();
                assert!(!rules_with_comment("ip", "berth-portmap", &env.container_id).is_empty());
                run(&bin("portmap"), "DEL", env, &pm).ok();
                assert!(rules_with_comment("ip", "berth-portmap", &env.container_id).is_empty());
            }),
        ),
        (
            "reference bridge + reference host-local",
            attach(&ref_bin("bridge"), REF_DIR, &subnet, no_extra),
        ),
    ];
    let (base_name, base) = &runs[0];
    let gw = subnet.replace(".0/24", ".1");
    assert_eq!(base.observed.bridge_addr, format!("{gw}/24"));
    assert_eq!(
        base.observed.default_route,
        format!("default via {gw} dev eth0")
    );
    assert_eq!(base.observed.alloc_content, b"interop-pod-1\r\neth0");
    assert_eq!(base.observed.ports, 1);
    assert_eq!(base.after_del, (0, vec![], false));
    for (name, r) in &runs[1..] {
        assert_eq!(
            normalize(r.result.clone()),
            normalize(base.result.clone()),
            "{name} vs {base_name}"
        );
        assert_eq!(r.observed, base.observed, "{name} vs {base_name}");
        assert_eq!(r.after_del, base.after_del, "{name} vs {base_name}");
    }
}

#[test]
fn host_local_implementations_share_one_store() {
    require_root!();
    if !have_reference_plugins() {
        eprintln!("skipped: no reference plugins in {REF_DIR}");
        return;
    }
    let mut cleanup = Cleanup::default();
    let dir = std::env::temp_dir().join(format!("berth-cni-store-{}", rand4()));
    cleanup.dirs.push(dir.clone());
    let conf = json!({
        "cniVersion": VERSION, "name": "shared", "type": "host-local",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.222.42.0/24"}]], "dataDir": dir}
    });
    let envs: Vec<Env> = (0..4)
        .map(|i| Env::new(&format!("store-{i}"), "/var/run/netns/unused", &berth_dir()))
        .collect();
    let ip = |o: Out| -> IpAddr {
        let v = o.ok().json();
        v["ips"][0]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // Alternate implementations: allocation continues round-robin across them.
    let a = ip(run(&bin("host-local"), "ADD", &envs[0], &conf));
    let b = ip(run(&ref_bin("host-local"), "ADD", &envs[1], &conf));
    let c = ip(run(&bin("host-local"), "ADD", &envs[2], &conf));
    let d = ip(run(&ref_bin("host-local"), "ADD", &envs[3], &conf));
    let got: Vec<String> = [a, b, c, d].iter().map(|i| i.to_string()).collect();
    assert_eq!(
        got,
        ["10.222.42.2", "10.222.42.3", "10.222.42.4", "10.222.42.5"]
    );
    // Each refuses a duplicate the other made.
    assert_ne!(run(&bin("host-local"), "ADD", &envs[1], &conf).code, 0);
    assert_ne!(run(&ref_bin("host-local"), "ADD", &envs[0], &conf).code, 0);
    // Each releases what the other allocated.
    run(&bin("host-local"), "DEL", &envs[1], &conf).ok();
    run(&ref_bin("host-local"), "DEL", &envs[0], &conf).ok();
    let net_dir = dir.join("shared");
    assert_eq!(ipam_files(&net_dir), ["10.222.42.4", "10.222.42.5"]);
    // CHECK of the other's allocation.
    let mut chk = conf.clone();
    chk["prevResult"] = json!({"cniVersion": VERSION, "ips": [{"address": "10.222.42.5/24"}]});
    run(&bin("host-local"), "CHECK", &envs[3], &chk).ok();
    run(&bin("host-local"), "DEL", &envs[3], &conf).ok();
    run(&ref_bin("host-local"), "DEL", &envs[2], &conf).ok();
    assert!(ipam_files(&net_dir).is_empty());
}

#[test]
fn loopback_matches_reference() {
    require_root!();
    if !ref_bin("loopback").exists() {
        eprintln!("skipped: no reference loopback");
        return;
    }
    let conf = json!({"cniVersion": VERSION, "name": "lo", "type": "loopback"});
    let mut results = Vec::new();
    for plugin in [bin("loopback"), ref_bin("loopback")] {
        let ns = Netns::new("btL");
        let env = Env::new("lo-pod", &ns.path, &berth_dir());
        assert!(ns.exec("ip link show lo").contains("state DOWN"));
        let r = run(&plugin, "ADD", &env, &conf).ok().json();
        assert!(ns.exec("ip -o addr show dev lo").contains("127.0.0.1/8"));
        assert!(ns.exec("ip link show lo").contains(",UP"));
        let mut chk = conf.clone();
        chk["prevResult"] = r.clone();
        run(&plugin, "CHECK", &env, &chk).ok();
        run(&plugin, "DEL", &env, &conf).ok();
        results.push(normalize(r));
    }
    assert_eq!(results[0], results[1]);
}
