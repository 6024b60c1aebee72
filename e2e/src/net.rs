//! Pod networks for the CNI scenario tests: a bridge network of its own per
//! test (a unique bridge `bn<hex>`, a private `10.223.N.0/24` no other test
//! or host route uses, a host-local `dataDir` of its own), written as a
//! conflist for either Debian's reference plugins or Berth's own, and the
//! host-side checks (bridge ports, IP allocations, nftables/iptables rules).
//!
//! Traffic safety: before a test sends anything to a pod address,
//! [`TestNet::assert_routed`] turns on `/work/shared/tools/net-guard`
//! (private ranges may not leave through the default-route interface) and
//! asserts the host routes the address through the test bridge.
//!
//! A [`TestNet`] removes what a test could leave on the host when dropped,
//! also when the test panics: links on its bridge, the bridge, iptables
//! rules and chains and nftables rules naming its network or subnet. Drop it
//! after the [`crate::pods::PodEnv`] (declare it first), so berthd's own
//! teardown (CNI DEL) runs while the bridge still exists.

use std::collections::HashSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use serde_json::{Value, json};

use crate::CniOptions;
use crate::pods::random_hex;

/// Where net-guard is looked for when `$BERTH_NET_GUARD` is unset and the
/// `shared/` folder beside the workspace has none.
pub const NET_GUARD: &str = "/work/shared/tools/net-guard";

/// The net-guard script: `$BERTH_NET_GUARD`, else `shared/tools/net-guard`
/// beside the workspace (where CI puts it), else [`NET_GUARD`].
pub fn net_guard_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("BERTH_NET_GUARD") {
        return p.into();
    }
    let beside =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/net-guard");
    if beside.exists() {
        return beside;
    }
    NET_GUARD.into()
}
/// The table net-guard installs.
pub const NET_GUARD_TABLE: &str = "berth_test_guard";
/// Debian's containernetworking-plugins.
pub const REFERENCE_PLUGIN_DIR: &str = "/usr/lib/cni";
/// The plugins every test conflist uses.
pub const CORE_PLUGINS: [&str; 4] = ["bridge", "host-local", "loopback", "portmap"];

/// Which CNI plugin binaries berthd runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugins {
    /// Debian's reference plugins in /usr/lib/cni (portmap uses iptables
    /// chains `CNI-HOSTPORT-*`, `CNI-DN-*`).
    Reference,
    /// Berth's plugins (crate `cni`), next to the berthd binary (portmap
    /// uses `table ip berth-portmap`); berthd runs their code in-process.
    Berth,
    /// Berth's plugins run as programs (berthd's `cni.in_process = false`):
    /// the spec's env + stdin path.
    BerthExec,
}

impl Plugins {
    pub fn dir(self) -> PathBuf {
        match self {
            Plugins::Reference => PathBuf::from(REFERENCE_PLUGIN_DIR),
            Plugins::Berth | Plugins::BerthExec => crate::berthd::bin_dir(),
        }
    }

    /// Panics naming the core plugins missing from [`Plugins::dir`].
    pub fn require(self) {
        let dir = self.dir();
        let missing: Vec<&str> = CORE_PLUGINS
            .iter()
            .copied()
            .filter(|p| !dir.join(p).is_file())
            .collect();
        assert!(
            missing.is_empty(),
            "{self:?} CNI plugins {missing:?} not found in {} ({})",
            dir.display(),
            match self {
                Plugins::Reference => "apt-get install containernetworking-plugins",
                Plugins::Berth | Plugins::BerthExec => "cargo build --workspace --bins",
            }
        );
    }
}

/// Runs a command; returns (success, stdout, stderr).
pub fn run(program: &str, args: &[&str]) -> (bool, String, String) {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), format!("run {program}: {e}")),
    }
}

/// Runs a command with `input` on stdin; returns (success, stderr).
fn run_stdin(program: &str, args: &[&str], input: &str) -> (bool, String) {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return (false, format!("run {program}: {e}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
    }
    match child.wait_with_output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, e.to_string()),
    }
}

static GUARD: Mutex<()> = Mutex::new(());

