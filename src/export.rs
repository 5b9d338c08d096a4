//! `chatwall export`: the active signature set, under the active policy, as
//! DNS-sinkhole rules (a hosts file, dnsmasq, unbound, an RPZ zone) and
//! firewall rules (iptables-restore input, an nftables ruleset).
//!
//! This module owns the translation only: which rules of the set a format
//! can express, and how. It reads the engine snapshot (signatures and
//! resolved policy) and returns text; it writes no file and runs no tool.
//!
//! What is exported:
//! - only apps whose resolved action is `block`. `monitor` apps are left
//!   out on purpose: a sinkhole or a firewall rule cannot let a flow pass
//!   and count it, so exporting them would turn "monitor" into "block";
//! - per-client `[[policy.exceptions]]` cannot be expressed and are ignored;
//! - the policy allow-list (`[[policy.allow]]`) is honoured: a blocked name
//!   the allow-list fully covers is left out, an allowed name below a
//!   blocked wildcard gets a pass-through entry (dnsmasq, unbound, RPZ), and
//!   allowed prefixes are accepted before any firewall rule drops;
//! - host rules and SNI rules go to the DNS formats; CIDR and port rules go
//!   to the firewall formats. HTTP, payload, TLS fingerprint and download
//!   rules need the proxy and have no equivalent here.
//!
//! Every DNS format (dnsmasq, unbound, RPZ) also answers NXDOMAIN for
//! Firefox's canary domain `use-application-dns.net`, whatever the policy:
//! Firefox then keeps DNS over HTTPS off when it is on by default, so its
//! lookups reach this resolver. A hosts file cannot answer NXDOMAIN (any
//! entry is an address, which Firefox reads as "DoH allowed"), so the hosts
//! format says so in a comment instead.
//!
//! The output carries no timestamp, so the same set and policy always give
//! the same bytes.
use std::collections::BTreeSet;
use std::fmt::Write as _;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use crate::config::Action;
use crate::engine::Engine;
use crate::signatures::App;

/// Ports in one `-m multiport --dports` list (an iptables limit).
const MULTIPORT_MAX: usize = 15;
/// TTL and SOA timers of the RPZ zone, in seconds.
const RPZ_TTL: u32 = 300;
/// Firefox's canary domain: a resolver that answers NXDOMAIN (or no A and
/// AAAA) for it tells Firefox to keep DNS over HTTPS off (Mozilla support,
/// "Canary domain - use-application-dns.net"). It does not bind a user who
/// turned DoH on by hand; enterprise policies do (README, "Circumvention").
pub const DOH_CANARY: &str = "use-application-dns.net";
/// The comment above the canary entry of the DNS formats.
const CANARY_NOTE: &str =
    "Firefox canary domain, answered NXDOMAIN: keeps Firefox's default DNS over HTTPS off";

/// An output format of `chatwall export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A hosts file (`0.0.0.0 name`); exact names only.
    Hosts,
    /// dnsmasq `address=/domain/0.0.0.0` lines.
    Dnsmasq,
    /// An unbound `server:` clause of `local-zone` lines.
    Unbound,
    /// A DNS Response Policy Zone (zone file).
    Rpz,
    /// iptables-restore input (IPv4 `filter` table, chain CHATWALL).
    Iptables,
    /// An nftables ruleset (`table inet chatwall_block`), IPv4 and IPv6.
    Nftables,
}

impl Format {
    pub const ALL: [Format; 6] = [
        Format::Hosts,
        Format::Dnsmasq,
        Format::Unbound,
        Format::Rpz,
        Format::Iptables,
        Format::Nftables,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Hosts => "hosts",
            Format::Dnsmasq => "dnsmasq",
            Format::Unbound => "unbound",
            Format::Rpz => "rpz",
            Format::Iptables => "iptables",
            Format::Nftables => "nftables",
        }
    }

    /// What starts a comment line in this format.
    fn comment(self) -> &'static str {
        match self {
            Format::Rpz => ";",
            _ => "#",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Format, String> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<_> = Format::ALL.iter().map(|f| f.as_str()).collect();
                format!("`{s}` is not one of {}", names.join(", "))
            })
    }
}

