//! Helpers for the plugin integration tests: run plugin binaries the way the
//! CNI spec describes (env + stdin), create and always remove network
//! namespaces, bridges, nft tables and IPAM dirs, and move test traffic only
//! to 127.0.0.0/8 or to pods inside namespaces the test created.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const REF_DIR: &str = "/usr/lib/cni";

pub fn bin(name: &str) -> PathBuf {
    PathBuf::from(match name {
        "bridge" => env!("CARGO_BIN_EXE_bridge"),
        "host-local" => env!("CARGO_BIN_EXE_host-local"),
        "loopback" => env!("CARGO_BIN_EXE_loopback"),
        "portmap" => env!("CARGO_BIN_EXE_portmap"),
        other => panic!("no plugin {other}"),
    })
}

pub fn ref_bin(name: &str) -> PathBuf {
    Path::new(REF_DIR).join(name)
}

/// The directory holding Berth's plugin binaries (a CNI_PATH entry).
pub fn berth_dir() -> String {
    bin("bridge").parent().unwrap().display().to_string()
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Root tests print why they do nothing when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !common::is_root() {
            eprintln!("skipped: needs root");
            return;
        }
    };
}

pub fn have_reference_plugins() -> bool {
    ref_bin("bridge").exists() && ref_bin("host-local").exists()
}

pub fn rand4() -> String {
    format!("{:04x}", rand::random::<u16>())
}