/// Installs net-guard unless its table is there (once per process, and
/// again if someone removed it); panics if it cannot.
pub fn net_guard_on() {
    let _lock = GUARD.lock().unwrap_or_else(|e| e.into_inner());
    if run("nft", &["list", "table", "inet", NET_GUARD_TABLE]).0 {
        return;
    }
    let guard = net_guard_path().display().to_string();
    let (ok, out, err) = run("bash", &[&guard, "on"]);
    assert!(
        ok,
        "{guard} on failed; not sending traffic to pod addresses:\n{out}{err}"
    );
    assert!(
        run("nft", &["list", "table", "inet", NET_GUARD_TABLE]).0,
        "{guard} on succeeded but table inet {NET_GUARD_TABLE} is missing ({out}); not sending traffic to pod addresses"
    );
}

/// The interface of the host's default route, if there is one.
pub fn default_route_dev() -> Option<String> {
    let (_, out, _) = run("ip", &["route", "show", "default"]);
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "dev" {
            return words.next().map(str::to_string);
        }
    }
    None
}

/// Bridge names handed out in this process.
static BRIDGES: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();

/// Subnet numbers N (10.223.N.0/24) handed out in this process.
static SUBNETS: OnceLock<Mutex<HashSet<u8>>> = OnceLock::new();

fn reserve_subnet() -> u8 {
    let taken = SUBNETS.get_or_init(|| Mutex::new(HashSet::new()));
    let mut taken = taken.lock().unwrap_or_else(|e| e.into_inner());
    let routes = run("ip", &["-4", "route", "show", "table", "all"]).1;
    let addrs = run("ip", &["-4", "-o", "addr", "show"]).1;
    let start = u8::from_str_radix(&random_hex(1), 16).unwrap();
    for i in 0..=255u16 {
        let n = ((start as u16 + i) % 231 + 10) as u8; // 10..=240
        let prefix = format!("10.223.{n}.");
        if taken.contains(&n) || routes.contains(&prefix) || addrs.contains(&prefix) {
            continue;
        }
        taken.insert(n);
        return n;
    }
    panic!("no free 10.223.N.0/24 subnet for a test network");
}

/// What the host had before the first [`TestNet`] of this process. The
/// reference portmap creates shared chains it never removes
/// (`CNI-HOSTPORT-*` and the base chains of the `nat` tables, through
/// iptables-nft); when the last TestNet goes, what was not there before and
/// is no longer used is removed.
struct HostBaseline {
    live: usize,
    /// Per [`IPTABLES`] entry: the chains of its `nat` table (`None`: no
    /// such table).
    nat_chains: Vec<Option<HashSet<String>>>,
}

static BASELINE: Mutex<Option<HostBaseline>> = Mutex::new(None);

/// (save program, restore program, nft family)
const IPTABLES: [(&str, &str, &str); 2] = [
    ("iptables-save", "iptables-restore", "ip"),
    ("ip6tables-save", "ip6tables-restore", "ip6"),
];

/// (chain names, has rules) of `family nat`; `None` without the table.
fn nat_table(family: &str) -> Option<(HashSet<String>, bool)> {
    let (ok, text, _) = run("nft", &["-j", "list", "table", family, "nat"]);
    if !ok {
        return None;
    }
    let v: Value = serde_json::from_str(&text).ok()?;
    let items = v["nftables"].as_array().cloned().unwrap_or_default();
    let chains = items
        .iter()
        .filter_map(|i| i["chain"]["name"].as_str().map(str::to_string))
        .collect();
    let rules = items.iter().any(|i| i.get("rule").is_some());
    Some((chains, rules))
}

fn nat_chain_has_rules(family: &str, chain: &str) -> bool {
    let (_, text, _) = run("nft", &["-j", "list", "chain", family, "nat", chain]);
    serde_json::from_str::<Value>(&text).is_ok_and(|v| {
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i.get("rule").is_some())
    })
}

fn baseline_enter() {
    let mut b = BASELINE.lock().unwrap_or_else(|e| e.into_inner());
    let b = b.get_or_insert_with(|| HostBaseline {
        live: 0,
        nat_chains: Vec::new(),
    });
    if b.live == 0 {
        b.nat_chains = IPTABLES
            .iter()
            .map(|(_, _, family)| nat_table(family).map(|(chains, _)| chains))
            .collect();
    }
    b.live += 1;
}

