//! Configuration: raw serde structs (unknown keys rejected), layered as
//! built-in defaults → file → `CHATWALL__SECTION__KEY` environment variables,
//! then one validation step into the typed [`Config`] the rest of the crate
//! uses. Every error names the file, the line and the field.
//!
//! Nothing here touches sockets; listeners are bound later, after the whole
//! configuration and the signature set have loaded (fail closed).
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::classify::host::normalize_host;
use crate::classify::NetSet;

mod tenant;
mod tls_inspect;
pub use tenant::{set_fields, TenantRestrictions, TenantRule};
pub use tls_inspect::{CertErrors, HostPattern, Select, TlsInspect};

/// The built-in defaults, also the documentation of every key's default.
/// `config/chatwall.toml` repeats them with comments.
pub const DEFAULTS: &str = r#"
[listen]
explicit = ["127.0.0.1:3128"]
transparent_http = []
transparent_tls = []
transparent = []
admin = "127.0.0.1:9128"

[signatures]
dir = ""
update_public_key = ""

[policy]
default = "block"
non_tls_on_443 = "block"
non_http_on_80 = "block"
ech = "monitor"
apps = {}
categories = { media-relay = "monitor", circumvention = "monitor" }
exceptions = []
allow = []

[access]
allow_clients = ["127.0.0.0/8", "::1/128"]
deny_destinations = ["127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10", "0.0.0.0/8", "::/128"]
connect_ports = [443]

[inspect]
client_bytes = 16384
first_bytes_timeout_ms = 5000

[log]
access = "stdout"
format = "json"
level = "info"

[limits]
max_request_head_bytes = 65536
max_headers = 100
header_read_timeout_ms = 30000
tunnel_idle_timeout_ms = 600000
upstream_idle_timeout_ms = 90000
upstream_response_timeout_ms = 60000
connect_timeout_ms = 10000
dns_timeout_ms = 5000
max_connections = 20000
max_connections_per_client = 1024
shutdown_grace_ms = 30000

[upstream]
mark = 0
parent = ""
parent_credentials_file = ""
parent_bypass = []

[pac]
proxy = ""
direct_networks = []
direct_domains = []

[auth]
users_file = ""
realm = "chatwall"
negotiate = false
keytab = ""
negotiate_principal = ""
strip_realm = true

[admin]
allow = ["127.0.0.0/8", "::1/128"]
reload_token_file = ""

[tls_inspect]
enabled = false
ca_cert = ""
ca_key = ""
clients = []
decrypt = []
never = []
never_builtin = true
upstream_extra_ca = ""
upstream_cert_errors = "block"
block_page = true
handshake_timeout_ms = 10000
cert_cache_entries = 10000
cert_cache_ttl_ms = 43200000

[tenant_restrictions]
microsoft_tenants = []
microsoft_context = ""
microsoft_v2_policy = ""
microsoft_block_consumer = false
google_allowed_domains = []
slack_requester = ""
slack_allowed = []
dropbox_team_ids = []
[ldap]
url = ""
starttls = false
ca_file = ""
bind_dn = ""
bind_password_file = ""
base_dn = ""
user_filter = "(&(objectClass=person)(uid={user}))"
group_attribute = "memberOf"
group_filter = ""
group_base_dn = ""
group_name_attribute = "cn"
nested = false
cache_ttl_ms = 300000
cache_entries = 10000
timeout_ms = 3000
on_unavailable = "no-groups"
basic_bind = false
"#;

/// Where a value came from, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(
                f,
                "{}:{}: {}: {}",
                self.file, line, self.field, self.message
            ),
            None => write!(f, "{}: {}: {}", self.file, self.field, self.message),
        }
    }
}

/// All errors found in one configuration, reported together.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: RawListen,
    signatures: RawSignatures,
    policy: RawPolicy,
    access: RawAccess,
    inspect: RawInspect,
    log: RawLog,
    limits: RawLimits,
    upstream: RawUpstream,
    pac: RawPac,
    auth: RawAuth,
    admin: RawAdmin,
    tls_inspect: tls_inspect::RawTlsInspect,
    tenant_restrictions: tenant::RawTenant,
    ldap: RawLdap,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLdap {
    url: String,
    starttls: bool,
    ca_file: String,
    bind_dn: String,
    bind_password_file: String,
    base_dn: String,
    user_filter: String,
    group_attribute: String,
    group_filter: String,
    group_base_dn: String,
    group_name_attribute: String,
    nested: bool,
    cache_ttl_ms: i64,
    cache_entries: i64,
    timeout_ms: i64,
    on_unavailable: String,
    basic_bind: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    allow: Vec<String>,
    reload_token_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    users_file: String,
    realm: String,
    negotiate: bool,
    keytab: String,
    negotiate_principal: String,
    strip_realm: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    explicit: Vec<String>,
    transparent_http: Vec<String>,
    transparent_tls: Vec<String>,
    transparent: Vec<String>,
    admin: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignatures {
    dir: String,
    update_public_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: String,
    non_tls_on_443: String,
    non_http_on_80: String,
    ech: String,
    apps: BTreeMap<String, String>,
    categories: BTreeMap<String, String>,
    exceptions: Vec<RawException>,
    allow: Vec<RawAllow>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawException {
    #[serde(default)]
    clients: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    apps: Vec<String>,
    #[serde(default)]
    categories: Vec<String>,
    action: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    schedule: Option<Vec<String>>,
    #[serde(default)]
    timezone: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAllow {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    cidrs: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccess {
    allow_clients: Vec<String>,
    deny_destinations: Vec<String>,
    connect_ports: RawPortList,
}

/// One `connect_ports` entry as written: a port number, or a string
/// holding a port or a range (`"8000-8999"`).
#[derive(Debug, Clone)]
enum RawPorts {
    Number(i64),
    Text(String),
}

/// `connect_ports` as written: a list of entries, or one entry alone (what
/// `CHATWALL__ACCESS__CONNECT_PORTS=443` becomes: the environment layer
/// reads a lone number as a number, not as a list).
#[derive(Debug, Clone, Default)]
struct RawPortList(Vec<RawPorts>);

const PORTS_EXPECTED: &str = "a port number or a string such as \"8000-8999\"";

impl<'de> Deserialize<'de> for RawPorts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl serde::de::Visitor<'_> for Entry {
            type Value = RawPorts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(PORTS_EXPECTED)
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawPorts, E> {
                Ok(RawPorts::Number(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawPorts, E> {
                Ok(RawPorts::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawPorts, E> {
                Ok(RawPorts::Text(v.to_string()))
            }
        }
        d.deserialize_any(Entry)
    }
}

impl<'de> Deserialize<'de> for RawPortList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct List;
        impl<'de> serde::de::Visitor<'de> for List {
            type Value = RawPortList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a list of ports and ranges ({PORTS_EXPECTED})")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RawPortList, A::Error> {
                let mut out = Vec::new();
                while let Some(e) = seq.next_element::<RawPorts>()? {
                    out.push(e);
                }
                Ok(RawPortList(out))
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawPortList, E> {
                Ok(RawPortList(vec![RawPorts::Number(v)]))
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawPortList, E> {
                Ok(RawPortList(vec![RawPorts::Number(
                    i64::try_from(v).unwrap_or(i64::MAX),
                )]))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawPortList, E> {
                Ok(RawPortList(vec![RawPorts::Text(v.to_string())]))
            }
        }
        d.deserialize_any(List)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInspect {
    client_bytes: i64,
    first_bytes_timeout_ms: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    access: String,
    format: String,
    level: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_request_head_bytes: i64,
    max_headers: i64,
    header_read_timeout_ms: i64,
    tunnel_idle_timeout_ms: i64,
    upstream_idle_timeout_ms: i64,
    upstream_response_timeout_ms: i64,
    connect_timeout_ms: i64,
    dns_timeout_ms: i64,
    max_connections: i64,
    max_connections_per_client: i64,
    shutdown_grace_ms: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    mark: i64,
    parent: String,
    parent_credentials_file: String,
    parent_bypass: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPac {
    proxy: String,
    direct_networks: Vec<String>,
    direct_domains: Vec<String>,
}

/// What to do with a flow the signature set attributes to an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Monitor,
    Block,
}

impl Action {
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "allow" => Some(Action::Allow),
            "monitor" => Some(Action::Monitor),
            "block" => Some(Action::Block),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Monitor => "monitor",
            Action::Block => "block",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Exception {
    pub clients: NetSet,
    pub users: Vec<String>,
    /// Directory groups, as [`group_key`] writes them: a member of any
    /// one of them matches.
    pub groups: Vec<String>,
    pub apps: Vec<String>,
    pub categories: Vec<String>,
    pub action: Action,
    /// `name`, or `#N` (its 1-based position) when it has none: how the
    /// access log, the metrics and `classify` name it.
    pub label: String,
    /// When it applies; `None`: always.
    pub schedule: Option<crate::schedule::Schedule>,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub default: Action,
    pub non_tls_on_443: Action,
    pub non_http_on_80: Action,
    pub ech: Action,
    pub apps: BTreeMap<String, Action>,
    pub categories: BTreeMap<String, Action>,
    pub exceptions: Vec<Exception>,
    /// Normalised names (exact, or `*.suffix`) that are never refused.
    pub allow_hosts: Vec<String>,
    pub allow_nets: NetSet,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    Off,
    File(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Squid,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_request_head_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout: Duration,
    pub tunnel_idle_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub upstream_response_timeout: Duration,
    pub connect_timeout: Duration,
    pub dns_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_client: usize,
    pub shutdown_grace: Duration,
}

/// A set of TCP ports, as sorted inclusive ranges that neither overlap nor
/// touch (`[access] connect_ports`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
}

impl PortSet {
    /// The set of the given inclusive ranges (each with low <= high).
    pub fn from_ranges(mut ranges: Vec<(u16, u16)>) -> PortSet {
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            debug_assert!(lo <= hi);
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        PortSet { ranges: merged }
    }

    pub fn contains(&self, port: u16) -> bool {
        // The last range starting at or below `port` is the only candidate.
        let i = self.ranges.partition_point(|&(lo, _)| lo <= port);
        i > 0 && port <= self.ranges[i - 1].1
    }

    /// Every port from 1 to 65535.
    pub fn is_all(&self) -> bool {
        self.ranges
            .first()
            .is_some_and(|&(lo, hi)| lo <= 1 && hi == u16::MAX)
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ranges.is_empty() {
            return write!(f, "none");
        }
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Listen {
    pub explicit: Vec<SocketAddr>,
    pub transparent_http: Vec<SocketAddr>,
    pub transparent_tls: Vec<SocketAddr>,
    pub transparent: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct Pac {
    /// `host:port` clients should use; empty means the first explicit listener.
    pub proxy: String,
    pub direct_networks: Vec<IpNet>,
    pub direct_domains: Vec<String>,
}

/// Proxy authentication (Basic and/or Negotiate over
/// `Proxy-Authorization`).
#[derive(Debug, Clone)]
pub struct Auth {
    pub realm: String,
    pub users_file: PathBuf,
    /// User name → Argon2 PHC hash string.
    pub users: std::collections::HashMap<String, String>,
    /// Basic is offered: a users file or `[ldap] basic_bind`.
    pub basic: bool,
    /// `negotiate = true`: SPNEGO/Kerberos single sign-on.
    pub negotiate: Option<Negotiate>,
}

/// `[auth] negotiate`: Kerberos tickets (SPNEGO) accepted with the keys of
/// the proxy's `HTTP/` service principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiate {
    /// The keytab; empty: the GSS-API default (`KRB5_KTNAME`, else
    /// `/etc/krb5.keytab`). Read at start (see `cli::run`).
    pub keytab: PathBuf,
    /// The acceptor principal (`HTTP/proxy.example.com@REALM`); empty: any
    /// key in the keytab.
    pub principal: String,
    /// The user is the principal without `@REALM`.
    pub strip_realm: bool,
}

/// Read a users file: `name:$argon2id$...` lines, `#` comments.
pub fn load_users(
    path: &Path,
) -> Result<std::collections::HashMap<String, String>, Vec<ConfigError>> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![ConfigError {
            file: file.clone(),
            line: None,
            field: "auth.users_file".into(),
            message: format!("cannot read: {e}"),
        }]
    })?;
    let mut users = std::collections::HashMap::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |m: &str| ConfigError {
            file: file.clone(),
            line: Some(i + 1),
            field: "user".into(),
            message: m.to_string(),
        };
        let Some((name, hash)) = line.split_once(':') else {
            errors.push(err("expected `name:hash`"));
            continue;
        };
        if name.is_empty() || name.contains(char::is_whitespace) {
            errors.push(err("invalid user name"));
        } else if argon2::PasswordHash::new(hash).is_err() {
            errors.push(err(
                "not an Argon2 PHC hash (make one with `chatwall passwd NAME`)",
            ));
        } else if users.insert(name.to_string(), hash.to_string()).is_some() {
            errors.push(err("user listed twice"));
        }
    }
    if errors.is_empty() {
        Ok(users)
    } else {
        Err(errors)
    }
}

/// A secret read from a file; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The admin listener's access rules.
#[derive(Debug, Clone)]
pub struct Admin {
    /// Clients that may reach `/metrics` and `POST /-/reload` (and any
    /// other path but the open ones: health, readiness and the PAC file).
    pub allow: NetSet,
    pub reload_token_file: Option<PathBuf>,
    /// The bearer token `POST /-/reload` needs, if any.
    pub reload_token: Option<Secret>,
}

/// Read a secret from a file only its owner may read: refused when group
/// or others have any permission on it. Surrounding white space (a final
/// newline) is not part of it.
pub fn read_secret(path: &Path, field: &str) -> Result<Secret, ConfigError> {
    let err = |message: String| ConfigError {
        file: path.display().to_string(),
        line: None,
        field: field.to_string(),
        message,
    };
    let text = read_private(path).map_err(err)?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(err("the token is shorter than 16 characters".into()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(err(
            "the token must be one word of printable ASCII characters".into(),
        ));
    }
    Ok(Secret(token.to_string()))
}

/// `[auth] negotiate`, `keytab`, `negotiate_principal`, `strip_realm`.
fn validate_negotiate(v: &mut Validator, raw: &RawAuth, path: Option<&Path>) -> Option<Negotiate> {
    if !raw.negotiate {
        for (key, value) in [
            ("keytab", &raw.keytab),
            ("negotiate_principal", &raw.negotiate_principal),
        ] {
            if !value.is_empty() {
                v.err("auth", key, "set, but negotiate = false");
            }
        }
        return None;
    }
    if !cfg!(feature = "negotiate") {
        v.err(
            "auth",
            "negotiate",
            "this chatwall was built without Negotiate support (cargo build --release --features negotiate)",
        );
    }
    let principal = raw.negotiate_principal.trim();
    if principal != raw.negotiate_principal
        || principal
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        v.err(
            "auth",
            "negotiate_principal",
            "must be one principal without white space (HTTP/proxy.example.com@REALM)",
        );
    }
    let keytab = if raw.keytab.is_empty() {
        PathBuf::new()
    } else {
        let p = PathBuf::from(&raw.keytab);
        let p = match (p.is_relative(), path.and_then(Path::parent)) {
            (true, Some(parent)) if !parent.as_os_str().is_empty() => parent.join(p),
            _ => p,
        };
        if let Err(e) = check_private(&p) {
            v.err("auth", "keytab", format!("{}: {e}", p.display()));
        }
        p
    };
    Some(Negotiate {
        keytab,
        principal: principal.to_string(),
        strip_realm: raw.strip_realm,
    })
}

/// A regular file only its owner may read (group and others have no
/// permission on it), without reading it.
fn check_private(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "mode {mode:04o} lets group or others at a secret; chmod 600 it"
            ));
        }
    }
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| format!("cannot read: {e}"))
}

/// Read a small file only its owner may read (group and others have no
/// permission on it).
fn read_private(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read: {e}"))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "mode {mode:04o} lets group or others at a secret; chmod 600 it"
            ));
        }
    }
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    read_small(path, 4096)
}

