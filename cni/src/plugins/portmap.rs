//! `portmap`: the `portMappings` capability as nftables DNAT rules.
//!
//! Everything lives in `table ip berth-portmap` (and `ip6 berth-portmap`):
//!
//! ```text
//! chain prerouting  (nat, dstnat)   fib daddr type local jump hostports
//! chain output      (nat, -100)     fib daddr type local jump hostports
//! chain hostports                   [ip daddr H] tcp dport P dnat to POD:C   per mapping
//! chain postrouting (nat, srcnat)   masquerade 127.0.0.0/8 -> POD:C and POD -> POD:C (hairpin)
//! ```
//!
//! Every rule of a container carries the comment
//! `berth-portmap <container id> <ifname> <proto>/<host ip|*>/<host port>`,
//! so DEL removes exactly its rules, and ADD refuses a host port another
//! container already maps. `route_localnet` is set on the host interface that
//! routes to the pod so 127.0.0.1 can be DNATed to it.

use std::collections::HashSet;
use std::net::IpAddr;

use serde::Deserialize;

use crate::netlink::Netlink;
use crate::nft::{self, RuleRef};
use crate::plugins::bridge::comment_safe;
use crate::spec::{CniResult, Error, NetConf, Request, Result};

pub const TABLE: &str = "berth-portmap";
const TAG: &str = "berth-portmap";
const JUMP_COMMENT: &str = "berth-portmap jump";

#[derive(Debug, Deserialize)]
struct RawConf {
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: Option<RawRuntime>,
    #[serde(default)]
    snat: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct RawRuntime {
    #[serde(rename = "portMappings", default)]
    port_mappings: Vec<RawMapping>,
}

#[derive(Debug, Deserialize)]
struct RawMapping {
    #[serde(rename = "hostPort", default)]
    host_port: i64,
    #[serde(rename = "containerPort", default)]
    container_port: i64,
    #[serde(default)]
    protocol: String,
    #[serde(rename = "hostIP", default)]
    host_ip: String,
}

/// One published port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PortMapping {
    pub host_port: u16,
    pub container_port: u16,
    /// `tcp`, `udp` or `sctp`
    pub protocol: String,
    /// `None`: every host address.
    pub host_ip: Option<IpAddr>,
}

impl PortMapping {
    fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.protocol,
            self.host_ip.map_or("*".to_string(), |i| i.to_string()),
            self.host_port
        )
    }
}

/// The parsed portmap configuration.
#[derive(Debug, Clone)]
pub struct PortmapConfig {
    pub cni_version: String,
    pub mappings: Vec<PortMapping>,
    pub snat: bool,
}

impl PortmapConfig {
    pub fn parse(config: &[u8]) -> Result<Self> {
        let net = NetConf::parse(config)?;
        let raw: RawConf = crate::spec::parse_config(config)?;
        let mut mappings = Vec::new();
        for m in raw.runtime_config.unwrap_or_default().port_mappings {
            if m.host_port == 0 {
                // CRI: host port 0 means "not published".
                continue;
            }
            let port = |what: &str, v: i64| -> Result<u16> {
                u16::try_from(v)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| Error::config(format!("invalid {what} {v}")))
            };
            let protocol = match m.protocol.to_ascii_lowercase().as_str() {
                "" | "tcp" => "tcp",
                "udp" => "udp",
                "sctp" => "sctp",
                other => {
                    return Err(Error::config(format!("unsupported protocol {other:?}")));
                }
            };
            let host_ip = match m.host_ip.trim() {
                "" => None,
                s => {
                    let ip: IpAddr = s
                        .parse()
                        .map_err(|_| Error::config(format!("invalid hostIP {s:?}")))?;
                    (!ip.is_unspecified()).then_some(ip)
                }
            };
            let pm = PortMapping {
                host_port: port("hostPort", m.host_port)?,
                container_port: port("containerPort", m.container_port)?,
                protocol: protocol.to_string(),
                host_ip,
            };
            if !mappings.contains(&pm) {
                mappings.push(pm);
            }
        }
        Ok(PortmapConfig {
            cni_version: net.cni_version,
            mappings,
            snat: raw.snat.unwrap_or(true),
        })
    }
}

