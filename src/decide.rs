//! Every decision chatwall makes about a flow, without sockets, clocks or
//! logs: the proxy's front ends, `classify host|url|pcap` and the benches
//! all call these, so a decision exists once.
//!
//! - [`destination`] and [`name`], [`address`]: what a name, an address and
//!   a port say before any byte (host, CIDR, port rules, the allow-list and
//!   the denied ranges);
//! - [`FirstBytes`]: what a tunnel's first client bytes are (a TLS
//!   ClientHello, HTTP/1.x, anything else), driven by the caller with
//!   [`Cue`]s (more bytes, the client ended, the upstream spoke first, the
//!   deadline passed);
//! - [`Requests`]: HTTP/1.x inside a tunnel (or on a redirected port 80)
//!   followed request by request from the bytes as they pass, each request
//!   decided before a byte of it is forwarded;
//! - [`payload`]: payload signatures on the first bytes of a direction.
//!
//! Verdicts fold into [`Findings`]: a block ends the flow as a
//! [`Refusal`], the first monitor verdict is kept, and the first detection
//! the policy let pass is remembered for reports; a detection of an IM app
//! takes the place of a kept circumvention one (a public resolver's name
//! on an IM port is the IM app's flow).
//!
//! It leaves IO (reading, deadlines, connecting, writing the refusal) to
//! `proxy` and `replay`, and the facts about bytes to `classify`.
use std::net::{IpAddr, SocketAddr};

use crate::classify::h1::{self, Asked, Body, Following, Lost, Progress};
use crate::classify::http::{HeadOutcome, HeadView};
use crate::classify::payload::Direction;
use crate::classify::sniff::{sniff, Sniff};
use crate::classify::tls::{inspect_client_hello_with, ClientHello, Hello};
use crate::classify::{Detection, Reason, UNIDENTIFIED};
use crate::config::Select;
use crate::engine::Engine;
use crate::policy::{Verdict, Who};

/// Why a flow (or one request of it) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The policy blocks it on this detection.
    Blocked(Detection),
    /// The destination is in `access.deny_destinations` (or unspecified).
    DeniedDestination(IpAddr),
    /// The client closed its side before sending a byte (not a policy
    /// decision: the proxy logs an error and resets).
    ClosedBeforeSending,
    /// A request that already passed through this proxy (its `Via` names
    /// this instance): a forwarding loop.
    Loop,
    /// A request a server must answer with 400 (RFC 9112 §3.2, §6.3): an
    /// invalid or repeated Host, framing that servers read differently, a
    /// head too large or with too many fields. Nothing of it is forwarded.
    Malformed(&'static str),
}

/// A flow's findings so far: a block ends the flow, the first monitor
/// verdict is kept, and (for reports) the first detection the policy let
/// pass. A circumvention app is never the app of a flow that an IM app's
/// rule also names: a later IM detection replaces a kept circumvention one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Findings {
    pub monitor: Option<Verdict>,
    pub allowed: Option<Detection>,
}

impl Findings {
    /// Decide one finding (or its absence) for `who`.
    pub fn decide(
        &mut self,
        engine: &Engine,
        who: &Who,
        found: Option<Detection>,
    ) -> Result<(), Refusal> {
        let circumvention = |d: &Detection| {
            engine
                .signatures
                .app(d.app)
                .is_some_and(|a| a.category == crate::signatures::load::CIRCUMVENTION)
        };
        // Keep the first, unless it is circumvention and the new one is not.
        let takes_over = |kept: Option<&Detection>, new: &Detection| match kept {
            None => true,
            Some(old) => circumvention(old) && !circumvention(new),
        };
        match engine.policy.decide_for(who, found) {
            Verdict::Block(d) => Err(Refusal::Blocked(d)),
            m @ Verdict::Monitor(d) => {
                if takes_over(self.monitor.as_ref().and_then(Verdict::detection), &d) {
                    self.monitor = Some(m);
                }
                Ok(())
            }
            Verdict::Allow => {
                if let Some(d) = found {
                    if takes_over(self.allowed.as_ref(), &d) {
                        self.allowed = Some(d);
                    }
                }
                Ok(())
            }
        }
    }

    /// The verdict of a flow that was not refused.
    pub fn verdict(&self) -> Verdict {
        self.monitor.unwrap_or(Verdict::Allow)
    }
}

/// What a name (or address literal) and port say, before any lookup.
/// `Ok(true)`: the name is on the allow-list, and nothing else about the
/// flow is refused on signatures.
pub fn name(
    engine: &Engine,
    who: &Who,
    host: &str,
    port: u16,
    findings: &mut Findings,
) -> Result<bool, Refusal> {
    let Some(found) = engine.name_evidence(host, port) else {
        return Ok(true);
    };
    for d in found {
        findings.decide(engine, who, d)?;
    }
    Ok(false)
}

/// The destination of a flow whose address chatwall does not know: a
/// tunnel through a parent proxy to a name, which the parent resolves. Its
/// requests are decided on their names and rules, without the address
/// check (`request_head`). An unspecified destination a client asks for
/// is refused by `address` before any flow is set up with it.
pub fn unresolved(port: u16) -> SocketAddr {
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port)
}

/// One address a flow connects to (a literal, each address a name resolves
/// to, or a redirected connection's original destination): the denied
/// ranges, then the CIDR rules. `is_self`: the address is one of the
/// proxy's own listeners, which only the proxy knows.
pub fn address(
    engine: &Engine,
    who: &Who,
    dst: SocketAddr,
    name_allowlisted: bool,
    is_self: bool,
    findings: &mut Findings,
) -> Result<(), Refusal> {
    let ip = crate::classify::addr::canonical(dst.ip());
    if is_self || engine.config.deny_destinations.contains(ip) || ip.is_unspecified() {
        return Err(Refusal::DeniedDestination(dst.ip()));
    }
    if name_allowlisted || engine.policy.allows_addr(dst.ip()) {
        return Ok(());
    }
    findings.decide(engine, who, engine.signatures.classify_ip(dst.ip()))
}