/// `[upstream] parent`: a parent proxy that upstream connections go
/// through (HTTP in absolute form, everything else as a CONNECT tunnel),
/// except to the destinations of `parent_bypass`.
#[derive(Debug, Clone)]
pub struct Parent {
    /// The host as written (a name, or an IP address without brackets).
    pub host: String,
    pub port: u16,
    /// `host:port` as it is named in messages.
    pub authority: String,
    /// The `Proxy-Authorization` value (`Basic ...`) from
    /// `parent_credentials_file`, if any.
    pub authorization: Option<Secret>,
    /// Names that go direct: exact, or `*.suffix` (the names under it).
    pub bypass_names: Vec<String>,
    /// Addresses that go direct.
    pub bypass_nets: NetSet,
}

impl Parent {
    /// Does a (normalised) name go direct?
    pub fn bypasses_name(&self, name: &str) -> bool {
        self.bypass_names
            .iter()
            .any(|p| crate::classify::host::pattern_matches(p, name))
    }

    /// Does an address go direct?
    pub fn bypasses_addr(&self, ip: std::net::IpAddr) -> bool {
        self.bypass_nets
            .contains(crate::classify::addr::canonical(ip))
    }
}

/// Validate `[upstream] parent`, `parent_credentials_file` and
/// `parent_bypass`.
fn parent(
    v: &mut Validator<'_>,
    path: Option<&Path>,
    raw: &RawUpstream,
    listen: &Listen,
) -> Option<Parent> {
    let mut bypass_names = Vec::new();
    let mut nets = Vec::new();
    for b in &raw.parent_bypass {
        if let Some(n) = parse_net(b) {
            nets.push(n);
            continue;
        }
        // `.example.org` is the domain and the names under it (as in
        // Squid's dstdomain); `*.example.org` only the names under it.
        let (name, wildcard, itself) = match (b.strip_prefix("*."), b.strip_prefix('.')) {
            (Some(rest), _) => (rest, true, false),
            (None, Some(rest)) => (rest, true, true),
            (None, None) => (b.as_str(), false, true),
        };
        match normalize_host(name) {
            Some(n) => {
                if wildcard {
                    bypass_names.push(format!("*.{n}"));
                }
                if itself {
                    bypass_names.push(n);
                }
            }
            None => v.err(
                "upstream",
                "parent_bypass",
                format!("`{b}` is not a host name, `*.suffix`, `.suffix` or CIDR prefix"),
            ),
        }
    }
    let written = raw.parent.trim();
    if written.is_empty() {
        if !raw.parent_credentials_file.is_empty() {
            v.err(
                "upstream",
                "parent_credentials_file",
                "set, but there is no `parent`",
            );
        }
        if !raw.parent_bypass.is_empty() {
            v.err("upstream", "parent_bypass", "set, but there is no `parent`");
        }
        return None;
    }
    let authority = match written.parse::<http::uri::Authority>() {
        Ok(a) if a.port_u16().is_some_and(|p| p != 0) && !a.as_str().contains('@') => a,
        _ => {
            v.err(
                "upstream",
                "parent",
                format!("`{written}` is not host:port"),
            );
            return None;
        }
    };
    let port = authority.port_u16().unwrap_or_default();
    let bare = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let host = if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        let addr = SocketAddr::new(ip, port);
        if listen.explicit.contains(&addr)
            || listen.transparent_http.contains(&addr)
            || listen.transparent_tls.contains(&addr)
            || listen.transparent.contains(&addr)
        {
            v.err(
                "upstream",
                "parent",
                format!("`{written}` is one of chatwall's own listeners"),
            );
        }
        ip.to_string()
    } else {
        match normalize_host(bare) {
            Some(n) => n,
            None => {
                v.err(
                    "upstream",
                    "parent",
                    format!("`{bare}` is not a host name or IP address"),
                );
                return None;
            }
        }
    };
    let authorization = if raw.parent_credentials_file.is_empty() {
        None
    } else {
        let p = relative_to(path, &raw.parent_credentials_file);
        match read_private(&p).and_then(|t| basic_credentials(&t)) {
            Ok(s) => Some(s),
            Err(message) => {
                v.errors.push(ConfigError {
                    file: p.display().to_string(),
                    line: None,
                    field: "upstream.parent_credentials_file".into(),
                    message,
                });
                None
            }
        }
    };
    Some(Parent {
        host,
        port,
        authority: authority.as_str().to_string(),
        authorization,
        bypass_names,
        bypass_nets: NetSet::from_nets(nets),
    })
}

