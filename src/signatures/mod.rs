//! The immutable, compiled signature set: one host matcher for names, one
//! for SNI, a CIDR trie, a port map, ALPN and JA4 tables, the HTTP rules, one
//! payload automaton per direction and the download rules. Built once per
//! load or reload and shared by every flow.
pub mod bundle;
pub mod load;
pub mod model;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use crate::classify::host::HostMatcher;
use crate::classify::http::{HttpMatcher, HttpRule};
use crate::classify::payload::{self, PayloadMatcher, PayloadRule};
use crate::classify::tls::ClientHello;
use crate::classify::{AppIdx, Detection, NetMap, Reason, UNIDENTIFIED};
use crate::config::ConfigError as FileError;
use load::{DownloadSpec, LoadedApp, RuleBody, SourceFile};

mod bundled {
    include!(concat!(env!("OUT_DIR"), "/bundled_signatures.rs"));
}
pub use bundled::BUNDLED_VERSION;

/// What kind of rule a rule-table entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleKind {
    Host,
    Port,
    Cidr,
    Sni,
    Alpn,
    Ja4,
    Http,
    Payload,
    Download,
}

impl RuleKind {
    pub const ALL: [RuleKind; 9] = [
        RuleKind::Host,
        RuleKind::Port,
        RuleKind::Cidr,
        RuleKind::Sni,
        RuleKind::Alpn,
        RuleKind::Ja4,
        RuleKind::Http,
        RuleKind::Payload,
        RuleKind::Download,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::Host => "hosts",
            RuleKind::Port => "ports",
            RuleKind::Cidr => "cidrs",
            RuleKind::Sni => "sni",
            RuleKind::Alpn => "alpn",
            RuleKind::Ja4 => "ja4",
            RuleKind::Http => "http",
            RuleKind::Payload => "payload",
            RuleKind::Download => "downloads",
        }
    }

    fn of(body: &RuleBody) -> RuleKind {
        match body {
            RuleBody::Host(_) => RuleKind::Host,
            RuleBody::Port(_) => RuleKind::Port,
            RuleBody::Cidr(_) => RuleKind::Cidr,
            RuleBody::Sni(_) => RuleKind::Sni,
            RuleBody::Alpn(_) => RuleKind::Alpn,
            RuleBody::Ja4(_) => RuleKind::Ja4,
            RuleBody::Http(_) => RuleKind::Http,
            RuleBody::Payload(..) => RuleKind::Payload,
            RuleBody::Download(_) => RuleKind::Download,
        }
    }
}

#[derive(Debug, Clone)]
pub struct App {
    pub id: String,
    pub name: String,
    pub vendor: String,
    pub category: String,
    pub notes: String,
    pub file: String,
    pub counts: HashMap<RuleKind, usize>,
}

#[derive(Debug, Clone)]
pub struct RuleInfo {
    pub app: AppIdx,
    pub kind: RuleKind,
    pub text: String,
    pub source: String,
    pub line: usize,
}

/// The compiled set.
pub struct SignatureSet {
    apps: Vec<App>,
    rules: Vec<RuleInfo>,
    hosts: HostMatcher,
    sni: HostMatcher,
    cidrs: NetMap<u32>,
    ports: HashMap<u16, u32>,
    alpn: HashMap<Vec<u8>, u32>,
    ja4: HashMap<String, u32>,
    http: HttpMatcher,
    payload: PayloadMatcher,
    /// host → (path prefix, rule), longest prefix first.
    url_prefixes: HashMap<String, Vec<(String, u32)>>,
    file_names: Vec<(String, u32)>,
    sha256: HashMap<[u8; 32], u32>,
    /// Where the set came from: "bundled" or the directory.
    pub origin: String,
    pub version: String,
}

impl std::fmt::Debug for SignatureSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignatureSet")
            .field("apps", &self.apps.len())
            .field("rules", &self.rules.len())
            .finish()
    }
}

impl SignatureSet {
    /// The set compiled into the binary.
    pub fn bundled(window: usize) -> Result<SignatureSet, Vec<FileError>> {
        let files: Vec<SourceFile> = bundled::BUNDLED
            .iter()
            .map(|(name, text)| SourceFile {
                name: format!("signatures/{name}"),
                text: (*text).to_string(),
            })
            .collect();
        let mut set = SignatureSet::from_files(&files, window)?;
        set.origin = "bundled".into();
        set.version = BUNDLED_VERSION.to_string();
        Ok(set)
    }

