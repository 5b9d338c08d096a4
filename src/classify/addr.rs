//! Address rules: CIDR sets (IPv4 and IPv6, longest-prefix match in a trie)
//! and the port map. Pure; no sockets.
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

/// A map from CIDR prefixes to a value, answering "which most specific prefix
/// holds this address". IPv4-mapped IPv6 addresses are looked up as IPv4.
#[derive(Clone)]
pub struct NetMap<T> {
    v4: PrefixMap<Ipv4Net, T>,
    v6: PrefixMap<Ipv6Net, T>,
    len: usize,
}

impl<T> Default for NetMap<T> {
    fn default() -> Self {
        NetMap {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
            len: 0,
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for NetMap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetMap").field("len", &self.len).finish()
    }
}

impl<T> NetMap<T> {
    /// Insert a prefix; the first value inserted for a prefix wins.
    pub fn insert(&mut self, net: IpNet, value: T) {
        let fresh = match net {
            IpNet::V4(n) => !self.v4.contains_key(&n) && self.v4.insert(n, value).is_none(),
            IpNet::V6(n) => !self.v6.contains_key(&n) && self.v6.insert(n, value).is_none(),
        };
        if fresh {
            self.len += 1;
        }
    }

    /// The value of the longest prefix holding `addr`, with that prefix.
    pub fn lookup(&self, addr: IpAddr) -> Option<(IpNet, &T)> {
        match canonical(addr) {
            IpAddr::V4(a) => self
                .v4
                .get_lpm(&Ipv4Net::from(a))
                .map(|(p, v)| (IpNet::V4(*p), v)),
            IpAddr::V6(a) => self
                .v6
                .get_lpm(&Ipv6Net::from(a))
                .map(|(p, v)| (IpNet::V6(*p), v)),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every prefix with its value.
    pub fn iter(&self) -> impl Iterator<Item = (IpNet, &T)> {
        self.v4
            .iter()
            .map(|(p, v)| (IpNet::V4(*p), v))
            .chain(self.v6.iter().map(|(p, v)| (IpNet::V6(*p), v)))
    }
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is the IPv4 address it carries: a
/// rule on 127.0.0.0/8 must also catch `[::ffff:127.0.0.1]`.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// A set of CIDR prefixes (client ACLs, denied destinations, allow-lists).
#[derive(Clone, Default, Debug)]
pub struct NetSet {
    map: NetMap<()>,
}

impl NetSet {
    pub fn from_nets(nets: impl IntoIterator<Item = IpNet>) -> NetSet {
        let mut map = NetMap::default();
        for n in nets {
            map.insert(n, ());
        }
        NetSet { map }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        self.map.lookup(addr).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.map.iter().map(|(n, _)| n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_and_families_are_separate() {
        let mut m = NetMap::default();
        m.insert(net("149.154.160.0/20"), "telegram");
        m.insert(net("149.154.167.0/24"), "dc2");
        m.insert(net("2001:67c:4e8::/48"), "telegram6");
        let cases: &[(&str, Option<&str>)] = &[
            ("149.154.167.51", Some("dc2")),
            ("149.154.160.1", Some("telegram")),
            ("149.154.175.255", Some("telegram")),
            ("149.154.176.0", None),
            ("149.0.0.1", None),
            ("::ffff:149.154.167.51", Some("dc2")),
            ("2001:67c:4e8:1::1", Some("telegram6")),
            ("2001:67c:4e9::1", None),
            ("::1", None),
        ];
        for (addr, want) in cases {
            let got = m.lookup(addr.parse().unwrap()).map(|(_, v)| *v);
            assert_eq!(got, *want, "{addr}");
        }
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn net_set_matches_mapped_loopback() {
        let s = NetSet::from_nets([net("127.0.0.0/8"), net("::1/128")]);
        assert!(s.contains("127.3.2.1".parse().unwrap()));
        assert!(s.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(s.contains("::1".parse().unwrap()));
        assert!(!s.contains("128.0.0.1".parse().unwrap()));
        assert!(!s.contains("::2".parse().unwrap()));
    }
}