/// `user:password` (one line; surrounding white space dropped) as a
/// `Proxy-Authorization` value for Basic (RFC 7617).
fn basic_credentials(text: &str) -> Result<Secret, String> {
    use base64::Engine as _;
    let line = text.trim();
    let Some((user, _password)) = line.split_once(':') else {
        return Err("expected one line `user:password`".into());
    };
    if user.is_empty() || line.chars().any(char::is_control) {
        return Err("expected one line `user:password` with a non-empty user".into());
    }
    Ok(Secret(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(line)
    )))
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, if any (for reload and messages).
    pub path: Option<PathBuf>,
    pub listen: Listen,
    pub signatures_dir: Option<PathBuf>,
    /// The key `signatures update` trusts (`[signatures]
    /// update_public_key`), as minisign's base64 line; `None` when unset.
    pub update_public_key: Option<String>,
    pub policy: PolicyConfig,
    pub allow_clients: NetSet,
    pub deny_destinations: NetSet,
    /// Ports a CONNECT may reach (`access.connect_ports`).
    pub connect_ports: PortSet,
    pub inspect_bytes: usize,
    pub first_bytes_timeout: Duration,
    pub access_log: AccessLogTarget,
    pub log_format: LogFormat,
    pub log_level: String,
    pub limits: Limits,
    pub upstream_mark: u32,
    /// `[upstream] parent`: where upstream connections go, if not direct.
    pub parent: Option<Parent>,
    pub pac: Pac,
    pub auth: Option<Auth>,
    pub admin: Admin,
    /// `[tls_inspect]`: which HTTPS flows may be decrypted.
    pub tls_inspect: TlsInspect,
    /// `[tenant_restrictions]`: headers for vendors' sign-in requests in
    /// decrypted flows.
    pub tenant_restrictions: TenantRestrictions,
    /// The directory (`[ldap]`), when `url` is set.
    pub ldap: Option<Ldap>,
}

impl Config {
    /// Built-in defaults with the environment applied.
    pub fn load_default() -> Result<Config, ConfigErrors> {
        Config::load(None)
    }

    /// Load defaults, then `path` (if any), then the environment.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
        let file_name = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<defaults>".to_string());
        let mut text = String::new();
        if let Some(p) = path {
            text = std::fs::read_to_string(p).map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    file: file_name.clone(),
                    line: None,
                    field: "-".into(),
                    message: format!("cannot read: {e}"),
                }])
            })?;
            check_file_syntax(&file_name, &text)?;
        }
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if path.is_some() {
            builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("CHATWALL")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("listen.explicit")
                .with_list_parse_key("listen.transparent_http")
                .with_list_parse_key("listen.transparent_tls")
                .with_list_parse_key("listen.transparent")
                .with_list_parse_key("access.allow_clients")
                .with_list_parse_key("access.deny_destinations")
                .with_list_parse_key("access.connect_ports")
                .with_list_parse_key("upstream.parent_bypass")
                .with_list_parse_key("pac.direct_networks")
                .with_list_parse_key("pac.direct_domains")
                .with_list_parse_key("admin.allow")
                .with_list_parse_key("tls_inspect.clients")
                .with_list_parse_key("tls_inspect.decrypt")
                .with_list_parse_key("tls_inspect.never")
                .with_list_parse_key("tenant_restrictions.microsoft_tenants")
                .with_list_parse_key("tenant_restrictions.google_allowed_domains")
                .with_list_parse_key("tenant_restrictions.slack_allowed")
                .with_list_parse_key("tenant_restrictions.dropbox_team_ids"),
        );
        let raw: RawConfig = builder
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| {
                ConfigErrors(vec![ConfigError {
                    file: file_name.clone(),
                    line: None,
                    field: "-".into(),
                    message: e.to_string(),
                }])
            })?;
        validate(raw, path, &file_name, &text)
    }
}

/// Parse the file on its own first: the `toml` crate keeps spans, so an
/// unknown key or a wrong type is reported with its line.
fn check_file_syntax(file: &str, text: &str) -> Result<(), ConfigErrors> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Partial {
        listen: Option<PartialListen>,
        signatures: Option<PartialSignatures>,
        policy: Option<PartialPolicy>,
        access: Option<PartialAccess>,
        inspect: Option<PartialInspect>,
        log: Option<PartialLog>,
        limits: Option<PartialLimits>,
        upstream: Option<PartialUpstream>,
        pac: Option<PartialPac>,
        auth: Option<PartialAuth>,
        admin: Option<PartialAdmin>,
        tls_inspect: Option<tls_inspect::PartialTlsInspect>,
        tenant_restrictions: Option<tenant::PartialTenant>,
        ldap: Option<PartialLdap>,
    }
    macro_rules! partial {
        ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            #[allow(dead_code)]
            struct $name { $( $field: Option<$ty>, )* }
        };
    }
    partial!(PartialListen { explicit: Vec<String>, transparent_http: Vec<String>, transparent_tls: Vec<String>, transparent: Vec<String>, admin: String });
    partial!(PartialSignatures {
        dir: String,
        update_public_key: String
    });
    partial!(PartialPolicy { default: String, non_tls_on_443: String, non_http_on_80: String, ech: String, apps: BTreeMap<String, String>, categories: BTreeMap<String, String>, exceptions: Vec<RawException>, allow: Vec<RawAllow> });
    partial!(PartialAccess { allow_clients: Vec<String>, deny_destinations: Vec<String>, connect_ports: RawPortList });
    partial!(PartialInspect {
        client_bytes: i64,
        first_bytes_timeout_ms: i64
    });
    partial!(PartialLog {
        access: String,
        format: String,
        level: String
    });
    partial!(PartialLimits {
        max_request_head_bytes: i64,
        max_headers: i64,
        header_read_timeout_ms: i64,
        tunnel_idle_timeout_ms: i64,
        upstream_idle_timeout_ms: i64,
        upstream_response_timeout_ms: i64,
        connect_timeout_ms: i64,
        dns_timeout_ms: i64,
        max_connections: i64,
        max_connections_per_client: i64,
        shutdown_grace_ms: i64
    });
    partial!(PartialUpstream {
        mark: i64,
        parent: String,
        parent_credentials_file: String,
        parent_bypass: Vec<String>
    });
    partial!(PartialPac { proxy: String, direct_networks: Vec<String>, direct_domains: Vec<String> });
    partial!(PartialAuth {
        users_file: String,
        realm: String,
        negotiate: bool,
        keytab: String,
        negotiate_principal: String,
        strip_realm: bool
    });
    partial!(PartialAdmin {
        allow: Vec<String>,
        reload_token_file: String
    });
    partial!(PartialLdap {
        url: String,
        starttls: bool,
        ca_file: String,
        bind_dn: String,
        bind_password_file: String,
        base_dn: String,
        user_filter: String,
        group_attribute: String,
        group_filter: String,
        group_base_dn: String,
        group_name_attribute: String,
        nested: bool,
        cache_ttl_ms: i64,
        cache_entries: i64,
        timeout_ms: i64,
        on_unavailable: String,
        basic_bind: bool
    });

    match toml::from_str::<Partial>(text) {
        Ok(_) => Ok(()),
        Err(e) => {
            let line = e.span().map(|s| line_of(text, s.start));
            let field = line
                .and_then(|l| field_at(text, l))
                .unwrap_or_else(|| "-".into());
            Err(ConfigErrors(vec![ConfigError {
                file: file.to_string(),
                line,
                field,
                message: e.message().trim().to_string(),
            }]))
        }
    }
}

/// 1-based line of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The `section.key` written on a line (1-based) of a TOML text: the key
/// before `=` on that line, under the nearest `[section]` header above.
pub fn field_at(text: &str, line: usize) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let here = lines.get(line.checked_sub(1)?)?.trim();
    let section = lines[..line - 1]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    if here.starts_with('[') {
        return Some(
            here.trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string(),
        );
    }
    let key = here.split('=').next()?.trim().trim_matches('"');
    if key.is_empty() {
        return section;
    }
    Some(match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    })
}

/// Best-effort line of `key` inside `[section]` of a TOML text.
pub fn locate(text: &str, section: &str, key: &str) -> Option<usize> {
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = name == section || name.starts_with(&format!("{section}."));
            if in_section && name != section && name.ends_with(key) {
                return Some(i + 1);
            }
            continue;
        }
        if in_section {
            let k = t.split('=').next().unwrap_or("").trim().trim_matches('"');
            if k == key {
                return Some(i + 1);
            }
        }
    }
    None
}

/// The line of `key` in the `index`-th (from 0) `[[section]]` table of a
/// TOML text, or with `needle`, of the first line from the key's on (within
/// that table) holding `"needle"`: the entry of a list spread over lines.
pub fn locate_in_table(
    text: &str,
    section: &str,
    index: usize,
    key: &str,
    needle: Option<&str>,
) -> Option<usize> {
    let header = format!("[[{section}]]");
    let mut seen = 0usize;
    let mut inside = false;
    let mut key_line = None;
    let quoted = needle.map(|n| format!("{n:?}"));
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if inside {
                break;
            }
            if t.split('#').next().unwrap_or("").trim().replace(' ', "") == header {
                inside = seen == index;
                seen += 1;
            }
            continue;
        }
        if !inside {
            continue;
        }
        if key_line.is_none() {
            let k = t.split('=').next().unwrap_or("").trim().trim_matches('"');
            if k == key && t.contains('=') {
                key_line = Some(i + 1);
            }
        }
        if let (Some(_), Some(q)) = (key_line, &quoted) {
            if line.contains(q.as_str()) {
                return Some(i + 1);
            }
        }
    }
    key_line
}

