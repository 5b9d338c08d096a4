//! `[tls_inspect]`: which HTTPS flows may be decrypted with the local CA.
//! Off by default; when on, only flows from the listed clients whose
//! ClientHello names a selected server, and no server on the never list,
//! are decrypted. The CA itself is loaded with the engine (its errors name
//! the files).
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::{parse_net, relative_to, Validator};
use crate::classify::host::normalize_host;
use crate::classify::NetSet;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTlsInspect {
    enabled: bool,
    ca_cert: String,
    ca_key: String,
    clients: Vec<String>,
    decrypt: Vec<String>,
    never: Vec<String>,
    never_builtin: bool,
    upstream_extra_ca: String,
    upstream_cert_errors: String,
    block_page: bool,
    handshake_timeout_ms: i64,
    cert_cache_entries: i64,
    cert_cache_ttl_ms: i64,
}

/// The same keys, each optional: the file's own view, for line numbers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub(super) struct PartialTlsInspect {
    enabled: Option<bool>,
    ca_cert: Option<String>,
    ca_key: Option<String>,
    clients: Option<Vec<String>>,
    decrypt: Option<Vec<String>>,
    never: Option<Vec<String>>,
    never_builtin: Option<bool>,
    upstream_extra_ca: Option<String>,
    upstream_cert_errors: Option<String>,
    block_page: Option<bool>,
    handshake_timeout_ms: Option<i64>,
    cert_cache_entries: Option<i64>,
    cert_cache_ttl_ms: Option<i64>,
}

/// A server name pattern: `example.com` exactly, or `*.example.com` for
/// the domain and every name below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    Domain(String),
}

impl HostPattern {
    pub fn parse(text: &str) -> Option<HostPattern> {
        match text.strip_prefix("*.") {
            Some(domain) => normalize_host(domain).map(HostPattern::Domain),
            None => normalize_host(text).map(HostPattern::Exact),
        }
    }

    /// `name` is normalised (lower case, no trailing dot).
    pub fn matches(&self, name: &str) -> bool {
        match self {
            HostPattern::Exact(h) => name == h,
            HostPattern::Domain(d) => {
                name == d
                    || (name.len() > d.len()
                        && name.ends_with(d.as_str())
                        && name.as_bytes()[name.len() - d.len() - 1] == b'.')
            }
        }
    }
}

/// One entry of `decrypt` or `never`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Select {
    /// `host:NAME` or `host:*.DOMAIN`.
    Host(HostPattern),
    /// `app:ID`: names the signature set attributes to this app.
    App(String),
    /// `category:C`: names of the apps in this category.
    Category(String),
    /// `cidr:PREFIX` (never list only): servers at these addresses.
    Net(IpNet),
    /// `builtin:tenant`: the sign-in hosts of the vendors configured in
    /// `[tenant_restrictions]`.
    Tenant,
}

