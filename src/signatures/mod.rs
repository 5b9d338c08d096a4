//! The immutable, compiled signature set: one host matcher for names, one
//! for SNI, a CIDR trie, a port map, ALPN and JA4 tables, the HTTP rules, one
//! payload automaton per direction and the download rules. Built once per
//! load or reload and shared by every flow.
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

    /// A body digest (for `classify pcap` and offline checks).
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