/// The destination of a redirected connection, before any byte: the
/// address as a name (allow-list, port rules), then as an address.
/// `Ok(true)`: the address is on the allow-list.
pub fn destination(
    engine: &Engine,
    who: &Who,
    dst: SocketAddr,
    is_self: bool,
    findings: &mut Findings,
) -> Result<bool, Refusal> {
    let allowlisted = name(engine, who, &dst.ip().to_string(), dst.port(), findings)?;
    address(engine, who, dst, allowlisted, is_self, findings)?;
    Ok(allowlisted)
}

/// SNI, ALPN, JA4 and ECH of a ClientHello.
pub fn hello(
    engine: &Engine,
    who: &Who,
    hello: &ClientHello,
    findings: &mut Findings,
) -> Result<(), Refusal> {
    for d in engine.hello_evidence(hello) {
        findings.decide(engine, who, d)?;
    }
    Ok(())
}

/// The names of a TLS 1.2 (or older) server's certificate, for a flow
/// whose ClientHello named no server: each name as an SNI would be
/// (reason `cert`). Only there: with an SNI, the SNI decided, and a
/// certificate shared by many services would otherwise name the flow after
/// every one of them.
pub fn server_certificate(
    engine: &Engine,
    who: &Who,
    names: &[String],
    findings: &mut Findings,
) -> Result<(), Refusal> {
    for d in engine.cert_evidence(names) {
        findings.decide(engine, who, d)?;
    }
    Ok(())
}

/// A payload match in the first bytes of one direction, if any.
pub fn payload_detection(engine: &Engine, dir: Direction, buf: &[u8]) -> Option<Detection> {
    let window = engine.config.inspect_bytes;
    let outcome = engine
        .signatures
        .payload()
        .classify(dir, &buf[..buf.len().min(window)]);
    engine.signatures.payload_detection(outcome)
}

/// Payload signatures on the first bytes of both directions of a relayed
/// flow: the client's, then the upstream's.
pub fn payload(
    engine: &Engine,
    who: &Who,
    up: &[u8],
    down: &[u8],
    findings: &mut Findings,
) -> Result<(), Refusal> {
    findings.decide(
        engine,
        who,
        payload_detection(engine, Direction::Client, up),
    )?;
    if engine.signatures.payload().reach(Direction::Server) > 0 {
        findings.decide(
            engine,
            who,
            payload_detection(engine, Direction::Server, down),
        )?;
    }
    Ok(())
}

/// Not TLS on 443, not HTTP on 80: the knob decides and a payload signature
/// only names the app; an app whose own policy is stricter than the knob is
/// still refused. Nothing is refused for an allow-listed destination.
pub fn generic(
    engine: &Engine,
    who: &Who,
    allowlisted: bool,
    buf: &[u8],
    reason: Reason,
    findings: &mut Findings,
) -> Result<(), Refusal> {
    if allowlisted {
        return Ok(());
    }
    let found = payload_detection(engine, Direction::Client, buf);
    let d = Detection {
        app: found.map_or(UNIDENTIFIED, |d| d.app),
        rule: found.and_then(|d| d.rule),
        reason,
        offset: found.and_then(|d| d.offset),
        exception: None,
    };
    if let Verdict::Block(d) = engine.policy.decide_for(who, Some(d)) {
        return Err(Refusal::Blocked(d));
    }
    findings.decide(engine, who, found)?;
    findings.decide(engine, who, Some(d))
}

/// The generic rule for a destination port, if it has one: 443 must be
/// TLS, 80 must be HTTP.
pub fn generic_for_port(
    engine: &Engine,
    who: &Who,
    port: u16,
    allowlisted: bool,
    buf: &[u8],
    findings: &mut Findings,
) -> Result<(), Refusal> {
    match port {
        443 => generic(engine, who, allowlisted, buf, Reason::NonTls, findings),
        80 => generic(engine, who, allowlisted, buf, Reason::NonHttp, findings),
        _ => Ok(()),
    }
}

/// Bytes of a hashed download held back until its digest is known: what
/// is cut off when the digest matches (an installer's tail holds its
/// archive directory or signature; without it the file is unusable).
pub const DIGEST_HOLD_BACK: usize = 64 * 1024;
/// Bodies longer than this are not hashed (they pass on as they come).
pub const DIGEST_MAX: u64 = 1 << 30;

/// A request whose answer is hashed against `[[downloads]] sha256` rules
/// (a GET, with such rules loaded): its URL key (host and target), after
/// refusing it when its body already matched once.
pub fn download(
    engine: &Engine,
    who: &Who,
    get: bool,
    host: &str,
    target: &str,
    findings: &mut Findings,
) -> Result<Option<Box<str>>, Refusal> {
    if !get || !engine.signatures.has_sha256() {
        return Ok(None);
    }
    let url: Box<str> = format!("{host}{target}").into();
    if let Some(hit) = engine.blocked_downloads.get(&url) {
        findings.decide(engine, who, Some(hit))?;
    }
    Ok(Some(url))
}

/// A download's body digest: refused, monitored or allowed as the policy
/// says; a refusal is remembered for the URL.
pub fn download_digest(
    engine: &Engine,
    who: &Who,
    url: &str,
    digest: &[u8; 32],
    findings: &mut Findings,
) -> Result<(), Refusal> {
    let refused = findings.decide(engine, who, engine.signatures.classify_sha256(digest));
    if let Err(Refusal::Blocked(d)) = refused {
        engine.blocked_downloads.insert(url, d);
    }
    refused
}

/// Whether a TLS flow whose ClientHello passed may be decrypted
/// (`[tls_inspect]`): inspection on, a listed client, a server name that
/// `decrypt` selects and no never list names (nor the server's address).
pub fn decrypt(engine: &Engine, who: &Who, sni: &str, server: Option<IpAddr>) -> bool {
    let t = &engine.config.tls_inspect;
    if !t.enabled || !inspected_client(engine, who) {
        return false;
    }
    let Some(name) = crate::classify::host::normalize_host(sni) else {
        return false;
    };
    !never_decrypted(engine, &name, server) && t.decrypt.iter().any(|s| selects(engine, s, &name))
}

