//! The spec's contract at the process boundary: VERSION, error objects with
//! the spec's codes and a non-zero exit, STATUS and GC, and the in-process
//! API giving the same bytes as the binaries. Runs without root.

mod common;

use berth_cni::{Command, Plugin, Request};
use common::*;
use serde_json::{Value, json};

const PLUGINS: [&str; 4] = ["bridge", "host-local", "loopback", "portmap"];

fn env() -> Env {
    Env::new("spec-test-1", "/var/run/netns/berth-none", &berth_dir())
}

#[test]
fn version_lists_supported_versions() {
    for p in PLUGINS {
        let o = run_raw(&bin(p), "VERSION", &env(), br#"{"cniVersion":"1.0.0"}"#).ok();
        assert_eq!(
            o.json(),
            json!({"cniVersion": "1.1.0", "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"]}),
            "{p}"
        );
        // Without any config too.
        let o = run_raw(&bin(p), "VERSION", &env(), b"").ok();
        assert_eq!(o.json()["supportedVersions"][1], "1.0.0");
    }
}

fn assert_error(o: &Out, code: u64, version: &str, what: &str) -> Value {
    assert_ne!(o.code, 0, "{what}: exit status must be non-zero");
    let v = o.json();
    assert_eq!(v["code"], code, "{what}: {v}");
    assert_eq!(v["cniVersion"], version, "{what}: {v}");
    assert!(
        v["msg"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    v
}

#[test]
fn bad_config_is_error_code_7() {
    let bad: [(&str, Value); 9] = [
        (
            "bridge",
            json!({"cniVersion": "1.0.0", "name": "n", "type": "bridge", "mtu": "big"}),
        ),
        (
            "bridge",
            json!({"cniVersion": "1.0.0", "name": "n", "type": "bridge", "bridge": "a/b"}),
        ),
        (
            "bridge",
            json!({"cniVersion": "1.0.0", "name": "n", "type": "bridge", "ipam": {}}),
        ),
        (
            "host-local",
            json!({"cniVersion": "1.0.0", "name": "n", "type": "host-local",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.222.0.0/33"}]]}}),
        ),
        (
            "host-local",
            json!({"cniVersion": "1.0.0", "name": "n", "type": "host-local"}),
        ),
        (
            "host-local",
            json!({"cniVersion": "1.0.0", "name": "n", "type": "host-local",
            "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.222.0.0/24", "rangeStart": "10.1.1.1"}]]}}),
        ),
        (
            "portmap",
            json!({"cniVersion": "1.0.0", "name": "n", "type": "portmap",
            "runtimeConfig": {"portMappings": [{"hostPort": 99999, "containerPort": 80}]}}),
        ),
        (
            "portmap",
            json!({"cniVersion": "1.0.0", "name": "n", "type": "portmap",
            "runtimeConfig": {"portMappings": [{"hostPort": 80, "containerPort": 80}]}}),
        ),
        (
            "loopback",
            json!({"cniVersion": "1.0.0", "name": 5, "type": "loopback"}),
        ),
    ];
    for (p, conf) in bad {
        let o = run(&bin(p), "ADD", &env(), &conf);
        assert_error(&o, 7, "1.0.0", &format!("{p} {conf}"));
    }
}

#[test]
fn other_spec_error_codes() {
    for p in PLUGINS {
        // Not JSON: decode failure (6).
        let o = run_raw(&bin(p), "ADD", &env(), b"{nope");
        assert_error(&o, 6, "1.1.0", p);
        // Unsupported version (1), reported in that version.
        let o = run(
            &bin(p),
            "ADD",
            &env(),
            &json!({"cniVersion": "0.2.0", "name": "n", "type": p}),
        );
        assert_error(&o, 1, "0.2.0", p);
        // Missing environment (4).
        let mut e = env();
        e.container_id.clear();
        let o = run(
            &bin(p),
            "ADD",
            &e,
            &json!({"cniVersion": "1.0.0", "name": "n", "type": p}),
        );
        assert_error(&o, 4, "1.0.0", p);
        let o = run(
            &bin(p),
            "FROB",
            &env(),
            &json!({"cniVersion": "1.0.0", "name": "n"}),
        );
        assert_error(&o, 4, "1.0.0", p);
    }
}