/// Render the active signature set in `format`, honouring the policy.
pub fn export(engine: &Engine, format: Format) -> String {
    let plan = Plan::new(engine);
    let mut out = String::new();
    plan.header(&mut out, format);
    match format {
        Format::Hosts => plan.hosts(&mut out),
        Format::Dnsmasq => plan.dnsmasq(&mut out),
        Format::Unbound => plan.unbound(&mut out),
        Format::Rpz => plan.rpz(&mut out),
        Format::Iptables => plan.iptables(&mut out),
        Format::Nftables => plan.nftables(&mut out),
    }
    out
}

/// A host rule: an exact name or every name below a suffix (normalised,
/// without the `*.`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Name {
    Exact(String),
    Below(String),
}

impl Name {
    fn parse(pattern: &str) -> Name {
        match pattern.strip_prefix("*.") {
            Some(suffix) => Name::Below(suffix.to_string()),
            None => Name::Exact(pattern.to_string()),
        }
    }

    /// The DNS name a domain-based format (dnsmasq, unbound, the hosts
    /// file) puts in its rule: the name, or the suffix itself.
    fn domain(&self) -> &str {
        match self {
            Name::Exact(n) | Name::Below(n) => n,
        }
    }

    /// The pattern as written in signature files and RPZ owner names.
    fn pattern(&self) -> String {
        match self {
            Name::Exact(n) => n.clone(),
            Name::Below(s) => format!("*.{s}"),
        }
    }
}

/// Is `name` equal to `domain` or below it, on a label boundary?
fn within(name: &str, domain: &str) -> bool {
    name == domain || is_below(name, domain)
}

/// Is `name` strictly below `domain`?
fn is_below(name: &str, domain: &str) -> bool {
    name.len() > domain.len() + 1
        && name.ends_with(domain)
        && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
}

/// Does `allow` let through every name `rule` matches (proxy semantics)?
fn covers(allow: &Name, rule: &Name) -> bool {
    match (allow, rule) {
        (Name::Exact(a), Name::Exact(r)) => a == r,
        (Name::Below(a), Name::Exact(r)) => is_below(r, a),
        (Name::Below(a), Name::Below(r)) => within(r, a),
        (Name::Exact(_), Name::Below(_)) => false,
    }
}

/// The rules of one blocked app that the formats can carry.
struct Blocked<'a> {
    app: &'a App,
    names: Vec<Name>,
    v4: Vec<Ipv4Net>,
    v6: Vec<Ipv6Net>,
    ports: Vec<u16>,
}

/// What to export: the blocked apps with their rules, in set order, and
/// the allow-list.
struct Plan<'a> {
    engine: &'a Engine,
    blocked: Vec<Blocked<'a>>,
    /// Apps left out, with their action.
    skipped: Vec<(&'a str, Action)>,
    /// Allowed names strictly below a blocked wildcard: pass-through entries.
    pass: Vec<Name>,
    allow_v4: Vec<Ipv4Net>,
    allow_v6: Vec<Ipv6Net>,
}

