//! `bridge`: a veth pair per container, host end on a Linux bridge, container
//! end moved into CNI_NETNS as CNI_IFNAME, addresses and routes from the IPAM
//! plugin named in `ipam.type` (delegated through CNI_PATH).

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;

use serde::Deserialize;

use crate::ip::{IpNet, next_ip};
use crate::netlink::{Link, Netlink, in_netns, open_netns};
use crate::nft;
use crate::plugins::delegate;
use crate::spec::{
    CniResult, Command, Error, Interface, IpConfig, NetConf, Request, Result, Route, valid_ifname,
};

pub const DEFAULT_BRIDGE: &str = "cni0";
/// Masquerade rules live in `ip berth-bridge` / `ip6 berth-bridge`.
pub const MASQ_TABLE: &str = "berth-bridge";
const MASQ_TAG: &str = "berth-bridge";

#[derive(Debug, Deserialize)]
struct RawConf {
    #[serde(default)]
    bridge: Option<String>,
    #[serde(rename = "isGateway", default)]
    is_gateway: bool,
    #[serde(rename = "isDefaultGateway", default)]
    is_default_gateway: bool,
    #[serde(rename = "forceAddress", default)]
    force_address: bool,
    #[serde(rename = "ipMasq", default)]
    ip_masq: bool,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(rename = "hairpinMode", default)]
    hairpin_mode: bool,
    #[serde(rename = "promiscMode", default)]
    promisc_mode: bool,
    #[serde(default)]
    ipam: Option<RawIpam>,
}

#[derive(Debug, Deserialize)]
struct RawIpam {
    #[serde(rename = "type", default)]
    plugin_type: String,
}

/// The parsed configuration of a bridge network.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    pub cni_version: String,
    pub name: String,
    pub bridge: String,
    pub is_gateway: bool,
    pub is_default_gateway: bool,
    pub force_address: bool,
    pub ip_masq: bool,
    pub mtu: Option<u32>,
    pub hairpin_mode: bool,
    pub promisc_mode: bool,
    /// `ipam.type`, when an IPAM plugin is configured.
    pub ipam: Option<String>,
}

impl BridgeConfig {
    pub fn parse(config: &[u8]) -> Result<Self> {
        let net = NetConf::parse(config)?;
        let raw: RawConf = crate::spec::parse_config(config)?;
        let bridge = raw
            .bridge
            .filter(|b| !b.is_empty())
            .unwrap_or_else(|| DEFAULT_BRIDGE.to_string());
        valid_ifname(&bridge).map_err(|m| Error::config(format!("invalid bridge name: {m}")))?;
        if let Some(m) = raw.mtu
            && !(68..=65535).contains(&m)
        {
            return Err(Error::config(format!("invalid mtu {m}")));
        }
        let ipam = match raw.ipam {
            None => None,
            Some(i) if i.plugin_type.is_empty() => {
                return Err(Error::config("ipam.type is missing"));
            }
            Some(i) => Some(i.plugin_type),
        };
        Ok(BridgeConfig {
            cni_version: net.cni_version,
            name: net.name,
            bridge,
            // isDefaultGateway implies isGateway, as in the reference plugin.
            is_gateway: raw.is_gateway || raw.is_default_gateway,
            is_default_gateway: raw.is_default_gateway,
            force_address: raw.force_address,
            ip_masq: raw.ip_masq,
            mtu: raw.mtu,
            hairpin_mode: raw.hairpin_mode,
            promisc_mode: raw.promisc_mode,
            ipam,
        })
    }
}

fn random_hex() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// The bridge, created (up) if missing.
fn ensure_bridge(nl: &Netlink, conf: &BridgeConfig) -> Result<Link> {
    nl.create_bridge(&conf.bridge, conf.mtu)?;
    let br = nl
        .link(&conf.bridge)?
        .ok_or_else(|| Error::internal(format!("bridge {} vanished", conf.bridge)))?;
    if !br.is_bridge() {
        return Err(Error::internal(format!(
            "{:?} already exists but is not a bridge",
            conf.bridge
        )));
    }
    if conf.promisc_mode {
        nl.set_promisc(br.index, true)?;
    }
    if !br.up {
        nl.set_up(br.index)?;
    }
    Ok(br)
}