    /// Every `*.toml` of `dir`.
    pub fn from_dir(dir: &Path, window: usize) -> Result<SignatureSet, Vec<FileError>> {
        let files = load::read_dir(dir)?;
        let mut set = SignatureSet::from_files(&files, window)?;
        set.origin = dir.display().to_string();
        set.version = std::fs::read_to_string(dir.join("VERSION"))
            .map(|v| v.trim().to_string())
            .unwrap_or_default();
        Ok(set)
    }

    pub fn from_files(files: &[SourceFile], window: usize) -> Result<SignatureSet, Vec<FileError>> {
        if files.is_empty() {
            return Err(vec![FileError {
                file: "-".into(),
                line: None,
                field: "-".into(),
                message: "no signature files: a set without rules would refuse nothing".into(),
            }]);
        }
        let apps = load::load(files, window)?;
        compile(apps, window)
    }

    pub fn apps(&self) -> &[App] {
        &self.apps
    }

    pub fn rules(&self) -> &[RuleInfo] {
        &self.rules
    }

    pub fn app(&self, idx: AppIdx) -> Option<&App> {
        self.apps.get(idx as usize)
    }

    /// The app id for labels and logs; "unidentified" for generic refusals.
    pub fn app_id(&self, idx: AppIdx) -> &str {
        if idx == UNIDENTIFIED {
            return "unidentified";
        }
        self.apps
            .get(idx as usize)
            .map(|a| a.id.as_str())
            .unwrap_or("unidentified")
    }

    pub fn app_index(&self, id: &str) -> Option<AppIdx> {
        self.apps
            .iter()
            .position(|a| a.id == id)
            .map(|i| i as AppIdx)
    }

    pub fn rule(&self, idx: u32) -> Option<&RuleInfo> {
        self.rules.get(idx as usize)
    }

    fn detection(&self, rule: u32, reason: Reason, offset: Option<u32>) -> Detection {
        Detection {
            app: self
                .rules
                .get(rule as usize)
                .map(|r| r.app)
                .unwrap_or(UNIDENTIFIED),
            rule: Some(rule),
            reason,
            offset,
            exception: None,
        }
    }

    /// A host name from a request target, Host header or CONNECT authority.
    pub fn classify_host(&self, name: &str) -> Option<Detection> {
        self.hosts
            .lookup(name)
            .map(|h| self.detection(h.rule, Reason::Host, None))
    }

    /// An SNI: the `tls.sni` rules, then the host rules.
    pub fn classify_sni(&self, name: &str) -> Option<Detection> {
        self.sni
            .lookup(name)
            .or_else(|| self.hosts.lookup(name))
            .map(|h| self.detection(h.rule, Reason::Sni, None))
    }

    /// A name from a server certificate: matched as an SNI is (the
    /// `tls.sni` rules, then the host rules), reported as [`Reason::Cert`].
    /// A wildcard name `*.example.com` is looked up by its labels below the
    /// `*`, so it matches only suffix rules that cover all of it
    /// (`*.example.com`, `*.com`), never an exact rule for one name under it:
    /// a shared wildcard certificate says nothing about which of its names
    /// the server is.
    pub fn classify_cert(&self, name: &str) -> Option<Detection> {
        self.sni
            .lookup(name)
            .or_else(|| self.hosts.lookup(name))
            .map(|h| self.detection(h.rule, Reason::Cert, None))
    }

    pub fn classify_ip(&self, addr: IpAddr) -> Option<Detection> {
        self.cidrs
            .lookup(addr)
            .map(|(_, &rule)| self.detection(rule, Reason::Ip, None))
    }

    pub fn classify_port(&self, port: u16) -> Option<Detection> {
        self.ports
            .get(&port)
            .map(|&rule| self.detection(rule, Reason::Port, None))
    }

    /// SNI, then ALPN, then JA4 of a parsed ClientHello.
    pub fn classify_hello(&self, hello: &ClientHello) -> Option<Detection> {
        if let Some(d) = hello.sni.as_deref().and_then(|s| self.classify_sni(s)) {
            return Some(d);
        }
        if let Some(&rule) = hello.alpn.iter().find_map(|a| self.alpn.get(a.as_bytes())) {
            return Some(self.detection(rule, Reason::Alpn, None));
        }
        self.ja4
            .get(&hello.ja4)
            .map(|&rule| self.detection(rule, Reason::Ja4, None))
    }

