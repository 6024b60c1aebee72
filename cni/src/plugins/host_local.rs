//! `host-local` IPAM: addresses from configured ranges, one file per
//! allocated address under `<dataDir>/<network name>/`, compatible with the
//! reference plugin's store (same file names, contents, `last_reserved_ip.N`
//! files and `lock` file), so either plugin can take over the other's state.
//!
//! Allocation is serialised by an flock on `<dir>/lock`; reservation files are
//! created with O_EXCL and synced before the result is returned, so state
//! survives crashes and restarts: the files are the state.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ip::{IpNet, ip_le, next_ip, parse_ip_maybe_cidr, prev_ip};
use crate::spec::{CniResult, Dns, Error, IpConfig, NetConf, Request, Result, Route};

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";
const LAST_IP_PREFIX: &str = "last_reserved_ip.";
const LOCK_FILE: &str = "lock";

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct RawConf {
    #[serde(default)]
    ipam: Option<RawIpam>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: Option<RawRuntime>,
    #[serde(default)]
    args: Option<RawArgs>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRuntime {
    #[serde(default)]
    ips: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawArgs {
    #[serde(default)]
    cni: Option<RawRuntime>,
}

#[derive(Debug, Deserialize)]
struct RawIpam {
    #[serde(rename = "type", default)]
    _plugin_type: String,
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(default)]
    subnet: Option<String>,
    #[serde(rename = "rangeStart", default)]
    range_start: Option<String>,
    #[serde(rename = "rangeEnd", default)]
    range_end: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(rename = "dataDir", default)]
    data_dir: Option<String>,
    #[serde(rename = "resolvConf", default)]
    resolv_conf: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawRange {
    #[serde(default)]
    subnet: String,
    #[serde(rename = "rangeStart", default)]
    range_start: Option<String>,
    #[serde(rename = "rangeEnd", default)]
    range_end: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
}

/// One canonical range: every address from `start` to `end` (inclusive)
/// except `gateway` can be handed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// The subnet, host bits clear.
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

impl Range {
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.subnet.contains(ip) && ip_le(self.start, ip) && ip_le(ip, self.end)
    }

    fn overlaps(&self, o: &Range) -> bool {
        self.subnet.addr.is_ipv4() == o.subnet.addr.is_ipv4()
            && ip_le(self.start, o.end)
            && ip_le(o.start, self.end)
    }

    fn describe(&self) -> String {
        format!("{}-{}", self.start, self.end)
    }
}

fn parse_ip(what: &str, s: &str) -> Result<IpAddr> {
    s.trim()
        .parse()
        .map_err(|_| Error::config(format!("invalid {what} {s:?}")))
}

impl RawRange {
    fn canonicalize(&self) -> Result<Range> {
        if self.subnet.is_empty() {
            return Err(Error::config("a range is missing its subnet"));
        }
        let net: IpNet = self.subnet.parse().map_err(Error::config)?;
        if !net.is_network() {
            return Err(Error::config(format!(
                "network {} has host bits set; for a subnet mask of length {} the network address is {}",
                self.subnet,
                net.prefix,
                net.network().addr
            )));
        }
        let bits = crate::ip::max_prefix(&net.addr);
        if net.prefix > bits - 2 {
            return Err(Error::config(format!(
                "network {} too small to allocate from",
                self.subnet
            )));
        }
        let first = next_ip(net.addr);
        let last = if net.is_ipv4() {
            prev_ip(net.last())
        } else {
            net.last()
        };
        let in_subnet = |what: &str, ip: IpAddr| -> Result<IpAddr> {
            if !net.contains(ip) {
                return Err(Error::config(format!(
                    "{what} {ip} not in network {}",
                    self.subnet
                )));
            }
            Ok(ip)
        };
        let start = match &self.range_start {
            Some(s) if !s.is_empty() => in_subnet("rangeStart", parse_ip("rangeStart", s)?)?,
            _ => first,
        };
        let end = match &self.range_end {
            Some(s) if !s.is_empty() => in_subnet("rangeEnd", parse_ip("rangeEnd", s)?)?,
            _ => last,
        };
        if !ip_le(start, end) {
            return Err(Error::config(format!(
                "rangeStart {start} is after rangeEnd {end}"
            )));
        }
        let gateway = match &self.gateway {
            Some(s) if !s.is_empty() => parse_ip("gateway", s)?,
            _ => first,
        };
        if gateway.is_ipv4() != net.is_ipv4() {
            return Err(Error::config(format!(
                "gateway {gateway} is not of the family of network {}",
                self.subnet
            )));
        }
        Ok(Range {
            subnet: net,
            start,
            end,
            gateway,
        })
    }
}

