//! Pure classification over names, addresses and bytes: what the signature
//! set says a flow is. Nothing here knows about sockets, policy or metrics,
//! so the proxy, `classify`, `classify pcap` and the fuzz targets all run the
//! same code.
//!
//! Classifiers answer "this app, by this rule" or nothing; byte classifiers
//! also answer "need more bytes" (see [`payload::Outcome`], [`tls::Hello`],
//! [`server_hello::ServerFlight`]).
pub mod addr;
pub mod h1;
pub mod host;
pub mod http;
pub mod payload;
pub mod server_hello;
pub mod sniff;
pub mod tls;

pub use addr::{NetMap, NetSet};

/// Why a flow was attributed to an app (or refused): the `reason` label of
/// `chatwall_blocked_total` and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    Host,
    Sni,
    Ip,
    Port,
    Http,
    Payload,
    NonTls,
    NonHttp,
    Ech,
    Download,
    Alpn,
    Ja4,
    /// A name in the certificate a TLS 1.2 (or older) server sent in clear.
    Cert,
    /// Inside a decrypted flow, a request for a host the server's
    /// certificate does not cover (domain fronting).
    Fronting,
}

impl Reason {
    pub const ALL: [Reason; 14] = [
        Reason::Host,
        Reason::Sni,
        Reason::Ip,
        Reason::Port,
        Reason::Http,
        Reason::Payload,
        Reason::NonTls,
        Reason::NonHttp,
        Reason::Ech,
        Reason::Download,
        Reason::Alpn,
        Reason::Ja4,
        Reason::Cert,
        Reason::Fronting,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Host => "host",
            Reason::Sni => "sni",
            Reason::Ip => "ip",
            Reason::Port => "port",
            Reason::Http => "http",
            Reason::Payload => "payload",
            Reason::NonTls => "non_tls",
            Reason::NonHttp => "non_http",
            Reason::Ech => "ech",
            Reason::Download => "download",
            Reason::Alpn => "alpn",
            Reason::Ja4 => "ja4",
            Reason::Cert => "cert",
            Reason::Fronting => "fronting",
        }
    }
}

/// Index of an app in the signature set. `UNIDENTIFIED` marks generic
/// refusals (non-TLS on 443, ECH) where no signature named the app.
pub type AppIdx = u16;
pub const UNIDENTIFIED: AppIdx = u16::MAX;

/// One finding: which app, which rule (index into the set's rule table, or
/// `None` for generic checks), found how, at which byte offset; and once
/// the policy decided it, which `[[policy.exceptions]]` entry (by index)
/// chose the action, if one did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Detection {
    pub app: AppIdx,
    pub rule: Option<u32>,
    pub reason: Reason,
    pub offset: Option<u32>,
    pub exception: Option<u16>,
}