/// Whether a refused TLS flow gets the 403 page over chatwall's own
/// certificate (a browser shows why) instead of a reset: inspection on,
/// `block_page`, a listed client, and a name on no never list (a pinned
/// client would fail the handshake anyway).
pub fn block_page_over_tls(engine: &Engine, who: &Who, sni: &str) -> bool {
    let t = &engine.config.tls_inspect;
    if !t.enabled || !t.block_page || !inspected_client(engine, who) {
        return false;
    }
    crate::classify::host::normalize_host(sni).is_some_and(|n| !never_decrypted(engine, &n, None))
}

/// A client whose flows may be decrypted: by address or by user.
pub fn inspected_client(engine: &Engine, who: &Who) -> bool {
    let t = &engine.config.tls_inspect;
    t.clients.contains(who.ip)
        || who
            .user
            .as_deref()
            .is_some_and(|u| t.client_users.iter().any(|c| c == u))
}

/// On the never list (the operator's or the built-in one).
pub fn never_decrypted(engine: &Engine, name: &str, server: Option<IpAddr>) -> bool {
    engine.config.tls_inspect.never.iter().any(|s| match s {
        Select::Net(n) => {
            server.is_some_and(|ip| n.contains(&crate::classify::addr::canonical(ip)))
        }
        other => selects(engine, other, name),
    })
}

/// A (normalised) name that `[tenant_restrictions]` sets fields for.
pub fn tenant_host(engine: &Engine, name: &str) -> bool {
    engine
        .config
        .tenant_restrictions
        .for_host(name)
        .next()
        .is_some()
}

/// Whether one `decrypt`/`never` entry names this (normalised) server name.
fn selects(engine: &Engine, select: &Select, name: &str) -> bool {
    let app = || {
        engine
            .signatures
            .classify_host(name)
            .and_then(|d| engine.signatures.app(d.app))
    };
    match select {
        Select::Host(p) => p.matches(name),
        Select::App(id) => app().is_some_and(|a| &a.id == id),
        Select::Category(c) => app().is_some_and(|a| &a.category == c),
        Select::Tenant => tenant_host(engine, name),
        Select::Net(_) => false,
    }
}

/// Whether a certificate's DNS name covers a (normalised) host: equal
/// ignoring case, or a wildcard `*.example.com` standing for exactly one
/// label (RFC 6125 §6.4.3).
pub fn covers(cert_name: &str, host: &str) -> bool {
    match cert_name.strip_prefix("*.") {
        Some(rest) => host
            .split_once('.')
            .is_some_and(|(label, tail)| !label.is_empty() && tail.eq_ignore_ascii_case(rest)),
        None => cert_name.eq_ignore_ascii_case(host),
    }
}

/// What a tunnel's first bytes were decided to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum First {
    /// An allowed TLS ClientHello: relayed without further inspection.
    Tls,
    /// HTTP/1.x: followed and decided request by request ([`Requests`]).
    Http,
    /// Anything else: payload signatures in both directions while relaying.
    Payload,
}

/// What makes the first-bytes inspection look again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cue {
    /// More client bytes arrived; the buffer holds all of them so far.
    Bytes,
    /// The client ended its side; the buffer is all it sent.
    ClientEnded,
    /// The upstream spoke while the client had sent nothing.
    UpstreamFirst,
    /// The first-bytes deadline passed.
    Deadline,
}

/// The first-bytes inspection of one tunnel, driven by its caller: call
/// [`FirstBytes::step`] with every byte the client has sent so far, each
/// time something happens, until it answers.
///
/// A client that says nothing is not a reason to fail open, nor to fail
/// closed: server-speaks-first protocols (SMTP, IRC banners) must work.
/// Only where the protocol is known to speak first (port 443, whose
/// `non_tls_on_443` knob applies) does silence past the deadline refuse.
pub struct FirstBytes<'e> {
    engine: &'e Engine,
    who: Who,
    /// The destination port: 443 and 80 have their own knobs.
    port: u16,
    /// The destination is on the allow-list: generic checks do not apply.
    allowlisted: bool,
    /// Compute JA4 (for rules that match on it, or a log that records it).
    want_ja4: bool,
    /// The ClientHello, once one was parsed.
    pub hello: Option<Box<ClientHello>>,
}

impl<'e> FirstBytes<'e> {
    pub fn new(engine: &'e Engine, who: Who, port: u16, allowlisted: bool, want_ja4: bool) -> Self {
        FirstBytes {
            engine,
            who,
            port,
            allowlisted,
            want_ja4,
            hello: None,
        }
    }

    /// Decide on `buf`, the client's bytes so far. `Ok(None)`: more bytes
    /// are needed. `Cue::UpstreamFirst` is only meaningful with an empty
    /// buffer.
    pub fn step(
        &mut self,
        buf: &[u8],
        cue: Cue,
        findings: &mut Findings,
    ) -> Result<Option<First>, Refusal> {
        let (engine, who) = (self.engine, &self.who);
        match cue {
            Cue::Bytes => {
                match sniff(buf) {
                    Sniff::NeedMore => {}
                    Sniff::Tls => match inspect_client_hello_with(buf, self.want_ja4) {
                        Hello::NeedMore { .. } => {}
                        Hello::Complete(h) => {
                            // Kept before deciding, so a refusal can name it.
                            let h = &**self.hello.insert(h);
                            hello(engine, who, h, findings)?;
                            if self.port == 80 {
                                self.generic(buf, Reason::NonHttp, findings)?;
                            }
                            return Ok(Some(First::Tls));
                        }
                        Hello::NotTls => return self.other_protocol(buf, findings).map(Some),
                    },
                    Sniff::Http => {
                        if self.port == 443 {
                            self.generic(buf, Reason::NonTls, findings)?;
                        }
                        return Ok(Some(First::Http));
                    }
                    Sniff::Other => return self.other_protocol(buf, findings).map(Some),
                }
                if buf.len() >= engine.config.inspect_bytes {
                    if sniff(buf) == Sniff::Tls {
                        // A ClientHello that does not fit the window (spread
                        // over tiny records, say) is an evasion, not a hello:
                        // whatever the port, the TLS checks could not run.
                        self.generic(buf, Reason::NonTls, findings)?;
                    }
                    return self.other_protocol(buf, findings).map(Some);
                }
                Ok(None)
            }
            Cue::ClientEnded if buf.is_empty() => Err(Refusal::ClosedBeforeSending),
            // Ended mid-way: decide on what came.
            Cue::ClientEnded => self.other_protocol(buf, findings).map(Some),
            Cue::UpstreamFirst => {
                // The server speaks first (SMTP, IRC, POP3...). TLS and HTTP
                // servers never do.
                if self.port == 443 {
                    self.generic(buf, Reason::NonTls, findings)?;
                }
                Ok(Some(First::Payload))
            }
            Cue::Deadline => {
                if self.port == 443 {
                    // TLS clients speak first: silence (or a hello that never
                    // completes) is not TLS.
                    self.generic(buf, Reason::NonTls, findings)?;
                }
                if !buf.is_empty() && sniff(buf) == Sniff::Tls {
                    // A ClientHello that started but never completed: the
                    // TLS checks could not run, whatever the port.
                    self.generic(buf, Reason::NonTls, findings)?;
                    return self.other_protocol(buf, findings).map(Some);
                }
                Ok(Some(First::Payload))
            }
        }
    }