/// The parsed `ipam` section of a host-local configuration.
#[derive(Debug, Clone)]
pub struct IpamConfig {
    pub network: String,
    /// Range sets: one address is allocated from each.
    pub range_sets: Vec<Vec<Range>>,
    pub routes: Vec<Route>,
    pub data_dir: PathBuf,
    pub resolv_conf: Option<PathBuf>,
    /// Addresses asked for by `runtimeConfig.ips`, `args.cni.ips` or
    /// `CNI_ARGS` `IP=`.
    pub requested: Vec<IpAddr>,
}

fn valid_network_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::config("network config is missing \"name\""));
    }
    if name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(Error::config(format!("invalid network name {name:?}")));
    }
    Ok(())
}

impl IpamConfig {
    /// Parses and validates the configuration of `req`.
    pub fn from_request(req: &Request) -> Result<Self> {
        let net = NetConf::parse(&req.config)?;
        valid_network_name(&net.name)?;
        let raw: RawConf = crate::spec::parse_config(&req.config)?;
        let ipam = raw
            .ipam
            .ok_or_else(|| Error::config("network config is missing \"ipam\""))?;
        let mut raw_sets = ipam.ranges.clone();
        if let Some(subnet) = &ipam.subnet {
            raw_sets.insert(
                0,
                vec![RawRange {
                    subnet: subnet.clone(),
                    range_start: ipam.range_start.clone(),
                    range_end: ipam.range_end.clone(),
                    gateway: ipam.gateway.clone(),
                }],
            );
        }
        if raw_sets.is_empty() {
            return Err(Error::config("ipam: no IP ranges specified"));
        }
        let mut sets: Vec<Vec<Range>> = Vec::new();
        for (i, raw_set) in raw_sets.iter().enumerate() {
            if raw_set.is_empty() {
                return Err(Error::config(format!("ipam: range set {i} is empty")));
            }
            let mut set = Vec::new();
            for r in raw_set {
                let r = r
                    .canonicalize()
                    .map_err(|e| e.context(&format!("invalid range set {i}")))?;
                if let Some(first) = set.first() {
                    let first: &Range = first;
                    if first.subnet.is_ipv4() != r.subnet.is_ipv4() {
                        return Err(Error::config(format!("range set {i} mixes IPv4 and IPv6")));
                    }
                }
                for o in &set {
                    if r.overlaps(o) {
                        return Err(Error::config(format!(
                            "range set {i}: ranges {} and {} overlap",
                            r.describe(),
                            o.describe()
                        )));
                    }
                }
                set.push(r);
            }
            for (j, other) in sets.iter().enumerate() {
                if set.iter().any(|a| other.iter().any(|b| a.overlaps(b))) {
                    return Err(Error::config(format!("range set {i} overlaps with {j}")));
                }
            }
            sets.push(set);
        }
        let mut requested = Vec::new();
        let mut push_req = |s: &str| -> Result<()> {
            let ip = parse_ip_maybe_cidr(s)
                .ok_or_else(|| Error::config(format!("invalid requested IP {s:?}")))?;
            if !requested.contains(&ip) {
                requested.push(ip);
            }
            Ok(())
        };
        if let Some(rc) = &raw.runtime_config {
            for s in &rc.ips {
                push_req(s)?;
            }
        }
        if let Some(cni) = raw.args.as_ref().and_then(|a| a.cni.as_ref()) {
            for s in &cni.ips {
                push_req(s)?;
            }
        }
        for (k, v) in req.cni_args() {
            if k == "IP" {
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    push_req(s)?;
                }
            }
        }
        Ok(IpamConfig {
            network: net.name,
            range_sets: sets,
            routes: ipam.routes,
            data_dir: PathBuf::from(
                ipam.data_dir
                    .filter(|d| !d.is_empty())
                    .unwrap_or_else(|| DEFAULT_DATA_DIR.to_string()),
            ),
            resolv_conf: ipam
                .resolv_conf
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
            requested,
        })
    }

    pub fn network_dir(&self) -> PathBuf {
        self.data_dir.join(&self.network)
    }
}

