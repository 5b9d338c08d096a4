//! `signatures/*.toml` → validated rule definitions with file and line.
//! Every bad rule of every file is reported, not just the first.
use std::collections::HashMap;
use std::path::Path;

use ipnet::IpNet;
use toml::Spanned;

use super::model::{RawApp, RawAtom, RawHeader};
use crate::classify::host::normalize_host;
use crate::classify::http::{HeaderCond, HeaderTest};
use crate::classify::payload::{Anchor, Atom, Direction};
use crate::config::{line_of, parse_net, ConfigError as FileError};

/// The categories an app may have.
pub const CATEGORIES: &[&str] = &[
    "consumer-im",
    "enterprise-im",
    "legacy-im",
    "open-protocol",
    "self-hosted-im",
    "im-gateway",
    // Not IM by itself: STUN/TURN relays that calls and meetings of any
    // kind use (monitored by default, see config.rs).
    "media-relay",
    // Not IM either: what lets users step around the policy (public
    // encrypted-DNS resolvers, VPN apps, web proxies, Tor). Monitored by
    // default, see config.rs; never the app of an IM flow's verdict
    // (decide::Findings).
    "circumvention",
];

/// The category of apps that are not IM but ways around the policy.
pub const CIRCUMVENTION: &str = "circumvention";

/// One signature file's text and the name errors should use.
pub struct SourceFile {
    pub name: String,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct HttpSpec {
    pub method: Option<String>,
    pub path: Option<String>,
    pub path_prefix: Option<String>,
    pub headers: Vec<HeaderCond>,
    pub body: Vec<Atom>,
}

#[derive(Debug, Clone)]
pub enum DownloadSpec {
    UrlPrefix(String),
    FileName(String),
    Sha256([u8; 32]),
}

#[derive(Debug, Clone)]
pub enum RuleBody {
    Host(String),
    Port(u16),
    Cidr(IpNet),
    Sni(String),
    Alpn(String),
    Ja4(String),
    Http(HttpSpec),
    Payload(Direction, Vec<Atom>),
    Download(DownloadSpec),
}

#[derive(Debug, Clone)]
pub struct RuleDef {
    pub body: RuleBody,
    /// Short human text of the rule, for logs and `signatures list`.
    pub text: String,
    pub source: String,
    pub line: usize,
}

#[derive(Debug, Clone)]
pub struct LoadedApp {
    pub id: String,
    pub name: String,
    pub vendor: String,
    pub category: String,
    pub notes: String,
    pub file: String,
    pub rules: Vec<RuleDef>,
}

/// Read every `*.toml` of a directory, sorted by name.
pub fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, Vec<FileError>> {
    let err = |m: String| {
        vec![FileError {
            file: dir.display().to_string(),
            line: None,
            field: "-".into(),
            message: m,
        }]
    };
    let rd = std::fs::read_dir(dir).map_err(|e| err(format!("cannot read directory: {e}")))?;
    let mut paths: Vec<_> = rd
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut files = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(&p)
            .map_err(|e| err(format!("cannot read {}: {e}", p.display())))?;
        files.push(SourceFile {
            name: p.display().to_string(),
            text,
        });
    }
    if files.is_empty() {
        return Err(err("no *.toml signature files".into()));
    }
    Ok(files)
}