    /// Neither TLS nor HTTP.
    fn other_protocol(&self, buf: &[u8], findings: &mut Findings) -> Result<First, Refusal> {
        generic_for_port(
            self.engine,
            &self.who,
            self.port,
            self.allowlisted,
            buf,
            findings,
        )?;
        Ok(First::Payload)
    }

    fn generic(&self, buf: &[u8], reason: Reason, findings: &mut Findings) -> Result<(), Refusal> {
        generic(
            self.engine,
            &self.who,
            self.allowlisted,
            buf,
            reason,
            findings,
        )
    }
}

/// The host a request names: the Host header's name, else the
/// absolute-form target's host, else the address connected to.
pub fn request_host(req: &httparse::Request<'_, '_>, dst: SocketAddr) -> String {
    let from_header = req
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("host"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.trim().parse::<http::uri::Authority>().ok())
        .map(|a| {
            a.host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        })
        .filter(|h| !h.is_empty());
    let from_target = || {
        req.path
            .and_then(|t| t.parse::<http::Uri>().ok())
            .and_then(|u| u.host().map(str::to_string))
            .filter(|h| !h.is_empty())
    };
    from_header
        .or_else(from_target)
        .unwrap_or_else(|| dst.ip().to_string())
}

/// Does `buf` start with an HTTP/1.x request line (a method token, a
/// target, the version)? Leading empty lines are skipped, as servers do.
fn request_line(buf: &[u8]) -> bool {
    let mut none = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut none);
    matches!(req.parse(buf), Ok(_) | Err(httparse::Error::TooManyHeaders)) && req.version.is_some()
}

/// The hosts a request names: the target's (absolute-form, or a CONNECT's
/// authority), which servers use first (RFC 9112 §3.2.2), and the Host
/// field's. `primary` is the one logged and decided with the address;
/// `other`, a different second name, is decided too.
struct RequestHosts {
    primary: String,
    other: Option<String>,
}

impl RequestHosts {
    fn of(req: &httparse::Request<'_, '_>, dst: SocketAddr) -> Result<RequestHosts, &'static str> {
        let mut fields = req
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("host"));
        let field = fields.next();
        if fields.next().is_some() {
            // RFC 9112 §3.2: a server must answer 400.
            return Err("more than one Host field");
        }
        let from_field = match field {
            None => None,
            Some(h) => Some(host_of_authority(h.value.trim_ascii()).ok_or("invalid Host field")?),
        };
        let target = req.path.unwrap_or_default();
        let from_target = if req.method == Some("CONNECT") {
            Some(host_of_authority(target.as_bytes()).ok_or("invalid CONNECT target")?)
        } else if !target.starts_with('/') && target.contains("://") {
            let uri: http::Uri = target.parse().map_err(|_| "invalid request target")?;
            let a = uri.authority().ok_or("invalid request target")?;
            Some(host_of_authority(a.as_str().as_bytes()).ok_or("invalid request target")?)
        } else {
            None
        };
        Ok(match (from_target, from_field) {
            (Some(t), Some(f)) => {
                let other = (!t.eq_ignore_ascii_case(&f)).then_some(f);
                RequestHosts { primary: t, other }
            }
            (Some(one), None) | (None, Some(one)) => RequestHosts {
                primary: one,
                other: None,
            },
            (None, None) => RequestHosts {
                primary: dst.ip().to_string(),
                other: None,
            },
        })
    }
}

/// The host of `host[:port]` (RFC 9110 §7.2; an IPv6 literal in brackets),
/// normalised as names are matched; `None` for anything else: a second
/// colon, userinfo, a path, spaces, bytes that are not a host.
fn host_of_authority(v: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(v).ok()?;
    let port_ok = |p: &str| {
        p.is_empty()
            || (p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok())
    };
    if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        let port = match after {
            "" => "",
            _ => after.strip_prefix(':').filter(|p| !p.is_empty())?,
        };
        return (port_ok(port))
            .then(|| v6.parse::<std::net::Ipv6Addr>().ok())
            .flatten()
            .map(|ip| ip.to_string());
    }
    let (host, port) = match text.split_once(':') {
        Some((h, p)) if !p.is_empty() => (h, p),
        Some(_) => return None,
        None => (text, ""),
    };
    if host.is_empty() || !port_ok(port) {
        return None;
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Some(host.to_string());
    }
    crate::classify::host::normalize_host(host)
}

/// What the head of a request needs before it can be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadDecision {
    /// Decided: it may pass.
    Pass,
    /// Body rules decide: this many bytes of the decoded body are enough.
    NeedBody { window: usize },
}