/// Deletes the host end of a veth pair unless disarmed.
struct VethGuard<'a> {
    nl: &'a Netlink,
    index: Option<u32>,
}

impl Drop for VethGuard<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.index {
            let _ = self.nl.delete_link(i);
        }
    }
}

/// Releases the IPAM allocation unless disarmed.
struct IpamGuard<'a> {
    plugin: Option<&'a str>,
    req: &'a Request,
}

impl Drop for IpamGuard<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.plugin {
            let _ = delegate(p, self.req, Command::Del);
        }
    }
}

/// Removes the container's masquerade rules unless disarmed.
struct MasqGuard<'a> {
    req: Option<&'a Request>,
}

impl Drop for MasqGuard<'_> {
    fn drop(&mut self) {
        if let Some(req) = self.req {
            let comment = masq_comment(&req.container_id, &req.ifname);
            let _ = remove_masq(|c| c == comment);
        }
    }
}

fn default_route(v4: bool) -> IpNet {
    if v4 {
        "0.0.0.0/0".parse().expect("valid")
    } else {
        "::/0".parse().expect("valid")
    }
}

/// Attaches the container: bridge, veth pair, IPAM addresses, routes,
/// gateway and masquerade. A step that fails undoes what the steps before
/// it made for this container (the guards, dropped in reverse).
pub fn add(req: &Request) -> Result<CniResult> {
    let conf = BridgeConfig::parse(&req.config)?;
    // Chained after another plugin (e.g. loopback): our result extends it.
    let prev = NetConf::parse(&req.config)?.prev_result()?;
    let ns = open_netns(Path::new(&req.netns))?;
    ensure_ifname_free(&ns, &req.ifname)?;

    let nl = Netlink::new()?;
    let br = ensure_bridge(&nl, &conf)?;
    let mut veth = create_veth(&nl, &ns, &req.ifname, conf.mtu)?;
    let cont = bring_up_peer(&ns, &req.ifname)?;
    attach_host_end(&nl, &conf, &veth.host, &br)?;

    let (mut result, mut ipam_guard) = delegate_ipam(&conf, req)?;
    assign_gateways(&conf, &mut result);
    if conf.is_default_gateway {
        add_default_routes(&mut result);
    }
    configure_container(&ns, &req.ifname, cont.index, &result.ips, &result.routes)?;
    if conf.is_gateway {
        set_bridge_gateways(&nl, &conf, &br, &result.ips)?;
    }
    let mut masq_guard = MasqGuard { req: None };
    if conf.ip_masq && !result.ips.is_empty() {
        // Armed first: setup_masq applies one family at a time.
        masq_guard.req = Some(req);
        setup_masq(&req.container_id, &req.ifname, &result.ips)?;
    }

    result.interfaces = describe_interfaces(&nl, req, &br, &veth.host, &cont)?;
    let result = extend_prev(prev, result);
    veth.guard.index = None;
    ipam_guard.plugin = None;
    masq_guard.req = None;
    Ok(result)
}

/// The container must not have the interface already.
fn ensure_ifname_free(ns: &File, ifname: &str) -> Result<()> {
    let exists = in_netns(ns, || Ok(Netlink::new()?.link(ifname)?.is_some()))?;
    if exists {
        return Err(Error::internal(format!(
            "container veth name {ifname:?} already exists"
        )));
    }
    Ok(())
}

/// A veth pair `add` made: the host end and the guard that deletes the pair
/// unless `add` gets to the end.
struct Veth<'a> {
    host: Link,
    guard: VethGuard<'a>,
}

/// The veth pair: the host end under a free random name, the peer made in
/// the container's namespace as `ifname` (checked free before).
fn create_veth<'a>(nl: &'a Netlink, ns: &File, ifname: &str, mtu: Option<u32>) -> Result<Veth<'a>> {
    let mut tries = 0;
    let host_name = loop {
        let h = format!("veth{}", random_hex());
        if nl.create_veth(&h, ifname, ns, mtu)? {
            break h;
        }
        tries += 1;
        if tries == 8 {
            return Err(Error::internal(format!(
                "cannot create a veth pair: {ifname:?} is taken in the container"
            )));
        }
    };
    let host = nl
        .link(&host_name)?
        .ok_or_else(|| Error::internal(format!("veth {host_name} vanished")))?;
    let guard = VethGuard {
        nl,
        index: Some(host.index),
    };
    Ok(Veth { host, guard })
}