fn owner_prefix(id: &str, ifname: &str) -> String {
    format!("{TAG} {} {} ", nft::short_id(id), comment_safe(ifname))
}

/// (owner prefix, mapping key) from a rule comment.
fn split_comment(c: &str) -> Option<(String, String)> {
    let rest = c.strip_prefix(TAG)?.strip_prefix(' ')?;
    let mut f = rest.split(' ');
    let id = f.next()?;
    let ifname = f.next()?;
    let key = f.next()?;
    Some((format!("{TAG} {id} {ifname} "), key.to_string()))
}

/// The container's addresses from the previous result: those on an
/// interface inside a sandbox (or with no interface), loopback excluded.
fn pod_ips(prev: &CniResult) -> (Option<IpAddr>, Option<IpAddr>) {
    let mut v4 = None;
    let mut v6 = None;
    for ipc in &prev.ips {
        let in_sandbox = match ipc.interface {
            Some(i) => prev
                .interfaces
                .get(i)
                .is_some_and(|iface| !iface.sandbox.is_empty()),
            None => true,
        };
        let ip = ipc.address.addr;
        if !in_sandbox || ip.is_loopback() {
            continue;
        }
        if ip.is_ipv4() {
            v4.get_or_insert(ip);
        } else {
            v6.get_or_insert(ip);
        }
    }
    (v4, v6)
}

fn skeleton(family: &str) -> String {
    format!(
        "table {family} {TABLE} {{
  chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
  chain output {{ type nat hook output priority -100; policy accept; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
  chain hostports {{ }}
}}
"
    )
}

fn mapping_rules(family: &str, pod: IpAddr, m: &PortMapping, snat: bool, comment: &str) -> String {
    let kw = if family == "ip" { "ip" } else { "ip6" };
    let mut s = String::new();
    let daddr = m
        .host_ip
        .map(|h| format!("{kw} daddr {h} "))
        .unwrap_or_default();
    let to = if pod.is_ipv4() {
        format!("{pod}:{}", m.container_port)
    } else {
        format!("[{pod}]:{}", m.container_port)
    };
    let p = &m.protocol;
    let cp = m.container_port;
    s.push_str(&format!(
        "add rule {family} {TABLE} hostports {daddr}{p} dport {} counter dnat to {to} comment \"{comment}\"\n",
        m.host_port
    ));
    if snat {
        if pod.is_ipv4() {
            s.push_str(&format!(
                "add rule {family} {TABLE} postrouting ip saddr 127.0.0.0/8 ip daddr {pod} {p} dport {cp} counter masquerade comment \"{comment}\"\n"
            ));
        }
        s.push_str(&format!(
            "add rule {family} {TABLE} postrouting {kw} saddr {pod} {kw} daddr {pod} {p} dport {cp} counter masquerade comment \"{comment}\"\n"
        ));
    }
    s
}

/// Lets 127.0.0.0/8 traffic be routed out of the interface that reaches
/// `pod` (needed for DNAT of host-local connections to 127.0.0.1).
fn enable_route_localnet(pod: IpAddr) -> Result<()> {
    let nl = Netlink::new()?;
    let oif = nl
        .route_get(pod)?
        .ok_or_else(|| Error::internal(format!("no route to pod address {pod}")))?;
    let link = nl
        .link_by_index(oif)?
        .ok_or_else(|| Error::internal(format!("no link #{oif} for pod address {pod}")))?;
    crate::netlink::write_sysctl(&format!("net/ipv4/conf/{}/route_localnet", link.name), "1")
}