impl<'a> Plan<'a> {
    fn new(engine: &'a Engine) -> Plan<'a> {
        let set = &engine.signatures;
        let policy_cfg = engine.policy.config();
        let allow: Vec<Name> = policy_cfg
            .allow_hosts
            .iter()
            .map(|p| Name::parse(p))
            .collect();
        let mut blocked: Vec<Blocked<'a>> = Vec::new();
        let mut skipped = Vec::new();
        let mut index = vec![None; set.apps().len()];
        for (i, app) in set.apps().iter().enumerate() {
            match engine.policy.app_action(i) {
                Action::Block => {
                    index[i] = Some(blocked.len());
                    blocked.push(Blocked {
                        app,
                        names: Vec::new(),
                        v4: Vec::new(),
                        v6: Vec::new(),
                        ports: Vec::new(),
                    });
                }
                other => skipped.push((app.id.as_str(), other)),
            }
        }
        let slot = |app: u16| index.get(app as usize).copied().flatten();

        // Names: a host and an SNI rule may give the same pattern.
        let mut seen = BTreeSet::new();
        for (pattern, app) in set.host_patterns() {
            let Some(b) = slot(app) else { continue };
            let name = Name::parse(pattern);
            if allow.iter().any(|a| covers(a, &name)) || !seen.insert(name.clone()) {
                continue;
            }
            blocked[b].names.push(name);
        }
        for (net, app) in set.cidr_list() {
            let Some(b) = slot(app) else { continue };
            match net {
                IpNet::V4(n) => blocked[b].v4.push(n),
                IpNet::V6(n) => blocked[b].v6.push(n),
            }
        }
        for (port, app) in set.port_list() {
            if let Some(b) = slot(app) {
                blocked[b].ports.push(port);
            }
        }

        let wildcards: Vec<&str> = blocked
            .iter()
            .flat_map(|b| &b.names)
            .filter_map(|n| match n {
                Name::Below(s) => Some(s.as_str()),
                Name::Exact(_) => None,
            })
            .collect();
        let pass = allow
            .into_iter()
            .filter(|a| wildcards.iter().any(|w| is_below(a.domain(), w)))
            .collect();
        let (mut allow_v4, mut allow_v6) = (Vec::new(), Vec::new());
        for net in policy_cfg.allow_nets.nets() {
            match net {
                IpNet::V4(n) => allow_v4.push(n),
                IpNet::V6(n) => allow_v6.push(n),
            }
        }
        Plan {
            engine,
            blocked,
            skipped,
            pass,
            allow_v4,
            allow_v6,
        }
    }

    fn header(&self, out: &mut String, format: Format) {
        let c = format.comment();
        let set = &self.engine.signatures;
        let version = if set.version.is_empty() {
            "-"
        } else {
            &set.version
        };
        let _ = writeln!(
            out,
            "{c} chatwall export --format {format}: signatures {version} ({}), generated by chatwall {}",
            set.origin,
            env!("CARGO_PKG_VERSION")
        );
        let ids: Vec<&str> = self.blocked.iter().map(|b| b.app.id.as_str()).collect();
        let _ = writeln!(
            out,
            "{c} Exported: the {} of {} apps whose policy action is block: {}",
            ids.len(),
            set.apps().len(),
            if ids.is_empty() {
                "none".to_string()
            } else {
                ids.join(", ")
            }
        );
        if !self.skipped.is_empty() {
            let left: Vec<String> = self
                .skipped
                .iter()
                .map(|(id, action)| format!("{id} ({})", action.as_str()))
                .collect();
            let _ = writeln!(out, "{c} Not exported: {}", left.join(", "));
        }
        let _ = writeln!(
            out,
            "{c} monitor apps are never exported (a DNS or firewall rule cannot pass a flow and count it);"
        );
        let _ = writeln!(
            out,
            "{c} per-client policy exceptions cannot be expressed here and are ignored."
        );
    }

    fn app_comment(&self, out: &mut String, c: &str, b: &Blocked) {
        let _ = writeln!(out, "{c} {}: {} ({})", b.app.id, b.app.name, b.app.file);
    }

    /// The domains of the formats that match whole subtrees (dnsmasq,
    /// unbound), per app: every name, minus those equal to or below a
    /// domain already exported.
    fn domains(&self) -> Vec<(&Blocked<'a>, Vec<&str>)> {
        let all: Vec<&str> = self
            .blocked
            .iter()
            .flat_map(|b| &b.names)
            .map(Name::domain)
            .collect();
        let mut seen = BTreeSet::new();
        self.blocked
            .iter()
            .map(|b| {
                let list = b
                    .names
                    .iter()
                    .map(Name::domain)
                    .filter(|d| !all.iter().any(|other| is_below(d, other)))
                    .filter(|d| seen.insert(*d))
                    .collect();
                (b, list)
            })
            .filter(|(_, list): &(_, Vec<&str>)| !list.is_empty())
            .collect()
    }

    fn hosts(&self, out: &mut String) {
        out.push_str(
            "# A hosts file matches exact names only: for a `*.suffix` rule only the\n\
             # suffix itself is listed, and the names below it still resolve.\n",
        );
        let _ = writeln!(
            out,
            "# {DOH_CANARY} (Firefox's DoH canary) is not listed: a hosts entry answers\n\
             # an address, which Firefox reads as \"DoH allowed\"; answer NXDOMAIN for it on\n\
             # the resolver (the dnsmasq, unbound and rpz formats do)."
        );
        let policy = &self.engine.policy;
        let mut seen = BTreeSet::new();
        for b in &self.blocked {
            if b.names.is_empty() {
                continue;
            }
            out.push('\n');
            self.app_comment(out, "#", b);
            for name in &b.names {
                let n = name.domain();
                if let Name::Below(_) = name {
                    if policy.allows_name(n) {
                        continue;
                    }
                    let _ = writeln!(out, "# {}: listed as {n} only", name.pattern());
                }
                if seen.insert(n) {
                    let _ = writeln!(out, "0.0.0.0 {n}");
                    let _ = writeln!(out, ":: {n}");
                }
            }
        }
    }

    fn dnsmasq(&self, out: &mut String) {
        out.push_str(
            "# dnsmasq matches a domain and every name below it: an exact-name rule also\n\
             # sinkholes the names below it, and a `*.suffix` rule the suffix itself.\n",
        );
        // An address= without an address answers NXDOMAIN (dnsmasq(8), --address).
        let _ = write!(out, "\n# {CANARY_NOTE}\naddress=/{DOH_CANARY}/\n");
        for (b, domains) in self.domains() {
            out.push('\n');
            self.app_comment(out, "#", b);
            for d in domains {
                let _ = writeln!(out, "address=/{d}/0.0.0.0");
                let _ = writeln!(out, "address=/{d}/::");
            }
        }
        if !self.pass.is_empty() {
            out.push_str("\n# policy.allow: resolved normally (the more specific domain wins)\n");
            for a in &self.pass {
                let _ = writeln!(out, "server=/{}/#", a.domain());
            }
        }
    }

    fn unbound(&self, out: &mut String) {
        out.push_str(
            "# A local-zone holds a name and every name below it: an exact-name rule also\n\
             # blocks the names below it, and a `*.suffix` rule the suffix itself.\n\
             server:\n",
        );
        let _ = write!(
            out,
            "\n\t# {CANARY_NOTE}\n\tlocal-zone: \"{DOH_CANARY}.\" always_nxdomain\n"
        );
        for (b, domains) in self.domains() {
            out.push('\n');
            self.app_comment(out, "\t#", b);
            for d in domains {
                let _ = writeln!(out, "\tlocal-zone: \"{d}.\" always_nxdomain");
            }
        }
        if !self.pass.is_empty() {
            out.push_str("\n\t# policy.allow: resolved normally (the more specific zone wins)\n");
            for a in &self.pass {
                let _ = writeln!(out, "\tlocal-zone: \"{}.\" transparent", a.domain());
            }
        }
    }

    fn rpz(&self, out: &mut String) {
        let serial = rpz_serial(&self.engine.signatures.version);
        let _ = write!(
            out,
            "; Load as a response-policy zone; owner names are relative to the zone's origin.\n\
             $TTL {RPZ_TTL}\n\
             @ IN SOA localhost. hostmaster.localhost. ( {serial} 3600 600 604800 {RPZ_TTL} )\n\
             \x20 IN NS localhost.\n"
        );
        let _ = write!(out, "\n; {CANARY_NOTE}\n{DOH_CANARY} CNAME .\n");
        for b in &self.blocked {
            if b.names.is_empty() {
                continue;
            }
            out.push('\n');
            self.app_comment(out, ";", b);
            for name in &b.names {
                // `CNAME .` answers NXDOMAIN (RPZ, draft-vixie-dnsop-dns-rpz §4.1).
                let _ = writeln!(out, "{} CNAME .", name.pattern());
            }
        }
        if !self.pass.is_empty() {
            out.push_str("\n; policy.allow: passed through\n");
            for a in &self.pass {
                let _ = writeln!(out, "{} CNAME rpz-passthru.", a.pattern());
            }
        }
    }

    fn iptables(&self, out: &mut String) {
        let v6: usize = self.blocked.iter().map(|b| b.v6.len()).sum();
        let _ = write!(
            out,
            "# IPv4 only: the {v6} IPv6 prefixes need ip6tables (or use --format nftables).\n\
             # Load without touching other chains, then hook the chain once:\n\
             #   iptables-restore --noflush < this-file\n\
             #   iptables -I FORWARD -j CHATWALL   (and OUTPUT on the proxy host)\n\
             *filter\n\
             :CHATWALL - [0:0]\n"
        );
        for n in &self.allow_v4 {
            let _ = writeln!(
                out,
                "-A CHATWALL -d {n} -m comment --comment \"policy.allow\" -j RETURN"
            );
        }
        for b in &self.blocked {
            let id = &b.app.id;
            for n in &b.v4 {
                let _ = writeln!(
                    out,
                    "-A CHATWALL -d {n} -p tcp -m comment --comment \"{id}\" -j REJECT --reject-with tcp-reset"
                );
                let _ = writeln!(
                    out,
                    "-A CHATWALL -d {n} -m comment --comment \"{id}\" -j DROP"
                );
            }
            for chunk in b.ports.chunks(MULTIPORT_MAX) {
                let ports = match chunk {
                    [one] => format!("--dport {one}"),
                    many => {
                        let list: Vec<String> = many.iter().map(u16::to_string).collect();
                        format!("-m multiport --dports {}", list.join(","))
                    }
                };
                let _ = writeln!(
                    out,
                    "-A CHATWALL -p tcp {ports} -m comment --comment \"{id}\" -j REJECT --reject-with tcp-reset"
                );
            }
        }
        // QUIC (HTTP/3) cannot be inspected: refusing it makes clients fall
        // back to TCP, through the proxy.
        for port in [443, 80] {
            let _ = writeln!(
                out,
                "-A CHATWALL -p udp --dport {port} -m comment --comment \"QUIC: fall back to TCP\" -j DROP"
            );
        }
        out.push_str("COMMIT\n");
    }

    fn nftables(&self, out: &mut String) {
        fn set<T: std::fmt::Display>(
            out: &mut String,
            name: &str,
            kind: &str,
            interval: bool,
            items: &[T],
        ) {
            let flags = if interval {
                " flags interval; auto-merge;"
            } else {
                ""
            };
            let _ = write!(out, "\tset {name} {{ type {kind};{flags}");
            if !items.is_empty() {
                let list: Vec<String> = items.iter().map(ToString::to_string).collect();
                let _ = write!(out, " elements = {{ {} }}", list.join(", "));
            }
            out.push_str(" }\n");
        }
        let im4: Vec<Ipv4Net> = self
            .blocked
            .iter()
            .flat_map(|b| b.v4.iter().copied())
            .collect();
        let im6: Vec<Ipv6Net> = self
            .blocked
            .iter()
            .flat_map(|b| b.v6.iter().copied())
            .collect();
        let ports: BTreeSet<u16> = self
            .blocked
            .iter()
            .flat_map(|b| b.ports.iter().copied())
            .collect();
        let ports: Vec<u16> = ports.into_iter().collect();
        out.push_str(
            "# Replaces the whole table on every load: nft -f this-file\n\
             # The first two lines make the delete succeed when the table is new.\n\
             # Its own table: `inet chatwall` is the transparent-mode redirect\n\
             # table of docker/nftables.sh, which this must not replace.\n\
             table inet chatwall_block\n\
             delete table inet chatwall_block\n\
             table inet chatwall_block {\n",
        );
        for b in &self.blocked {
            if !(b.v4.is_empty() && b.v6.is_empty() && b.ports.is_empty()) {
                let _ = writeln!(
                    out,
                    "\t# {}: {} IPv4 and {} IPv6 prefixes, {} ports ({})",
                    b.app.id,
                    b.v4.len(),
                    b.v6.len(),
                    b.ports.len(),
                    b.app.file
                );
            }
        }
        set(out, "allow4", "ipv4_addr", true, &self.allow_v4);
        set(out, "allow6", "ipv6_addr", true, &self.allow_v6);
        set(out, "im4", "ipv4_addr", true, &im4);
        set(out, "im6", "ipv6_addr", true, &im6);
        set(out, "im_ports", "inet_service", false, &ports);
        out.push_str(
            "\n\tchain im {\n\
             \t\tip daddr @allow4 return\n\
             \t\tip6 daddr @allow6 return\n\
             \t\tip daddr @im4 meta l4proto tcp reject with tcp reset\n\
             \t\tip daddr @im4 drop\n\
             \t\tip6 daddr @im6 meta l4proto tcp reject with tcp reset\n\
             \t\tip6 daddr @im6 drop\n\
             \t\ttcp dport @im_ports reject with tcp reset\n\
             \t\t# QUIC (HTTP/3) cannot be inspected: clients fall back to TCP, through the proxy.\n\
             \t\tudp dport { 80, 443 } drop\n\
             \t}\n\
             \n\
             \tchain forward {\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tjump im\n\
             \t}\n\
             \n\
             \tchain output {\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             \t\tjump im\n\
             \t}\n\
             }\n",
        );
    }
}

/// An RPZ serial from the set's version: `YYYY.MM.DD` gives `YYYYMMDD00`,
/// a plain number itself; anything else 1. Deterministic, so the output is
/// reproducible, and increasing with dated versions.
fn rpz_serial(version: &str) -> u32 {
    let parts: Vec<&str> = version.split('.').collect();
    if let [y, m, d] = parts[..] {
        if y.len() == 4 && m.len() <= 2 && d.len() <= 2 {
            if let (Ok(y), Ok(m), Ok(d)) = (y.parse::<u32>(), m.parse::<u32>(), d.parse::<u32>()) {
                if (1..=12).contains(&m) && (1..=31).contains(&d) {
                    return (y * 10_000 + m * 100 + d).saturating_mul(100);
                }
            }
        }
    }
    version.parse().ok().filter(|&n| n > 0).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn engine(config: &str) -> Engine {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chatwall.toml");
        std::fs::write(&path, config).expect("write config");
        let cfg = Config::load(Some(&path)).expect("config loads");
        Engine::build(cfg).expect("engine builds")
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| !l.trim_start().starts_with(['#', ';']))
            .collect()
    }