struct Validator<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    /// An error in the `index`-th `[[policy.exceptions]]` (from 0), at the
    /// line of its `key`, or of `needle` (a value as written) from there on.
    fn err_in_exception(
        &mut self,
        index: usize,
        key: &str,
        needle: Option<&str>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: locate_in_table(self.text, "policy.exceptions", index, key, needle)
                .or_else(|| locate(self.text, "policy.exceptions", key))
                .or_else(|| locate(self.text, "policy", "exceptions")),
            field: format!("policy.exceptions.{key}"),
            message: message.into(),
        });
    }

    fn err(&mut self, section: &str, key: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: locate(self.text, section, key),
            field: format!("{section}.{key}"),
            message: message.into(),
        });
    }

    fn action(&mut self, section: &str, key: &str, value: &str) -> Action {
        Action::parse(value).unwrap_or_else(|| {
            self.err(
                section,
                key,
                format!("`{value}` is not one of block, monitor, allow"),
            );
            Action::Block
        })
    }

    fn addrs(&mut self, section: &str, key: &str, values: &[String]) -> Vec<SocketAddr> {
        let mut out = Vec::new();
        for v in values {
            match v.parse::<SocketAddr>() {
                Ok(a) => out.push(a),
                Err(_) => self.err(section, key, format!("`{v}` is not an IP:port address")),
            }
        }
        out
    }

    fn nets(&mut self, section: &str, key: &str, values: &[String]) -> Vec<IpNet> {
        let mut out = Vec::new();
        for v in values {
            match parse_net(v) {
                Some(n) => out.push(n),
                None => self.err(
                    section,
                    key,
                    format!("`{v}` is not a CIDR prefix or address"),
                ),
            }
        }
        out
    }

    fn ports(&mut self, section: &str, key: &str, values: &[RawPorts]) -> PortSet {
        let mut ranges = Vec::new();
        for v in values {
            match parse_ports(v) {
                Ok(r) => ranges.push(r),
                Err(m) => self.err(section, key, m),
            }
        }
        PortSet::from_ranges(ranges)
    }

    fn millis(&mut self, section: &str, key: &str, v: i64, min: i64, max: i64) -> Duration {
        if v < min || v > max {
            self.err(section, key, format!("{v} is outside {min}..={max} ms"));
        }
        Duration::from_millis(v.clamp(min, max) as u64)
    }

    fn count(&mut self, section: &str, key: &str, v: i64, min: i64, max: i64) -> usize {
        if v < min || v > max {
            self.err(section, key, format!("{v} is outside {min}..={max}"));
        }
        v.clamp(min, max) as usize
    }
}

/// One `connect_ports` entry: a port 1-65535 (a number or a string of
/// digits) or a range `"LOW-HIGH"` with LOW <= HIGH.
fn parse_ports(v: &RawPorts) -> Result<(u16, u16), String> {
    let port = |text: &str| -> Option<u16> {
        if text.is_empty() || text.len() > 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse::<u16>().ok().filter(|&p| p != 0)
    };
    match v {
        RawPorts::Number(n) => u16::try_from(*n)
            .ok()
            .filter(|&p| p != 0)
            .map(|p| (p, p))
            .ok_or_else(|| format!("{n} is not a port (1-65535)")),
        RawPorts::Text(s) => {
            let parsed = match s.split_once('-') {
                Some((lo, hi)) => port(lo).zip(port(hi)),
                None => port(s).map(|p| (p, p)),
            };
            match parsed {
                Some((lo, hi)) if lo <= hi => Ok((lo, hi)),
                Some(_) => Err(format!("`{s}`: the range runs backwards")),
                None => Err(format!(
                    "`{s}` is not a port or a range of ports (1-65535, e.g. \"8000-8999\")"
                )),
            }
        }
    }
}

/// A small text file, refused past `limit` bytes.
fn read_small(path: &Path, limit: u64) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_string(&mut text))
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() as u64 > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    Ok(text)
}

