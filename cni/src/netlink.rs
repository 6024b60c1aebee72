//! Synchronous helpers over `rtnetlink`: each [`Netlink`] owns a
//! current-thread tokio runtime driving one netlink connection in the network
//! namespace of the thread that created it. [`in_netns`] runs a closure in a
//! dedicated thread that has entered another network namespace.

use std::fs::File;
use std::future::Future;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteScope,
};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::ip::IpNet;
use crate::spec::{Error, Result, Route};

/// A link as the plugins need to see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    /// `aa:bb:cc:dd:ee:ff`
    pub mac: String,
    pub kind: Option<InfoKind>,
    /// Index of the bridge (or other controller) it is enslaved to.
    pub master: Option<u32>,
    pub up: bool,
}

impl Link {
    pub fn is_bridge(&self) -> bool {
        matches!(self.kind, Some(InfoKind::Bridge))
    }
    pub fn is_veth(&self) -> bool {
        matches!(self.kind, Some(InfoKind::Veth))
    }
}

/// A route from a dump of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
}

/// One netlink connection in the current thread's network namespace.
pub struct Netlink {
    rt: tokio::runtime::Runtime,
    handle: Handle,
}

/// The errno of a netlink error reply, if it is one.
pub fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.raw_code() != 0 => Some(m.raw_code().abs()),
        _ => None,
    }
}

fn nl_err(what: impl std::fmt::Display, e: rtnetlink::Error) -> Error {
    match errno(&e) {
        Some(code) => Error::internal(format!(
            "{what}: {}",
            std::io::Error::from_raw_os_error(code)
        )),
        None => Error::internal(format!("{what}: {e}")),
    }
}

fn mac_string(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn parse_link(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        mac: String::new(),
        kind: None,
        master: None,
        up: m.header.flags.contains(LinkFlags::Up),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Address(b) => l.mac = mac_string(b),
            LinkAttribute::Controller(c) => l.master = Some(*c),
            LinkAttribute::LinkInfo(infos) => {
                for i in infos {
                    if let LinkInfo::Kind(k) = i {
                        l.kind = Some(k.clone());
                    }
                }
            }
            _ => {}
        }
    }
    l
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