/// One request head to a destination: the name and port, the address,
/// then the request rules. The connection's address is checked with each
/// request, since a redirected port-80 flow to an IM address gets the 403
/// page request by request.
pub fn request_head(
    engine: &Engine,
    who: &Who,
    dst: SocketAddr,
    host: &str,
    head: &dyn HeadView,
    has_body: bool,
    findings: &mut Findings,
) -> Result<HeadDecision, Refusal> {
    let allowlisted = name(engine, who, host, dst.port(), findings)?;
    if dst != unresolved(dst.port()) {
        address(engine, who, dst, allowlisted, false, findings)?;
    }
    if allowlisted {
        return Ok(HeadDecision::Pass);
    }
    request_rules(engine, who, host, head, has_body, findings)
}

/// The rules of a request to a destination that is not on the allow-list:
/// installer downloads, then the HTTP head rules.
pub fn request_rules(
    engine: &Engine,
    who: &Who,
    host: &str,
    head: &dyn HeadView,
    has_body: bool,
    findings: &mut Findings,
) -> Result<HeadDecision, Refusal> {
    let sigs = &engine.signatures;
    findings.decide(engine, who, sigs.classify_download(host, head.path()))?;
    match sigs.http().classify_head(head, has_body) {
        HeadOutcome::Match(rule) => {
            findings.decide(engine, who, Some(sigs.http_detection(rule)))?;
            Ok(HeadDecision::Pass)
        }
        HeadOutcome::NeedBody { window } => Ok(HeadDecision::NeedBody { window }),
        HeadOutcome::NoMatch => Ok(HeadDecision::Pass),
    }
}

/// The body rules of a request whose head asked for its body.
pub fn request_body(
    engine: &Engine,
    who: &Who,
    head: &dyn HeadView,
    prefix: &[u8],
    findings: &mut Findings,
) -> Result<(), Refusal> {
    let sigs = &engine.signatures;
    let hit = sigs.http().classify_body(head, prefix);
    findings.decide(engine, who, hit.map(|r| sigs.http_detection(r)))
}

/// A request as the log and the response follower need it.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// How its response is framed.
    pub asked: Asked,
    /// The host it names (Host field, target, or the address).
    pub host: String,
    /// Method and target, for the log (empty unless asked for).
    pub method: String,
    pub target: String,
    /// The head to send instead of the client's (tenant-restriction
    /// fields set); `None`: the client's bytes as they are.
    pub head: Option<Box<[u8]>>,
    /// The vendor whose tenant-restriction fields `head` sets.
    pub tenant: Option<&'static str>,
    /// A GET whose response body is hashed against `[[downloads]] sha256`
    /// rules: its URL (host and target), the key of refusals on retry.
    pub download: Option<Box<str>>,
}

/// What to do with the client's bytes at the front of the buffer.
#[derive(Debug)]
pub enum Step {
    /// Read more client bytes (the buffer keeps everything not forwarded).
    NeedMore,
    /// Forward the first `len` bytes. `request` is set when they start a
    /// new request, whose head was decided.
    Forward {
        len: usize,
        request: Option<Box<RequestInfo>>,
    },
    /// Refuse the request at the front of the buffer: not one byte of it
    /// may be forwarded.
    Refuse {
        refusal: Refusal,
        request: Box<RequestInfo>,
    },
    /// Refuse the request whose head was already forwarded (it waited for
    /// `100 Continue`) on its body: no page can be framed while the server
    /// answers it, so the tunnel is reset; none of the body was forwarded.
    Reset {
        refusal: Refusal,
        request: Box<RequestInfo>,
    },
    /// From the front of the buffer on the stream is no longer HTTP (after
    /// an upgrade or a CONNECT): relay it opaquely, payload signatures on.
    Opaque,
    /// The stream cannot be followed from the front of the buffer on:
    /// the generic rules apply to what follows.
    Lost(Lost),
}

/// What wakes [`Requests::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReqCue {
    /// More bytes arrived.
    Bytes,
    /// The wait for a body's first bytes is over (the hold deadline).
    Deadline,
    /// The client ended its side; the buffer is all that is left.
    Ended,
}

#[derive(Debug)]
enum ReqState {
    /// At the start of a request head.
    Head,
    /// A decided head of `head_len` bytes waits for the start of its body.
    Held {
        head_len: usize,
        body: Body,
        window: usize,
        switch: bool,
        request: Box<RequestInfo>,
    },
    /// A forwarded head (its client waits for `100 Continue`) whose body
    /// is held until the body rules decide; the head is kept for them.
    BodyHeld {
        head: Box<[u8]>,
        body: Body,
        window: usize,
        switch: bool,
        request: Box<RequestInfo>,
    },
    /// Inside a forwarded body; `switch`: a protocol switch was asked for.
    Body { body: Following, switch: bool },
    /// A request that asked to switch protocols (Upgrade, CONNECT) went
    /// on: nothing more passes until its response says whether the server
    /// switched (then opaque) or not (then HTTP goes on).
    AwaitSwitch,
    /// The response to a switch could not be read.
    Unconfirmed,
    /// Not HTTP any more.
    Opaque,
}

/// Limits of request following.
#[derive(Debug, Clone, Copy)]
pub struct ReqLimits {
    /// The largest request head (request line and fields).
    pub max_head: usize,
    /// The most header fields.
    pub max_headers: usize,
}

/// HTTP/1.x requests from a client to one destination, followed from the
/// bytes as they pass and decided one by one; nothing is re-encoded. The
/// caller keeps the bytes not forwarded yet in one buffer and calls
/// [`Requests::step`] with it until it answers something other than
/// `NeedMore`, acts on the answer, drops the forwarded bytes, and goes on.
pub struct Requests<'e> {
    engine: &'e Engine,
    who: Who,
    dst: SocketAddr,
    limits: ReqLimits,
    /// The `Via` token naming this instance: a request carrying it is a
    /// loop.
    via: Option<&'e [u8]>,
    /// Fill method and target for logs.
    want_log: bool,
    state: ReqState,
    /// Bytes of the current head parsed so far without finding its end.
    head_scanned: usize,
    /// Inside a decrypted flow: the names the server's certificate covers
    /// (a request for another host is domain fronting).
    cover: Option<Box<[String]>>,
    /// Inside a decrypted flow: set tenant-restriction fields.
    tenant: bool,
}