/// A CIDR prefix, or a bare address as a host prefix. Host bits must be zero.
pub fn parse_net(s: &str) -> Option<IpNet> {
    if let Ok(n) = s.parse::<IpNet>() {
        return (n.trunc() == n).then_some(n);
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

fn validate(
    raw: RawConfig,
    path: Option<&Path>,
    file: &str,
    text: &str,
) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        file,
        text,
        errors: Vec::new(),
    };

    let listen = Listen {
        explicit: v.addrs("listen", "explicit", &raw.listen.explicit),
        transparent_http: v.addrs("listen", "transparent_http", &raw.listen.transparent_http),
        transparent_tls: v.addrs("listen", "transparent_tls", &raw.listen.transparent_tls),
        transparent: v.addrs("listen", "transparent", &raw.listen.transparent),
        admin: if raw.listen.admin.is_empty() {
            None
        } else {
            v.addrs("listen", "admin", std::slice::from_ref(&raw.listen.admin))
                .into_iter()
                .next()
        },
    };

    let p = &raw.policy;
    let mut apps = BTreeMap::new();
    for (app, action) in &p.apps {
        let a = v.action("policy.apps", app, action);
        apps.insert(app.to_ascii_lowercase(), a);
    }
    let mut categories = BTreeMap::new();
    for (cat, action) in &p.categories {
        let a = v.action("policy.categories", cat, action);
        categories.insert(cat.to_ascii_lowercase(), a);
    }
    let mut exceptions = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, e) in p.exceptions.iter().enumerate() {
        let label = match &e.name {
            None => format!("#{}", i + 1),
            Some(n) => {
                let valid = !n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
                if !valid {
                    v.err_in_exception(
                        i,
                        "name",
                        None,
                        format!("`{n}`: a name is 1 to 64 letters, digits, '-', '_' or '.'"),
                    );
                } else if !names.insert(n.clone()) {
                    v.err_in_exception(i, "name", None, format!("`{n}` names two exceptions"));
                }
                n.clone()
            }
        };
        let schedule = match (&e.schedule, &e.timezone) {
            (None, None) => None,
            (None, Some(_)) => {
                v.err_in_exception(
                    i,
                    "timezone",
                    None,
                    "a timezone without a schedule; add `schedule` or remove it",
                );
                None
            }
            (Some(_), None) => {
                v.err_in_exception(
                    i,
                    "schedule",
                    None,
                    "a schedule needs its `timezone` (an IANA name such as \"Europe/Berlin\" or \"UTC\")",
                );
                None
            }
            (Some(entries), Some(tz)) => match crate::schedule::Schedule::new(entries, tz) {
                Ok(s) => Some(s),
                Err(err) => {
                    let (key, needle) = match &err {
                        crate::schedule::ScheduleError::TimeZone(_) => ("timezone", None),
                        crate::schedule::ScheduleError::Entry(entry, _) => {
                            ("schedule", Some(entry.as_str()))
                        }
                        crate::schedule::ScheduleError::Empty => ("schedule", None),
                    };
                    v.err_in_exception(i, key, needle, err.to_string());
                    None
                }
            },
        };
        let clients = v.nets("policy.exceptions", "clients", &e.clients);
        let action = v.action("policy.exceptions", "action", &e.action);
        if e.apps.is_empty() && e.categories.is_empty() {
            v.err(
                "policy.exceptions",
                "apps",
                "an exception names at least one app or category",
            );
        }
        let mut groups = Vec::new();
        for g in &e.groups {
            match group_key(g) {
                Some(k) => groups.push(k),
                None => v.err_in_exception(
                    i,
                    "groups",
                    Some(g),
                    format!("`{g}` is not a group name or DN"),
                ),
            }
        }
        if !e.groups.is_empty() && raw.ldap.url.is_empty() {
            v.err_in_exception(
                i,
                "groups",
                None,
                "groups are read from a directory: set [ldap] url (and the rest of [ldap])",
            );
        }
        exceptions.push(Exception {
            clients: NetSet::from_nets(clients),
            users: e.users.clone(),
            groups,
            apps: e.apps.iter().map(|a| a.to_ascii_lowercase()).collect(),
            categories: e
                .categories
                .iter()
                .map(|c| c.to_ascii_lowercase())
                .collect(),
            action,
            label,
            schedule,
        });
    }
    let mut allow_hosts = Vec::new();
    let mut allow_nets = Vec::new();
    for a in &p.allow {
        for h in &a.hosts {
            let (wild, name) = match h.strip_prefix("*.") {
                Some(rest) => (true, rest),
                None => (false, h.as_str()),
            };
            match normalize_host(name) {
                Some(n) if wild => allow_hosts.push(format!("*.{n}")),
                Some(n) => allow_hosts.push(n),
                None => v.err("policy.allow", "hosts", format!("`{h}` is not a host name")),
            }
        }
        allow_nets.extend(v.nets("policy.allow", "cidrs", &a.cidrs));
    }
    let policy = PolicyConfig {
        default: v.action("policy", "default", &p.default),
        non_tls_on_443: v.action("policy", "non_tls_on_443", &p.non_tls_on_443),
        non_http_on_80: v.action("policy", "non_http_on_80", &p.non_http_on_80),
        ech: v.action("policy", "ech", &p.ech),
        apps,
        categories,
        exceptions,
        allow_hosts,
        allow_nets: NetSet::from_nets(allow_nets),
    };

    let allow_clients =
        NetSet::from_nets(v.nets("access", "allow_clients", &raw.access.allow_clients));
    let deny_destinations =
        NetSet::from_nets(v.nets("access", "deny_destinations", &raw.access.deny_destinations));
    let connect_ports = v.ports("access", "connect_ports", &raw.access.connect_ports.0);

    let inspect_bytes = v.count(
        "inspect",
        "client_bytes",
        raw.inspect.client_bytes,
        512,
        1 << 20,
    );
    let first_bytes_timeout = v.millis(
        "inspect",
        "first_bytes_timeout_ms",
        raw.inspect.first_bytes_timeout_ms,
        1,
        600_000,
    );

    let access_log = match raw.log.access.as_str() {
        "stdout" | "-" => AccessLogTarget::Stdout,
        "off" | "" => AccessLogTarget::Off,
        other => AccessLogTarget::File(PathBuf::from(other)),
    };
    let log_format = match raw.log.format.as_str() {
        "json" => LogFormat::Json,
        "squid" => LogFormat::Squid,
        other => {
            v.err(
                "log",
                "format",
                format!("`{other}` is not one of json, squid"),
            );
            LogFormat::Json
        }
    };
    if tracing_subscriber::EnvFilter::try_new(&raw.log.level).is_err() {
        v.err(
            "log",
            "level",
            format!("`{}` is not a log level or filter", raw.log.level),
        );
    }

    let l = &raw.limits;
    let limits = Limits {
        max_request_head_bytes: v.count(
            "limits",
            "max_request_head_bytes",
            l.max_request_head_bytes,
            1024,
            1 << 20,
        ),
        max_headers: v.count("limits", "max_headers", l.max_headers, 8, 1000),
        header_read_timeout: v.millis(
            "limits",
            "header_read_timeout_ms",
            l.header_read_timeout_ms,
            1,
            30_000,
        ),
        tunnel_idle_timeout: v.millis(
            "limits",
            "tunnel_idle_timeout_ms",
            l.tunnel_idle_timeout_ms,
            1,
            86_400_000,
        ),
        upstream_idle_timeout: v.millis(
            "limits",
            "upstream_idle_timeout_ms",
            l.upstream_idle_timeout_ms,
            1,
            86_400_000,
        ),
        upstream_response_timeout: v.millis(
            "limits",
            "upstream_response_timeout_ms",
            l.upstream_response_timeout_ms,
            1,
            86_400_000,
        ),
        connect_timeout: v.millis(
            "limits",
            "connect_timeout_ms",
            l.connect_timeout_ms,
            1,
            600_000,
        ),
        dns_timeout: v.millis("limits", "dns_timeout_ms", l.dns_timeout_ms, 1, 600_000),
        max_connections: v.count(
            "limits",
            "max_connections",
            l.max_connections,
            1,
            10_000_000,
        ),
        max_connections_per_client: v.count(
            "limits",
            "max_connections_per_client",
            l.max_connections_per_client,
            1,
            10_000_000,
        ),
        shutdown_grace: v.millis(
            "limits",
            "shutdown_grace_ms",
            l.shutdown_grace_ms,
            0,
            3_600_000,
        ),
    };

    let upstream_mark = if (0..=u32::MAX as i64).contains(&raw.upstream.mark) {
        raw.upstream.mark as u32
    } else {
        v.err("upstream", "mark", "must be a 32-bit unsigned number");
        0
    };

    let parent = parent(&mut v, path, &raw.upstream, &listen);

    let direct_networks = v.nets("pac", "direct_networks", &raw.pac.direct_networks);
    let mut direct_domains = Vec::new();
    for d in &raw.pac.direct_domains {
        match normalize_host(d.trim_start_matches("*.").trim_start_matches('.')) {
            Some(n) => direct_domains.push(n),
            None => v.err("pac", "direct_domains", format!("`{d}` is not a domain")),
        }
    }
    let pac = Pac {
        proxy: raw.pac.proxy.clone(),
        direct_networks,
        direct_domains,
    };

    let admin_allow = NetSet::from_nets(v.nets("admin", "allow", &raw.admin.allow));
    let (reload_token_file, reload_token) = if raw.admin.reload_token_file.is_empty() {
        (None, None)
    } else {
        let p = relative_to(path, &raw.admin.reload_token_file);
        match read_secret(&p, "admin.reload_token_file") {
            Ok(t) => (Some(p), Some(t)),
            Err(e) => {
                v.errors.push(e);
                (Some(p), None)
            }
        }
    };
    let admin = Admin {
        allow: admin_allow,
        reload_token_file,
        reload_token,
    };

    if listen.explicit.is_empty()
        && listen.transparent_http.is_empty()
        && listen.transparent_tls.is_empty()
        && listen.transparent.is_empty()
    {
        v.err("listen", "explicit", "no proxy listener is configured");
    }

    let signatures_dir = if raw.signatures.dir.is_empty() {
        None
    } else {
        let d = PathBuf::from(&raw.signatures.dir);
        // A relative directory is relative to the configuration file.
        Some(match (d.is_relative(), path.and_then(Path::parent)) {
            (true, Some(parent)) if !parent.as_os_str().is_empty() => parent.join(d),
            _ => d,
        })
    };

    let update_public_key = match raw.signatures.update_public_key.trim() {
        "" => None,
        value => {
            // The base64 line itself, or a public key file (relative to
            // the configuration file).
            let inline = crate::signatures::bundle::parse_public_key(value);
            let text = if inline.is_ok() {
                Ok(value.to_string())
            } else {
                let p = PathBuf::from(value);
                let p = match (p.is_relative(), path.and_then(Path::parent)) {
                    (true, Some(parent)) if !parent.as_os_str().is_empty() => parent.join(p),
                    _ => p,
                };
                read_small(&p, 4096).map_err(|e| format!("{}: {e}", p.display()))
            };
            match text.and_then(|t| crate::signatures::bundle::parse_public_key(&t)) {
                Ok(key) => Some(key.to_base64()),
                Err(e) => {
                    v.err("signatures", "update_public_key", e);
                    None
                }
            }
        }
    };

    let ldap = validate_ldap(&mut v, &raw.ldap, path);
    let basic_bind = ldap.as_ref().is_some_and(|l| l.basic_bind);
    let negotiate = validate_negotiate(&mut v, &raw.auth, path);
    let auth = if raw.auth.users_file.is_empty() && (basic_bind || negotiate.is_some()) {
        // Every Basic name is checked against the directory, if any.
        if raw.auth.realm.is_empty() || raw.auth.realm.contains('"') {
            v.err("auth", "realm", "must be non-empty and without quotes");
        }
        Some(Auth {
            realm: raw.auth.realm.clone(),
            users_file: PathBuf::new(),
            users: std::collections::HashMap::new(),
            basic: basic_bind,
            negotiate,
        })
    } else if raw.auth.users_file.is_empty() {
        None
    } else {
        let p = PathBuf::from(&raw.auth.users_file);
        let p = match (p.is_relative(), path.and_then(Path::parent)) {
            (true, Some(parent)) if !parent.as_os_str().is_empty() => parent.join(p),
            _ => p,
        };
        if raw.auth.realm.is_empty() || raw.auth.realm.contains('"') {
            v.err("auth", "realm", "must be non-empty and without quotes");
        }
        match load_users(&p) {
            Ok(users) => Some(Auth {
                realm: raw.auth.realm.clone(),
                users_file: p,
                users,
                basic: true,
                negotiate,
            }),
            Err(mut e) => {
                v.errors.append(&mut e);
                None
            }
        }
    };

    let tls_inspect = tls_inspect::validate(&mut v, &raw.tls_inspect, path);
    let tenant_restrictions = tenant::validate(&mut v, &raw.tenant_restrictions);

    if !v.errors.is_empty() {
        return Err(ConfigErrors(v.errors));
    }
    Ok(Config {
        path: path.map(Path::to_path_buf),
        listen,
        signatures_dir,
        update_public_key,
        policy,
        allow_clients,
        deny_destinations,
        connect_ports,
        inspect_bytes,
        first_bytes_timeout,
        access_log,
        log_format,
        log_level: raw.log.level,
        limits,
        upstream_mark,
        parent,
        pac,
        auth,
        admin,
        tls_inspect,
        tenant_restrictions,
        ldap,
    })
}
/// The directory behind `[ldap]`: where it is, how chatwall binds to it,
/// how a user's entry is found and how its group memberships are read.
#[derive(Debug, Clone)]
pub struct Ldap {
    /// `ldaps://host[:port]` or `ldap://host[:port]` (with `starttls`, or
    /// on a loopback address).
    pub url: String,
    pub starttls: bool,
    pub ca_file: Option<PathBuf>,
    /// The CA certificates of `ca_file` (DER); empty: the system's store.
    pub ca_certs: Vec<Vec<u8>>,
    /// Empty: an anonymous bind.
    pub bind_dn: String,
    pub bind_password_file: Option<PathBuf>,
    pub bind_password: Option<Secret>,
    pub base_dn: String,
    /// With `{user}`, replaced by the user name escaped as RFC 4515 §3 says.
    pub user_filter: String,
    pub membership: Membership,
    /// The attribute whose value names a group (`cn`).
    pub group_name_attribute: String,
    pub cache_ttl: Duration,
    pub cache_entries: usize,
    /// The bound of every exchange with the directory (connect, bind,
    /// search), together.
    pub timeout: Duration,
    pub on_unavailable: OnUnavailable,
    /// Basic credentials of names not in `[auth] users_file` are checked by
    /// a simple bind as the user's entry.
    pub basic_bind: bool,
}

/// How a user's groups are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// An attribute of the user's entry listing the groups' DNs
    /// (`memberOf`: Active Directory, OpenLDAP's memberof overlay).
    Attribute(String),
    /// A search for group entries: `filter` with `{dn}` (the user's DN) and
    /// `{user}` (the name), under `base`.
    Search { filter: String, base: String },
}

/// What a look-up does when the directory does not answer in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// The user is in no group: group exceptions do not apply to it.
    NoGroups,
    /// The groups last read for the user, however old; else no groups.
    Stale,
}

impl OnUnavailable {
    pub fn as_str(self) -> &'static str {
        match self {
            OnUnavailable::NoGroups => "no-groups",
            OnUnavailable::Stale => "stale",
        }
    }
}

/// Active Directory's LDAP_MATCHING_RULE_IN_CHAIN: `member` matched
/// through nested groups.
pub const AD_IN_CHAIN: &str = "1.2.840.113556.1.4.1941";

/// How a group is compared: a DN (it holds `=`) lower-cased with the
/// spaces around its separators removed, else the name lower-cased
/// (directory names compare case-insensitively). `None`: empty.
pub fn group_key(name: &str) -> Option<String> {
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    if name.contains('=') {
        return Some(normalize_dn(name));
    }
    Some(name.to_lowercase())
}

/// A DN in a form to compare: lower case, no spaces around `,`, `+` or
/// `=`. (Escaped separators keep their backslash, so they stay apart.)
pub fn normalize_dn(dn: &str) -> String {
    let mut out = String::with_capacity(dn.len());
    let mut escaped = false;
    for c in dn.trim().chars() {
        if !escaped && matches!(c, ',' | '+' | '=') {
            while out.ends_with(' ') && !out.ends_with("\\ ") {
                out.pop();
            }
            out.push(c);
            escaped = false;
            continue;
        }
        if !escaped && c == ' ' && (out.ends_with(',') || out.ends_with('+') || out.ends_with('='))
        {
            continue;
        }
        escaped = !escaped && c == '\\';
        out.extend(c.to_lowercase());
    }
    out
}