    /// Does any rule match on a JA4 fingerprint?
    pub fn has_ja4_rules(&self) -> bool {
        !self.ja4.is_empty()
    }

    pub fn http(&self) -> &HttpMatcher {
        &self.http
    }

    pub fn http_detection(&self, rule: u32) -> Detection {
        self.detection(rule, Reason::Http, None)
    }

    pub fn payload(&self) -> &PayloadMatcher {
        &self.payload
    }

    /// A payload outcome as a detection, if it is a match.
    pub fn payload_detection(&self, outcome: payload::Outcome) -> Option<Detection> {
        match outcome {
            payload::Outcome::Match { tag, offset } => {
                Some(self.detection(tag, Reason::Payload, u32::try_from(offset).ok()))
            }
            _ => None,
        }
    }

    /// An installer download by URL (`host` and `path` without the query,
    /// compared case-insensitively) or by file name.
    pub fn classify_download(&self, host: &str, path: &str) -> Option<Detection> {
        let mut buf = [0u8; crate::classify::host::MAX_HOST_LEN];
        let lower = buf
            .get_mut(..host.len())
            .map(|b| {
                b.copy_from_slice(host.as_bytes());
                b.make_ascii_lowercase();
                &*b
            })
            .and_then(|b| std::str::from_utf8(b).ok());
        if let Some(prefixes) = lower.and_then(|h| self.url_prefixes.get(h)) {
            for (prefix, rule) in prefixes {
                let p = prefix.as_bytes();
                if path.len() >= p.len() && path.as_bytes()[..p.len()].eq_ignore_ascii_case(p) {
                    return Some(self.detection(*rule, Reason::Download, None));
                }
            }
        }
        let file = path.rsplit('/').next().unwrap_or("");
        self.file_names
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(file))
            .map(|&(_, rule)| self.detection(rule, Reason::Download, None))
    }

    /// Whether any `[[downloads]] sha256` rule is loaded (responses are
    /// hashed only then).
    pub fn has_sha256(&self) -> bool {
        !self.sha256.is_empty()
    }

    /// A body digest: the `[[downloads]] sha256` rule it matches.
    pub fn classify_sha256(&self, digest: &[u8; 32]) -> Option<Detection> {
        self.sha256
            .get(digest)
            .map(|&rule| self.detection(rule, Reason::Download, None))
    }

    /// Every host pattern with its app (exports, PAC).
    pub fn host_patterns(&self) -> impl Iterator<Item = (&str, AppIdx)> + '_ {
        self.rules.iter().filter_map(move |r| match r.kind {
            RuleKind::Host | RuleKind::Sni => Some((r.text.trim_start_matches("sni "), r.app)),
            _ => None,
        })
    }

    /// Every CIDR with its app.
    pub fn cidr_list(&self) -> impl Iterator<Item = (ipnet::IpNet, AppIdx)> + '_ {
        self.cidrs
            .iter()
            .filter_map(move |(n, &rule)| self.rule(rule).map(|r| (n, r.app)))
    }

    /// Every IM port with its app.
    pub fn port_list(&self) -> Vec<(u16, AppIdx)> {
        let mut v: Vec<_> = self
            .ports
            .iter()
            .filter_map(|(&p, &rule)| self.rule(rule).map(|r| (p, r.app)))
            .collect();
        v.sort_unstable();
        v
    }
}