// ---------------------------------------------------------------------------
// Store
// ---------------------------------------------------------------------------

/// The allocation directory of one network, locked for the store's life.
pub struct Store {
    dir: PathBuf,
    _lock: File,
}

/// What an allocation file records.
fn entry_content(id: &str, ifname: &str) -> String {
    format!("{}\r\n{}", id.trim(), ifname)
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::internal(format!("{what} {}: {e}", path.display()))
}

impl Store {
    /// Creates the directory if needed and takes its lock.
    pub fn open(dir: &Path) -> Result<Store> {
        fs::create_dir_all(dir).map_err(|e| io_err("failed to create", dir, e))?;
        let lock = crate::nft::flock_file(&dir.join(LOCK_FILE))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        self.dir.join(ip.to_string())
    }

    /// Creates the reservation file; `Ok(false)` if the address is taken.
    pub fn reserve(&self, id: &str, ifname: &str, ip: IpAddr, range_id: usize) -> Result<bool> {
        let path = self.ip_path(ip);
        let mut f = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err("failed to create", &path, e)),
        };
        let written = f
            .write_all(entry_content(id, ifname).as_bytes())
            .and_then(|_| f.sync_all());
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(io_err("failed to write", &path, e));
        }
        let last = self.dir.join(format!("{LAST_IP_PREFIX}{range_id}"));
        fs::write(&last, ip.to_string()).map_err(|e| io_err("failed to write", &last, e))?;
        Ok(true)
    }

    pub fn last_reserved(&self, range_id: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_IP_PREFIX}{range_id}")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Every allocation: (address, container id, ifname).
    pub fn entries(&self) -> Vec<(IpAddr, String, String)> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for de in rd.flatten() {
            let name = de.file_name();
            let Some(name) = name.to_str() else { continue };
            let Ok(ip) = name.parse::<IpAddr>() else {
                continue;
            };
            let Ok(content) = fs::read_to_string(de.path()) else {
                continue;
            };
            let content = content.trim();
            let (id, ifname) = match content.split_once("\r\n") {
                Some((id, ifname)) => (id.trim(), ifname.trim()),
                None => (content, ""),
            };
            out.push((ip, id.to_string(), ifname.to_string()));
        }
        out.sort();
        out
    }

    fn matches(eid: &str, eif: &str, id: &str, ifname: &str) -> bool {
        // Old-format files hold only the container id.
        eid == id.trim() && (eif == ifname || eif.is_empty())
    }

    pub fn get_by_id(&self, id: &str, ifname: &str) -> Vec<IpAddr> {
        self.entries()
            .into_iter()
            .filter(|(_, eid, eif)| Self::matches(eid, eif, id, ifname))
            .map(|(ip, _, _)| ip)
            .collect()
    }

    pub fn release(&self, ip: IpAddr) -> Result<()> {
        let path = self.ip_path(ip);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("failed to remove", &path, e)),
        }
    }

    /// Releases every address of (id, ifname); returns them.
    pub fn release_by_id(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        let ips = self.get_by_id(id, ifname);
        for ip in &ips {
            self.release(*ip)?;
        }
        Ok(ips)
    }

    fn sync_dir(&self) {
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
    }
}

// ---------------------------------------------------------------------------
// Allocation
// ---------------------------------------------------------------------------

/// Round-robin over a range set, starting after the last reserved address,
/// as the reference allocator does; `None` when every address is taken.
fn allocate_next(
    store: &Store,
    set: &[Range],
    range_id: usize,
    id: &str,
    ifname: &str,
) -> Result<Option<(IpAddr, usize)>> {
    let last = store
        .last_reserved(range_id)
        .and_then(|ip| set.iter().position(|r| r.contains(ip)).map(|i| (i, ip)));
    let (mut ri, mut cur) = match last {
        Some((i, ip)) => (i, Some(ip)),
        None => (0, None),
    };
    let start_range = ri;
    let mut start_ip: Option<IpAddr> = None;
    loop {
        let candidate = match cur {
            None => set[ri].start,
            Some(c) if c == set[ri].end => {
                ri = (ri + 1) % set.len();
                set[ri].start
            }
            Some(c) => next_ip(c),
        };
        match start_ip {
            None => start_ip = Some(candidate),
            Some(s) if ri == start_range && s == candidate => return Ok(None),
            Some(_) => {}
        }
        cur = Some(candidate);
        if candidate == set[ri].gateway {
            continue;
        }
        if store.reserve(id, ifname, candidate, range_id)? {
            return Ok(Some((candidate, ri)));
        }
    }
}