/// `read_private` for a configuration field: errors name the file and the
/// field.
fn read_private_field(path: &Path, field: &str) -> Result<String, ConfigError> {
    read_private(path).map_err(|message| ConfigError {
        file: path.display().to_string(),
        line: None,
        field: field.to_string(),
        message,
    })
}

/// An LDAP search filter (RFC 4515) with its placeholders filled.
fn filter_parses(filter: &str) -> bool {
    let sample = filter.replace("{user}", "x").replace("{dn}", "cn=x");
    ldap3::parse_filter(&sample).is_ok()
}

fn validate_ldap(v: &mut Validator<'_>, raw: &RawLdap, path: Option<&Path>) -> Option<Ldap> {
    if raw.url.is_empty() {
        if raw.basic_bind {
            v.err("ldap", "basic_bind", "needs a directory: set [ldap] url");
        }
        return None;
    }
    let before = v.errors.len();
    let url = raw.url.trim();
    let lower = url.to_ascii_lowercase();
    let host = lower
        .strip_prefix("ldaps://")
        .or_else(|| lower.strip_prefix("ldap://"))
        .map(|rest| rest.split('/').next().unwrap_or(""));
    match host {
        None | Some("") => v.err(
            "ldap",
            "url",
            format!("`{url}` is not ldap://host[:port] or ldaps://host[:port]"),
        ),
        Some(host) => {
            let tls = lower.starts_with("ldaps://");
            if tls && raw.starttls {
                v.err(
                    "ldap",
                    "starttls",
                    "ldaps:// is TLS already; remove starttls",
                );
            }
            let name = match host.rsplit_once(':') {
                Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
                _ => host,
            };
            let name = name.trim_start_matches('[').trim_end_matches(']');
            let loopback =
                name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !tls && !raw.starttls && !loopback {
                v.err(
                    "ldap",
                    "url",
                    "plain ldap:// would send passwords in clear: use ldaps:// or set starttls = true",
                );
            }
        }
    }
    let ca_file = (!raw.ca_file.is_empty()).then(|| relative_to(path, &raw.ca_file));
    let mut ca_certs = Vec::new();
    if let Some(p) = &ca_file {
        use rustls::pki_types::pem::PemObject;
        match rustls::pki_types::CertificateDer::pem_file_iter(p) {
            Ok(iter) => {
                for c in iter {
                    match c {
                        Ok(c) => ca_certs.push(c.as_ref().to_vec()),
                        Err(e) => v.err("ldap", "ca_file", format!("{}: {e}", p.display())),
                    }
                }
                if ca_certs.is_empty() {
                    v.err(
                        "ldap",
                        "ca_file",
                        format!("{}: no PEM certificate in it", p.display()),
                    );
                }
            }
            Err(e) => v.err("ldap", "ca_file", format!("{}: {e}", p.display())),
        }
    }
    let (bind_password_file, bind_password) =
        match (raw.bind_dn.is_empty(), raw.bind_password_file.is_empty()) {
            (true, true) => (None, None),
            (true, false) => {
                v.err("ldap", "bind_password_file", "a password without bind_dn");
                (None, None)
            }
            (false, true) => {
                v.err(
                    "ldap",
                    "bind_password_file",
                    "bind_dn needs its password file (or remove bind_dn for an anonymous bind)",
                );
                (None, None)
            }
            (false, false) => {
                let p = relative_to(path, &raw.bind_password_file);
                match read_private_field(&p, "ldap.bind_password_file") {
                    Ok(text) => {
                        // The password is the first line, as written.
                        let pw = text.lines().next().unwrap_or("").to_string();
                        if pw.is_empty() {
                            v.err("ldap", "bind_password_file", "the password is empty");
                        }
                        (Some(p), Some(Secret(pw)))
                    }
                    Err(e) => {
                        v.errors.push(e);
                        (Some(p), None)
                    }
                }
            }
        };
    if raw.base_dn.trim().is_empty() {
        v.err(
            "ldap",
            "base_dn",
            "the subtree users are searched in, e.g. \"dc=example,dc=com\"",
        );
    }
    if !raw.user_filter.contains("{user}") || !filter_parses(&raw.user_filter) {
        v.err(
            "ldap",
            "user_filter",
            format!(
                "`{}` is not an LDAP filter holding {{user}}, e.g. \"(&(objectClass=person)(uid={{user}}))\"",
                raw.user_filter
            ),
        );
    }
    let attribute = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'))
    };
    if !attribute(&raw.group_name_attribute) {
        v.err(
            "ldap",
            "group_name_attribute",
            format!("`{}` is not an attribute name", raw.group_name_attribute),
        );
    }
    let group_base = if raw.group_base_dn.trim().is_empty() {
        raw.base_dn.trim().to_string()
    } else {
        raw.group_base_dn.trim().to_string()
    };
    let membership = match (raw.nested, raw.group_filter.is_empty()) {
        (true, false) => {
            v.err(
                "ldap",
                "nested",
                format!("nested writes the group filter itself ((member:{AD_IN_CHAIN}:={{dn}})); remove group_filter or nested"),
            );
            Membership::Attribute(raw.group_attribute.clone())
        }
        (true, true) => Membership::Search {
            filter: format!("(member:{AD_IN_CHAIN}:={{dn}})"),
            base: group_base,
        },
        (false, false) => {
            let holds = raw.group_filter.contains("{dn}") || raw.group_filter.contains("{user}");
            if !holds || !filter_parses(&raw.group_filter) {
                v.err(
                    "ldap",
                    "group_filter",
                    format!(
                        "`{}` is not an LDAP filter holding {{dn}} or {{user}}, e.g. \"(&(objectClass=groupOfNames)(member={{dn}}))\"",
                        raw.group_filter
                    ),
                );
            }
            Membership::Search {
                filter: raw.group_filter.clone(),
                base: group_base,
            }
        }
        (false, true) => {
            if !attribute(&raw.group_attribute) {
                v.err(
                    "ldap",
                    "group_attribute",
                    format!("`{}` is not an attribute name", raw.group_attribute),
                );
            }
            Membership::Attribute(raw.group_attribute.clone())
        }
    };
    let cache_ttl = v.millis("ldap", "cache_ttl_ms", raw.cache_ttl_ms, 0, 86_400_000);
    let cache_entries = v.count("ldap", "cache_entries", raw.cache_entries, 1, 1_000_000);
    let timeout = v.millis("ldap", "timeout_ms", raw.timeout_ms, 1, 60_000);
    let on_unavailable = match raw.on_unavailable.as_str() {
        "no-groups" => OnUnavailable::NoGroups,
        "stale" => OnUnavailable::Stale,
        other => {
            v.err(
                "ldap",
                "on_unavailable",
                format!("`{other}` is not one of no-groups, stale"),
            );
            OnUnavailable::NoGroups
        }
    };
    if v.errors.len() > before {
        return None;
    }
    Some(Ldap {
        url: url.to_string(),
        starttls: raw.starttls,
        ca_file,
        ca_certs,
        bind_dn: raw.bind_dn.clone(),
        bind_password_file,
        bind_password,
        base_dn: raw.base_dn.trim().to_string(),
        user_filter: raw.user_filter.clone(),
        membership,
        group_name_attribute: raw.group_name_attribute.clone(),
        cache_ttl,
        cache_entries,
        timeout,
        on_unavailable,
        basic_bind: raw.basic_bind,
    })
}