/// Sets the container's end up; returns it as it is there.
fn bring_up_peer(ns: &File, ifname: &str) -> Result<Link> {
    in_netns(ns, || {
        let nl = Netlink::new()?;
        let l = nl
            .link(ifname)?
            .ok_or_else(|| Error::internal(format!("veth peer {ifname} is not in the netns")))?;
        nl.set_up(l.index)?;
        nl.link_by_index(l.index)?
            .ok_or_else(|| Error::internal(format!("{ifname} vanished")))
    })
}

/// Puts the host end on the bridge, up.
fn attach_host_end(nl: &Netlink, conf: &BridgeConfig, host: &Link, br: &Link) -> Result<()> {
    nl.set_master(host.index, br.index)?;
    if conf.hairpin_mode {
        nl.set_hairpin(host.index, true)?;
    }
    nl.set_up(host.index)
}

/// Addresses, routes and DNS from the IPAM plugin (none without one), and
/// the guard that releases them unless `add` gets to the end.
fn delegate_ipam<'a>(
    conf: &'a BridgeConfig,
    req: &'a Request,
) -> Result<(CniResult, IpamGuard<'a>)> {
    let mut guard = IpamGuard { plugin: None, req };
    let mut result = CniResult {
        cni_version: conf.cni_version.clone(),
        ..Default::default()
    };
    if let Some(ipam) = &conf.ipam {
        let r = delegate(ipam, req, Command::Add)?
            .ok_or_else(|| Error::internal("IPAM plugin returned no result"))?;
        guard.plugin = Some(ipam);
        if r.ips.is_empty() {
            return Err(Error::internal("IPAM plugin returned missing IP config"));
        }
        result.ips = r.ips;
        result.routes = r.routes;
        result.dns = r.dns;
    }
    Ok((result, guard))
}

/// Puts every address on the container interface (index 2 of our own
/// interfaces) and, for a gateway bridge, gives those without a gateway the
/// first address of their subnet.
fn assign_gateways(conf: &BridgeConfig, result: &mut CniResult) {
    for ipc in &mut result.ips {
        ipc.interface = Some(2);
        ipc.version = None;
        if ipc.gateway.is_none() && conf.is_gateway {
            ipc.gateway = Some(next_ip(ipc.address.network().addr));
        }
    }
}

/// A default route per family via that family's first gateway, unless IPAM
/// gave one already.
fn add_default_routes(result: &mut CniResult) {
    for v4 in [true, false] {
        let Some(gw) = result
            .ips
            .iter()
            .find(|i| i.address.is_ipv4() == v4)
            .and_then(|i| i.gateway)
        else {
            continue;
        };
        let def = default_route(v4);
        if !result.routes.iter().any(|r| r.dst == def) {
            result.routes.push(Route::new(def, Some(gw)));
        }
    }
}

/// The addresses and routes on the container interface, inside the netns.
fn configure_container(
    ns: &File,
    ifname: &str,
    cont_index: u32,
    ips: &[IpConfig],
    routes: &[Route],
) -> Result<()> {
    in_netns(ns, || {
        let nl = Netlink::new()?;
        if ips.iter().any(|i| !i.address.is_ipv4()) {
            // No duplicate address detection: the address (and routes via
            // it) must work at once. /proc/sys/net follows this thread's netns.
            crate::netlink::write_sysctl(&format!("net/ipv6/conf/{ifname}/accept_dad"), "0")?;
        }
        for ipc in ips {
            nl.add_address(cont_index, ipc.address)?;
        }
        for r in routes {
            let v4 = r.dst.is_ipv4();
            let gw = r.gw.or_else(|| {
                ips.iter()
                    .find(|i| i.address.is_ipv4() == v4)
                    .and_then(|i| i.gateway)
            });
            nl.add_route(r, gw, cont_index)?;
        }
        Ok(())
    })
}