    #[test]
    fn allowed_apps_are_not_exported() {
        let e = engine("[policy.apps]\nwhatsapp = \"allow\"\n");
        for format in [Format::Hosts, Format::Dnsmasq, Format::Unbound, Format::Rpz] {
            let out = export(&e, format);
            assert!(
                !lines(&out).iter().any(|l| l.contains("whatsapp")),
                "{format}:\n{out}"
            );
            assert!(
                out.contains("whatsapp (allow)"),
                "{format}: header names the skipped app"
            );
            assert!(
                lines(&out).iter().any(|l| l.contains("telegram.org")),
                "{format}"
            );
        }
    }

    #[test]
    fn monitor_apps_are_not_exported() {
        let e = engine("[policy.apps]\ntelegram = \"monitor\"\n");
        for format in Format::ALL {
            let out = export(&e, format);
            assert!(
                !lines(&out).iter().any(|l| l.contains("telegram")),
                "{format}:\n{out}"
            );
        }
        let out = export(&e, Format::Nftables);
        assert!(
            !out.contains("149.154.160.0/20"),
            "telegram's prefix is left out"
        );
    }

    #[test]
    fn everything_allowed_exports_an_empty_but_valid_skeleton() {
        let e = engine("[policy]\ndefault = \"allow\"\n");
        let ipt = export(&e, Format::Iptables);
        assert!(ipt.contains("*filter\n:CHATWALL - [0:0]\n"));
        assert!(ipt.ends_with("COMMIT\n"));
        assert!(!ipt.contains("REJECT"));
        let nft = export(&e, Format::Nftables);
        assert!(nft.contains("set im4 { type ipv4_addr; flags interval; auto-merge; }"));
        assert_eq!(
            lines(&export(&e, Format::Hosts))
                .iter()
                .filter(|l| !l.is_empty())
                .count(),
            0
        );
    }