/// A partial head is parsed again after this many more bytes even without
/// a possible end, so that bytes that are not HTTP are found early.
const RESCAN_BYTES: usize = 1024;

impl<'e> Requests<'e> {
    pub fn new(
        engine: &'e Engine,
        who: Who,
        dst: SocketAddr,
        via: Option<&'e [u8]>,
        want_log: bool,
    ) -> Self {
        let limits = &engine.config.limits;
        Requests {
            engine,
            who,
            dst,
            limits: ReqLimits {
                max_head: limits.max_request_head_bytes,
                max_headers: limits.max_headers.max(1),
            },
            via,
            want_log,
            state: ReqState::Head,
            head_scanned: 0,
            cover: None,
            tenant: false,
        }
    }

    /// Set the `[tenant_restrictions]` fields on the vendors' sign-in
    /// requests (a decrypted flow).
    pub fn set_tenant_fields(&mut self) {
        self.tenant = !self.engine.config.tenant_restrictions.is_empty();
    }

    /// Requests inside a decrypted flow: each must name a host that
    /// `names` (the server certificate's DNS names) covers.
    pub fn covered_by(&mut self, names: Vec<String>) {
        self.cover = Some(names.into_boxed_slice());
    }

    /// Is a decided head waiting for its body's start (under the hold
    /// deadline)?
    pub fn holding(&self) -> bool {
        matches!(self.state, ReqState::Held { .. })
    }

    /// Does the stream wait for the response to a protocol switch?
    pub fn awaiting_switch(&self) -> bool {
        matches!(self.state, ReqState::AwaitSwitch)
    }

    /// What the response to the awaited switch said: `Some(true)` the
    /// server switched (101, or 2xx to CONNECT), `Some(false)` it answered
    /// otherwise and HTTP goes on, `None` it could not be read.
    pub fn switched(&mut self, outcome: Option<bool>) {
        if self.awaiting_switch() {
            self.state = match outcome {
                Some(true) => ReqState::Opaque,
                Some(false) => ReqState::Head,
                None => ReqState::Unconfirmed,
            };
        }
    }

    /// Look at `buf`, the client's bytes not forwarded yet.
    pub fn step(&mut self, buf: &[u8], cue: ReqCue, findings: &mut Findings) -> Step {
        match &mut self.state {
            ReqState::Opaque => Step::Opaque,
            ReqState::Body { body, switch } => {
                if buf.is_empty() {
                    return Step::NeedMore;
                }
                match body.advance(buf, &mut |_| {}) {
                    Ok(Progress::More) => Step::Forward {
                        len: buf.len(),
                        request: None,
                    },
                    Ok(Progress::Ended(n)) => {
                        self.state = if *switch {
                            ReqState::AwaitSwitch
                        } else {
                            ReqState::Head
                        };
                        Step::Forward {
                            len: n,
                            request: None,
                        }
                    }
                    // The head went on; its body's framing broke: nothing
                    // more of it may pass, and no page fits.
                    Err(why) => Step::Reset {
                        refusal: Refusal::Malformed(why),
                        request: Box::default(),
                    },
                }
            }
            ReqState::AwaitSwitch => Step::NeedMore,
            ReqState::Unconfirmed => Step::Lost("a protocol switch that cannot be confirmed"),
            ReqState::Held { .. } => self.held(buf, cue, findings),
            ReqState::BodyHeld { .. } => self.body_held(buf, cue, findings),
            ReqState::Head => self.head(buf, cue, findings),
        }
    }