fn baseline_leave() {
    let mut guard = BASELINE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(b) = guard.as_mut() else {
        return;
    };
    b.live = b.live.saturating_sub(1);
    if b.live > 0 {
        return;
    }
    for ((save, restore, family), before) in IPTABLES.iter().zip(&b.nat_chains) {
        let had = |c: &str| before.as_ref().is_some_and(|set| set.contains(c));
        if !had("CNI-HOSTPORT-DNAT") {
            remove_hostport_chains(save, restore);
        }
        let Some((chains, _)) = nat_table(family) else {
            continue;
        };
        // Empty chains that were not there (iptables-nft's base chains).
        for c in chains.iter().filter(|c| !had(c)) {
            if !nat_chain_has_rules(family, c) {
                run("nft", &["delete", "chain", family, "nat", c]);
            }
        }
        if before.is_none()
            && let Some((chains, rules)) = nat_table(family)
            && chains.is_empty()
            && !rules
        {
            run("nft", &["delete", "table", family, "nat"]);
        }
    }
}

/// Removes the reference portmap's shared `CNI-HOSTPORT-*` chains and the
/// jumps to them, if no pod's mapping is in `CNI-HOSTPORT-DNAT`; one
/// atomic iptables-restore (it fails, removing nothing, if a chain is
/// still referenced).
fn remove_hostport_chains(save: &str, restore: &str) {
    let (_, text, _) = run(save, &["-t", "nat"]);
    let chains: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| c.starts_with("CNI-HOSTPORT-"))
        .map(str::to_string)
        .collect();
    if chains.is_empty() || text.lines().any(|l| l.starts_with("-A CNI-HOSTPORT-DNAT ")) {
        return;
    }
    let mut script = String::from("*nat\n");
    for line in text.lines().filter(|l| l.starts_with("-A ")) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let from_ours = chains.iter().any(|c| c == words[1]);
        let jumps_to_ours = words
            .windows(2)
            .any(|w| w[0] == "-j" && chains.iter().any(|c| c == w[1]));
        if jumps_to_ours && !from_ours {
            script.push_str(&format!("-D {}\n", &line[3..]));
        }
    }
    for c in &chains {
        script.push_str(&format!("-F {c}\n"));
    }
    for c in &chains {
        script.push_str(&format!("-X {c}\n"));
    }
    script.push_str("COMMIT\n");
    let (ok, err) = run_stdin(restore, &["--noflush"], &script);
    if !ok {
        eprintln!("net harness: removing the shared CNI-HOSTPORT chains failed: {err}");
    }
}

/// One test's bridge network.
pub struct TestNet {
    pub plugins: Plugins,
    /// The subnet is 10.223.`n`.0/24.
    pub n: u8,
    /// `bn<4 hex>`.
    pub bridge: String,
    /// The network name in the conflist (`berth-e2e-<hex>`).
    pub name: String,
    /// Holds the host-local dataDir and fake plugins.
    pub dir: tempfile::TempDir,
}