/// The bridge as gateway: each gateway address on the bridge (refusing a
/// different address in the same subnet unless `forceAddress`), and
/// forwarding on for the families it routes.
fn set_bridge_gateways(
    nl: &Netlink,
    conf: &BridgeConfig,
    br: &Link,
    ips: &[IpConfig],
) -> Result<()> {
    let existing = nl.addresses(br.index)?;
    let mut v4 = false;
    let mut v6 = false;
    for ipc in ips {
        let Some(gw) = ipc.gateway else { continue };
        let gw_net = IpNet {
            addr: gw,
            prefix: ipc.address.prefix,
        };
        if !existing.contains(&gw_net) {
            let clash = existing.iter().find(|a| {
                a.addr != gw && a.is_ipv4() == gw.is_ipv4() && a.network() == gw_net.network()
            });
            if let Some(c) = clash
                && !conf.force_address
            {
                return Err(Error::internal(format!(
                    "{:?} already has an IP address different from {gw_net}: {c}",
                    conf.bridge
                )));
            }
            nl.add_address(br.index, gw_net)?;
        }
        v4 |= gw.is_ipv4();
        v6 |= gw.is_ipv6();
    }
    if v4 {
        crate::netlink::write_sysctl("net/ipv4/ip_forward", "1")?;
    }
    if v6 {
        crate::netlink::write_sysctl("net/ipv6/conf/all/forwarding", "1")?;
    }
    Ok(())
}

/// Our three interfaces for the result: bridge, host end, container end.
/// The host links are read again, as they are now (a bridge's MAC changes
/// with its first port).
fn describe_interfaces(
    nl: &Netlink,
    req: &Request,
    br: &Link,
    host: &Link,
    cont: &Link,
) -> Result<Vec<Interface>> {
    let br = nl.link_by_index(br.index)?.unwrap_or_else(|| br.clone());
    let host = nl
        .link_by_index(host.index)?
        .unwrap_or_else(|| host.clone());
    Ok(vec![
        Interface {
            name: br.name.clone(),
            mac: br.mac.clone(),
            mtu: Some(br.mtu),
            ..Default::default()
        },
        Interface {
            name: host.name.clone(),
            mac: host.mac.clone(),
            mtu: Some(host.mtu),
            ..Default::default()
        },
        Interface {
            name: req.ifname.clone(),
            mac: cont.mac.clone(),
            mtu: Some(cont.mtu),
            sandbox: req.netns.clone(),
            ..Default::default()
        },
    ])
}

/// Chained after another plugin: `prev` with our interfaces, addresses
/// (their interface indexes shifted past prev's) and routes appended, and
/// our DNS if we have any.
fn extend_prev(prev: Option<CniResult>, mut result: CniResult) -> CniResult {
    let Some(prev) = prev else {
        return result;
    };
    let offset = prev.interfaces.len();
    for ipc in &mut result.ips {
        ipc.interface = ipc.interface.map(|i| i + offset);
    }
    let mut merged = prev;
    merged.cni_version = result.cni_version.clone();
    merged.interfaces.append(&mut result.interfaces);
    merged.ips.append(&mut result.ips);
    merged.routes.append(&mut result.routes);
    if !result.dns.is_empty() {
        merged.dns = result.dns;
    }
    merged
}

fn masq_comment(id: &str, ifname: &str) -> String {
    format!("{MASQ_TAG} {} {}", nft::short_id(id), comment_safe(ifname))
}

pub(crate) fn comment_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Masquerade traffic from the container's addresses leaving their subnet.
fn setup_masq(id: &str, ifname: &str, ips: &[IpConfig]) -> Result<()> {
    let comment = masq_comment(id, ifname);
    let _lock = nft::host_lock("nft.lock")?;
    for v4 in [true, false] {
        let fam_ips: Vec<&IpConfig> = ips.iter().filter(|i| i.address.is_ipv4() == v4).collect();
        if fam_ips.is_empty() {
            continue;
        }
        let (family, kw, mcast) = if v4 {
            ("ip", "ip", "224.0.0.0/4")
        } else {
            ("ip6", "ip6", "ff00::/8")
        };
        let mut script = format!(
            "table {family} {MASQ_TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n  }}\n}}\n"
        );
        // Re-ADD replaces the container's rules.
        if let Some(rules) = nft::rules(family, MASQ_TABLE)? {
            let mine: Vec<&nft::RuleRef> = rules.iter().filter(|r| r.comment == comment).collect();
            script.push_str(&nft::delete_lines(family, MASQ_TABLE, &mine));
        }
        for ipc in fam_ips {
            script.push_str(&format!(
                "add rule {family} {MASQ_TABLE} postrouting {kw} saddr {} {kw} daddr != {} {kw} daddr != {mcast} counter masquerade comment \"{comment}\"\n",
                ipc.address.addr,
                ipc.address.network()
            ));
        }
        nft::apply(&script)?;
    }
    Ok(())
}