#[test]
fn status_and_gc() {
    let dir = tempfile::tempdir().unwrap();
    let ipam = json!({"type": "host-local", "ranges": [[{"subnet": "10.222.50.0/24"}]], "dataDir": dir.path()});
    let hl = json!({"cniVersion": "1.1.0", "name": "st", "type": "host-local", "ipam": ipam});
    let br = json!({"cniVersion": "1.1.0", "name": "st", "type": "bridge", "bridge": "btnone", "ipam": ipam});
    for (p, c) in [("host-local", &hl), ("bridge", &br)] {
        let o = run(&bin(p), "STATUS", &env(), c).ok();
        assert!(o.stdout.is_empty(), "{p}: {}", o.stdout);
    }
    run(
        &bin("loopback"),
        "STATUS",
        &env(),
        &json!({"cniVersion": "1.1.0", "name": "st", "type": "loopback"}),
    )
    .ok();

    // Two allocations, GC (through the bridge, delegated) keeps the valid one.
    let mut e1 = env();
    e1.container_id = "gc-keep".into();
    let mut e2 = env();
    e2.container_id = "gc-stale".into();
    run(&bin("host-local"), "ADD", &e1, &hl).ok();
    run(&bin("host-local"), "ADD", &e2, &hl).ok();
    let mut gc = br.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "gc-keep", "ifname": "eth0"}]);
    let o = run(&bin("bridge"), "GC", &Env::new("", "", &berth_dir()), &gc).ok();
    assert!(o.stdout.is_empty());
    assert_eq!(ipam_files(&dir.path().join("st")), ["10.222.50.2"]);
}

/// `berth_cni::invoke` prints exactly what the binary prints.
#[test]
fn in_process_api_matches_binaries() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let conf = |dir: &std::path::Path| {
        json!({"cniVersion": "1.1.0", "name": "same", "type": "host-local",
               "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.222.51.0/24"}]],
                        "routes": [{"dst": "0.0.0.0/0"}], "dataDir": dir}})
    };
    let e = env();
    let request = |cmd: Command, c: &Value| Request {
        command: cmd,
        container_id: e.container_id.clone(),
        netns: e.netns.clone(),
        ifname: e.ifname.clone(),
        args: String::new(),
        path: e.cni_path.clone(),
        config: serde_json::to_vec(c).unwrap(),
    };
    // ADD
    let by_bin = run(&bin("host-local"), "ADD", &e, &conf(d1.path()))
        .ok()
        .stdout;
    let in_proc =
        berth_cni::invoke(Plugin::HostLocal, &request(Command::Add, &conf(d2.path()))).unwrap();
    assert_eq!(by_bin.as_bytes(), in_proc.as_slice());
    // An error: same object.
    let bad = json!({"cniVersion": "1.0.0", "name": "x", "type": "host-local"});
    let by_bin = run(&bin("host-local"), "ADD", &e, &bad);
    let in_proc = berth_cni::invoke(Plugin::HostLocal, &request(Command::Add, &bad)).unwrap_err();
    assert_eq!(by_bin.json(), serde_json::to_value(&in_proc).unwrap());
    // VERSION and DEL
    let v = berth_cni::invoke(Plugin::Bridge, &request(Command::Version, &json!({}))).unwrap();
    assert_eq!(
        v,
        run_raw(&bin("bridge"), "VERSION", &e, b"{}")
            .ok()
            .stdout
            .as_bytes()
    );
    let del =
        berth_cni::invoke(Plugin::HostLocal, &request(Command::Del, &conf(d2.path()))).unwrap();
    assert!(del.is_empty());
    assert!(ipam_files(&d2.path().join("same")).is_empty());
    run(&bin("host-local"), "DEL", &e, &conf(d1.path())).ok();
}

/// 0.4.0 results carry `version` on each IP, 1.0.0 ones do not.
#[test]
fn result_shape_follows_the_config_version() {
    let dir = tempfile::tempdir().unwrap();
    for (v, has_version) in [("0.4.0", true), ("1.0.0", false), ("1.1.0", false)] {
        let conf = json!({"cniVersion": v, "name": format!("v{}", v.replace('.', "")), "type": "host-local",
                          "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.222.52.0/24"}]], "dataDir": dir.path()}});
        let r = run(&bin("host-local"), "ADD", &env(), &conf).ok().json();
        assert_eq!(r["cniVersion"], v);
        assert_eq!(
            r["ips"][0].get("version").is_some(),
            has_version,
            "{v}: {r}"
        );
    }
}