/// What a plugin run printed and how it exited.
#[derive(Debug)]
pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }
    pub fn ok(self) -> Self {
        assert_eq!(
            self.code, 0,
            "plugin failed: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// One invocation's environment.
#[derive(Debug, Clone)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub cni_path: String,
    pub args: String,
}

impl Env {
    pub fn new(container_id: &str, netns: &str, cni_path: &str) -> Self {
        Env {
            container_id: container_id.into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            cni_path: cni_path.into(),
            args: String::new(),
        }
    }
}

/// Runs a plugin binary with CNI_* set and `conf` on stdin.
pub fn run(plugin: &Path, command: &str, env: &Env, conf: &Value) -> Out {
    run_raw(
        plugin,
        command,
        env,
        serde_json::to_vec(conf).unwrap().as_slice(),
    )
}

pub fn run_raw(plugin: &Path, command: &str, env: &Env, stdin: &[u8]) -> Out {
    let mut cmd = Command::new(plugin);
    for (k, _) in std::env::vars() {
        if k.starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &env.container_id)
        .env("CNI_NETNS", &env.netns)
        .env("CNI_IFNAME", &env.ifname)
        .env("CNI_PATH", &env.cni_path)
        .env("CNI_ARGS", &env.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn plugin");
    let _ = child.stdin.take().unwrap().write_all(stdin);
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn sh(cmd: &str) -> (bool, String) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct Netns {
    pub name: String,
    pub path: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        // Random names can collide (20 namespaces made at once share a
        // 16-bit space): a taken name is retried with a fresh one.
        let mut attempt = 0;
        let name = loop {
            let name = format!("{prefix}{}", rand4());
            let (ok, out) = sh(&format!("ip netns add {name}"));
            if ok {
                break name;
            }
            attempt += 1;
            assert!(
                out.contains("File exists") && attempt < 10,
                "ip netns add {name}: {out}"
            );
        };
        Netns {
            path: format!("/var/run/netns/{name}"),
            name,
        }
    }

    pub fn file(&self) -> File {
        File::open(&self.path).unwrap()
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, cmd: &str) -> String {
        let (ok, out) = sh(&format!("ip netns exec {} {cmd}", self.name));
        assert!(ok, "{cmd} in {}: {out}", self.name);
        out
    }

    pub fn delete(&self) {
        let _ = sh(&format!("ip netns del {} 2>/dev/null", self.name));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Removes bridges, veths, dirs and the given containers' nft rules on drop
/// (also when the test fails), and restores `ip_forward`.
pub struct Cleanup {
    pub links: Vec<String>,
    pub dirs: Vec<PathBuf>,
    /// Substrings of nft rule comments to purge from Berth's tables.
    pub nft_comments: Vec<String>,
    ip_forward: String,
}

impl Default for Cleanup {
    fn default() -> Self {
        Cleanup {
            links: Vec::new(),
            dirs: Vec::new(),
            nft_comments: Vec::new(),
            ip_forward: std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap_or_else(|_| "0".into())
                .trim()
                .to_string(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for l in &self.links {
            let _ = sh(&format!("ip link del {l} 2>/dev/null"));
        }
        for d in &self.dirs {
            let _ = std::fs::remove_dir_all(d);
        }
        for (fam, table) in [
            ("ip", "berth-portmap"),
            ("ip6", "berth-portmap"),
            ("ip", "berth-bridge"),
            ("ip6", "berth-bridge"),
        ] {
            for c in &self.nft_comments {
                for (chain, handle) in rules_with_comment(fam, table, c) {
                    let _ = sh(&format!(
                        "nft delete rule {fam} {table} {chain} handle {handle}"
                    ));
                }
            }
        }
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", &self.ip_forward);
    }
}

/// (chain, handle) of rules in `family table` whose comment contains `needle`.
pub fn rules_with_comment(family: &str, table: &str, needle: &str) -> Vec<(String, u64)> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", family, table])
        .output();
    let Ok(out) = out else { return vec![] };
    if !out.status.success() {
        return vec![];
    }
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("rule"))
        .filter(|r| r["comment"].as_str().is_some_and(|c| c.contains(needle)))
        .map(|r| {
            (
                r["chain"].as_str().unwrap().to_string(),
                r["handle"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Installs the shared network guard (rejects private-range traffic that
/// would leave through the default route). Panics if it cannot.
pub fn net_guard_on() {
    let script = std::env::var_os("BERTH_NET_GUARD")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/net-guard"),
            PathBuf::from("/work/shared/tools/net-guard"),
        ])
        .find(|p| p.exists());
    match script {
        Some(p) => {
            let (ok, out) = sh(&format!("bash {} on", p.display()));
            assert!(ok, "net-guard on failed: {out}");
        }
        None => {
            // The same rule, inline, when the shared tool is not there.
            let (_, dev) = sh(
                "ip route show default | awk '/default/ {for (i=1;i<=NF;i++) if ($i==\"dev\") {print $(i+1); exit}}'",
            );
            let dev = dev.trim();
            if !dev.is_empty() {
                let (ok, out) = sh(&format!(
                    "nft -f - <<'EOF'\ntable inet berth_test_guard {{\n chain out {{\n  type filter hook output priority 0; policy accept;\n  oifname \"{dev}\" ip daddr {{ 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10 }} counter reject\n }}\n}}\nEOF"
                ));
                assert!(ok, "inline net guard failed: {out}");
            }
        }
    }
}

/// Asserts the host routes `ip` through `dev` (the test bridge).
pub fn assert_route_via(ip: IpAddr, dev: &str) {
    let (ok, out) = sh(&format!("ip route get {ip}"));
    assert!(ok, "ip route get {ip}: {out}");
    assert!(
        out.contains(&format!("dev {dev} ")),
        "route to {ip} does not go through {dev}: {out}"
    );
}

/// A subnet third octet in 10.222.0.0/16 no route of the host covers yet.
pub fn free_subnet(hint: u8) -> String {
    for k in 0..=255u16 {
        let o = ((hint as u16 + k) % 256) as u8;
        let s = format!("10.222.{o}.0/24");
        let (_, routes) = sh("ip -4 route show");
        if !routes.contains(&format!("10.222.{o}.")) {
            return s;
        }
    }
    panic!("no free 10.222.x.0/24 subnet");
}

/// Runs `f` inside `ns` (a thread that setns'd into it).
pub fn in_ns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let file = ns.file();
    berth_cni::netlink::in_netns(&file, || Ok(f())).unwrap()
}

/// A one-connection TCP server inside `ns` on `addr`: reads until EOF and
/// answers `reply:<peer ip>:<what it read>`. Returns when it is listening.
pub fn tcp_server(ns: &Netns, addr: SocketAddr, reply: &str) -> std::thread::JoinHandle<String> {
    let file = ns.file();
    let reply = reply.to_string();
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        berth_cni::netlink::in_netns(&file, || {
            let l = TcpListener::bind(addr).unwrap();
            l.set_nonblocking(true).unwrap();
            tx.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut got = String::new();
                        s.read_to_string(&mut got).unwrap();
                        s.write_all(format!("{reply}:{}:{got}", peer.ip()).as_bytes())
                            .unwrap();
                        return Ok(format!("{}:{got}", peer.ip()));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(Instant::now() < deadline, "no connection to {addr}");
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            }
        })
        .unwrap()
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("server listening");
    h
}

/// Connects to `addr`, sends `msg`, returns the answer.
pub fn tcp_client(addr: SocketAddr, msg: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(msg.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A one-datagram UDP echo inside `ns`.
pub fn udp_echo(ns: &Netns, addr: SocketAddr) -> std::thread::JoinHandle<()> {
    let file = ns.file();
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        berth_cni::netlink::in_netns(&file, || {
            let s = UdpSocket::bind(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            let (n, peer) = s.recv_from(&mut buf).unwrap();
            let mut reply = b"echo:".to_vec();
            reply.extend_from_slice(&buf[..n]);
            s.send_to(&reply, peer).unwrap();
            Ok(())
        })
        .unwrap()
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("udp server ready");
    h
}

/// A bridge network config (host-local IPAM) in the conflist style.
pub fn bridge_conf(
    version: &str,
    name: &str,
    bridge: &str,
    subnet: &str,
    data_dir: &Path,
    ipam_type: &str,
) -> Value {
    json!({
        "cniVersion": version,
        "name": name,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "isDefaultGateway": true,
        "hairpinMode": true,
        "ipam": {
            "type": ipam_type,
            "ranges": [[{"subnet": subnet}]],
            "dataDir": data_dir,
        }
    })
}

/// One plugin of a conflist with the list's name and version injected, and
/// `prevResult` / `runtimeConfig` when given (what libcni does).
pub fn chained(
    plugin: &Value,
    name: &str,
    version: &str,
    prev: Option<&Value>,
    runtime: Option<Value>,
) -> Value {
    let mut c = plugin.clone();
    c["name"] = json!(name);
    c["cniVersion"] = json!(version);
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    if let Some(r) = runtime {
        c["runtimeConfig"] = r;
    }
    c
}

/// The container's IPv4 address (ip, prefix) from a result.
pub fn pod_ip(result: &Value) -> IpAddr {
    let ifaces = result["interfaces"].as_array().unwrap();
    for ip in result["ips"].as_array().unwrap() {
        let idx = ip["interface"].as_u64().unwrap() as usize;
        if ifaces[idx]["sandbox"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
        {
            let a = ip["address"].as_str().unwrap();
            let ip: IpAddr = a.split('/').next().unwrap().parse().unwrap();
            if !ip.is_loopback() {
                return ip;
            }
        }
    }
    panic!("no pod address in {result}");
}

/// Names of the links enslaved to `bridge`.
pub fn bridge_ports(bridge: &str) -> Vec<String> {
    let (_, out) = sh(&format!("ip -o link show master {bridge} 2>/dev/null"));
    out.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap().to_string())
        .collect()
}

/// Allocation files (names) in an IPAM network dir, without lock/last_*.
pub fn ipam_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