fn compile(loaded: Vec<LoadedApp>, window: usize) -> Result<SignatureSet, Vec<FileError>> {
    let mut errors = Vec::new();
    let mut set = SignatureSet {
        apps: Vec::new(),
        rules: Vec::new(),
        hosts: HostMatcher::default(),
        sni: HostMatcher::default(),
        cidrs: NetMap::default(),
        ports: HashMap::new(),
        alpn: HashMap::new(),
        ja4: HashMap::new(),
        http: HttpMatcher::default(),
        payload: PayloadMatcher::compile(&[], window).map_err(|e| {
            vec![FileError {
                file: "-".into(),
                line: None,
                field: "payload".into(),
                message: e,
            }]
        })?,
        url_prefixes: HashMap::new(),
        file_names: Vec::new(),
        sha256: HashMap::new(),
        origin: String::new(),
        version: String::new(),
    };
    if loaded.len() >= UNIDENTIFIED as usize {
        return Err(vec![FileError {
            file: "-".into(),
            line: None,
            field: "-".into(),
            message: "too many apps".into(),
        }]);
    }
    let mut http_rules = Vec::new();
    let mut payload_rules = Vec::new();
    let mut owner: HashMap<String, (String, usize)> = HashMap::new();
    for (ai, app) in loaded.into_iter().enumerate() {
        let app_idx = ai as AppIdx;
        let mut counts = HashMap::new();
        for r in &app.rules {
            let idx = set.rules.len() as u32;
            let kind = RuleKind::of(&r.body);
            *counts.entry(kind).or_insert(0) += 1;
            // A name, port or prefix may belong to one app only: the set
            // would otherwise name whichever app happened to load first.
            let key = match &r.body {
                RuleBody::Host(h) => Some(format!("host {h}")),
                RuleBody::Sni(h) => Some(format!("sni {h}")),
                RuleBody::Port(p) => Some(format!("port {p}")),
                RuleBody::Cidr(n) => Some(format!("cidr {n}")),
                _ => None,
            };
            if let Some(key) = key {
                if let Some((file, line)) = owner.get(&key) {
                    if file != &app.file {
                        errors.push(FileError {
                            file: app.file.clone(),
                            line: Some(r.line),
                            field: RuleKind::of(&r.body).as_str().into(),
                            message: format!("`{}` is already claimed by {file}:{line}", r.text),
                        });
                    }
                } else {
                    owner.insert(key, (app.file.clone(), r.line));
                }
            }
            match &r.body {
                RuleBody::Host(h) => {
                    set.hosts.insert(h, idx);
                }
                RuleBody::Sni(h) => {
                    set.sni.insert(h, idx);
                }
                RuleBody::Port(p) => {
                    set.ports.entry(*p).or_insert(idx);
                }
                RuleBody::Cidr(n) => set.cidrs.insert(*n, idx),
                RuleBody::Alpn(a) => {
                    set.alpn.entry(a.as_bytes().to_vec()).or_insert(idx);
                }
                RuleBody::Ja4(j) => {
                    set.ja4.entry(j.clone()).or_insert(idx);
                }
                RuleBody::Http(h) => http_rules.push(HttpRule {
                    rule: idx,
                    method: h.method.clone(),
                    path: h.path.clone(),
                    path_prefix: h.path_prefix.clone(),
                    headers: h.headers.clone(),
                    body: h.body.clone(),
                }),
                RuleBody::Payload(dir, atoms) => payload_rules.push(PayloadRule {
                    tag: idx,
                    direction: *dir,
                    atoms: atoms.clone(),
                }),
                RuleBody::Download(DownloadSpec::UrlPrefix(u)) => {
                    // Validated as host/path by the loader.
                    let (host, path) = u.split_at(u.find('/').unwrap_or(u.len()));
                    set.url_prefixes
                        .entry(host.to_string())
                        .or_default()
                        .push((path.to_string(), idx));
                }
                RuleBody::Download(DownloadSpec::FileName(n)) => {
                    set.file_names.push((n.clone(), idx));
                }
                RuleBody::Download(DownloadSpec::Sha256(d)) => {
                    set.sha256.entry(*d).or_insert(idx);
                }
            }
            set.rules.push(RuleInfo {
                app: app_idx,
                kind,
                text: r.text.clone(),
                source: r.source.clone(),
                line: r.line,
            });
        }
        set.apps.push(App {
            id: app.id,
            name: app.name,
            vendor: app.vendor,
            category: app.category,
            notes: app.notes,
            file: app.file,
            counts,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    set.http = HttpMatcher::new(http_rules);
    set.payload = PayloadMatcher::compile(&payload_rules, window).map_err(|e| {
        vec![FileError {
            file: "-".into(),
            line: None,
            field: "payload".into(),
            message: e,
        }]
    })?;
    // Longest URL prefix first, so the most specific rule names the flow.
    for prefixes in set.url_prefixes.values_mut() {
        prefixes.sort_by_key(|p| std::cmp::Reverse(p.0.len()));
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::payload::{Direction, Outcome};

    /// The inspection window of the default configuration.
    const WINDOW: usize = 16 * 1024;

    fn bundled() -> SignatureSet {
        SignatureSet::bundled(WINDOW).expect("the bundled set compiles")
    }

    /// RFC 8489 transaction id: 96 bits, here fixed.
    const TRANSACTION_ID: [u8; 12] = [
        0x5a, 0x11, 0x3c, 0x7e, 0x01, 0x02, 0x03, 0x04, 0x9a, 0xbc, 0xde, 0xf0,
    ];

    /// An RFC 8489 message (§5): type, length of the attributes, magic
    /// cookie 0x2112A442, transaction id, then the attributes (§14: type,
    /// length, value padded to a multiple of 4 bytes).
    fn stun(msg_type: u16, attributes: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (attr_type, value) in attributes {
            body.extend(attr_type.to_be_bytes());
            body.extend((value.len() as u16).to_be_bytes());
            body.extend_from_slice(value);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        let mut out = msg_type.to_be_bytes().to_vec();
        out.extend((body.len() as u16).to_be_bytes());
        out.extend([0x21, 0x12, 0xa4, 0x42]);
        out.extend(TRANSACTION_ID);
        out.extend(body);
        out
    }

    /// RFC 4571 §2: a 2-byte length, then the message.
    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = (message.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(message);
        out
    }

    /// An [MS-TURN] Allocate request over TCP: the §2.1.4 framing header
    /// (type 0x02 control message, reserved, length), the §2.2.2 header
    /// (type, length, 16-byte transaction id), the MAGIC-COOKIE attribute
    /// first (§2.2.2.8), then MS-VERSION (§2.2.2.17, 0x8008).
    fn ms_turn_allocate(frame_type: u8) -> Vec<u8> {
        let attributes = [
            0x00, 0x0f, 0x00, 0x04, 0x72, 0xc6, 0x4b, 0xc6, // MAGIC-COOKIE
            0x80, 0x08, 0x00, 0x04, 0x00, 0x00, 0x00, 0x06, // MS-VERSION 6
        ];
        let mut turn = vec![0x00, 0x03]; // Allocate request
        turn.extend((attributes.len() as u16).to_be_bytes());
        turn.extend([0x7f; 16]); // transaction id
        turn.extend(attributes);
        let mut out = vec![frame_type, 0x00];
        out.extend((turn.len() as u16).to_be_bytes());
        out.extend(turn);
        out
    }

    /// REQUESTED-TRANSPORT (RFC 8656 §14.7): protocol 17 (UDP), RFFU.
    const UDP: (u16, &[u8]) = (0x0019, &[17, 0, 0, 0]);

    /// What the client bytes are attributed to: the app of the matching
    /// rule and where the completing atom starts, `None` without a match.
    fn attributed(set: &SignatureSet, bytes: &[u8]) -> Option<(String, usize)> {
        match set.payload().classify(Direction::Client, bytes) {
            Outcome::Match { tag, offset } => {
                let app = set.rule(tag).map(|r| r.app).unwrap_or(UNIDENTIFIED);
                Some((set.app_id(app).to_owned(), offset))
            }
            _ => None,
        }
    }

    #[test]
    fn stun_and_turn_requests_are_named_stun_turn() {
        let set = bundled();
        let binding = stun(0x0001, &[]);
        assert_eq!(binding.len(), 20);
        let ice_binding = stun(
            0x0001,
            &[
                (0x0006, b"a3f9:Zq81"),              // USERNAME
                (0x0024, &[0x6e, 0x7f, 0x1e, 0xff]), // PRIORITY
                (0x802a, &[1, 2, 3, 4, 5, 6, 7, 8]), // ICE-CONTROLLING
            ],
        );
        let allocate = stun(0x0003, &[UDP]);
        let allocate_long = stun(
            0x0003,
            &[UDP, (0x0006, &[b'u'; 300]), (0x8022, b"webrtc")], // USERNAME, SOFTWARE
        );
        let connection_bind = stun(0x000b, &[(0x002a, &[0, 0, 0, 9])]); // CONNECTION-ID
                                                                        // An RFC 8489 Allocate carrying Microsoft's MS-VERSION: named by its
                                                                        // header, which completes first (see stun-turn.toml).
        let allocate_ms = stun(0x0003, &[UDP, (0x8008, &[0, 0, 0, 6])]);
        let cases: [(&str, Vec<u8>, usize); 9] = [
            ("Binding", binding.clone(), 4),
            ("Binding, ICE attributes", ice_binding.clone(), 4),
            ("Allocate", allocate.clone(), 4),
            ("Allocate, 300-byte USERNAME", allocate_long, 4),
            ("ConnectionBind", connection_bind, 4),
            ("Allocate with MS-VERSION", allocate_ms, 4),
            ("framed Binding", framed(&binding), 6),
            ("framed ICE Binding", framed(&ice_binding), 6),
            ("framed Allocate", framed(&allocate), 6),
        ];
        for (name, bytes, cookie_at) in cases {
            assert_eq!(
                attributed(&set, &bytes),
                Some(("stun-turn".to_owned(), cookie_at)),
                "{name}"
            );
            // Decided as soon as the cookie is in, whatever follows.
            for cut in 0..cookie_at + 4 {
                assert!(
                    matches!(
                        set.payload().classify(Direction::Client, &bytes[..cut]),
                        Outcome::Pending { .. }
                    ),
                    "{name}: prefix {cut}"
                );
            }
            assert!(
                attributed(&set, &bytes[..cookie_at + 4]).is_some(),
                "{name}"
            );
        }
        let app = set
            .app(set.app_index("stun-turn").expect("stun-turn"))
            .expect("app");
        assert_eq!(app.category, "media-relay");
        assert_eq!(
            set.classify_port(3478).map(|d| set.app_id(d.app)),
            Some("stun-turn")
        );
    }

    #[test]
    fn microsoft_turn_is_named_teams() {
        let set = bundled();
        let allocate = ms_turn_allocate(0x02);
        assert_eq!(attributed(&set, &allocate), Some(("teams".to_owned(), 24)));
        // End-to-end data frames (type 0x03) are not a control message.
        assert_eq!(attributed(&set, &ms_turn_allocate(0x03)), None);
        // Without the framing header (as over UDP) it is not TURN over TCP.
        assert_eq!(attributed(&set, &allocate[4..]), None);
    }

    #[test]
    fn other_first_bytes_are_not_stun() {
        let set = bundled();
        let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
        let mut noise = |n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng.to_le_bytes()[0]
                })
                .collect()
        };
        let cookie = [0x21, 0x12, 0xa4, 0x42];
        let mut cases: Vec<(String, Vec<u8>)> = vec![
            (
                "TLS ClientHello".into(),
                [
                    &[
                        0x16, 0x03, 0x01, 0x00, 0x2f, 0x01, 0x00, 0x00, 0x2b, 0x03, 0x03,
                    ][..],
                    &[0x21; 32],
                    &[0x00, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00],
                ]
                .concat(),
            ),
            (
                "HTTP".into(),
                b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n".to_vec(),
            ),
            (
                "SSH".into(),
                b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13.5\r\n".to_vec(),
            ),
            // A Binding success response (server side), and ChannelData
            // (first bits 01): not a client's first message.
            ("Binding response".into(), stun(0x0101, &[])),
            (
                "ChannelData".into(),
                [&[0x40, 0x00, 0x00, 0x18][..], &cookie, &[0; 20]].concat(),
            ),
            // RFC 3489 (no cookie): the old transaction id in its place.
            (
                "RFC 3489 Binding".into(),
                [&[0x00, 0x01, 0x00, 0x00][..], &[0x33; 16]].concat(),
            ),
        ];
        // The right type at 0 but the cookie elsewhere, in random bytes.
        for at in [2, 3, 5, 8, 12, 20] {
            let mut bytes = noise(40);
            bytes[..2].copy_from_slice(&[0x00, 0x01]);
            bytes[4] ^= 0x80; // never the cookie at 4 by chance
            bytes[at..at + 4].copy_from_slice(&cookie);
            if at != 4 {
                cases.push((format!("cookie at {at}"), bytes));
            }
        }
        // The cookie at 4 after a type no client starts with.
        for msg_type in [0x0000, 0x0002, 0x0004, 0x0111, 0x8001] {
            let mut bytes = stun(0x0001, &[]);
            bytes[..2].copy_from_slice(&u16::to_be_bytes(msg_type));
            cases.push((format!("type {msg_type:#06x}"), bytes));
        }
        for (name, bytes) in cases {
            let got = attributed(&set, &bytes);
            assert!(
                !matches!(&got, Some((app, _)) if app == "stun-turn" || app == "teams"),
                "{name}: {got:?}"
            );
        }
    }
}
