//! The plugins as a runtime runs them: a conflist of loopback, bridge
//! (+ host-local) and portmap, executed with env + stdin, two pods on one
//! bridge talking TCP, a host port on 127.0.0.1, DEL cleaning everything.
//! Needs root.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use serde_json::{Value, json};

const VERSION: &str = "1.0.0";

struct Pod {
    ns: Netns,
    env: Env,
    results: Vec<Value>,
}

/// ADD of the whole conflist; returns each plugin's result.
fn add_chain(plugins: &[Value], name: &str, env: &Env, ports: Option<Value>) -> Vec<Value> {
    let mut prev: Option<Value> = None;
    let mut out = Vec::new();
    for p in plugins {
        let ty = p["type"].as_str().unwrap();
        let runtime = if ty == "portmap" {
            ports.clone().map(|pm| json!({ "portMappings": pm }))
        } else {
            None
        };
        let conf = chained(p, name, VERSION, prev.as_ref(), runtime);
        let r = run(&bin(ty), "ADD", env, &conf).ok().json();
        prev = Some(r.clone());
        out.push(r);
    }
    out
}

/// DEL in reverse order, each with the final result as prevResult.
fn del_chain(plugins: &[Value], name: &str, env: &Env, ports: Option<Value>, last: Option<&Value>) {
    for p in plugins.iter().rev() {
        let ty = p["type"].as_str().unwrap();
        let runtime = if ty == "portmap" {
            ports.clone().map(|pm| json!({ "portMappings": pm }))
        } else {
            None
        };
        let conf = chained(p, name, VERSION, last, runtime);
        run(&bin(ty), "DEL", env, &conf).ok();
    }
}

fn check_chain(
    plugins: &[Value],
    name: &str,
    env: &Env,
    ports: Option<Value>,
    last: &Value,
) -> Vec<Out> {
    plugins
        .iter()
        .map(|p| {
            let ty = p["type"].as_str().unwrap();
            let runtime = if ty == "portmap" {
                ports.clone().map(|pm| json!({ "portMappings": pm }))
            } else {
                None
            };
            let conf = chained(p, name, VERSION, Some(last), runtime);
            run(&bin(ty), "CHECK", env, &conf)
        })
        .collect()
}