    /// At the start of a request.
    fn head(&mut self, buf: &[u8], cue: ReqCue, findings: &mut Findings) -> Step {
        if buf.is_empty() {
            return Step::NeedMore;
        }
        // A head dripped a few bytes at a time is parsed again only once
        // its end may be there (or enough came to find an error), so its
        // cost stays linear in its length.
        let seen = self.head_scanned;
        let fresh = &buf[seen.saturating_sub(3).min(buf.len())..];
        let may_end =
            fresh.windows(2).any(|w| w == b"\n\n") || fresh.windows(3).any(|w| w == b"\n\r\n");
        if seen > 0
            && !may_end
            && buf.len() < seen + RESCAN_BYTES
            && buf.len() <= self.limits.max_head
            && cue != ReqCue::Ended
        {
            return Step::NeedMore;
        }
        self.head_scanned = buf.len();
        let malformed = |why| Step::Refuse {
            refusal: Refusal::Malformed(why),
            request: Box::default(),
        };
        let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut req = httparse::Request::new(&mut headers);
        let head_len = match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) if n <= self.limits.max_head => n,
            Ok(httparse::Status::Complete(_)) => return malformed("request head too large"),
            Ok(httparse::Status::Partial) if buf.len() > self.limits.max_head => {
                return malformed("request head too large")
            }
            Ok(httparse::Status::Partial) if cue == ReqCue::Ended => {
                return Step::Lost("the client ended inside a request head")
            }
            Ok(httparse::Status::Partial) => return Step::NeedMore,
            Err(httparse::Error::TooManyHeaders) => return malformed("too many header fields"),
            // A request line followed by fields httparse refuses (a space
            // before the colon, a bad name): servers differ on such heads
            // (some skip the field), so it is refused, not passed on.
            Err(_) if request_line(buf) => return malformed("malformed request head"),
            Err(_) => return Step::Lost("not an HTTP/1.x request"),
        };
        let connect = req.method == Some("CONNECT");
        let switch = connect || h1::is_upgrade(&req);
        let hosts = match RequestHosts::of(&req, self.dst) {
            Ok(h) => h,
            Err(why) => return malformed(why),
        };
        let request = Box::new(RequestInfo {
            asked: Asked {
                head: req.method == Some("HEAD"),
                connect,
                upgrade: switch && !connect,
            },
            method: if self.want_log {
                req.method.unwrap_or_default().to_string()
            } else {
                String::new()
            },
            target: if self.want_log {
                req.path.unwrap_or_default().to_string()
            } else {
                String::new()
            },
            host: hosts.primary,
            head: None,
            tenant: None,
            download: None,
        });
        if let Some(via) = self.via {
            let ours = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("via"))
                .any(|h| h.value.windows(via.len().max(1)).any(|w| w == via));
            if ours {
                return Step::Refuse {
                    refusal: Refusal::Loop,
                    request,
                };
            }
        }
        // Framing a server would refuse is refused with 400, but only once
        // the request's names and rules had their say (an IM request with
        // odd framing is still the IM request).
        let framing = h1::request_body(&req);
        let body = *framing.as_ref().unwrap_or(&Body::None);
        let (engine, who) = (self.engine, &self.who);
        let decided = request_head(
            engine,
            who,
            self.dst,
            &request.host,
            &req,
            body != Body::None,
            findings,
        )
        .and_then(|d| {
            // The Host field, where the target names another host: both
            // are decided (servers differ on which one they use).
            if let Some(other) = hosts.other.as_deref() {
                name(engine, who, other, self.dst.port(), findings)?;
            }
            if let Some(cover) = self.cover.as_deref() {
                let fronted = std::iter::once(request.host.as_str())
                    .chain(hosts.other.as_deref())
                    .any(|h| !cover.iter().any(|c| covers(c, h)));
                if fronted {
                    findings.decide(
                        engine,
                        who,
                        Some(Detection {
                            app: UNIDENTIFIED,
                            rule: None,
                            reason: Reason::Fronting,
                            offset: None,
                            exception: None,
                        }),
                    )?;
                }
            }
            if let Err(why) = framing {
                return Err(Refusal::Malformed(why));
            }
            if h1::offers_h2c(&req) {
                // h2c would carry further requests in HTTP/2 frames, past
                // per-request inspection; a byte-exact relay cannot strip
                // the offer, so the request is refused.
                findings.decide(
                    engine,
                    who,
                    Some(Detection {
                        app: UNIDENTIFIED,
                        rule: None,
                        reason: Reason::Http,
                        offset: None,
                        exception: None,
                    }),
                )?;
            }
            Ok(d)
        });
        let mut request = request;
        // Responses to GETs are hashed when digests are listed; a URL
        // whose body matched one is refused before its next request goes.
        let decided = decided.and_then(|d| {
            let get = req.method == Some("GET");
            let target = req.path.unwrap_or_default();
            request.download = download(engine, who, get, &request.host, target, findings)?;
            Ok(d)
        });
        if self.tenant && decided.is_ok() {
            let rules = &engine.config.tenant_restrictions;
            let mut fields: Vec<(&str, &str)> = Vec::new();
            // The rules of both names a request gives (target and Host):
            // a server may route by either.
            let names = std::iter::once(request.host.as_str()).chain(hosts.other.as_deref());
            for name in names {
                for rule in rules.for_host(name) {
                    request.tenant = Some(rule.vendor);
                    for (n, v) in &rule.fields {
                        if !fields.iter().any(|(have, _)| have.eq_ignore_ascii_case(n)) {
                            fields.push((n, v.as_str()));
                        }
                    }
                }
            }
            if !fields.is_empty() {
                let head = crate::config::set_fields(&buf[..head_len], &fields);
                request.head = Some(head.into_boxed_slice());
            }
        }
        match decided {
            Err(refusal) => Step::Refuse { refusal, request },
            Ok(HeadDecision::NeedBody { window })
                if body != Body::None && h1::expects_continue(&req) =>
            {
                // The client sends the body only once the server said
                // `100 Continue`: holding the head would stall it. The head
                // goes on; the body is held until the body rules decide.
                self.hold_body(&buf[..head_len], body, window, switch, request)
            }
            Ok(HeadDecision::NeedBody { window }) if body != Body::None => {
                self.state = ReqState::Held {
                    head_len,
                    body,
                    window,
                    switch,
                    request,
                };
                self.held(buf, cue, findings)
            }
            Ok(_) => self.forward_head(head_len, body, switch, request),
        }
    }

    /// The body of a forwarded head, held until the body rules decide.
    fn body_held(&mut self, buf: &[u8], cue: ReqCue, findings: &mut Findings) -> Step {
        let ReqState::BodyHeld { body, window, .. } = &self.state else {
            return Step::NeedMore;
        };
        let (body, window) = (*body, *window);
        let (prefix, ended) = match h1::body_prefix(body, buf, window) {
            Ok(p) => p,
            Err(why) => return self.refuse_held(Refusal::Malformed(why)),
        };
        // No deadline here: none of the body passes before the rules decide
        // (a client may not wait them out), only the client's end does.
        if prefix.len() < window && !ended && cue != ReqCue::Ended {
            if buf.len() > window.saturating_mul(8).max(4096) {
                return self.refuse_held(Refusal::Malformed(
                    "request body framing too sparse to inspect",
                ));
            }
            return Step::NeedMore;
        }
        let ReqState::BodyHeld {
            head,
            switch,
            request,
            ..
        } = std::mem::replace(&mut self.state, ReqState::Head)
        else {
            return Step::NeedMore;
        };
        let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(req.parse(&head), Ok(httparse::Status::Complete(_))) {
            return Step::Lost("not an HTTP/1.x request");
        }
        if let Err(refusal) = request_body(self.engine, &self.who, &req, &prefix, findings) {
            return Step::Reset { refusal, request };
        }
        self.state = match Following::new(body) {
            Some(body) => ReqState::Body { body, switch },
            None if switch => ReqState::AwaitSwitch,
            None => ReqState::Head,
        };
        if buf.is_empty() {
            return Step::NeedMore;
        }
        self.step(buf, cue, findings)
    }

    /// A decided head: forward it and follow its body.
    fn forward_head(
        &mut self,
        head_len: usize,
        body: Body,
        switch: bool,
        request: Box<RequestInfo>,
    ) -> Step {
        self.head_scanned = 0;
        self.state = match Following::new(body) {
            Some(body) => ReqState::Body { body, switch },
            None if switch => ReqState::AwaitSwitch,
            None => ReqState::Head,
        };
        Step::Forward {
            len: head_len,
            request: Some(request),
        }
    }

    /// Forward a decided head and hold its body until the body rules
    /// decide (the head is kept for them).
    fn hold_body(
        &mut self,
        head: &[u8],
        body: Body,
        window: usize,
        switch: bool,
        request: Box<RequestInfo>,
    ) -> Step {
        self.head_scanned = 0;
        self.state = ReqState::BodyHeld {
            head: head.into(),
            body,
            window,
            switch,
            request: request.clone(),
        };
        Step::Forward {
            len: head.len(),
            request: Some(request),
        }
    }

    /// Refuse the held request (nothing of it went on).
    fn refuse_held(&mut self, refusal: Refusal) -> Step {
        match std::mem::replace(&mut self.state, ReqState::Head) {
            ReqState::Held { request, .. } => Step::Refuse { refusal, request },
            ReqState::BodyHeld { request, .. } => Step::Reset { refusal, request },
            _ => Step::Reset {
                refusal,
                request: Box::default(),
            },
        }
    }

    /// A decided head waiting for the start of its body: decide the body
    /// once `window` decoded bytes (or all of it) are there, or the wait is
    /// over.
    fn held(&mut self, buf: &[u8], cue: ReqCue, findings: &mut Findings) -> Step {
        let ReqState::Held {
            head_len,
            body,
            window,
            ..
        } = &self.state
        else {
            return Step::NeedMore;
        };
        let (head_len, body, window) = (*head_len, *body, *window);
        let (prefix, ended) = match h1::body_prefix(body, &buf[head_len..], window) {
            Ok(p) => p,
            Err(why) => return self.refuse_held(Refusal::Malformed(why)),
        };
        let held_raw = buf.len() - head_len;
        // Tiny chunks spread a window over many more raw bytes; past this
        // the body cannot be decided.
        let raw_cap = window.saturating_mul(8).max(4096);
        if prefix.len() < window && !ended {
            if held_raw > raw_cap {
                return self.refuse_held(Refusal::Malformed(
                    "request body framing too sparse to inspect",
                ));
            }
            match cue {
                ReqCue::Bytes => return Step::NeedMore,
                ReqCue::Deadline => {
                    // The body is slow to come (the client may wait for a
                    // 100 it did not ask for): the head goes on, the body
                    // stays held until the rules can decide, however long.
                    let ReqState::Held {
                        switch, request, ..
                    } = std::mem::replace(&mut self.state, ReqState::Head)
                    else {
                        return Step::NeedMore;
                    };
                    return self.hold_body(&buf[..head_len], body, window, switch, request);
                }
                ReqCue::Ended => {}
            }
        }
        let ReqState::Held {
            switch, request, ..
        } = std::mem::replace(&mut self.state, ReqState::Head)
        else {
            return Step::NeedMore;
        };
        // Parse the head again: the body rules match on it.
        let mut headers = vec![httparse::EMPTY_HEADER; self.limits.max_headers];
        let mut req = httparse::Request::new(&mut headers);
        if !matches!(
            req.parse(&buf[..head_len]),
            Ok(httparse::Status::Complete(_))
        ) {
            return Step::Lost("not an HTTP/1.x request");
        }
        if let Err(refusal) = request_body(self.engine, &self.who, &req, &prefix, findings) {
            return Step::Refuse { refusal, request };
        }
        self.forward_head(head_len, body, switch, request)
    }
}