pub fn add(req: &Request) -> Result<CniResult> {
    let conf = PortmapConfig::parse(&req.config)?;
    let prev = NetConf::parse(&req.config)?.prev_result()?.ok_or_else(|| {
        Error::config("portmap must be chained after an interface plugin (no prevResult)")
    })?;
    if conf.mappings.is_empty() {
        return Ok(prev);
    }
    let (v4, v6) = pod_ips(&prev);
    if v4.is_none() && v6.is_none() {
        return Err(Error::internal(
            "portmap: prevResult has no container address to map ports to",
        ));
    }
    let owner = owner_prefix(&req.container_id, &req.ifname);
    let _lock = nft::host_lock("nft.lock")?;
    for (family, pod) in [("ip", v4), ("ip6", v6)] {
        let Some(pod) = pod else { continue };
        let maps: Vec<&PortMapping> = conf
            .mappings
            .iter()
            .filter(|m| m.host_ip.is_none_or(|h| h.is_ipv4() == pod.is_ipv4()))
            .collect();
        if maps.is_empty() {
            continue;
        }
        let existing = nft::rules(family, TABLE)?;
        let mut script = String::new();
        match &existing {
            None => {
                script.push_str(&skeleton(family));
            }
            Some(rules) => {
                // A port another container maps is refused.
                for r in rules.iter().filter(|r| r.chain == "hostports") {
                    let Some((o, key)) = split_comment(&r.comment) else {
                        continue;
                    };
                    if o == owner {
                        continue;
                    }
                    let mut kf = key.split('/');
                    let (Some(proto), Some(hip), Some(hport)) = (kf.next(), kf.next(), kf.next())
                    else {
                        continue;
                    };
                    for m in &maps {
                        let mk = m.key();
                        let mut mf = mk.split('/');
                        let (mproto, mhip, mport) =
                            (mf.next().unwrap(), mf.next().unwrap(), mf.next().unwrap());
                        if proto == mproto
                            && hport == mport
                            && (hip == "*" || mhip == "*" || hip == mhip)
                        {
                            let other = o.trim_end().rsplit(' ').nth(1).unwrap_or("?");
                            return Err(Error::internal(format!(
                                "host port {mhip}:{mport}/{mproto} is already mapped for container {other}"
                            )));
                        }
                    }
                }
                // Re-ADD: replace the container's own rules.
                let mine: Vec<&RuleRef> = rules
                    .iter()
                    .filter(|r| r.comment.starts_with(&owner))
                    .collect();
                script.push_str(&nft::delete_lines(family, TABLE, &mine));
            }
        }
        let has_jump = |chain: &str| {
            existing.as_ref().is_some_and(|rs| {
                rs.iter()
                    .any(|r| r.chain == chain && r.comment == JUMP_COMMENT)
            })
        };
        for chain in ["prerouting", "output"] {
            if !has_jump(chain) {
                script.push_str(&format!(
                    "add rule {family} {TABLE} {chain} fib daddr type local counter jump hostports comment \"{JUMP_COMMENT}\"\n"
                ));
            }
        }
        for m in &maps {
            let comment = format!("{owner}{}", m.key());
            script.push_str(&mapping_rules(family, pod, m, conf.snat, &comment));
        }
        if pod.is_ipv4() {
            enable_route_localnet(pod)?;
        }
        nft::apply(&script)?;
    }
    Ok(prev)
}

/// Removes the rules of comments `remove` selects, and the table when only
/// its skeleton is left.
fn remove_rules(remove: impl Fn(&str) -> bool) -> Result<()> {
    if nft::nft_binary().is_none() {
        return Ok(());
    }
    let _lock = nft::host_lock("nft.lock")?;
    for family in ["ip", "ip6"] {
        let Some(rules) = nft::rules(family, TABLE)? else {
            continue;
        };
        let doomed: Vec<&RuleRef> = rules.iter().filter(|r| remove(&r.comment)).collect();
        let left = rules
            .iter()
            .filter(|r| r.comment != JUMP_COMMENT && !remove(&r.comment))
            .count();
        let script = if left == 0 {
            format!("delete table {family} {TABLE}\n")
        } else {
            nft::delete_lines(family, TABLE, &doomed)
        };
        if !script.is_empty() {
            nft::apply(&script)?;
        }
    }
    Ok(())
}

/// Removes the container's rules. Idempotent; prevResult is not needed.
pub fn del(req: &Request) -> Result<()> {
    PortmapConfig::parse(&req.config)?;
    let owner = owner_prefix(&req.container_id, &req.ifname);
    remove_rules(|c| c.starts_with(&owner))
}

