//! Small IP address and prefix arithmetic (no external crate needed).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An address with a prefix length, written `10.1.2.3/24`. The address keeps
/// its host bits (a CNI `address` is the interface's address, not the network).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, String> {
        if prefix > max_prefix(&addr) {
            return Err(format!("invalid prefix length {prefix} for {addr}"));
        }
        Ok(IpNet { addr, prefix })
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The same prefix with the host bits cleared.
    pub fn network(&self) -> IpNet {
        let bits = max_prefix(&self.addr);
        let v = to_u128(self.addr) & mask(bits, self.prefix);
        IpNet {
            addr: from_u128(v, self.addr.is_ipv4()),
            prefix: self.prefix,
        }
    }

    /// Whether the host bits are all zero.
    pub fn is_network(&self) -> bool {
        self.network().addr == self.addr
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let bits = max_prefix(&self.addr);
        let m = mask(bits, self.prefix);
        to_u128(ip) & m == to_u128(self.addr) & m
    }

    /// Whether two prefixes share any address.
    pub fn overlaps(&self, other: &IpNet) -> bool {
        self.contains(other.network().addr) || other.contains(self.network().addr)
    }

    /// The last address of the prefix (the IPv4 broadcast address).
    pub fn last(&self) -> IpAddr {
        let bits = max_prefix(&self.addr);
        let v = to_u128(self.addr) | !mask(bits, self.prefix) & width_mask(bits);
        from_u128(v, self.addr.is_ipv4())
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid CIDR address: {s}"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("invalid CIDR address: {s}"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("invalid CIDR address: {s}"))?;
        IpNet::new(addr, prefix).map_err(|_| format!("invalid CIDR address: {s}"))
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

pub fn max_prefix(ip: &IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn width_mask(bits: u8) -> u128 {
    if bits == 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

fn mask(bits: u8, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        let host = bits - prefix;
        (width_mask(bits) >> host) << host
    }
}

pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

pub fn from_u128(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(v))
    }
}

/// The next address, wrapping to zero at the end of the family's space.
pub fn next_ip(ip: IpAddr) -> IpAddr {
    let bits = max_prefix(&ip);
    from_u128(to_u128(ip).wrapping_add(1) & width_mask(bits), ip.is_ipv4())
}

/// The previous address, wrapping at zero.
pub fn prev_ip(ip: IpAddr) -> IpAddr {
    let bits = max_prefix(&ip);
    from_u128(to_u128(ip).wrapping_sub(1) & width_mask(bits), ip.is_ipv4())
}

/// `a <= b` for two addresses of one family.
pub fn ip_le(a: IpAddr, b: IpAddr) -> bool {
    to_u128(a) <= to_u128(b)
}

/// Parses `10.1.2.3` or `10.1.2.3/24` (the prefix is dropped).
pub fn parse_ip_maybe_cidr(s: &str) -> Option<IpAddr> {
    let a = s.split('/').next().unwrap_or(s);
    a.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_contains_last() {
        let n: IpNet = "10.222.5.7/24".parse().unwrap();
        assert_eq!(n.network().to_string(), "10.222.5.0/24");
        assert!(!n.is_network());
        assert!(n.contains("10.222.5.255".parse().unwrap()));
        assert!(!n.contains("10.222.6.0".parse().unwrap()));
        assert_eq!(n.last().to_string(), "10.222.5.255");
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert_eq!(all.last().to_string(), "255.255.255.255");
        let host: IpNet = "10.0.0.1/32".parse().unwrap();
        assert!(host.contains("10.0.0.1".parse().unwrap()));
        assert!(!host.contains("10.0.0.2".parse().unwrap()));
        let v6: IpNet = "fd00:1::5/64".parse().unwrap();
        assert_eq!(v6.network().to_string(), "fd00:1::/64");
        assert_eq!(v6.last().to_string(), "fd00:1::ffff:ffff:ffff:ffff");
        let v6all: IpNet = "::/0".parse().unwrap();
        assert!(v6all.contains("fd00::1".parse().unwrap()));
        assert!(!v6all.contains("1.2.3.4".parse().unwrap()));
        let v6host: IpNet = "::1/128".parse().unwrap();
        assert_eq!(v6host.last().to_string(), "::1");
    }

    #[test]
    fn parse_errors() {
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("10.0.0.0".parse::<IpNet>().is_err());
        assert!("x/8".parse::<IpNet>().is_err());
        assert!("fd00::/129".parse::<IpNet>().is_err());
    }

    #[test]
    fn next_prev() {
        let a: IpAddr = "10.0.0.255".parse().unwrap();
        assert_eq!(next_ip(a).to_string(), "10.0.1.0");
        assert_eq!(prev_ip(next_ip(a)), a);
        assert_eq!(
            next_ip("255.255.255.255".parse().unwrap()).to_string(),
            "0.0.0.0"
        );
        assert!(ip_le(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap()
        ));
    }

    #[test]
    fn overlaps() {
        let a: IpNet = "10.0.0.0/16".parse().unwrap();
        let b: IpNet = "10.0.5.0/24".parse().unwrap();
        let c: IpNet = "10.1.0.0/24".parse().unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
    }
}