#[test]
fn two_pods_exchange_tcp_and_host_port_reaches_pod() {
    require_root!();
    let mut cleanup = Cleanup::default();
    let tag = rand4();
    let bridge = format!("bt{tag}");
    let net = format!("bt-chain-{tag}");
    let subnet = free_subnet(31);
    let data_dir = std::env::temp_dir().join(format!("berth-cni-chain-{tag}"));
    cleanup.links.push(bridge.clone());
    cleanup.dirs.push(data_dir.clone());
    let net_dir = data_dir.join(&net);

    let plugins = vec![
        json!({"type": "loopback"}),
        {
            let mut b = bridge_conf(VERSION, &net, &bridge, &subnet, &data_dir, "host-local");
            b["ipMasq"] = json!(true);
            b
        },
        json!({"type": "portmap", "capabilities": {"portMappings": true}}),
    ];
    let ports_a = json!([
        {"hostPort": 18931, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"},
        {"hostPort": 18932, "containerPort": 5353, "protocol": "udp", "hostIP": "127.0.0.1"},
    ]);
    let mk_pod = |prefix: &str| {
        let ns = Netns::new(prefix);
        let id = format!("chain{tag}{}", &ns.name[ns.name.len() - 4..]);
        let env = Env::new(&id, &ns.path, &berth_dir());
        Pod {
            ns,
            env,
            results: Vec::new(),
        }
    };
    let mut a = mk_pod("btA");
    let mut b = mk_pod("btB");
    cleanup.nft_comments.push(a.env.container_id.clone());
    cleanup.nft_comments.push(b.env.container_id.clone());

    a.results = add_chain(&plugins, &net, &a.env, Some(ports_a.clone()));
    b.results = add_chain(&plugins, &net, &b.env, None);

    // Loopback result, then the bridge's, which extends it (prevResult).
    assert_eq!(a.results[0]["interfaces"][0]["name"], "lo");
    let ra = &a.results[1];
    let rb = &b.results[1];
    assert_eq!(ra["cniVersion"], VERSION);
    let ifaces: Vec<&str> = ra["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(ifaces.len(), 4, "{ra}");
    assert_eq!(ifaces[0], "lo");
    assert_eq!(ifaces[1], bridge.as_str());
    assert!(ifaces[2].starts_with("veth"));
    assert_eq!(ifaces[3], "eth0");
    assert_eq!(ra["interfaces"][3]["sandbox"], a.ns.path.as_str());
    let pod_entry = ra["ips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["interface"] == 3)
        .unwrap();
    assert!(pod_entry["address"].as_str().unwrap().ends_with("/24"));
    // portmap passes its prevResult on unchanged.
    assert_eq!(&a.results[2], ra);

    let ip_a = pod_ip(ra);
    let ip_b = pod_ip(rb);
    assert_ne!(ip_a, ip_b);
    let gw: IpAddr = pod_entry["gateway"].as_str().unwrap().parse().unwrap();
    let sub: berth_cni::ip::IpNet = subnet.parse().unwrap();
    for ip in [ip_a, ip_b, gw] {
        assert!(sub.contains(ip), "{ip} not in {subnet}");
    }

    // Host side: the bridge has the gateway address, both veths are its ports.
    let (_, br_addr) = sh(&format!("ip -4 -o addr show dev {bridge}"));
    assert!(br_addr.contains(&format!("{gw}/24")), "{br_addr}");
    let ports = bridge_ports(&bridge);
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert!(ports.contains(&ifaces[2].to_string()));
    let (_, hp) = sh(&format!("bridge -d link show dev {}", ports[0]));
    assert!(hp.contains("hairpin on"), "{hp}");

    // Pod side: address, default route via the gateway, lo up.
    let addr_a = a.ns.exec("ip -4 -o addr show dev eth0");
    assert!(addr_a.contains(&format!("{ip_a}/24")), "{addr_a}");
    let route_a = a.ns.exec("ip route show default");
    assert!(route_a.contains(&format!("via {gw} dev eth0")), "{route_a}");
    assert!(a.ns.exec("ip link show lo").contains("UP"));

    // Masquerade and DNAT rules exist.
    assert!(!rules_with_comment("ip", "berth-bridge", &a.env.container_id).is_empty());
    assert!(!rules_with_comment("ip", "berth-portmap", &a.env.container_id).is_empty());

    // CHECK passes for every plugin.
    for o in check_chain(&plugins, &net, &a.env, Some(ports_a.clone()), ra) {
        o.ok();
    }

    // Traffic: only to pod addresses routed through the test bridge.
    net_guard_on();
    assert_route_via(ip_a, &bridge);
    assert_route_via(ip_b, &bridge);

    // Pod B -> pod A over TCP, no NAT between pods.
    let server = tcp_server(&a.ns, SocketAddr::new(ip_a, 8080), "pong");
    let answer = in_ns(&b.ns, || {
        tcp_client(SocketAddr::new(ip_a, 8080), "ping-from-b")
    });
    assert_eq!(answer, format!("pong:{ip_b}:ping-from-b"));
    assert_eq!(server.join().unwrap(), format!("{ip_b}:ping-from-b"));

    // Host 127.0.0.1:18931 -> pod A:8080 (DNAT in OUTPUT + route_localnet + masquerade).
    let server = tcp_server(
        &a.ns,
        SocketAddr::new("0.0.0.0".parse().unwrap(), 8080),
        "hostport",
    );
    let answer = tcp_client("127.0.0.1:18931".parse().unwrap(), "via-localhost");
    assert!(answer.starts_with("hostport:"), "{answer}");
    assert!(answer.ends_with(":via-localhost"), "{answer}");
    server.join().unwrap();

    // UDP host port 127.0.0.1:18932 -> pod A:5353.
    let echo = udp_echo(&a.ns, SocketAddr::new("0.0.0.0".parse().unwrap(), 5353));
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    sock.send_to(b"dgram", "127.0.0.1:18932").unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"echo:dgram");
    echo.join().unwrap();

    // DEL in reverse order removes the veths, allocations and rules.
    let host_veth_a = ifaces[2].to_string();
    assert_eq!(ipam_files(&net_dir).len(), 2);
    del_chain(
        &plugins,
        &net,
        &a.env,
        Some(ports_a.clone()),
        Some(&a.results[2]),
    );
    assert!(!bridge_ports(&bridge).contains(&host_veth_a));
    assert!(!sh(&format!("ip netns exec {} ip link show eth0", a.ns.name)).0);
    assert_eq!(ipam_files(&net_dir), vec![ip_b.to_string()]);
    assert!(rules_with_comment("ip", "berth-bridge", &a.env.container_id).is_empty());
    assert!(rules_with_comment("ip", "berth-portmap", &a.env.container_id).is_empty());
    // CHECK now fails (bridge and portmap).
    let checks = check_chain(&plugins, &net, &a.env, Some(ports_a.clone()), ra);
    assert_ne!(checks[1].code, 0);
    assert_ne!(checks[2].code, 0);
    // DEL is idempotent, also without prevResult and once the netns is gone.
    del_chain(&plugins, &net, &a.env, Some(ports_a.clone()), None);
    a.ns.delete();
    del_chain(&plugins, &net, &a.env, Some(ports_a), None);

    del_chain(&plugins, &net, &b.env, None, Some(&b.results[2]));
    assert!(bridge_ports(&bridge).is_empty());
    assert!(ipam_files(&net_dir).is_empty());
    assert!(rules_with_comment("ip", "berth-bridge", &b.env.container_id).is_empty());
}

#[test]
fn twenty_concurrent_adds_get_distinct_ips() {
    require_root!();
    let mut cleanup = Cleanup::default();
    let tag = rand4();
    let bridge = format!("bt{tag}");
    let net = format!("bt-conc-{tag}");
    let subnet = free_subnet(32);
    let data_dir = std::env::temp_dir().join(format!("berth-cni-conc-{tag}"));
    cleanup.links.push(bridge.clone());
    cleanup.dirs.push(data_dir.clone());
    let conf = bridge_conf(VERSION, &net, &bridge, &subnet, &data_dir, "host-local");

    let pods: Vec<(Netns, Env)> = (0..20)
        .map(|i| {
            let ns = Netns::new("btC");
            let env = Env::new(&format!("conc{tag}-{i}"), &ns.path, &berth_dir());
            (ns, env)
        })
        .collect();
    let results: Vec<Out> = std::thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .map(|(_, env)| s.spawn(|| run(&bin("bridge"), "ADD", env, &conf)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips = std::collections::BTreeSet::new();
    for r in results {
        let r = r.ok().json();
        assert!(ips.insert(pod_ip(&r)), "duplicate address in {r}");
    }
    assert_eq!(ips.len(), 20);
    assert_eq!(ipam_files(&data_dir.join(&net)).len(), 20);
    assert_eq!(bridge_ports(&bridge).len(), 20);
    // Every pod really has its address.
    let have: std::collections::BTreeSet<IpAddr> = pods
        .iter()
        .map(|(ns, _)| {
            let out = ns.exec("ip -4 -o addr show dev eth0");
            let a = out.split_whitespace().nth(3).unwrap();
            a.split('/').next().unwrap().parse().unwrap()
        })
        .collect();
    assert_eq!(have, ips);

    std::thread::scope(|s| {
        for (_, env) in &pods {
            let conf = &conf;
            s.spawn(move || run(&bin("bridge"), "DEL", env, conf).ok());
        }
    });
    assert!(ipam_files(&data_dir.join(&net)).is_empty());
    assert!(bridge_ports(&bridge).is_empty());
}

#[test]
fn second_pod_mapping_the_same_host_port_is_refused() {
    require_root!();
    let mut cleanup = Cleanup::default();
    let tag = rand4();
    let bridge = format!("bt{tag}");
    let net = format!("bt-conf-{tag}");
    let subnet = free_subnet(33);
    let data_dir = std::env::temp_dir().join(format!("berth-cni-conflict-{tag}"));
    cleanup.links.push(bridge.clone());
    cleanup.dirs.push(data_dir.clone());
    let plugins = vec![
        bridge_conf(VERSION, &net, &bridge, &subnet, &data_dir, "host-local"),
        json!({"type": "portmap", "capabilities": {"portMappings": true}}),
    ];
    let ports =
        json!([{"hostPort": 18941, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}]);
    let ns1 = Netns::new("btP");
    let ns2 = Netns::new("btQ");
    let e1 = Env::new(&format!("pm{tag}a"), &ns1.path, &berth_dir());
    let e2 = Env::new(&format!("pm{tag}b"), &ns2.path, &berth_dir());
    cleanup.nft_comments.push(e1.container_id.clone());
    cleanup.nft_comments.push(e2.container_id.clone());

    let r1 = add_chain(&plugins, &net, &e1, Some(ports.clone()));
    // Second pod: bridge works, portmap refuses the taken port.
    let rb = run(
        &bin("bridge"),
        "ADD",
        &e2,
        &chained(&plugins[0], &net, VERSION, None, None),
    )
    .ok()
    .json();
    let pm = chained(
        &plugins[1],
        &net,
        VERSION,
        Some(&rb),
        Some(json!({"portMappings": ports.clone()})),
    );
    let o = run(&bin("portmap"), "ADD", &e2, &pm);
    assert_ne!(o.code, 0);
    let err = o.json();
    assert!(
        err["msg"].as_str().unwrap().contains("already mapped"),
        "{err}"
    );
    // A different host IP on the same port is fine.
    let other =
        json!([{"hostPort": 18941, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.2"}]);
    let pm2 = chained(
        &plugins[1],
        &net,
        VERSION,
        Some(&rb),
        Some(json!({"portMappings": other})),
    );
    run(&bin("portmap"), "ADD", &e2, &pm2).ok();
    // The first pod's rules are intact.
    let c = chained(
        &plugins[1],
        &net,
        VERSION,
        Some(&r1[1]),
        Some(json!({"portMappings": ports.clone()})),
    );
    run(&bin("portmap"), "CHECK", &e1, &c).ok();

    del_chain(&plugins, &net, &e2, None, Some(&rb));
    del_chain(&plugins, &net, &e1, Some(ports), Some(&r1[1]));
    assert!(rules_with_comment("ip", "berth-portmap", &e1.container_id).is_empty());
    assert!(rules_with_comment("ip", "berth-portmap", &e2.container_id).is_empty());
    assert!(ipam_files(&data_dir.join(&net)).is_empty());
}

#[test]
fn mtu_is_applied_to_both_veth_ends() {
    require_root!();
    let mut cleanup = Cleanup::default();
    let tag = rand4();
    let bridge = format!("bt{tag}");
    let net = format!("bt-mtu-{tag}");
    let subnet = free_subnet(34);
    let data_dir = std::env::temp_dir().join(format!("berth-cni-mtu-{tag}"));
    cleanup.links.push(bridge.clone());
    cleanup.dirs.push(data_dir.clone());
    let mut conf = bridge_conf(VERSION, &net, &bridge, &subnet, &data_dir, "host-local");
    conf["mtu"] = json!(1372);
    let ns = Netns::new("btM");
    let env = Env::new(&format!("mtu{tag}"), &ns.path, &berth_dir());
    let r = run(&bin("bridge"), "ADD", &env, &conf).ok().json();
    let host = r["interfaces"][1]["name"].as_str().unwrap();
    assert!(sh(&format!("ip link show {host}")).1.contains("mtu 1372"));
    assert!(ns.exec("ip link show eth0").contains("mtu 1372"));
    // A second ADD for the same interface fails without side effects.
    let again = run(&bin("bridge"), "ADD", &env, &conf);
    assert_ne!(again.code, 0);
    assert_eq!(bridge_ports(&bridge).len(), 1);
    assert_eq!(ipam_files(&data_dir.join(&net)).len(), 1);
    run(&bin("bridge"), "DEL", &env, &conf).ok();
    assert!(bridge_ports(&bridge).is_empty());
}

#[test]
fn dual_stack_pod_gets_both_families() {
    require_root!();
    let mut cleanup = Cleanup::default();
    let tag = rand4();
    let bridge = format!("bt{tag}");
    let net = format!("bt-ds-{tag}");
    let subnet = free_subnet(35);
    let v6 = format!("fd00:bc:{tag}::/64");
    let data_dir = std::env::temp_dir().join(format!("berth-cni-ds-{tag}"));
    cleanup.links.push(bridge.clone());
    cleanup.dirs.push(data_dir.clone());
    let mut conf = bridge_conf(VERSION, &net, &bridge, &subnet, &data_dir, "host-local");
    conf["ipam"]["ranges"] = json!([[{"subnet": subnet}], [{"subnet": v6}]]);
    let ns1 = Netns::new("btD");
    let ns2 = Netns::new("btE");
    let e1 = Env::new(&format!("ds{tag}a"), &ns1.path, &berth_dir());
    let e2 = Env::new(&format!("ds{tag}b"), &ns2.path, &berth_dir());
    let r1 = run(&bin("bridge"), "ADD", &e1, &conf).ok().json();
    let r2 = run(&bin("bridge"), "ADD", &e2, &conf).ok().json();
    assert_eq!(r1["ips"].as_array().unwrap().len(), 2, "{r1}");
    let v6_of = |r: &Value| -> IpAddr {
        r["ips"][1]["address"]
            .as_str()
            .unwrap()
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (a6, b6) = (v6_of(&r1), v6_of(&r2));
    assert!(a6.is_ipv6() && a6 != b6);
    let addrs = ns1.exec("ip -6 -o addr show dev eth0");
    assert!(addrs.contains(&format!("{a6}/64")), "{addrs}");
    let line = addrs
        .lines()
        .find(|l| l.contains(&format!("{a6}/64")))
        .unwrap();
    assert!(!line.contains("tentative"), "DAD must be off: {line}");
    // `ip` prints the group without leading zeros (tag 01aa is 1aa).
    let group = format!("{:x}", u16::from_str_radix(&tag, 16).unwrap());
    let route = ns1.exec("ip -6 route show default");
    assert!(
        route.contains(&format!("via fd00:bc:{group}::1 dev eth0")),
        "{route}"
    );
    let (_, br) = sh(&format!("ip -6 -o addr show dev {bridge}"));
    assert!(br.contains(&format!("fd00:bc:{group}::1/64")), "{br}");

    // Pod to pod over IPv6 (the ULA range is guarded off the default route).
    net_guard_on();
    assert_route_via(b6, &bridge);
    let server = tcp_server(&ns2, SocketAddr::new(b6, 8081), "v6");
    let answer = in_ns(&ns1, || tcp_client(SocketAddr::new(b6, 8081), "hello6"));
    assert_eq!(answer, format!("v6:{a6}:hello6"));
    server.join().unwrap();

    run(&bin("bridge"), "DEL", &e1, &conf).ok();
    run(&bin("bridge"), "DEL", &e2, &conf).ok();
    assert!(ipam_files(&data_dir.join(&net)).is_empty());
    assert!(bridge_ports(&bridge).is_empty());
}