/// The invariants of [`Requests`] on arbitrary bytes, for the fuzz targets
/// (`http_head`) and their smoke test: every step forwards bytes that are
/// there, the stream ends in a bounded number of steps, and the outcome
/// does not depend on how the bytes were split across reads. The bytes'
/// sum picks the split, so that a seed's stream is all of it.
pub fn fuzz_logic(engine: &Engine, stream: &[u8]) {
    let split = stream
        .iter()
        .fold(0usize, |a, &b| a.wrapping_add(usize::from(b)));
    let whole = fuzz_drive(engine, stream, stream.len().max(1));
    let pieces = fuzz_drive(engine, stream, split % 17 + 1);
    assert_eq!(whole, pieces, "the outcome depends on the split");
}

/// Request boundaries (forwarded lengths, summed per request) and how the
/// stream ended, driving `stream` in reads of `step` bytes.
fn fuzz_drive(engine: &Engine, stream: &[u8], step: usize) -> (Vec<usize>, String) {
    let dst = SocketAddr::from(([192, 0, 2, 1], 80));
    let who = Who::ip(dst.ip());
    let mut reqs = Requests::new(engine, who, dst, Some(b"chatwall-fuzz"), true);
    let mut findings = Findings::default();
    let mut buf = Vec::new();
    let (mut fed, mut forwarded) = (0, 0);
    let mut sizes: Vec<usize> = Vec::new();
    for _ in 0..stream.len() * 3 + 8 {
        let cue = if fed == stream.len() {
            ReqCue::Ended
        } else {
            ReqCue::Bytes
        };
        match reqs.step(&buf, cue, &mut findings) {
            // The server switched (the fuzz input has no server side).
            Step::NeedMore if reqs.awaiting_switch() => reqs.switched(Some(true)),
            Step::NeedMore if fed == stream.len() => return (sizes, "ended".into()),
            Step::NeedMore => {
                let end = (fed + step).min(stream.len());
                buf.extend_from_slice(&stream[fed..end]);
                fed = end;
            }
            Step::Forward { len, request } => {
                assert!(
                    len > 0 && len <= buf.len(),
                    "forward {len} of {}",
                    buf.len()
                );
                if request.is_some() || sizes.is_empty() {
                    sizes.push(0);
                }
                if let Some(last) = sizes.last_mut() {
                    *last += len;
                }
                forwarded += len;
                buf.drain(..len);
            }
            Step::Refuse { refusal, .. } => return (sizes, format!("refused {refusal:?}")),
            Step::Reset { refusal, .. } => return (sizes, format!("reset {refusal:?}")),
            Step::Opaque => return (sizes, format!("opaque at {forwarded}")),
            Step::Lost(why) => return (sizes, format!("lost at {forwarded}: {why}")),
        }
    }
    panic!("no end after {} steps", stream.len() * 3 + 8);
}

#[cfg(test)]
mod tests;