/// Removes masquerade rules for which `remove(comment)` holds; drops the
/// table when it is left empty.
fn remove_masq(remove: impl Fn(&str) -> bool) -> Result<()> {
    if nft::nft_binary().is_none() {
        return Ok(());
    }
    let _lock = nft::host_lock("nft.lock")?;
    for family in ["ip", "ip6"] {
        let Some(rules) = nft::rules(family, MASQ_TABLE)? else {
            continue;
        };
        let doomed: Vec<&nft::RuleRef> = rules.iter().filter(|r| remove(&r.comment)).collect();
        let mut script = nft::delete_lines(family, MASQ_TABLE, &doomed);
        if doomed.len() == rules.len() {
            script = format!("delete table {family} {MASQ_TABLE}\n");
        }
        if !script.is_empty() {
            nft::apply(&script)?;
        }
    }
    Ok(())
}

/// Removes the container's veth, its addresses (IPAM DEL) and masquerade
/// rules. A missing netns or link is not an error.
pub fn del(req: &Request) -> Result<()> {
    let conf = BridgeConfig::parse(&req.config)?;
    let mut first_err: Option<Error> = None;
    if let Some(ipam) = &conf.ipam
        && let Err(e) = delegate(ipam, req, Command::Del)
    {
        first_err.get_or_insert(e);
    }
    if !req.netns.is_empty()
        && let Ok(ns) = File::open(&req.netns)
    {
        let ifname = req.ifname.clone();
        let r = in_netns(&ns, || {
            let nl = Netlink::new()?;
            if let Some(l) = nl.link(&ifname)? {
                nl.delete_link(l.index)?;
            }
            Ok(())
        });
        match r {
            Ok(()) => {}
            // Not (or no longer) a netns: nothing left to delete there.
            Err(e) if e.msg.contains("failed to enter netns") => {}
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if conf.ip_masq {
        let comment = masq_comment(&req.container_id, &req.ifname);
        if let Err(e) = remove_masq(|c| c == comment) {
            first_err.get_or_insert(e);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Verifies the attachment described by `prevResult`.
pub fn check(req: &Request) -> Result<()> {
    let conf = BridgeConfig::parse(&req.config)?;
    let prev = NetConf::parse(&req.config)?
        .prev_result()?
        .ok_or_else(|| Error::config("bridge: CHECK requires prevResult"))?;
    if let Some(ipam) = &conf.ipam {
        delegate(ipam, req, Command::Check)?;
    }
    let nl = Netlink::new()?;
    let br = nl
        .link(&conf.bridge)?
        .ok_or_else(|| Error::internal(format!("bridge {} does not exist", conf.bridge)))?;
    if !br.is_bridge() {
        return Err(Error::internal(format!("{} is not a bridge", conf.bridge)));
    }
    let cont_idx = prev
        .interfaces
        .iter()
        .position(|i| i.name == req.ifname && i.sandbox == req.netns)
        .ok_or_else(|| {
            Error::internal(format!(
                "prevResult has no interface {} in {}",
                req.ifname, req.netns
            ))
        })?;
    let cont_if = &prev.interfaces[cont_idx];
    // The host end: an interface of the result outside any sandbox.
    for hi in prev
        .interfaces
        .iter()
        .filter(|i| i.sandbox.is_empty() && i.name != conf.bridge)
    {
        let l = nl
            .link(&hi.name)?
            .ok_or_else(|| Error::internal(format!("host veth {} does not exist", hi.name)))?;
        if l.master != Some(br.index) {
            return Err(Error::internal(format!(
                "host veth {} is not attached to {}",
                hi.name, conf.bridge
            )));
        }
    }
    let ns = open_netns(Path::new(&req.netns))?;
    let want_ips: Vec<IpNet> = prev
        .ips
        .iter()
        .filter(|i| i.interface == Some(cont_idx))
        .map(|i| i.address)
        .collect();
    let want_routes = prev.routes.clone();
    let ifname = req.ifname.clone();
    let mac = cont_if.mac.clone();
    in_netns(&ns, || {
        let nl = Netlink::new()?;
        let l = nl
            .link(&ifname)?
            .ok_or_else(|| Error::internal(format!("{ifname} does not exist in the netns")))?;
        if !l.is_veth() {
            return Err(Error::internal(format!("{ifname} is not a veth")));
        }
        if !mac.is_empty() && !mac.eq_ignore_ascii_case(&l.mac) {
            return Err(Error::internal(format!(
                "{ifname} has mac {} instead of {mac}",
                l.mac
            )));
        }
        let have = nl.addresses(l.index)?;
        for w in &want_ips {
            if !have.contains(w) {
                return Err(Error::internal(format!("{ifname} lacks address {w}")));
            }
        }
        let mut have_routes = nl.routes(true)?;
        have_routes.extend(nl.routes(false)?);
        let have_dsts: HashSet<IpNet> = have_routes.iter().map(|r| r.dst.network()).collect();
        for r in &want_routes {
            if !have_dsts.contains(&r.dst.network()) {
                return Err(Error::internal(format!(
                    "route to {} is missing in the netns",
                    r.dst
                )));
            }
        }
        Ok(())
    })?;
    if conf.ip_masq {
        let comment = masq_comment(&req.container_id, &req.ifname);
        let found = ["ip", "ip6"].iter().any(|f| {
            nft::rules(f, MASQ_TABLE)
                .ok()
                .flatten()
                .is_some_and(|rs| rs.iter().any(|r| r.comment == comment))
        });
        if !found {
            return Err(Error::internal("masquerade rule is missing"));
        }
    }
    Ok(())
}

/// Ready when the IPAM plugin is (CNI 1.1 delegates STATUS).
pub fn status(req: &Request) -> Result<()> {
    let conf = BridgeConfig::parse(&req.config)?;
    if let Some(ipam) = &conf.ipam
        && conf.cni_version != "1.0.0"
        && !conf.cni_version.starts_with("0.")
    {
        delegate(ipam, req, Command::Status)?;
    }
    Ok(())
}

/// CNI 1.1 GC: IPAM GC, and masquerade rules of attachments not listed in
/// `cni.dev/valid-attachments`.
pub fn gc(req: &Request) -> Result<()> {
    let conf = BridgeConfig::parse(&req.config)?;
    let net = NetConf::parse(&req.config)?;
    if let Some(ipam) = &conf.ipam {
        delegate(ipam, req, Command::Gc)?;
    }
    if conf.ip_masq {
        let valid: HashSet<String> = net
            .valid_attachments
            .unwrap_or_default()
            .iter()
            .map(|a| masq_comment(&a.container_id, &a.ifname))
            .collect();
        remove_masq(|c| c.starts_with(MASQ_TAG) && !valid.contains(c))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_errors() {
        let c = BridgeConfig::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"bridge","isDefaultGateway":true,
                 "ipam":{"type":"host-local"}}"#,
        )
        .unwrap();
        assert_eq!(c.bridge, "cni0");
        assert!(c.is_gateway);
        assert_eq!(c.ipam.as_deref(), Some("host-local"));
        for bad in [
            r#"{"cniVersion":"1.0.0","name":"n","bridge":"has space"}"#,
            r#"{"cniVersion":"1.0.0","name":"n","mtu":10}"#,
            r#"{"cniVersion":"1.0.0","name":"n","ipam":{}}"#,
            r#"{"cniVersion":"1.0.0","name":"n","isGateway":"yes"}"#,
        ] {
            assert_eq!(
                BridgeConfig::parse(bad.as_bytes()).unwrap_err().code,
                7,
                "{bad}"
            );
        }
    }

    fn conf(extra: &str) -> BridgeConfig {
        BridgeConfig::parse(format!(r#"{{"cniVersion":"1.0.0","name":"n"{extra}}}"#).as_bytes())
            .unwrap()
    }

    fn ipc(address: &str, gateway: Option<&str>) -> IpConfig {
        IpConfig {
            version: Some("4".into()),
            address: address.parse().unwrap(),
            gateway: gateway.map(|g| g.parse().unwrap()),
            interface: None,
        }
    }

    #[test]
    fn gateways_and_default_routes() {
        let mut r = CniResult {
            ips: vec![
                ipc("10.22.0.5/24", None),
                ipc("fd22::5/64", Some("fd22::fe")),
            ],
            routes: vec![Route::new("::/0".parse().unwrap(), None)],
            ..Default::default()
        };
        let mut plain = r.clone();
        assign_gateways(&conf(""), &mut plain);
        assert_eq!(plain.ips[0].gateway, None);
        assert_eq!(plain.ips[0].interface, Some(2));
        assert_eq!(plain.ips[0].version, None);

        assign_gateways(&conf(r#","isDefaultGateway":true"#), &mut r);
        assert_eq!(r.ips[0].gateway, Some("10.22.0.1".parse().unwrap()));
        assert_eq!(r.ips[1].gateway, Some("fd22::fe".parse().unwrap()));
        add_default_routes(&mut r);
        // IPv4 gets one via its gateway; IPAM's IPv6 default stays alone.
        assert_eq!(
            r.routes,
            vec![
                Route::new("::/0".parse().unwrap(), None),
                Route::new(default_route(true), Some("10.22.0.1".parse().unwrap())),
            ]
        );
    }

    #[test]
    fn chained_result_extends_prev() {
        let ours = CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                interface: Some(2),
                ..ipc("10.22.0.5/24", None)
            }],
            ..Default::default()
        };
        assert_eq!(extend_prev(None, ours.clone()), ours);
        let prev = CniResult {
            cni_version: "1.0.0".into(),
            interfaces: vec![Interface {
                name: "lo".into(),
                ..Default::default()
            }],
            ips: vec![IpConfig {
                interface: Some(0),
                ..ipc("127.0.0.1/8", None)
            }],
            dns: crate::spec::Dns {
                nameservers: vec!["10.0.0.10".into()],
                ..Default::default()
            },
            ..Default::default()
        };
        let merged = extend_prev(Some(prev), ours);
        assert_eq!(merged.cni_version, "1.1.0");
        let names: Vec<&str> = merged.interfaces.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["lo", "eth0"]);
        let idx: Vec<Option<usize>> = merged.ips.iter().map(|i| i.interface).collect();
        assert_eq!(idx, [Some(0), Some(3)]);
        // Ours has no DNS: prev's stays.
        assert_eq!(merged.dns.nameservers, ["10.0.0.10"]);
    }

    /// In a netns of its own (this thread's), so the host's rules are
    /// never touched; nft inherits the thread's netns.
    #[test]
    fn masq_guard_removes_only_this_containers_rules() {
        if !nix::unistd::geteuid().is_root() || nft::nft_binary().is_none() {
            eprintln!("skipped: needs root and nft");
            return;
        }
        std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let ips = [ipc("10.22.0.5/24", None), ipc("fd22::5/64", None)];
            setup_masq("guarded", "eth0", &ips).unwrap();
            setup_masq("other", "eth0", &ips[..1]).unwrap();
            let comments = |family| -> Vec<String> {
                nft::rules(family, MASQ_TABLE)
                    .unwrap()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| r.comment)
                    .collect()
            };
            let req = Request {
                container_id: "guarded".into(),
                ifname: "eth0".into(),
                ..Request::new(Command::Add, Vec::new())
            };
            drop(MasqGuard { req: None });
            assert_eq!(comments("ip").len(), 2);
            drop(MasqGuard { req: Some(&req) });
            assert_eq!(comments("ip"), [masq_comment("other", "eth0")]);
            // Its family's table held only ours: gone.
            assert!(nft::rules("ip6", MASQ_TABLE).unwrap().is_none());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn comments_are_safe() {
        assert_eq!(masq_comment("abc", "eth\"0"), "berth-bridge abc eth_0");
        assert!(masq_comment(&"a".repeat(200), "eth0").len() < 128);
    }
}