impl Select {
    fn parse(text: &str, nets: bool) -> Result<Select, String> {
        let (kind, value) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}` is not KIND:VALUE (host:, app:, category:)"))?;
        match kind {
            "host" => HostPattern::parse(value)
                .map(Select::Host)
                .ok_or_else(|| format!("`{value}` is not a host name or *.domain")),
            "app" if !value.is_empty() => Ok(Select::App(value.to_string())),
            "category" if !value.is_empty() => Ok(Select::Category(value.to_string())),
            "builtin" if value == "tenant" => Ok(Select::Tenant),
            "cidr" if nets => parse_net(value)
                .map(Select::Net)
                .ok_or_else(|| format!("`{value}` is not a CIDR prefix")),
            _ => Err(format!(
                "`{text}`: the kinds are host:, app:, category:, builtin:tenant{}",
                if nets { ", cidr:" } else { "" }
            )),
        }
    }
}

/// What to do when the upstream's certificate does not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertErrors {
    /// The client gets a page naming the error, over chatwall's
    /// certificate; nothing reaches the upstream.
    Block,
    /// The flow is relayed undecrypted: the client sees the upstream's
    /// certificate and judges it.
    Splice,
}

/// The validated `[tls_inspect]`.
#[derive(Debug, Clone)]
pub struct TlsInspect {
    pub enabled: bool,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// Client addresses whose flows may be decrypted.
    pub clients: NetSet,
    /// Authenticated users whose flows may be decrypted (`user:NAME`).
    pub client_users: Vec<String>,
    pub decrypt: Vec<Select>,
    /// The operator's never list, then the built-in one (unless off).
    pub never: Vec<Select>,
    /// The built-in never list applies (`never_builtin`).
    pub never_builtin: bool,
    pub upstream_extra_ca: Option<PathBuf>,
    pub upstream_cert_errors: CertErrors,
    /// A refused HTTPS flow from a listed client gets the 403 page over
    /// chatwall's certificate instead of a reset.
    pub block_page: bool,
    pub handshake_timeout: Duration,
    pub cert_cache_entries: usize,
    pub cert_cache_ttl: Duration,
}

pub(super) fn validate(
    v: &mut Validator<'_>,
    raw: &RawTlsInspect,
    path: Option<&Path>,
) -> TlsInspect {
    const S: &str = "tls_inspect";
    let mut nets = Vec::new();
    let mut client_users = Vec::new();
    for c in &raw.clients {
        if let Some(user) = c.strip_prefix("user:") {
            if user.is_empty() {
                v.err(S, "clients", "`user:` needs a user name");
            }
            client_users.push(user.to_string());
        } else {
            match parse_net(c) {
                Some(n) => nets.push(n),
                None => v.err(
                    S,
                    "clients",
                    format!("`{c}` is not a CIDR prefix, an address or user:NAME"),
                ),
            }
        }
    }
    let mut selects = |key: &str, values: &[String], with_nets: bool| -> Vec<Select> {
        let mut out = Vec::new();
        for text in values {
            match Select::parse(text, with_nets) {
                Ok(s) => out.push(s),
                Err(m) => v.err(S, key, m),
            }
        }
        out
    };
    let decrypt = selects("decrypt", &raw.decrypt, false);
    let mut never = selects("never", &raw.never, true);
    if raw.never_builtin {
        never.extend(builtin_never().into_iter().map(Select::Host));
    }
    let upstream_cert_errors = match raw.upstream_cert_errors.as_str() {
        "block" => CertErrors::Block,
        "splice" => CertErrors::Splice,
        other => {
            v.err(
                S,
                "upstream_cert_errors",
                format!("`{other}` is not one of block, splice"),
            );
            CertErrors::Block
        }
    };
    let path_of = |written: &str| (!written.is_empty()).then(|| relative_to(path, written));
    let ca_cert = path_of(&raw.ca_cert);
    let ca_key = path_of(&raw.ca_key);
    if raw.enabled {
        if ca_cert.is_none() {
            v.err(
                S,
                "ca_cert",
                "TLS inspection needs the CA certificate (PEM)",
            );
        }
        if ca_key.is_none() {
            v.err(
                S,
                "ca_key",
                "TLS inspection needs the CA's private key (PEM)",
            );
        }
        if decrypt.is_empty() {
            v.err(
                S,
                "decrypt",
                "TLS inspection is on but selects nothing to decrypt",
            );
        }
        if nets.is_empty() && client_users.is_empty() {
            v.err(S, "clients", "TLS inspection is on but lists no client");
        }
    }
    TlsInspect {
        enabled: raw.enabled,
        ca_cert: ca_cert.unwrap_or_default(),
        ca_key: ca_key.unwrap_or_default(),
        clients: NetSet::from_nets(nets),
        client_users,
        decrypt,
        never,
        never_builtin: raw.never_builtin,
        upstream_extra_ca: path_of(&raw.upstream_extra_ca),
        upstream_cert_errors,
        block_page: raw.block_page,
        handshake_timeout: v.millis(
            S,
            "handshake_timeout_ms",
            raw.handshake_timeout_ms,
            100,
            120_000,
        ),
        cert_cache_entries: v.count(
            S,
            "cert_cache_entries",
            raw.cert_cache_entries,
            1,
            1_000_000,
        ),
        cert_cache_ttl: v.millis(
            S,
            "cert_cache_ttl_ms",
            raw.cert_cache_ttl_ms,
            1000,
            30 * 24 * 3600 * 1000,
        ),
    }
}

/// Servers that must never be decrypted, whatever `decrypt` says: they
/// pin their certificates or refuse interception by design, and breaking
/// them breaks devices, not IM. Turned off with `never_builtin = false`.
pub const BUILTIN_NEVER: &[&str] = &[
    // Apple: "Apple services will fail any connection that uses HTTPS
    // Interception" (support.apple.com/en-us/101555).
    "*.apple.com",
    "*.icloud.com",
    "*.mzstatic.com",
    "*.apple-cloudkit.com",
    // Microsoft: device registration and sign-in (Tenant Restrictions
    // documentation asks to keep them out of interception), updates.
    "device.login.microsoftonline.com",
    "enterpriseregistration.windows.net",
    "*.windowsupdate.com",
    "*.update.microsoft.com",
    "*.delivery.mp.microsoft.com",
    // Google Play services and Android check-in (pinned).
    "play.googleapis.com",
    "android.clients.google.com",
    // Banks and insurers on their verified-registrant top-level domains.
    "*.bank",
    "*.insurance",
];

/// The built-in never list as patterns.
pub fn builtin_never() -> Vec<HostPattern> {
    BUILTIN_NEVER
        .iter()
        .filter_map(|p| HostPattern::parse(p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_patterns_match_the_name_or_the_domain() {
        let d = HostPattern::parse("*.Example.com").expect("pattern");
        assert!(d.matches("example.com"));
        assert!(d.matches("a.b.example.com"));
        assert!(!d.matches("badexample.com"));
        assert!(!d.matches("example.com.evil"));
        let e = HostPattern::parse("chat.example.com").expect("pattern");
        assert!(e.matches("chat.example.com"));
        assert!(!e.matches("x.chat.example.com"));
        assert_eq!(builtin_never().len(), BUILTIN_NEVER.len());
    }

    #[test]
    fn selections_take_kinds_and_refuse_others() {
        assert_eq!(
            Select::parse("app:slack", false),
            Ok(Select::App("slack".into()))
        );
        assert!(Select::parse("cidr:10.0.0.0/8", false).is_err());
        assert!(Select::parse("cidr:10.0.0.0/8", true).is_ok());
        assert!(Select::parse("example.com", false).is_err());
        assert!(Select::parse("host:", false).is_err());
    }
}