impl TestNet {
    pub fn new(plugins: Plugins) -> TestNet {
        crate::require_root();
        plugins.require();
        let bridge = {
            let names = BRIDGES.get_or_init(|| Mutex::new(HashSet::new()));
            let mut names = names.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let b = format!("bn{}", random_hex(2));
                if !Path::new("/sys/class/net").join(&b).exists() && names.insert(b.clone()) {
                    break b;
                }
            }
        };
        let net = TestNet {
            plugins,
            n: reserve_subnet(),
            name: format!("berth-e2e-{}", random_hex(4)),
            bridge,
            dir: tempfile::Builder::new()
                .prefix("berth-e2e-net-")
                .tempdir()
                .expect("temp dir"),
        };
        baseline_enter();
        std::fs::create_dir_all(net.data_dir()).unwrap();
        std::fs::create_dir_all(net.fake_bin_dir()).unwrap();
        net
    }

    /// `10.223.N.0/24`
    pub fn subnet(&self) -> String {
        format!("10.223.{}.0/24", self.n)
    }

    /// `10.223.N.` (what every address of the subnet starts with).
    pub fn prefix(&self) -> String {
        format!("10.223.{}.", self.n)
    }

    /// The bridge's own address (`isGateway`).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 223, self.n, 1)
    }

    pub fn contains(&self, ip: &str) -> bool {
        ip.parse::<Ipv4Addr>()
            .is_ok_and(|a| a.octets()[..3] == [10, 223, self.n] && a.octets()[3] != 0)
    }

    /// host-local's `dataDir`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// Where [`TestNet::fake_plugin`] writes its scripts.
    pub fn fake_bin_dir(&self) -> PathBuf {
        self.dir.path().join("bin")
    }

    /// berthd's `[cni]` options for these plugins: the fake plugins' dir
    /// first, then the plugins' dir; `plugin_timeout_secs` as given.
    pub fn cni_options(&self, plugin_timeout_secs: Option<u64>) -> CniOptions {
        CniOptions {
            bin_dirs: vec![self.fake_bin_dir(), self.plugins.dir()],
            plugin_timeout_secs,
            in_process: (self.plugins == Plugins::BerthExec).then_some(false),
        }
    }

    /// The `bridge` plugin with host-local IPAM: `isGateway`, no masquerade,
    /// no routes (pods reach their subnet only).
    pub fn bridge_plugin(&self) -> Value {
        json!({
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": self.subnet()}]],
                "dataDir": self.data_dir().display().to_string(),
            }
        })
    }

    pub fn portmap_plugin(&self) -> Value {
        json!({"type": "portmap", "capabilities": {"portMappings": true}})
    }

    pub fn loopback_plugin(&self) -> Value {
        json!({"type": "loopback"})
    }

    /// bridge, portmap (if `portmap`), loopback.
    pub fn standard_plugins(&self, portmap: bool) -> Vec<Value> {
        let mut v = vec![self.bridge_plugin()];
        if portmap {
            v.push(self.portmap_plugin());
        }
        v.push(self.loopback_plugin());
        v
    }

    pub fn conflist(&self, plugins: Vec<Value>) -> Value {
        json!({"cniVersion": "1.0.0", "name": self.name, "plugins": plugins})
    }

    /// Writes `<conf_dir>/10-<name>.conflist`.
    pub fn write_conflist(&self, conf_dir: &Path, plugins: Vec<Value>) -> PathBuf {
        std::fs::create_dir_all(conf_dir).unwrap();
        let path = conf_dir.join(format!("10-{}.conflist", self.name));
        std::fs::write(
            &path,
            serde_json::to_vec_pretty(&self.conflist(plugins)).unwrap(),
        )
        .unwrap();
        path
    }

    /// A shell-script plugin `<fake bin dir>/<name>`: logs
    /// `<name> <CNI_COMMAND> <CNI_CONTAINERID>` to [`TestNet::calls_log`], answers
    /// VERSION, runs `on_add` for ADD and exits 0 for anything else.
    pub fn fake_plugin(&self, name: &str, on_add: &str) -> PathBuf {
        let path = self.fake_bin_dir().join(name);
        let log = self.calls_log();
        let script = format!(
            "#!/bin/sh\n\
             echo \"{name} $CNI_COMMAND $CNI_CONTAINERID\" >> '{log}'\n\
             case \"$CNI_COMMAND\" in\n\
             ADD)\n{on_add}\n;;\n\
             VERSION) echo '{{\"cniVersion\":\"1.0.0\",\"supportedVersions\":[\"0.3.0\",\"0.3.1\",\"0.4.0\",\"1.0.0\"]}}' ;;\n\
             esac\n\
             exit 0\n",
            log = log.display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// A spy: `<fake bin dir>/<name>` logs the call like
    /// [`TestNet::fake_plugin`], then execs the real plugin `name` of
    /// [`TestNet::plugins`] (same stdin and environment).
    pub fn spy_plugin(&self, name: &str) -> PathBuf {
        let path = self.fake_bin_dir().join(name);
        let script = format!(
            "#!/bin/sh\necho \"{name} $CNI_COMMAND $CNI_CONTAINERID\" >> '{}'\nexec '{}'\n",
            self.calls_log().display(),
            self.plugins.dir().join(name).display()
        );
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Where fake plugins and spies log their calls, one a line:
    /// `<plugin> <CNI_COMMAND> <CNI_CONTAINERID>`, in call order.
    pub fn calls_log(&self) -> PathBuf {
        self.dir.path().join("plugin.calls")
    }

    /// Every logged call, in order.
    pub fn all_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.calls_log())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The calls of fake plugin or spy `name`: `<CNI_COMMAND> <id>`.
    pub fn fake_calls(&self, name: &str) -> Vec<String> {
        let prefix = format!("{name} ");
        self.all_calls()
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }

    /// Turns net-guard on and asserts the host routes `ip` through this
    /// test's bridge; panics (so the test sends nothing) otherwise.
    pub fn assert_routed(&self, ip: &str) {
        assert!(
            self.contains(ip),
            "{ip} is not in the test subnet {}: not sending to it",
            self.subnet()
        );
        net_guard_on();
        let (ok, out, err) = run("ip", &["route", "get", ip]);
        assert!(ok, "ip route get {ip} failed: {err}");
        let words: Vec<&str> = out.split_whitespace().collect();
        let dev = words
            .windows(2)
            .find(|w| w[0] == "dev")
            .map(|w| w[1])
            .unwrap_or("");
        assert_eq!(
            dev, self.bridge,
            "the route to pod address {ip} does not go through the test bridge {}: {out:?}; aborting before any traffic",
            self.bridge
        );
    }

    pub fn bridge_exists(&self) -> bool {
        Path::new("/sys/class/net").join(&self.bridge).exists()
    }

    /// The links enslaved to the bridge (the host ends of pod veths).
    pub fn bridge_ports(&self) -> Vec<String> {
        bridge_ports(&self.bridge)
    }

    /// The addresses host-local has allocated (files named like an IP in
    /// `<dataDir>/<network name>/`).
    pub fn allocations(&self) -> Vec<String> {
        let dir = self.data_dir().join(&self.name);
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The container id host-local recorded for an allocated address.
    pub fn allocation_owner(&self, ip: &str) -> Option<String> {
        std::fs::read_to_string(self.data_dir().join(&self.name).join(ip))
            .ok()
            .map(|s| s.lines().next().unwrap_or("").trim().to_string())
    }

    /// Host packet-filter rules mentioning this network (its name or
    /// subnet) or any of `needles`.
    pub fn rules_mentioning(&self, needles: &[&str]) -> Vec<String> {
        let mut all = vec![self.name.as_str()];
        let prefix = self.prefix();
        all.push(&prefix);
        all.extend_from_slice(needles);
        rules_mentioning(&all)
    }
}

/// The links enslaved to `bridge`.
pub fn bridge_ports(bridge: &str) -> Vec<String> {
    let dir = Path::new("/sys/class/net").join(bridge).join("brif");
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

/// Lines of `nft list ruleset`, `iptables-save` and `ip6tables-save`
/// containing any of `needles`, prefixed with where they are from.
pub fn rules_mentioning(needles: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for (what, program, args) in [
        ("nft", "nft", &["list", "ruleset"][..]),
        ("iptables", "iptables-save", &[][..]),
        ("ip6tables", "ip6tables-save", &[][..]),
    ] {
        let (_, text, _) = run(program, args);
        let mut table = String::new();
        for line in text.lines() {
            let t = line.trim();
            if t.starts_with("table ") || t.starts_with('*') {
                table = t.trim_end_matches(" {").to_string();
            }
            if needles.iter().any(|n| !n.is_empty() && line.contains(n)) {
                out.push(format!("{what} [{table}] {t}"));
            }
        }
    }
    out
}

/// Removes iptables rules (all tables) mentioning any of `needles`, and the
/// `CNI-DN-*`/`CNI-SN-*` chains holding such rules (with the jumps to
/// them); best effort, for cleanup.
fn remove_iptables_rules(save: &str, restore: &str, needles: &[&str]) {
    let (_, text, _) = run(save, &[]);
    // (table, its "-A ..." lines)
    let mut tables: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            tables.push((t.to_string(), Vec::new()));
        } else if line.starts_with("-A ")
            && let Some((_, rules)) = tables.last_mut()
        {
            rules.push(line.to_string());
        }
    }
    let mut script = String::new();
    for (table, rules) in &tables {
        let chain_of = |r: &str| r.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut drop_chains: Vec<String> = Vec::new();
        for r in rules
            .iter()
            .filter(|r| needles.iter().any(|n| r.contains(n)))
        {
            let c = chain_of(r);
            if (c.starts_with("CNI-DN-") || c.starts_with("CNI-SN-")) && !drop_chains.contains(&c) {
                drop_chains.push(c);
            }
        }
        let deletes: Vec<&String> = rules
            .iter()
            .filter(|r| !drop_chains.contains(&chain_of(r)))
            .filter(|r| {
                needles.iter().any(|n| r.contains(n)) || {
                    let words: Vec<&str> = r.split_whitespace().collect();
                    words
                        .windows(2)
                        .any(|w| w[0] == "-j" && drop_chains.iter().any(|c| c == w[1]))
                }
            })
            .collect();
        if deletes.is_empty() && drop_chains.is_empty() {
            continue;
        }
        script.push_str(&format!("*{table}\n"));
        for d in deletes {
            script.push_str(&format!("-D {}\n", &d[3..]));
        }
        for c in &drop_chains {
            script.push_str(&format!("-F {c}\n-X {c}\n"));
        }
        script.push_str("COMMIT\n");
    }
    if script.is_empty() {
        return;
    }
    eprintln!("net harness: removing leftover {save} rules:\n{script}");
    let (ok, err) = run_stdin(restore, &["--noflush"], &script);
    if !ok {
        eprintln!("net harness: {restore} failed: {err}");
    }
}

/// Deletes nftables rules (any table) whose JSON mentions one of `needles`;
/// best effort, for cleanup.
fn remove_nft_rules(needles: &[&str]) {
    let (ok, text, _) = run("nft", &["-j", "list", "ruleset"]);
    if !ok {
        return;
    }
    let Ok(doc) = serde_json::from_str::<Value>(&text) else {
        return;
    };
    let mut script = String::new();
    for item in doc["nftables"].as_array().into_iter().flatten() {
        let Some(rule) = item.get("rule") else {
            continue;
        };
        if rule["table"].as_str() == Some(NET_GUARD_TABLE) {
            continue;
        }
        let text = rule.to_string();
        if needles.iter().any(|n| text.contains(n)) {
            script.push_str(&format!(
                "delete rule {} {} {} handle {}\n",
                rule["family"].as_str().unwrap_or(""),
                rule["table"].as_str().unwrap_or(""),
                rule["chain"].as_str().unwrap_or(""),
                rule["handle"]
            ));
        }
    }
    if script.is_empty() {
        return;
    }
    eprintln!("net harness: removing leftover nft rules:\n{script}");
    let (ok, err) = run_stdin("nft", &["-f", "-"], &script);
    if !ok {
        eprintln!("net harness: nft failed: {err}");
    }
}

impl TestNet {
    /// Kills processes running a fake plugin of this test (a hanging one
    /// outlives a killed berthd).
    pub fn kill_fake_plugins(&self) {
        let dir = self.fake_bin_dir().display().to_string();
        for pid in crate::pods::all_pids() {
            if crate::pods::cmdline(pid).is_some_and(|c| c.contains(&dir)) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        self.kill_fake_plugins();
        for port in self.bridge_ports() {
            eprintln!(
                "net harness: deleting leftover link {port} on {}",
                self.bridge
            );
            run("ip", &["link", "del", &port]);
        }
        if self.bridge_exists() {
            let (ok, _, err) = run("ip", &["link", "del", &self.bridge]);
            if !ok {
                eprintln!("net harness: ip link del {}: {err}", self.bridge);
            }
        }
        let prefix = self.prefix();
        let needles = [self.name.as_str(), prefix.as_str()];
        remove_iptables_rules("iptables-save", "iptables-restore", &needles);
        remove_nft_rules(&needles);
        if let Some(s) = SUBNETS.get() {
            s.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.n);
        }
        baseline_leave();
    }
}

// ---- pods ----

/// The first IPv4 address of `dev` in `ip -4 -o addr show dev <dev>`
/// output.
pub fn parse_inet(ip_addr_output: &str) -> Option<String> {
    let words: Vec<&str> = ip_addr_output.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == "inet")
        .map(|w| w[1].split('/').next().unwrap_or("").to_string())
}

/// Interface names in a `/proc/net/dev` text.
pub fn proc_net_dev_names(text: &str) -> Vec<String> {
    text.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
        .collect()
}