impl Netlink {
    /// Opens a connection in the calling thread's network namespace.
    pub fn new() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| Error::internal(format!("tokio runtime: {e}")))?;
        let (conn, handle, _) = {
            let _guard = rt.enter();
            rtnetlink::new_connection()
                .map_err(|e| Error::internal(format!("netlink socket: {e}")))?
        };
        rt.spawn(conn);
        Ok(Netlink { rt, handle })
    }

    fn run<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// The link called `name`, or `None`.
    pub fn link(&self, name: &str) -> Result<Option<Link>> {
        let r = self.run(async {
            self.handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_next()
                .await
        });
        match r {
            Ok(m) => Ok(m.as_ref().map(parse_link)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format_args!("failed to look up link {name}"), e)),
        }
    }

    pub fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let r = self.run(async {
            self.handle
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next()
                .await
        });
        match r {
            Ok(m) => Ok(m.as_ref().map(parse_link)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(nl_err(format_args!("failed to look up link #{index}"), e)),
        }
    }

    pub fn links(&self) -> Result<Vec<Link>> {
        self.run(async {
            self.handle
                .link()
                .get()
                .execute()
                .try_collect::<Vec<_>>()
                .await
        })
        .map(|v| v.iter().map(parse_link).collect())
        .map_err(|e| nl_err("failed to list links", e))
    }

    fn set(&self, what: String, msg: LinkMessage) -> Result<()> {
        self.run(async { self.handle.link().set(msg).execute().await })
            .map_err(|e| nl_err(what, e))
    }

    /// Creates a bridge (up); `Ok(false)` if a link of that name exists.
    /// The bridge gets a fixed random locally administered MAC: without one
    /// the kernel gives it its lowest port's MAC, which changes (and breaks
    /// the pods' ARP entries for the gateway) as pods come and go.
    pub fn create_bridge(&self, name: &str, mtu: Option<u32>) -> Result<bool> {
        let mut mac: [u8; 6] = rand::random();
        mac[0] = (mac[0] & 0xfe) | 0x02;
        let mut b = LinkBridge::new(name).address(mac.to_vec());
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        let msg = b.build();
        match self.run(async { self.handle.link().add(msg).execute().await }) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(nl_err(format_args!("failed to create bridge {name}"), e)),
        }
    }

    /// Creates a veth pair, `name` here and `peer` in the network namespace
    /// `peer_netns`; `Ok(false)` if one of the names is taken. Made there
    /// rather than moved there afterwards: moving a link between namespaces
    /// waits for an RCU grace period (10 to 20 ms on a busy 2-core host).
    pub fn create_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: &File,
        mtu: Option<u32>,
    ) -> Result<bool> {
        let mut b = LinkVeth::new(name, peer);
        if let Some(m) = mtu {
            b = b.mtu(m);
        }
        let mut msg = b.build();
        for attr in &mut msg.attributes {
            if let LinkAttribute::LinkInfo(infos) = attr {
                for info in infos {
                    if let LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))) = info {
                        p.attributes
                            .push(LinkAttribute::NetNsFd(peer_netns.as_raw_fd()));
                        if let Some(m) = mtu {
                            p.attributes.push(LinkAttribute::Mtu(m));
                        }
                    }
                }
            }
        }
        match self.run(async { self.handle.link().add(msg).execute().await }) {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(nl_err(format_args!("failed to create veth {name}"), e)),
        }
    }

    pub fn set_up(&self, index: u32) -> Result<()> {
        self.set(
            format!("failed to set link #{index} up"),
            LinkUnspec::new_with_index(index).up().build(),
        )
    }

    pub fn set_down(&self, index: u32) -> Result<()> {
        self.set(
            format!("failed to set link #{index} down"),
            LinkUnspec::new_with_index(index).down().build(),
        )
    }

    pub fn set_promisc(&self, index: u32, on: bool) -> Result<()> {
        self.set(
            format!("failed to set promiscuous mode on link #{index}"),
            LinkUnspec::new_with_index(index).promiscuous(on).build(),
        )
    }

    pub fn set_master(&self, index: u32, master: u32) -> Result<()> {
        self.set(
            format!("failed to attach link #{index} to #{master}"),
            LinkUnspec::new_with_index(index).controller(master).build(),
        )
    }

    pub fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
        let msg = LinkBridgePort::new(index).hairpin(on).build();
        self.run(async { self.handle.link().set_port(msg).execute().await })
            .map_err(|e| nl_err(format_args!("failed to set hairpin on link #{index}"), e))
    }

    /// Deletes a link; a missing link is not an error.
    pub fn delete_link(&self, index: u32) -> Result<()> {
        match self.run(async { self.handle.link().del(index).execute().await }) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(nl_err(format_args!("failed to delete link #{index}"), e)),
        }
    }

    /// The addresses on a link.
    pub fn addresses(&self, index: u32) -> Result<Vec<IpNet>> {
        let msgs = self
            .run(async {
                self.handle
                    .address()
                    .get()
                    .set_link_index_filter(index)
                    .execute()
                    .try_collect::<Vec<_>>()
                    .await
            })
            .map_err(|e| nl_err(format_args!("failed to list addresses of link #{index}"), e))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.index != index {
                continue;
            }
            let mut local = None;
            let mut addr = None;
            for a in &m.attributes {
                match a {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => addr = Some(*ip),
                    _ => {}
                }
            }
            if let Some(ip) = local.or(addr) {
                out.push(IpNet {
                    addr: ip,
                    prefix: m.header.prefix_len,
                });
            }
        }
        Ok(out)
    }

    /// Adds an address; `Ok(false)` if the link already has it.
    pub fn add_address(&self, index: u32, net: IpNet) -> Result<bool> {
        let r = self.run(async {
            self.handle
                .address()
                .add(index, net.addr, net.prefix)
                .execute()
                .await
        });
        match r {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(nl_err(
                format_args!("failed to add address {net} to link #{index}"),
                e,
            )),
        }
    }

    /// Adds a route through `oif` (gateway `gw` if given); an identical route
    /// already present is not an error.
    pub fn add_route(&self, route: &Route, gw: Option<IpAddr>, oif: u32) -> Result<()> {
        let dst = route.dst.network();
        let what = || match gw {
            Some(g) => format!("failed to add route {dst} via {g}"),
            None => format!("failed to add route {dst}"),
        };
        let mut b = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(dst.addr, dst.prefix)
            .map_err(|e| Error::internal(format!("{}: {e}", what())))?
            .output_interface(oif);
        if let Some(g) = gw {
            b = b
                .gateway(g)
                .map_err(|e| Error::internal(format!("{}: {e}", what())))?;
        } else {
            b = b.scope(RouteScope::Link);
        }
        if let Some(p) = route.priority {
            b = b.priority(p);
        }
        if let Some(t) = route.table {
            b = b.table_id(t);
        }
        if let Some(s) = route.scope {
            b = b.scope(RouteScope::from(s));
        }
        let mut msg = b.build();
        let mut metrics = Vec::new();
        if let Some(m) = route.mtu {
            metrics.push(RouteMetric::Mtu(m));
        }
        if let Some(m) = route.advmss {
            metrics.push(RouteMetric::Advmss(m));
        }
        if !metrics.is_empty() {
            msg.attributes.push(RouteAttribute::Metrics(metrics));
        }
        match self.run(async { self.handle.route().add(msg).execute().await }) {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(nl_err(what(), e)),
        }
    }

    /// The routes of the main table for one family.
    pub fn routes(&self, v4: bool) -> Result<Vec<RouteEntry>> {
        let mut q = RouteMessage::default();
        q.header.address_family = if v4 {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let msgs = self
            .run(async {
                self.handle
                    .route()
                    .get(q)
                    .execute()
                    .try_collect::<Vec<_>>()
                    .await
            })
            .map_err(|e| nl_err("failed to list routes", e))?;
        let mut out = Vec::new();
        for m in msgs {
            if m.header.table != RouteHeader::RT_TABLE_MAIN {
                continue;
            }
            let mut dst = None;
            let mut gw = None;
            let mut oif = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_addr(d),
                    RouteAttribute::Gateway(g) => gw = route_addr(g),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let dst = dst.unwrap_or(if v4 {
                IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            });
            out.push(RouteEntry {
                dst: IpNet {
                    addr: dst,
                    prefix: m.header.destination_prefix_length,
                },
                gw,
                oif,
            });
        }
        Ok(out)
    }

    /// `ip route get`: the output interface the kernel picks for `ip`.
    pub fn route_get(&self, ip: IpAddr) -> Result<Option<u32>> {
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, crate::ip::max_prefix(&ip))
            .map_err(|e| Error::internal(format!("route get {ip}: {e}")))?
            .build();
        let r = self.run(async {
            self.handle
                .route()
                .get(msg)
                .execute()
                .try_collect::<Vec<_>>()
                .await
        });
        match r {
            Ok(msgs) => Ok(msgs.iter().find_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            })),
            Err(e) if matches!(errno(&e), Some(libc::ENETUNREACH | libc::EHOSTUNREACH)) => Ok(None),
            Err(e) => Err(nl_err(format_args!("route get {ip}"), e)),
        }
    }
}

/// Opens a network namespace file (`CNI_NETNS`).
pub fn open_netns(path: &Path) -> Result<File> {
    File::open(path)
        .map_err(|e| Error::internal(format!("failed to open netns {}: {e}", path.display())))
}

/// Runs `f` in a new thread that has joined the network namespace `netns`.
/// The thread ends with `f`, so the caller's namespace is never touched.
pub fn in_netns<T, F>(netns: &File, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> Result<T> + Send,
{
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| Error::internal(format!("failed to enter netns: {e}")))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| Err(Error::internal("netns worker thread panicked")))
    })
}

/// Whether `path` names a network namespace (opening and entering it works).
pub fn netns_exists(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => in_netns(&f, || Ok(())).is_ok(),
        Err(_) => false,
    }
}

/// Writes a sysctl given as a path under /proc/sys (`net/ipv4/ip_forward`;
/// slashes, not dots, so interface names with dots work).
pub fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    let cur = std::fs::read_to_string(&path).unwrap_or_default();
    if cur.trim() == value {
        return Ok(());
    }
    std::fs::write(&path, value)
        .map_err(|e| Error::internal(format!("failed to set {key}={value}: {e}")))
}