    #[test]
    fn dns_formats_carry_exact_names_and_wildcards() {
        let e = engine("");
        let hosts = export(&e, Format::Hosts);
        assert!(
            hosts.contains("\n0.0.0.0 web.whatsapp.com\n")
                || hosts.contains("\n0.0.0.0 whatsapp.com\n")
        );
        assert!(hosts.contains("# *.whatsapp.com: listed as whatsapp.com only\n"));
        assert!(
            !hosts.contains('*')
                || hosts
                    .lines()
                    .all(|l| l.starts_with('#') || !l.contains('*'))
        );
        let dnsmasq = export(&e, Format::Dnsmasq);
        assert!(dnsmasq.contains("address=/whatsapp.com/0.0.0.0\naddress=/whatsapp.com/::\n"));
        let unbound = export(&e, Format::Unbound);
        assert!(unbound.contains("\tlocal-zone: \"whatsapp.com.\" always_nxdomain\n"));
        let rpz = export(&e, Format::Rpz);
        assert!(
            rpz.contains("\nwhatsapp.com CNAME .\n*.whatsapp.com CNAME .\n"),
            "{rpz}"
        );
        let serial = rpz_serial(crate::signatures::BUNDLED_VERSION);
        assert!(serial > 2_026_000_000, "{serial}");
        assert!(rpz.contains(&format!("( {serial} ")), "serial from VERSION");
    }