/// Validate all files; on any error, all errors of all files.
pub fn load(files: &[SourceFile], window: usize) -> Result<Vec<LoadedApp>, Vec<FileError>> {
    let mut errors = Vec::new();
    let mut apps = Vec::new();
    let mut ids: HashMap<String, String> = HashMap::new();
    for f in files {
        match load_one(f, window) {
            Ok(app) => {
                if let Some(first) = ids.insert(app.id.clone(), f.name.clone()) {
                    errors.push(FileError {
                        file: f.name.clone(),
                        line: Some(1),
                        field: "id".into(),
                        message: format!("`{}` is already the id of {first}", app.id),
                    });
                }
                apps.push(app);
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if errors.is_empty() {
        Ok(apps)
    } else {
        Err(errors)
    }
}

struct Ctx<'a> {
    file: &'a SourceFile,
    errors: Vec<FileError>,
}

impl Ctx<'_> {
    fn line(&self, offset: usize) -> usize {
        line_of(&self.file.text, offset)
    }

    fn err<T>(&mut self, at: &Spanned<T>, field: &str, message: impl Into<String>) {
        self.errors.push(FileError {
            file: self.file.name.clone(),
            line: Some(self.line(at.span().start)),
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn source(&mut self, s: &Spanned<String>, field: &str) -> String {
        if s.get_ref().trim().is_empty() {
            self.err(s, field, "every rule needs a non-empty source note");
        }
        s.get_ref().trim().to_string()
    }

    fn host_pattern(&mut self, s: &Spanned<String>, field: &str) -> Option<String> {
        let raw = s.get_ref().trim();
        let (wild, name) = match raw.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, raw),
        };
        if name.contains('*') {
            self.err(
                s,
                field,
                format!("`{raw}`: a wildcard is only allowed as a leading `*.`"),
            );
            return None;
        }
        match normalize_host(name) {
            Some(n) if wild && !n.contains('.') => {
                self.err(
                    s,
                    field,
                    format!("`{raw}`: a wildcard needs at least two labels after it"),
                );
                None
            }
            Some(n) => Some(if wild { format!("*.{n}") } else { n }),
            None => {
                self.err(s, field, format!("`{raw}` is not a host name"));
                None
            }
        }
    }

    fn atom(&mut self, a: &Spanned<RawAtom>, field: &str, window: usize) -> Option<(Atom, String)> {
        let r = a.get_ref();
        let bytes = match (&r.hex, &r.ascii) {
            (Some(h), None) => match parse_hex(h) {
                Some(b) => b,
                None => {
                    self.err(a, field, format!("`{h}` is not pairs of hex digits"));
                    return None;
                }
            },
            (None, Some(s)) => s.as_bytes().to_vec(),
            _ => {
                self.err(a, field, "give exactly one of `hex` or `ascii`");
                return None;
            }
        };
        if bytes.is_empty() {
            self.err(a, field, "the pattern is empty");
            return None;
        }
        let anchor = match (r.offset, r.within) {
            (Some(o), None) if o >= 0 => Anchor::At(o as usize),
            (None, Some(w)) if w > 0 => Anchor::Within(w as usize),
            (None, None) => Anchor::Within(window),
            _ => {
                self.err(
                    a,
                    field,
                    "give at most one of `offset` (>= 0) or `within` (> 0)",
                );
                return None;
            }
        };
        let reach = match anchor {
            Anchor::At(o) => o.saturating_add(bytes.len()),
            Anchor::Within(n) => n,
        };
        if reach > window {
            self.err(
                a,
                field,
                format!("reaches byte {reach}, beyond the inspection window of {window} bytes"),
            );
            return None;
        }
        if let Anchor::Within(n) = anchor {
            if bytes.len() > n {
                self.err(a, field, "the pattern is longer than its `within` bound");
                return None;
            }
        }
        let shown = match (&r.hex, &r.ascii) {
            (Some(h), _) => format!("hex {}", h.replace(' ', "")),
            (_, Some(s)) => format!("{:?}", s),
            _ => String::new(),
        };
        let place = match anchor {
            Anchor::At(o) => format!("@{o}"),
            Anchor::Within(n) => format!("within {n}"),
        };
        let text = format!("{shown} {place}{}", if r.nocase { " nocase" } else { "" });
        Some((
            Atom {
                bytes,
                anchor,
                nocase: r.nocase,
            },
            text,
        ))
    }

    fn header(&mut self, h: &Spanned<RawHeader>, field: &str) -> Option<(HeaderCond, String)> {
        let r = h.get_ref();
        let name = r.name.trim().to_ascii_lowercase();
        if name.is_empty() || http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            self.err(h, field, format!("`{}` is not a header name", r.name));
            return None;
        }
        let (test, shown) = match (&r.equals, &r.prefix, &r.contains) {
            (Some(v), None, None) => (
                HeaderTest::Equals(v.as_bytes().to_vec()),
                format!("{name} = {v:?}"),
            ),
            (None, Some(v), None) => (
                HeaderTest::Prefix(v.as_bytes().to_vec()),
                format!("{name} ^= {v:?}"),
            ),
            (None, None, Some(v)) => (
                HeaderTest::Contains(v.as_bytes().to_vec()),
                format!("{name} ~ {v:?}"),
            ),
            _ => {
                self.err(
                    h,
                    field,
                    "give exactly one of `equals`, `prefix`, `contains`",
                );
                return None;
            }
        };
        let empty = match &test {
            HeaderTest::Equals(v) | HeaderTest::Prefix(v) | HeaderTest::Contains(v) => v.is_empty(),
        };
        if empty {
            self.err(h, field, "the value is empty");
            return None;
        }
        Some((HeaderCond { name, test }, shown))
    }
}

/// Hex pairs, spaces allowed between bytes.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let digits: Vec<u8> = s.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if digits.is_empty() || digits.len() % 2 != 0 {
        return None;
    }
    digits
        .chunks(2)
        .map(|p| {
            let hi = (p[0] as char).to_digit(16)?;
            let lo = (p[1] as char).to_digit(16)?;
            Some((hi * 16 + lo) as u8)
        })
        .collect()
}

