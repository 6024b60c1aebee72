//! `loopback`: brings `lo` up in the container's netns (ADD) and down (DEL).
//! CNI_IFNAME is ignored: the plugin only ever handles `lo`.

use std::path::Path;

use crate::netlink::{Netlink, in_netns, open_netns};
use crate::spec::{CniResult, Error, Interface, IpConfig, NetConf, Request, Result};

pub fn add(req: &Request) -> Result<CniResult> {
    let net = NetConf::parse(&req.config)?;
    let ns = open_netns(Path::new(&req.netns))?;
    let addrs = in_netns(&ns, || {
        let nl = Netlink::new()?;
        let lo = nl
            .link("lo")?
            .ok_or_else(|| Error::internal("no lo interface in the netns"))?;
        nl.set_up(lo.index)?;
        nl.addresses(lo.index)
    })?;
    if let Some(prev) = net.prev_result()? {
        // Chained after another plugin: pass its result on.
        return Ok(prev);
    }
    Ok(CniResult {
        cni_version: net.cni_version,
        interfaces: vec![Interface {
            name: "lo".into(),
            mac: "00:00:00:00:00:00".into(),
            sandbox: req.netns.clone(),
            ..Default::default()
        }],
        ips: addrs
            .into_iter()
            .filter(|a| a.addr.is_loopback())
            .map(|a| IpConfig {
                version: None,
                address: a,
                gateway: None,
                interface: Some(0),
            })
            .collect(),
        routes: Vec::new(),
        dns: Default::default(),
    })
}

/// Sets `lo` down; a missing netns is not an error.
pub fn del(req: &Request) -> Result<()> {
    NetConf::parse(&req.config)?;
    if req.netns.is_empty() {
        return Ok(());
    }
    let Ok(ns) = std::fs::File::open(&req.netns) else {
        return Ok(());
    };
    let r = in_netns(&ns, || {
        let nl = Netlink::new()?;
        if let Some(lo) = nl.link("lo")? {
            nl.set_down(lo.index)?;
        }
        Ok(())
    });
    // A path that is not (or no longer) a netns: nothing to undo.
    match r {
        Err(e) if e.msg.contains("failed to enter netns") => Ok(()),
        r => r,
    }
}

pub fn check(req: &Request) -> Result<()> {
    NetConf::parse(&req.config)?;
    let ns = open_netns(Path::new(&req.netns))?;
    in_netns(&ns, || {
        let nl = Netlink::new()?;
        match nl.link("lo")? {
            Some(lo) if lo.up => Ok(()),
            Some(_) => Err(Error::internal("lo is down")),
            None => Err(Error::internal("no lo interface in the netns")),
        }
    })
}

pub fn status(req: &Request) -> Result<()> {
    NetConf::parse(&req.config).map(|_| ())
}

pub fn gc(req: &Request) -> Result<()> {
    NetConf::parse(&req.config).map(|_| ())
}