    #[test]
    fn every_dns_format_answers_nxdomain_for_the_firefox_canary() {
        // Whatever the policy: nothing blocked at all still closes the DoH door.
        for config in ["", "[policy]\ndefault = \"allow\"\n"] {
            let e = engine(config);
            let dnsmasq = export(&e, Format::Dnsmasq);
            assert!(
                lines(&dnsmasq).contains(&"address=/use-application-dns.net/"),
                "{dnsmasq}"
            );
            let unbound = export(&e, Format::Unbound);
            assert!(
                lines(&unbound)
                    .contains(&"\tlocal-zone: \"use-application-dns.net.\" always_nxdomain"),
                "{unbound}"
            );
            let rpz = export(&e, Format::Rpz);
            assert!(
                lines(&rpz).contains(&"use-application-dns.net CNAME ."),
                "{rpz}"
            );
            // A hosts entry would answer an address: only a comment.
            let hosts = export(&e, Format::Hosts);
            assert!(hosts.contains("# use-application-dns.net"), "{hosts}");
            assert!(!lines(&hosts).iter().any(|l| l.contains(DOH_CANARY)));
        }
    }

    #[test]
    fn domains_below_another_exported_domain_are_not_repeated() {
        let e = engine("");
        let dnsmasq = export(&e, Format::Dnsmasq);
        // web.whatsapp.com is below whatsapp.com, which dnsmasq already covers.
        assert!(!dnsmasq.contains("address=/web.whatsapp.com/"));
        let mut seen = BTreeSet::new();
        for l in lines(&dnsmasq).into_iter().filter(|l| !l.is_empty()) {
            assert!(seen.insert(l), "duplicate line {l}");
        }
    }