/// Verifies a DNAT rule exists for every mapping.
pub fn check(req: &Request) -> Result<()> {
    let conf = PortmapConfig::parse(&req.config)?;
    let prev = NetConf::parse(&req.config)?
        .prev_result()?
        .ok_or_else(|| Error::config("portmap: CHECK requires prevResult"))?;
    if conf.mappings.is_empty() {
        return Ok(());
    }
    let (v4, v6) = pod_ips(&prev);
    let owner = owner_prefix(&req.container_id, &req.ifname);
    for (family, pod) in [("ip", v4), ("ip6", v6)] {
        let Some(pod) = pod else { continue };
        let comments: HashSet<String> = nft::rules(family, TABLE)?
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.chain == "hostports")
            .map(|r| r.comment)
            .collect();
        for m in conf
            .mappings
            .iter()
            .filter(|m| m.host_ip.is_none_or(|h| h.is_ipv4() == pod.is_ipv4()))
        {
            if !comments.contains(&format!("{owner}{}", m.key())) {
                return Err(Error::internal(format!(
                    "portmap: no rule for {} of container {}",
                    m.key(),
                    req.container_id
                )));
            }
        }
    }
    Ok(())
}

/// Ready when `nft` is available.
pub fn status(req: &Request) -> Result<()> {
    PortmapConfig::parse(&req.config)?;
    if nft::nft_binary().is_none() {
        return Err(Error::new(
            crate::spec::ErrorCode::PluginNotAvailable,
            "portmap: nft not found",
        ));
    }
    Ok(())
}

/// CNI 1.1 GC: drops rules of attachments not in `cni.dev/valid-attachments`.
pub fn gc(req: &Request) -> Result<()> {
    PortmapConfig::parse(&req.config)?;
    let net = NetConf::parse(&req.config)?;
    let valid: HashSet<String> = net
        .valid_attachments
        .unwrap_or_default()
        .iter()
        .map(|a| owner_prefix(&a.container_id, &a.ifname))
        .collect();
    remove_rules(|c| match split_comment(c) {
        Some((owner, _)) => !valid.contains(&owner),
        None => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mappings() {
        let c = PortmapConfig::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"portmap",
                 "runtimeConfig":{"portMappings":[
                   {"hostPort":8080,"containerPort":80,"protocol":"TCP"},
                   {"hostPort":0,"containerPort":81},
                   {"hostPort":5353,"containerPort":53,"protocol":"udp","hostIP":"127.0.0.2"},
                   {"hostPort":9,"containerPort":9,"hostIP":"0.0.0.0"}]}}"#,
        )
        .unwrap();
        assert_eq!(c.mappings.len(), 3);
        assert_eq!(c.mappings[0].key(), "tcp/*/8080");
        assert_eq!(c.mappings[1].key(), "udp/127.0.0.2/5353");
        assert_eq!(c.mappings[2].host_ip, None);
        assert!(c.snat);
        for bad in [
            r#"{"hostPort":70000,"containerPort":80}"#,
            r#"{"hostPort":80,"containerPort":0}"#,
            r#"{"hostPort":80,"containerPort":80,"protocol":"icmp"}"#,
            r#"{"hostPort":80,"containerPort":80,"hostIP":"nope"}"#,
        ] {
            let conf = format!(
                r#"{{"cniVersion":"1.0.0","name":"n","runtimeConfig":{{"portMappings":[{bad}]}}}}"#
            );
            assert_eq!(
                PortmapConfig::parse(conf.as_bytes()).unwrap_err().code,
                7,
                "{bad}"
            );
        }
    }

    #[test]
    fn comment_round_trip() {
        let o = owner_prefix("abc", "eth0");
        let (owner, key) = split_comment(&format!("{o}tcp/*/80")).unwrap();
        assert_eq!(owner, o);
        assert_eq!(key, "tcp/*/80");
        assert!(split_comment(JUMP_COMMENT).is_none());
    }

    #[test]
    fn pod_ips_skip_host_side_and_loopback() {
        let prev: CniResult = serde_json::from_value(serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "br"}, {"name": "veth1"}, {"name": "eth0", "sandbox": "/ns"}],
            "ips": [{"address": "127.0.0.1/8", "interface": 2},
                    {"address": "10.1.0.1/24", "interface": 0},
                    {"address": "10.1.0.5/24", "interface": 2}]
        }))
        .unwrap();
        assert_eq!(pod_ips(&prev).0.unwrap().to_string(), "10.1.0.5");
        assert!(pod_ips(&prev).1.is_none());
    }
}
