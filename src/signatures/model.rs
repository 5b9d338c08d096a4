//! The on-disk shape of one signature file (`signatures/<app>.toml`), as serde
//! reads it. Every value that can be wrong carries its span, so `load.rs` can
//! report `file:line: field: message` for each bad rule.
//!
//! ```toml
//! id = "whatsapp"                # [a-z0-9-]+, unique in the set
//! name = "WhatsApp"
//! vendor = "Meta"
//! category = "consumer-im"       # see `Category`
//!
//! [[hosts]]                      # exact names and `*.suffix` wildcards
//! names = ["whatsapp.com", "*.whatsapp.com"]
//! source = "where these facts come from"
//!
//! [[ports]]                      # TCP destination ports only this app uses
//! tcp = [5190]
//! source = "..."
//!
//! [[cidrs]]
//! nets = ["149.154.160.0/20", "2001:67c:4e8::/48"]
//! source = "..."
//!
//! [[tls]]                        # SNI names (default: the hosts), ALPN ids, JA4
//! sni = ["*.example.com"]
//! alpn = ["xmpp-client"]
//! ja4 = ["t13d1516h2_8daaf6152771_02713d6af862"]
//! source = "..."
//!
//! [[http]]                       # every condition given must hold
//! method = "POST"                # optional
//! path = "/api"                  # exact path (query ignored), or
//! path_prefix = "/gateway/gateway.dll"
//! headers = [{ name = "Content-Type", contains = "application/x-msn-messenger" }]
//! body = [{ ascii = "httpbind", within = 1024 }]
//! source = "..."
//!
//! [[payload]]                    # every atom must hold; one automaton per direction
//! direction = "client"           # client (client to upstream) | server
//! match = [{ hex = "2A 01", offset = 0 }, { hex = "00 00 00 01", offset = 6 }]
//! source = "..."
//!
//! [[downloads]]                  # one of url_prefix, file_name, sha256
//! url_prefix = "dl.discordapp.net/distro/app/"
//! source = "..."
//! ```
use serde::Deserialize;
use toml::Spanned;

/// One signature file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApp {
    pub id: Spanned<String>,
    pub name: Spanned<String>,
    #[serde(default)]
    pub vendor: Option<Spanned<String>>,
    pub category: Spanned<String>,
    /// Free text for administrators (status, caveats).
    #[serde(default)]
    pub notes: Option<String>,
    #[serde(default)]
    pub hosts: Vec<RawHosts>,
    #[serde(default)]
    pub ports: Vec<RawPorts>,
    #[serde(default)]
    pub cidrs: Vec<RawCidrs>,
    #[serde(default)]
    pub tls: Vec<RawTls>,
    #[serde(default)]
    pub http: Vec<RawHttp>,
    #[serde(default)]
    pub payload: Vec<RawPayload>,
    #[serde(default)]
    pub downloads: Vec<RawDownload>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHosts {
    pub names: Vec<Spanned<String>>,
    pub source: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPorts {
    pub tcp: Vec<Spanned<i64>>,
    pub source: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCidrs {
    pub nets: Vec<Spanned<String>>,
    pub source: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub sni: Vec<Spanned<String>>,
    #[serde(default)]
    pub alpn: Vec<Spanned<String>>,
    #[serde(default)]
    pub ja4: Vec<Spanned<String>>,
    pub source: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttp {
    #[serde(default)]
    pub method: Option<Spanned<String>>,
    #[serde(default)]
    pub path: Option<Spanned<String>>,
    #[serde(default)]
    pub path_prefix: Option<Spanned<String>>,
    #[serde(default)]
    pub headers: Vec<Spanned<RawHeader>>,
    #[serde(default)]
    pub body: Vec<Spanned<RawAtom>>,
    pub source: Spanned<String>,
}

/// A header condition: the field name (case-insensitive) and exactly one of
/// `equals`, `prefix`, `contains` (all compared case-insensitively).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeader {
    pub name: String,
    #[serde(default)]
    pub equals: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub contains: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPayload {
    #[serde(default)]
    pub direction: Option<Spanned<String>>,
    #[serde(rename = "match")]
    pub atoms: Vec<Spanned<RawAtom>>,
    pub source: Spanned<String>,
}

/// One byte pattern: exactly one of `hex` (pairs of hex digits, spaces
/// allowed) or `ascii`; at most one of `offset` (the pattern starts exactly
/// there) or `within` (the pattern ends within the first N bytes; the default
/// is the inspection window); `nocase` folds ASCII letters.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAtom {
    #[serde(default)]
    pub hex: Option<String>,
    #[serde(default)]
    pub ascii: Option<String>,
    #[serde(default)]
    pub offset: Option<i64>,
    #[serde(default)]
    pub within: Option<i64>,
    #[serde(default)]
    pub nocase: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDownload {
    #[serde(default)]
    pub url_prefix: Vec<Spanned<String>>,
    #[serde(default)]
    pub file_name: Vec<Spanned<String>>,
    #[serde(default)]
    pub sha256: Vec<Spanned<String>>,
    pub source: Spanned<String>,
}