    #[test]
    fn allow_list_names_are_left_out_or_passed_through() {
        let e = engine(
            "[[policy.allow]]\nhosts = [\"wa.me\", \"*.whatsapp.net\", \"media.whatsapp.com\"]\ncidrs = [\"192.0.2.0/24\"]\n",
        );
        let rpz = export(&e, Format::Rpz);
        assert!(!rpz.contains("\nwa.me CNAME"), "fully allowed exact name");
        assert!(
            !rpz.contains("*.whatsapp.net CNAME"),
            "fully allowed wildcard"
        );
        assert!(
            rpz.contains("\nwhatsapp.net CNAME .\n"),
            "the apex is not allowed"
        );
        assert!(rpz.contains("\nmedia.whatsapp.com CNAME rpz-passthru.\n"));
        assert!(export(&e, Format::Dnsmasq).contains("\nserver=/media.whatsapp.com/#\n"));
        assert!(export(&e, Format::Unbound)
            .contains("\tlocal-zone: \"media.whatsapp.com.\" transparent\n"));
        assert!(export(&e, Format::Iptables).contains(
            "-A CHATWALL -d 192.0.2.0/24 -m comment --comment \"policy.allow\" -j RETURN\n"
        ));
        assert!(export(&e, Format::Nftables).contains("set allow4 { type ipv4_addr; flags interval; auto-merge; elements = { 192.0.2.0/24 } }"));
    }