fn set_description(set: &[Range]) -> String {
    set.iter()
        .map(Range::describe)
        .collect::<Vec<_>>()
        .join(",")
}

/// Allocates one address per range set for (id, ifname).
pub fn allocate(conf: &IpamConfig, id: &str, ifname: &str) -> Result<Vec<IpConfig>> {
    let store = Store::open(&conf.network_dir())?;
    let mut requested = conf.requested.clone();
    let mut got: Vec<IpConfig> = Vec::new();
    let result = (|| -> Result<()> {
        for (i, set) in conf.range_sets.iter().enumerate() {
            let ctx = |e: Error| e.context(&format!("failed to allocate for range {i}"));
            let pos = requested
                .iter()
                .position(|ip| set.iter().any(|r| r.contains(*ip)));
            let (ip, range) = if let Some(p) = pos {
                let ip = requested.remove(p);
                let range = set.iter().find(|r| r.contains(ip)).expect("found above");
                if ip == range.gateway {
                    return Err(ctx(Error::internal(format!(
                        "requested ip {ip} is subnet's gateway"
                    ))));
                }
                if !store.reserve(id, ifname, ip, i)? {
                    return Err(ctx(Error::internal(format!(
                        "requested IP address {ip} is not available in range set {}",
                        set_description(set)
                    ))));
                }
                (ip, range)
            } else {
                for ip in store.get_by_id(id, ifname) {
                    if set.iter().any(|r| r.contains(ip)) {
                        return Err(ctx(Error::internal(format!(
                            "{ip} has been allocated to {id}, duplicate allocation is not allowed"
                        ))));
                    }
                }
                match allocate_next(&store, set, i, id, ifname)? {
                    Some((ip, ri)) => (ip, &set[ri]),
                    None => {
                        return Err(ctx(Error::internal(format!(
                            "no IP addresses available in range set: {}",
                            set_description(set)
                        ))));
                    }
                }
            };
            got.push(IpConfig {
                version: None,
                address: IpNet {
                    addr: ip,
                    prefix: range.subnet.prefix,
                },
                gateway: Some(range.gateway),
                interface: None,
            });
        }
        if !requested.is_empty() {
            return Err(Error::internal(format!(
                "failed to allocate all requested IPs: {}",
                requested
                    .iter()
                    .map(|ip| ip.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    })();
    if let Err(e) = result {
        for ipc in &got {
            let _ = store.release(ipc.address.addr);
        }
        return Err(e);
    }
    store.sync_dir();
    Ok(got)
}

/// Reads nameserver/domain/search/options from a resolv.conf.
pub fn parse_resolv_conf(path: &Path) -> Result<Dns> {
    let text = fs::read_to_string(path).map_err(|e| io_err("failed to read", path, e))?;
    let mut dns = Dns::default();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") => dns.nameservers.extend(f.next().map(String::from)),
            Some("domain") => dns.domain = f.next().unwrap_or_default().to_string(),
            Some("search") => dns.search = f.map(String::from).collect(),
            Some("options") => dns.options.extend(f.map(String::from)),
            _ => {}
        }
    }
    Ok(dns)
}

// ---------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------

pub fn add(req: &Request) -> Result<CniResult> {
    let conf = IpamConfig::from_request(req)?;
    let dns = match &conf.resolv_conf {
        Some(p) => parse_resolv_conf(p)?,
        None => Dns::default(),
    };
    let ips = allocate(&conf, &req.container_id, &req.ifname)?;
    Ok(CniResult {
        cni_version: NetConf::parse(&req.config)?.cni_version,
        interfaces: Vec::new(),
        ips,
        routes: conf.routes.clone(),
        dns,
    })
}

/// Releases the addresses of (container id, ifname). Idempotent.
pub fn del(req: &Request) -> Result<()> {
    let conf = IpamConfig::from_request(req)?;
    let dir = conf.network_dir();
    if !dir.is_dir() {
        return Ok(());
    }
    let store = Store::open(&dir)?;
    store.release_by_id(&req.container_id, &req.ifname)?;
    store.sync_dir();
    Ok(())
}

/// Verifies that (container id, ifname) holds its addresses (those of
/// `prevResult` that fall in the configured ranges).
pub fn check(req: &Request) -> Result<()> {
    let conf = IpamConfig::from_request(req)?;
    let net = NetConf::parse(&req.config)?;
    let store = Store::open(&conf.network_dir())?;
    let held = store.get_by_id(&req.container_id, &req.ifname);
    if held.is_empty() {
        return Err(Error::internal(format!(
            "host-local: failed to find address added by container {}",
            req.container_id
        )));
    }
    if let Some(prev) = net.prev_result()? {
        for ipc in prev.ips {
            let ip = ipc.address.addr;
            let ours = conf
                .range_sets
                .iter()
                .any(|s| s.iter().any(|r| r.contains(ip)));
            if ours && !held.contains(&ip) {
                return Err(Error::internal(format!(
                    "host-local: address {ip} of container {} is not allocated to it",
                    req.container_id
                )));
            }
        }
    }
    Ok(())
}

/// Ready when the data dir can be created.
pub fn status(req: &Request) -> Result<()> {
    let conf = IpamConfig::from_request(req)?;
    fs::create_dir_all(conf.network_dir())
        .map_err(|e| io_err("failed to create", &conf.network_dir(), e))
        .map_err(|e| Error {
            code: crate::spec::ErrorCode::PluginNotAvailable as u32,
            ..e
        })
}

/// CNI 1.1 GC: releases every allocation whose (container id, ifname) is not
/// in `cni.dev/valid-attachments`.
pub fn gc(req: &Request) -> Result<()> {
    let conf = IpamConfig::from_request(req)?;
    let net = NetConf::parse(&req.config)?;
    let valid: HashSet<(String, String)> = net
        .valid_attachments
        .unwrap_or_default()
        .into_iter()
        .map(|a| (a.container_id, a.ifname))
        .collect();
    let dir = conf.network_dir();
    if !dir.is_dir() {
        return Ok(());
    }
    let store = Store::open(&dir)?;
    for (ip, id, ifname) in store.entries() {
        let keep = if ifname.is_empty() {
            valid.iter().any(|(vid, _)| *vid == id)
        } else {
            valid.contains(&(id.clone(), ifname.clone()))
        };
        if !keep {
            store.release(ip)?;
        }
    }
    store.sync_dir();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Command;

    fn req(cmd: Command, id: &str, conf: serde_json::Value) -> Request {
        let mut r = Request::new(cmd, serde_json::to_vec(&conf).unwrap());
        r.container_id = id.into();
        r.ifname = "eth0".into();
        r.netns = "/dev/null".into();
        r
    }

    fn conf(dir: &Path, ranges: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "unit",
            "type": "host-local",
            "ipam": {"type": "host-local", "ranges": ranges, "dataDir": dir,
                     "routes": [{"dst": "0.0.0.0/0"}]}
        })
    }

    #[test]
    fn allocates_round_robin_and_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(tmp.path(), serde_json::json!([[{"subnet": "10.9.0.0/29"}]]));
        let r1 = add(&req(Command::Add, "c1", c.clone())).unwrap();
        assert_eq!(r1.ips[0].address.to_string(), "10.9.0.2/29");
        assert_eq!(r1.ips[0].gateway.unwrap().to_string(), "10.9.0.1");
        assert_eq!(r1.routes[0].dst.to_string(), "0.0.0.0/0");
        let f = fs::read(tmp.path().join("unit/10.9.0.2")).unwrap();
        assert_eq!(f, b"c1\r\neth0");
        assert_eq!(
            fs::read_to_string(tmp.path().join("unit/last_reserved_ip.0")).unwrap(),
            "10.9.0.2"
        );
        assert!(tmp.path().join("unit/lock").exists());
        // duplicate allocation for the same id+ifname is refused
        assert!(add(&req(Command::Add, "c1", c.clone())).is_err());
        // .2 .. .6 usable (.1 gateway, .7 broadcast)
        let mut got = vec![];
        for i in 2..=5 {
            let r = add(&req(Command::Add, &format!("c{i}"), c.clone())).unwrap();
            got.push(r.ips[0].address.addr.to_string());
        }
        assert_eq!(got, ["10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"]);
        let e = add(&req(Command::Add, "c6", c.clone())).unwrap_err();
        assert!(e.msg.contains("no IP addresses available"), "{e}");
        // release one; the next allocation continues round-robin and wraps to it
        del(&req(Command::Del, "c2", c.clone())).unwrap();
        del(&req(Command::Del, "c2", c.clone())).unwrap();
        let r = add(&req(Command::Add, "c7", c.clone())).unwrap();
        assert_eq!(r.ips[0].address.addr.to_string(), "10.9.0.3");
        check(&req(Command::Check, "c7", c.clone())).unwrap();
        assert!(check(&req(Command::Check, "c2", c.clone())).is_err());
    }

    #[test]
    fn requested_ip_and_ranges() {
        let tmp = tempfile::tempdir().unwrap();
        let mut c = conf(
            tmp.path(),
            serde_json::json!([[{"subnet": "10.9.1.0/24", "rangeStart": "10.9.1.10",
                                 "rangeEnd": "10.9.1.20", "gateway": "10.9.1.254"}],
                               [{"subnet": "fd00:9::/64"}]]),
        );
        c["runtimeConfig"] = serde_json::json!({"ips": ["10.9.1.15/24"]});
        let r = add(&req(Command::Add, "a", c.clone())).unwrap();
        assert_eq!(r.ips.len(), 2);
        assert_eq!(r.ips[0].address.to_string(), "10.9.1.15/24");
        assert_eq!(r.ips[0].gateway.unwrap().to_string(), "10.9.1.254");
        assert_eq!(r.ips[1].address.to_string(), "fd00:9::2/64");
        // taken
        let e = add(&req(Command::Add, "b", c.clone())).unwrap_err();
        assert!(e.msg.contains("not available"), "{e}");
        // outside every range
        c["runtimeConfig"] = serde_json::json!({"ips": ["10.9.1.50"]});
        let e = add(&req(Command::Add, "b", c.clone())).unwrap_err();
        assert!(e.msg.contains("requested"), "{e}");
        // nothing leaked by the failures
        let store = Store::open(&tmp.path().join("unit")).unwrap();
        assert_eq!(store.entries().len(), 2);
    }

    #[test]
    fn gc_releases_stale() {
        let tmp = tempfile::tempdir().unwrap();
        let c = conf(tmp.path(), serde_json::json!([[{"subnet": "10.9.2.0/24"}]]));
        add(&req(Command::Add, "keep", c.clone())).unwrap();
        add(&req(Command::Add, "stale", c.clone())).unwrap();
        let mut g = c.clone();
        g["cni.dev/valid-attachments"] =
            serde_json::json!([{"containerID": "keep", "ifname": "eth0"}]);
        gc(&req(Command::Gc, "", g)).unwrap();
        let store = Store::open(&tmp.path().join("unit")).unwrap();
        let e = store.entries();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].1, "keep");
    }

    #[test]
    fn bad_configs_are_code_7() {
        let tmp = tempfile::tempdir().unwrap();
        for ranges in [
            serde_json::json!([[{"subnet": "10.9.3.0/33"}]]),
            serde_json::json!([[{"subnet": "10.9.3.1/24"}]]),
            serde_json::json!([[{"subnet": "10.9.3.0/31"}]]),
            serde_json::json!([[{"subnet": "10.9.3.0/24", "rangeStart": "10.9.4.1"}]]),
            serde_json::json!([[{"subnet": "10.9.3.0/24"}], [{"subnet": "10.9.3.0/25"}]]),
            serde_json::json!([]),
            serde_json::json!("nope"),
        ] {
            let e = add(&req(Command::Add, "x", conf(tmp.path(), ranges.clone()))).unwrap_err();
            assert_eq!(e.code, 7, "{ranges}: {e}");
        }
    }

    #[test]
    fn resolv_conf() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("resolv.conf");
        fs::write(
            &p,
            "# c\nnameserver 10.96.0.10\nsearch a.svc b.svc\noptions ndots:5\ndomain x\n",
        )
        .unwrap();
        let d = parse_resolv_conf(&p).unwrap();
        assert_eq!(d.nameservers, ["10.96.0.10"]);
        assert_eq!(d.search, ["a.svc", "b.svc"]);
        assert_eq!(d.options, ["ndots:5"]);
        assert_eq!(d.domain, "x");
    }
}