/// A path as written in the configuration: relative to the file's
/// directory, if it is relative and there is a file.
fn relative_to(config: Option<&Path>, written: &str) -> PathBuf {
    let p = PathBuf::from(written);
    match (p.is_relative(), config.and_then(Path::parent)) {
        (true, Some(parent)) if !parent.as_os_str().is_empty() => parent.join(p),
        _ => p,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_load() {
        let c = Config::load_default().expect("defaults are valid");
        assert_eq!(c.listen.explicit, vec!["127.0.0.1:3128".parse().unwrap()]);
        assert_eq!(c.listen.admin, Some("127.0.0.1:9128".parse().unwrap()));
        assert_eq!(c.policy.default, Action::Block);
        assert!(c.allow_clients.contains("127.0.0.1".parse().unwrap()));
        assert!(!c.allow_clients.contains("10.0.0.1".parse().unwrap()));
        assert!(c.deny_destinations.contains("169.254.1.1".parse().unwrap()));
        assert_eq!(c.inspect_bytes, 16384);
        // Squid's SSL_ports: CONNECT reaches 443 only.
        assert_eq!(c.connect_ports, PortSet::from_ranges(vec![(443, 443)]));
    }

    /// Load `text` as a configuration file.
    fn load_text(text: &str) -> Result<Config, ConfigErrors> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).expect("write");
        Config::load(Some(&path))
    }

    #[test]
    fn connect_ports_take_numbers_strings_and_ranges() {
        let c = load_text(
            "[access]\nconnect_ports = [443, \"563\", \"8000-8999\", \"8443-8450\", 9000]\n",
        )
        .expect("valid");
        assert_eq!(c.connect_ports.to_string(), "443, 563, 8000-9000");
        for (port, allowed) in [
            (443, true),
            (442, false),
            (444, false),
            (563, true),
            (7999, false),
            (8000, true),
            (8450, true),
            (9000, true),
            (9001, false),
            (1, false),
            (65535, false),
        ] {
            assert_eq!(c.connect_ports.contains(port), allowed, "{port}");
        }
        let all = load_text("[access]\nconnect_ports = [\"1-65535\"]\n").expect("valid");
        assert!(all.connect_ports.is_all());
        assert!(all.connect_ports.contains(1) && all.connect_ports.contains(65535));
        let none = load_text("[access]\nconnect_ports = []\n").expect("valid");
        assert!(!none.connect_ports.contains(443));
        assert_eq!(none.connect_ports.to_string(), "none");
    }

    #[test]
    fn bad_connect_ports_name_file_line_and_field() {
        for entry in [
            "0",
            "65536",
            "-1",
            "\"0\"",
            "\"70000\"",
            "\"9000-8000\"",
            "\"0-10\"",
            "\"10-65536\"",
            "\"https\"",
            "\"\"",
            "\" 443\"",
            "\"443-\"",
            "\"-443\"",
            "\"1-2-3\"",
            "\"+443\"",
        ] {
            let text = format!("[access]\n\nconnect_ports = [443, {entry}]\n");
            let e = load_text(&text).expect_err(&text);
            let first = &e.0[0];
            assert_eq!(first.line, Some(3), "{entry}: {e}");
            assert_eq!(first.field, "access.connect_ports", "{entry}: {e}");
        }
        // A value of another type is a type error with its line.
        let e = load_text("[access]\nconnect_ports = [443, true]\n").expect_err("bool");
        assert_eq!(e.0[0].line, Some(2), "{e}");
        assert_eq!(e.0[0].field, "access.connect_ports", "{e}");
        assert!(e.to_string().contains("8000-8999"), "{e}");
        // One port alone is a list of one.
        let c = load_text("[access]\nconnect_ports = 8443\n").expect("valid");
        assert_eq!(c.connect_ports.to_string(), "8443");
    }

    #[test]
    fn port_sets_merge_touching_ranges() {
        let s = PortSet::from_ranges(vec![(10, 20), (5, 9), (21, 21), (30, 40), (35, 36)]);
        assert_eq!(s.to_string(), "5-21, 30-40");
        assert!(!s.contains(4) && s.contains(5) && s.contains(21) && !s.contains(22));
        assert!(!s.contains(29) && s.contains(30) && s.contains(40) && !s.contains(41));
        assert!(!PortSet::default().contains(443));
        assert!(PortSet::from_ranges(vec![(1, 100), (101, 65535)]).is_all());
    }

    #[test]
    fn media_relay_is_monitored_by_default_and_file_entries_add_to_it() {
        let c = Config::load_default().expect("defaults are valid");
        assert_eq!(
            c.policy.categories.get("media-relay"),
            Some(&Action::Monitor)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chatwall.toml");
        std::fs::write(&path, "[policy.categories]\nconsumer-im = \"monitor\"\n").expect("write");
        let c = Config::load(Some(&path)).expect("loads");
        assert_eq!(c.policy.categories.len(), 3);
        assert_eq!(
            c.policy.categories.get("media-relay"),
            Some(&Action::Monitor)
        );
        std::fs::write(&path, "[policy.categories]\nmedia-relay = \"block\"\n").expect("write");
        let c = Config::load(Some(&path)).expect("loads");
        assert_eq!(c.policy.categories.get("media-relay"), Some(&Action::Block));
    }

    #[test]
    fn exceptions_take_a_name_a_schedule_and_a_time_zone() {
        let c = load_text(
            "[[policy.exceptions]]\napps = [\"slack\"]\naction = \"allow\"\n\n[[policy.exceptions]]\nname = \"lunch\"\napps = [\"slack\"]\naction = \"allow\"\nschedule = [\"Mon-Fri 12:00-13:00\", \"Sat-Sun\"]\ntimezone = \"Europe/Berlin\"\n",
        )
        .expect("valid");
        let e = &c.policy.exceptions;
        assert_eq!((e[0].label.as_str(), e[0].schedule.is_none()), ("#1", true));
        assert_eq!(e[1].label, "lunch");
        let s = e[1].schedule.as_ref().expect("schedule");
        assert_eq!(s.timezone(), "Europe/Berlin");
        assert!(s.holds("2025-06-02T10:30:00Z".parse().expect("ts")));
    }

    #[test]
    fn bad_schedules_and_time_zones_name_file_line_and_field() {
        let first = "[[policy.exceptions]]\napps = [\"slack\"]\naction = \"allow\"\nschedule = [\"Sat-Sun\"]\ntimezone = \"UTC\"\n\n";
        for (second, line, field, says) in [
            (
                "[[policy.exceptions]]\napps = [\"slack\"]\naction = \"allow\"\nschedule = [\n  \"Mon-Fri 12:00-13:00\",\n  \"Mon-Fry 18:00-19:00\",\n]\ntimezone = \"UTC\"\n",
                12,
                "policy.exceptions.schedule",
                "not a day",
            ),
            (
                "[[policy.exceptions]]\napps = [\"slack\"]\naction = \"allow\"\nschedule = [\"Mon 25:00-26:00\"]\ntimezone = \"UTC\"\n",
                10,
                "policy.exceptions.schedule",
                "HH:MM",
            ),
            (
                "[[policy.exceptions]]\napps = [\"slack\"]\naction = \"allow\"\nschedule = [\"Mon-Fri\"]\ntimezone = \"Europe/Berlln\"\n",
                11,
                "policy.exceptions.timezone",
                "IANA",
            ),
            (
                "[[policy.exceptions]]\napps = [\"slack\"]\naction = \"allow\"\nschedule = [\"Mon-Fri\"]\n",
                10,
                "policy.exceptions.schedule",
                "timezone",
            ),
            (
                "[[policy.exceptions]]\napps = [\"slack\"]\naction = \"allow\"\ntimezone = \"UTC\"\n",
                10,
                "policy.exceptions.timezone",
                "without a schedule",
            ),
            (
                "[[policy.exceptions]]\napps = [\"slack\"]\naction = \"allow\"\nschedule = []\ntimezone = \"UTC\"\n",
                10,
                "policy.exceptions.schedule",
                "empty",
            ),
            (
                "[[policy.exceptions]]\nname = \"lunch break\"\napps = [\"slack\"]\naction = \"allow\"\n",
                8,
                "policy.exceptions.name",
                "letters",
            ),
        ] {
            let text = format!("{first}{second}");
            let e = load_text(&text).expect_err(&text);
            let err = &e.0[0];
            assert_eq!(err.line, Some(line), "{text}\n{e}");
            assert_eq!(err.field, field, "{e}");
            assert!(err.message.contains(says), "{e}");
        }
        let twice = "[[policy.exceptions]]\nname = \"a\"\napps = [\"slack\"]\naction = \"allow\"\n[[policy.exceptions]]\nname = \"a\"\napps = [\"slack\"]\naction = \"block\"\n";
        let e = load_text(twice).expect_err("twice");
        assert_eq!(e.0[0].line, Some(6), "{e}");
        assert!(e.0[0].message.contains("two exceptions"), "{e}");
    }

    #[test]
    fn locate_in_table_finds_the_nth_table_and_a_value_in_a_list() {
        let text =
            "[[t]]\nk = 1\n\n[[t]]  # second\nj = 2\nk = [\n  \"a\",\n  \"b\",\n]\n[x]\nk = 3\n";
        assert_eq!(locate_in_table(text, "t", 0, "k", None), Some(2));
        assert_eq!(locate_in_table(text, "t", 1, "k", None), Some(6));
        assert_eq!(locate_in_table(text, "t", 1, "k", Some("b")), Some(8));
        assert_eq!(locate_in_table(text, "t", 1, "k", Some("zz")), Some(6));
        assert_eq!(locate_in_table(text, "t", 0, "j", None), None);
        assert_eq!(locate_in_table(text, "t", 2, "k", None), None);
    }

    #[test]
    fn admin_allow_defaults_to_loopback_and_takes_prefixes() {
        let c = Config::load_default().expect("defaults");
        assert!(c.admin.allow.contains("127.0.0.1".parse().expect("ip")));
        assert!(c.admin.allow.contains("::1".parse().expect("ip")));
        assert!(!c.admin.allow.contains("10.0.0.1".parse().expect("ip")));
        assert!(c.admin.reload_token.is_none());
        let c = load_text("[admin]\nallow = [\"10.0.0.0/8\"]\n").expect("valid");
        assert!(!c.admin.allow.contains("127.0.0.1".parse().expect("ip")));
        assert!(c.admin.allow.contains("10.9.8.7".parse().expect("ip")));
        let e = load_text("[admin]\n\nallow = [\"10.0.0.0/33\"]\n").expect_err("bad");
        assert_eq!(
            (e.0[0].line, e.0[0].field.as_str()),
            (Some(3), "admin.allow")
        );
        let e = load_text("[admin]\nalow = []\n").expect_err("unknown key");
        assert_eq!(e.0[0].line, Some(2), "{e}");
    }

    #[test]
    fn a_parent_is_host_port_with_bypass_names_and_prefixes() {
        let none = load_text("").expect("valid");
        assert!(none.parent.is_none());
        let c = load_text(
            "[upstream]\nparent = \"Gateway.Example.org:8080\"\nparent_bypass = [\"intranet.example\", \".corp.example\", \"*.lan.example\", \"10.0.0.0/8\", \"fd00::1\"]\n",
        )
        .expect("valid");
        let p = c.parent.expect("parent");
        assert_eq!((p.host.as_str(), p.port), ("gateway.example.org", 8080));
        assert_eq!(p.authority, "Gateway.Example.org:8080");
        assert!(p.authorization.is_none());
        for (name, direct) in [
            ("intranet.example", true),
            ("www.intranet.example", false),
            ("corp.example", true),
            ("a.b.corp.example", true),
            ("lan.example", false),
            ("printer.lan.example", true),
            ("example.org", false),
        ] {
            assert_eq!(p.bypasses_name(name), direct, "{name}");
        }
        assert!(p.bypasses_addr("10.1.2.3".parse().unwrap()));
        assert!(p.bypasses_addr("::ffff:10.1.2.3".parse().unwrap()));
        assert!(p.bypasses_addr("fd00::1".parse().unwrap()));
        assert!(!p.bypasses_addr("192.0.2.1".parse().unwrap()));
        let v6 = load_text("[upstream]\nparent = \"[2001:db8::1]:3128\"\n").expect("valid");
        assert_eq!(v6.parent.expect("parent").host, "2001:db8::1");

        for (text, field) in [
            (
                "[upstream]\nparent = \"gateway.example.org\"\n",
                "upstream.parent",
            ),
            (
                "[upstream]\nparent = \"gateway.example.org:0\"\n",
                "upstream.parent",
            ),
            (
                "[upstream]\nparent = \"user@gateway.example.org:80\"\n",
                "upstream.parent",
            ),
            (
                "[upstream]\nparent = \"http://gateway.example.org:80\"\n",
                "upstream.parent",
            ),
            (
                "[upstream]\nparent = \"127.0.0.1:3128\"\n",
                "upstream.parent",
            ),
            (
                "[upstream]\nparent_bypass = [\"10.0.0.0/8\"]\n",
                "upstream.parent_bypass",
            ),
            (
                "[upstream]\nparent_credentials_file = \"x\"\n",
                "upstream.parent_credentials_file",
            ),
            (
                "[upstream]\nparent = \"gw.example:3128\"\nparent_bypass = [\"a b\"]\n",
                "upstream.parent_bypass",
            ),
        ] {
            let e = load_text(text).expect_err(text);
            assert_eq!(e.0[0].field, field, "{text}: {e}");
            assert!(e.0[0].line.is_some(), "{text}: {e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn parent_credentials_are_user_password_in_a_private_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = dir.path().join("parent.credentials");
        let config = dir.path().join("c.toml");
        std::fs::write(
            &config,
            "[upstream]\nparent = \"gw.example:3128\"\nparent_credentials_file = \"parent.credentials\"\n",
        )
        .expect("write");
        let set = |text: &str, mode: u32| {
            std::fs::write(&creds, text).expect("write credentials");
            std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        set("alice:pa:ss word\n", 0o600);
        let c = Config::load(Some(&config)).expect("valid");
        let a = c.parent.as_ref().and_then(|p| p.authorization.as_ref());
        // base64("alice:pa:ss word")
        assert_eq!(
            a.map(Secret::expose),
            Some("Basic YWxpY2U6cGE6c3Mgd29yZA==")
        );
        assert!(!format!("{c:?}").contains("YWxpY2U"));
        for (text, mode, says) in [
            ("alice:hunter2", 0o640, "group or others"),
            ("alice:hunter2", 0o604, "group or others"),
            ("alice", 0o600, "user:password"),
            (":hunter2", 0o600, "non-empty user"),
            ("alice:hunter2\nbob:other", 0o600, "one line"),
        ] {
            set(text, mode);
            let e = Config::load(Some(&config)).expect_err(says);
            let err = &e.0[0];
            assert_eq!(err.field, "upstream.parent_credentials_file", "{e}");
            assert!(err.file.ends_with("parent.credentials"), "{e}");
            assert!(err.message.contains(says), "{mode:o}: {e}");
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn the_reload_token_file_must_be_private_and_long_enough() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let token = dir.path().join("reload.token");
        let config = dir.path().join("c.toml");
        std::fs::write(&config, "[admin]\nreload_token_file = \"reload.token\"\n").expect("write");
        let set = |text: &str, mode: u32| {
            std::fs::write(&token, text).expect("write token");
            std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).expect("chmod");
        };
        // Relative to the configuration file; the final newline is not part
        // of it; never printed.
        set("0123456789abcdefXYZ\n", 0o600);
        let c = Config::load(Some(&config)).expect("valid");
        let t = c.admin.reload_token.as_ref().expect("token");
        assert_eq!(t.expose(), "0123456789abcdefXYZ");
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        assert_eq!(c.admin.reload_token_file.as_deref(), Some(token.as_path()));
        set("0123456789abcdefXYZ\n", 0o400);
        assert!(Config::load(Some(&config)).is_ok());
        for (text, mode, says) in [
            ("0123456789abcdefXYZ", 0o640, "group or others"),
            ("0123456789abcdefXYZ", 0o604, "group or others"),
            ("0123456789abcdefXYZ", 0o620, "group or others"),
            ("short", 0o600, "16"),
            ("0123456789 abcdefXYZ", 0o600, "one word"),
        ] {
            set(text, mode);
            let e = Config::load(Some(&config)).expect_err(says);
            let err = &e.0[0];
            assert_eq!(err.field, "admin.reload_token_file", "{e}");
            assert!(err.message.contains(says), "{mode:o}: {e}");
            assert!(!e.to_string().contains("0123456789"), "{e}");
        }
        std::fs::remove_file(&token).expect("rm");
        let e = Config::load(Some(&config)).expect_err("missing");
        assert!(e.0[0].message.contains("cannot read"), "{e}");
    }

    #[test]
    fn circumvention_is_monitored_by_default_and_can_be_blocked() {
        let c = Config::load_default().expect("defaults are valid");
        assert_eq!(
            c.policy.categories.get("circumvention"),
            Some(&Action::Monitor)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chatwall.toml");
        std::fs::write(&path, "[policy.categories]\ncircumvention = \"block\"\n").expect("write");
        let c = Config::load(Some(&path)).expect("loads");
        assert_eq!(
            c.policy.categories.get("circumvention"),
            Some(&Action::Block)
        );
        // The other built-in entry stays.
        assert_eq!(
            c.policy.categories.get("media-relay"),
            Some(&Action::Monitor)
        );
    }

    #[test]
    fn update_public_key_is_a_key_file_or_its_base64_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, public) = crate::signatures::bundle::keygen().expect("keygen");
        std::fs::write(dir.path().join("signing.pub"), &public).expect("write");
        let line = public.lines().nth(1).expect("base64 line").to_string();
        let path = dir.path().join("chatwall.toml");
        let load = |value: &str| {
            std::fs::write(
                &path,
                format!("[signatures]\n\nupdate_public_key = {value:?}\n"),
            )
            .expect("write");
            Config::load(Some(&path))
        };
        assert_eq!(
            Config::load_default().expect("defaults").update_public_key,
            None
        );
        // Relative to the configuration file.
        let c = load("signing.pub").expect("a key file");
        assert_eq!(c.update_public_key.as_deref(), Some(line.as_str()));
        let c = load(&line).expect("the base64 line");
        assert_eq!(c.update_public_key.as_deref(), Some(line.as_str()));
        for bad in ["missing.pub", "RWnotakey", "chatwall.toml"] {
            let e = load(bad).expect_err(bad);
            assert_eq!(e.0[0].field, "signatures.update_public_key", "{e}");
            assert_eq!(e.0[0].line, Some(3), "{e}");
        }
    }

    #[cfg(not(feature = "negotiate"))]
    #[test]
    fn negotiate_needs_the_feature() {
        let e = load_text("[auth]\nnegotiate = true\n").expect_err("refused");
        assert!(e.to_string().contains("--features negotiate"), "{e}");
    }

    #[cfg(all(unix, feature = "negotiate"))]
    #[test]
    fn negotiate_needs_a_private_keytab_and_turns_authentication_on() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let keytab = dir.path().join("proxy.keytab");
        std::fs::write(&keytab, b"\x05\x02").expect("write keytab");
        std::fs::set_permissions(&keytab, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let path = dir.path().join("chatwall.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).expect("write");
            Config::load(Some(&path))
        };
        // Alone, relative to the configuration file: Negotiate only.
        let c = load("[auth]\nnegotiate = true\nkeytab = \"proxy.keytab\"\n").expect("valid");
        let auth = c.auth.expect("authentication on");
        assert!(!auth.basic);
        let n = auth.negotiate.expect("negotiate");
        assert_eq!(n.keytab, keytab);
        assert!(n.principal.is_empty());
        assert!(n.strip_realm);
        // Off by default.
        let c = Config::load_default().expect("defaults");
        assert!(c.auth.is_none());
        // Beside Basic from the directory.
        let c = load(
            "[auth]\nnegotiate = true\nnegotiate_principal = \"HTTP/p.example.com@EXAMPLE.COM\"\nstrip_realm = false\n[ldap]\nurl = \"ldap://127.0.0.1\"\nbase_dn = \"dc=example\"\nbasic_bind = true\n",
        )
        .expect("valid");
        let auth = c.auth.expect("authentication on");
        assert!(auth.basic);
        let n = auth.negotiate.expect("negotiate");
        assert_eq!(n.principal, "HTTP/p.example.com@EXAMPLE.COM");
        assert!(!n.strip_realm);
        // A keytab group or others may read, a missing one, a bad principal,
        // keys without negotiate: file, line and field.
        std::fs::set_permissions(&keytab, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        for (text, field, line, says) in [
            (
                "[auth]\nnegotiate = true\nkeytab = \"proxy.keytab\"\n",
                "auth.keytab",
                3,
                "group or others",
            ),
            (
                "[auth]\nnegotiate = true\n\nkeytab = \"missing\"\n",
                "auth.keytab",
                4,
                "cannot read",
            ),
            (
                "[auth]\nnegotiate = true\nnegotiate_principal = \"HTTP/a b\"\n",
                "auth.negotiate_principal",
                3,
                "white space",
            ),
            (
                "[auth]\nkeytab = \"proxy.keytab\"\n",
                "auth.keytab",
                2,
                "negotiate = false",
            ),
            (
                "[auth]\nnegotiate_principal = \"HTTP/x\"\n",
                "auth.negotiate_principal",
                2,
                "negotiate = false",
            ),
        ] {
            let e = load(text).expect_err(says);
            let err = &e.0[0];
            assert_eq!((err.field.as_str(), err.line), (field, Some(line)), "{e}");
            assert!(err.message.contains(says), "{e}");
        }
    }

    #[test]
    fn line_of_counts_from_one() {
        assert_eq!(line_of("a\nb\nc", 0), 1);
        assert_eq!(line_of("a\nb\nc", 2), 2);
        assert_eq!(line_of("a\nb\nc", 4), 3);
    }

    #[test]
    fn field_at_names_section_and_key() {
        let text = "[listen]\nexplicit = []\n\n[inspect]\nclient_bytes = \"big\"\n";
        assert_eq!(field_at(text, 2).as_deref(), Some("listen.explicit"));
        assert_eq!(field_at(text, 5).as_deref(), Some("inspect.client_bytes"));
        assert_eq!(field_at(text, 4).as_deref(), Some("inspect"));
    }

    #[test]
    fn locate_finds_keys_in_sections() {
        let text =
            "[listen]\nexplicit = []\n\n[policy]\ndefault = \"x\"\n[policy.apps]\nteams = \"y\"\n";
        assert_eq!(locate(text, "listen", "explicit"), Some(2));
        assert_eq!(locate(text, "policy", "default"), Some(5));
        assert_eq!(locate(text, "policy.apps", "teams"), Some(7));
    }
}