    #[test]
    fn firewall_formats_carry_prefixes_ports_and_quic() {
        let e = engine("");
        let ipt = export(&e, Format::Iptables);
        assert!(ipt.contains("-A CHATWALL -d 149.154.160.0/20 -p tcp -m comment --comment \"telegram\" -j REJECT --reject-with tcp-reset\n"));
        assert!(ipt.contains("--dports 5222,5269,5280,5281 -m comment --comment \"xmpp\""));
        assert!(ipt.contains("-A CHATWALL -p udp --dport 443 "));
        assert!(
            !ipt.contains("2001:67c:4e8::/48"),
            "no IPv6 in iptables input"
        );
        for l in ipt.lines().filter(|l| l.contains("--dports")) {
            let list = l
                .split("--dports ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .unwrap_or("");
            assert!(list.split(',').count() <= MULTIPORT_MAX, "{l}");
        }
        let nft = export(&e, Format::Nftables);
        assert!(nft.contains("2001:67c:4e8::/48"));
        assert!(nft.contains("5222"));
    }

    #[test]
    fn output_is_reproducible() {
        let e = engine("");
        for format in Format::ALL {
            assert_eq!(export(&e, format), export(&e, format), "{format}");
        }
    }

    #[test]
    fn format_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.as_str().parse::<Format>(), Ok(f));
        }
        assert!("bind".parse::<Format>().is_err());
    }

    #[test]
    fn rpz_serials() {
        assert_eq!(rpz_serial("2026.11.26"), 2_026_112_600);
        assert_eq!(rpz_serial("42"), 42);
        assert_eq!(rpz_serial(""), 1);
        assert_eq!(rpz_serial("v1.2"), 1);
        assert_eq!(rpz_serial("2026.13.01"), 1);
    }

    #[test]
    fn name_relations() {
        assert!(is_below("a.b.c", "b.c"));
        assert!(!is_below("b.c", "b.c"));
        assert!(!is_below("xb.c", "b.c"));
        assert!(covers(&Name::parse("*.b.c"), &Name::parse("*.x.b.c")));
        assert!(covers(&Name::parse("*.b.c"), &Name::parse("*.b.c")));
        assert!(!covers(&Name::parse("b.c"), &Name::parse("*.b.c")));
        assert!(!covers(&Name::parse("*.b.c"), &Name::parse("b.c")));
    }
}