fn load_one(f: &SourceFile, window: usize) -> Result<LoadedApp, Vec<FileError>> {
    let raw: RawApp = toml::from_str(&f.text).map_err(|e| {
        vec![FileError {
            file: f.name.clone(),
            line: e.span().map(|s| line_of(&f.text, s.start)),
            field: "-".into(),
            message: e.message().trim().to_string(),
        }]
    })?;
    let mut cx = Ctx {
        file: f,
        errors: Vec::new(),
    };
    let id = raw.id.get_ref().clone();
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        cx.err(
            &raw.id,
            "id",
            format!("`{id}` must be lower-case letters, digits and `-`"),
        );
    }
    let stem = Path::new(&f.name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if stem != id {
        cx.err(
            &raw.id,
            "id",
            format!("`{id}` must equal the file name `{stem}`"),
        );
    }
    if raw.name.get_ref().trim().is_empty() {
        cx.err(&raw.name, "name", "must not be empty");
    }
    let category = raw.category.get_ref().clone();
    if !CATEGORIES.contains(&category.as_str()) {
        cx.err(
            &raw.category,
            "category",
            format!("`{category}` is not one of {}", CATEGORIES.join(", ")),
        );
    }

    let mut rules = Vec::new();
    let mut push = |body: RuleBody, text: String, source: &str, line: usize| {
        rules.push(RuleDef {
            body,
            text,
            source: source.to_string(),
            line,
        })
    };

    for h in &raw.hosts {
        let source = cx.source(&h.source, "hosts.source");
        if h.names.is_empty() {
            cx.err(&h.source, "hosts.names", "is empty");
        }
        for n in &h.names {
            if let Some(p) = cx.host_pattern(n, "hosts.names") {
                push(
                    RuleBody::Host(p.clone()),
                    p,
                    &source,
                    cx.line(n.span().start),
                );
            }
        }
    }
    for p in &raw.ports {
        let source = cx.source(&p.source, "ports.source");
        for port in &p.tcp {
            match u16::try_from(*port.get_ref()) {
                Ok(n) if n != 0 => push(
                    RuleBody::Port(n),
                    format!("tcp/{n}"),
                    &source,
                    cx.line(port.span().start),
                ),
                _ => cx.err(
                    port,
                    "ports.tcp",
                    format!("{} is not a TCP port", port.get_ref()),
                ),
            }
        }
    }
    for c in &raw.cidrs {
        let source = cx.source(&c.source, "cidrs.source");
        for n in &c.nets {
            match parse_net(n.get_ref().trim()) {
                Some(net) => push(
                    RuleBody::Cidr(net),
                    net.to_string(),
                    &source,
                    cx.line(n.span().start),
                ),
                None => cx.err(
                    n,
                    "cidrs.nets",
                    format!("`{}` is not a CIDR prefix with zero host bits", n.get_ref()),
                ),
            }
        }
    }
    for t in &raw.tls {
        let source = cx.source(&t.source, "tls.source");
        if t.sni.is_empty() && t.alpn.is_empty() && t.ja4.is_empty() {
            cx.err(&t.source, "tls", "give at least one of sni, alpn, ja4");
        }
        for n in &t.sni {
            if let Some(p) = cx.host_pattern(n, "tls.sni") {
                push(
                    RuleBody::Sni(p.clone()),
                    format!("sni {p}"),
                    &source,
                    cx.line(n.span().start),
                );
            }
        }
        for a in &t.alpn {
            let v = a.get_ref();
            if v.is_empty() || v.len() > 255 {
                cx.err(a, "tls.alpn", "an ALPN id is 1 to 255 bytes");
            } else {
                push(
                    RuleBody::Alpn(v.clone()),
                    format!("alpn {v}"),
                    &source,
                    cx.line(a.span().start),
                );
            }
        }
        for j in &t.ja4 {
            let v = j.get_ref().to_ascii_lowercase();
            if !valid_ja4(&v) {
                cx.err(
                    j,
                    "tls.ja4",
                    format!("`{}` is not a JA4 fingerprint (a_b_c)", j.get_ref()),
                );
            } else {
                push(
                    RuleBody::Ja4(v.clone()),
                    format!("ja4 {v}"),
                    &source,
                    cx.line(j.span().start),
                );
            }
        }
    }
    for h in &raw.http {
        let source = cx.source(&h.source, "http.source");
        let line = cx.line(h.source.span().start);
        let mut parts = Vec::new();
        let method = h.method.as_ref().map(|m| {
            let v = m.get_ref().trim().to_ascii_uppercase();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_uppercase()) {
                cx.err(
                    m,
                    "http.method",
                    format!("`{}` is not a method", m.get_ref()),
                );
            }
            parts.push(v.clone());
            v
        });
        let check_path =
            |p: &Option<Spanned<String>>, field: &str, cx: &mut Ctx, parts: &mut Vec<String>| {
                p.as_ref().map(|s| {
                    let v = s.get_ref().clone();
                    if !v.starts_with('/') || v.bytes().any(|b| b <= b' ' || b == 0x7f) {
                        cx.err(s, field, format!("`{v}` is not an absolute path"));
                    }
                    parts.push(format!("{} {v}", field.trim_start_matches("http.")));
                    v
                })
            };
        let path = check_path(&h.path, "http.path", &mut cx, &mut parts);
        let path_prefix = check_path(&h.path_prefix, "http.path_prefix", &mut cx, &mut parts);
        let mut headers = Vec::new();
        for hd in &h.headers {
            if let Some((c, shown)) = cx.header(hd, "http.headers") {
                headers.push(c);
                parts.push(shown);
            }
        }
        let mut body = Vec::new();
        for a in &h.body {
            if let Some((atom, shown)) = cx.atom(a, "http.body", window) {
                body.push(atom);
                parts.push(format!("body {shown}"));
            }
        }
        if parts.is_empty() {
            cx.err(&h.source, "http", "a rule needs at least one condition");
            continue;
        }
        if method.is_some()
            && path.is_none()
            && path_prefix.is_none()
            && headers.is_empty()
            && body.is_empty()
        {
            cx.err(
                &h.source,
                "http",
                "a method alone would match ordinary traffic",
            );
            continue;
        }
        push(
            RuleBody::Http(HttpSpec {
                method,
                path,
                path_prefix,
                headers,
                body,
            }),
            parts.join(" + "),
            &source,
            line,
        );
    }
    for p in &raw.payload {
        let source = cx.source(&p.source, "payload.source");
        let line = cx.line(p.source.span().start);
        let direction = match p.direction.as_ref().map(|d| d.get_ref().as_str()) {
            None | Some("client") => Direction::Client,
            Some("server") => Direction::Server,
            Some(other) => {
                if let Some(d) = &p.direction {
                    cx.err(
                        d,
                        "payload.direction",
                        format!("`{other}` is not client or server"),
                    );
                }
                continue;
            }
        };
        if p.atoms.is_empty() {
            cx.err(&p.source, "payload.match", "is empty");
            continue;
        }
        let mut atoms = Vec::new();
        let mut parts = Vec::new();
        for a in &p.atoms {
            if let Some((atom, shown)) = cx.atom(a, "payload.match", window) {
                atoms.push(atom);
                parts.push(shown);
            }
        }
        if atoms.len() != p.atoms.len() {
            continue;
        }
        let total: usize = atoms.iter().map(|a| a.bytes.len()).sum();
        if total < 3 {
            cx.err(
                &p.source,
                "payload.match",
                "fewer than 3 fixed bytes would match ordinary traffic",
            );
            continue;
        }
        let dir = if direction == Direction::Server {
            "server: "
        } else {
            ""
        };
        push(
            RuleBody::Payload(direction, atoms),
            format!("{dir}{}", parts.join(" + ")),
            &source,
            line,
        );
    }
    for d in &raw.downloads {
        let source = cx.source(&d.source, "downloads.source");
        if d.url_prefix.is_empty() && d.file_name.is_empty() && d.sha256.is_empty() {
            cx.err(
                &d.source,
                "downloads",
                "give at least one of url_prefix, file_name, sha256",
            );
        }
        for u in &d.url_prefix {
            let v = u.get_ref().trim().to_ascii_lowercase();
            let host = v.split('/').next().unwrap_or("");
            if v.contains("://") || !v.contains('/') || normalize_host(host).is_none() {
                cx.err(
                    u,
                    "downloads.url_prefix",
                    format!("`{}` is not host/path (no scheme)", u.get_ref()),
                );
            } else {
                push(
                    RuleBody::Download(DownloadSpec::UrlPrefix(v.clone())),
                    format!("url {v}"),
                    &source,
                    cx.line(u.span().start),
                );
            }
        }
        for n in &d.file_name {
            let v = n.get_ref().trim().to_string();
            if v.is_empty() || v.contains('/') {
                cx.err(
                    n,
                    "downloads.file_name",
                    format!("`{v}` is not a file name"),
                );
            } else {
                push(
                    RuleBody::Download(DownloadSpec::FileName(v.to_ascii_lowercase())),
                    format!("file {v}"),
                    &source,
                    cx.line(n.span().start),
                );
            }
        }
        for s in &d.sha256 {
            match parse_hex(s.get_ref()).and_then(|b| <[u8; 32]>::try_from(b).ok()) {
                Some(digest) => push(
                    RuleBody::Download(DownloadSpec::Sha256(digest)),
                    format!("sha256 {}", s.get_ref().to_ascii_lowercase()),
                    &source,
                    cx.line(s.span().start),
                ),
                None => cx.err(s, "downloads.sha256", "is not 64 hex digits"),
            }
        }
    }

    let blocks = raw.hosts.len()
        + raw.ports.len()
        + raw.cidrs.len()
        + raw.tls.len()
        + raw.http.len()
        + raw.payload.len()
        + raw.downloads.len();
    if blocks == 0 {
        cx.err(&raw.id, "-", "the file has no rules");
    }
    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    Ok(LoadedApp {
        id,
        name: raw.name.into_inner(),
        vendor: raw.vendor.map(Spanned::into_inner).unwrap_or_default(),
        category,
        notes: raw.notes.unwrap_or_default(),
        file: f.name.clone(),
        rules,
    })
}

/// `t13d1516h2_8daaf6152771_e5627efa2ab1`: 10 characters, 12 hex, 12 hex.
fn valid_ja4(s: &str) -> bool {
    let parts: Vec<&str> = s.split('_').collect();
    parts.len() == 3
        && parts[0].len() == 10
        && parts[0].is_ascii()
        && parts[1..]
            .iter()
            .all(|p| p.len() == 12 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}
