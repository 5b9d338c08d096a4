//! The two heads a forward proxy rewrites, as bytes: the request (to
//! origin form, hop-by-hop fields out, `Host` from the target, `Via` in)
//! and the response (hop-by-hop fields out, `Via` in). Everything else of
//! a head is copied as it came: field names in their case, their order,
//! values, custom reason phrases. Pure: no sockets, so the rules are unit
//! tested and fuzzed (`fuzz/fuzz_targets/http_head.rs`).
//!
//! What is not taken here goes to the general HTTP server
//! (`explicit::serve_with`), which answers or forwards it with hyper:
//! [`screen`] says which requests those are, before anything is decided.
use super::super::hop_by_hop;
use crate::classify::h1::{self, Body};

/// The request bodies forwarded here are read whole before they go
/// upstream (so that a request can be sent again on a fresh connection
/// when a pooled one turns out closed); longer ones stream through the
/// general server.
pub const MAX_BODY: u64 = 64 * 1024;

/// Header fields looked at in a head; more go to the general server.
pub const MAX_FIELDS: usize = 100;

/// Fields removed whether or not `Connection` names them (RFC 9110
/// §7.6.1; the set the general path removes too).
fn always_removed(name: &str) -> bool {
    hop_by_hop::is_one_of(hop_by_hop::ALWAYS_REMOVED, name)
}

/// Is this field hop-by-hop in a head whose `Connection` options are
/// `named`?
fn is_hop_by_hop(name: &str, named: &[&[u8]]) -> bool {
    always_removed(name)
        || (!hop_by_hop::is_one_of(hop_by_hop::PROTECTED, name)
            && named
                .iter()
                .any(|n| n.eq_ignore_ascii_case(name.as_bytes())))
}

fn has_option(named: &[&[u8]], option: &str) -> bool {
    named
        .iter()
        .any(|n| n.eq_ignore_ascii_case(option.as_bytes()))
}

/// Append `name: value\r\n`.
fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A request this path forwards, as the rest of the proxy needs it.
#[derive(Debug)]
pub struct Request {
    /// Bytes of the client's head.
    pub head_len: usize,
    pub method: String,
    /// The absolute-form target, as written.
    pub target: String,
    /// The host to decide and connect to, as the target names it (an
    /// IPv6 literal in brackets), and the port.
    pub host: String,
    pub port: u16,
    /// How the body is framed: none, a length of at most [`MAX_BODY`],
    /// or chunked (taken if it ends within [`MAX_BODY`], see [`body_end`]).
    pub body: Body,
    /// The body's data bytes, once read (for the log).
    pub body_data: u64,
    /// The client asked to close the connection after this exchange.
    pub close: bool,
    pub proxy_authorization: Option<Vec<u8>>,
    /// A `Via` field already names this instance: a forwarding loop.
    pub looped: bool,
    /// The head to send upstream, without `Via` and the blank line (see
    /// [`finish`]).
    pub upstream_head: Vec<u8>,
    /// Where in it this proxy's `Via` goes: after the last `Via` field,
    /// so that the list stays in order; `None`: at the end.
    pub via_at: Option<usize>,
}

/// Why a head is left to the general server.
pub type Elsewhere = &'static str;

/// The head at the front of the buffer is not whole yet.
pub const INCOMPLETE: Elsewhere = "incomplete head";

/// Take the head at the front of `buf` if this path forwards it: a whole
/// HTTP/1.1 request with an `http://` absolute-form target, no body or a
/// `Content-Length` body of at most [`MAX_BODY`], no protocol switch, no
/// `Expect`, within the head limits. Anything else (including anything
/// malformed, which the general server answers with its 400) is
/// `Err(why)`, before anything was decided.
pub fn screen(
    buf: &[u8],
    max_head: usize,
    max_fields: usize,
    via_token: &[u8],
) -> Result<Request, Elsewhere> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < max_head => return Err(INCOMPLETE),
        Ok(httparse::Status::Partial) => return Err("over the head limits"),
        Err(_) => return Err("not a head httparse takes"),
    };
    if head_len > max_head || req.headers.len() > max_fields {
        return Err("over the head limits");
    }
    if req.version != Some(1) {
        return Err("not HTTP/1.1");
    }
    let method = req.method.ok_or("no method")?;
    if method == "CONNECT" || method == "OPTIONS" {
        // CONNECT has its own path; OPTIONS may carry an asterisk-form
        // meaning that origin form cannot say.
        return Err("CONNECT or OPTIONS");
    }
    let target = req.path.ok_or("no target")?;
    if !target.starts_with("http://") || target.len() > u16::MAX as usize - 1 {
        return Err("not an http:// absolute-form target");
    }
    let uri: http::Uri = target.parse().map_err(|_| "unparsable target")?;
    let authority = uri.authority().ok_or("no authority")?;
    let port = match super::super::target::authority_port(authority.as_str()) {
        Ok(p) => p.unwrap_or(80),
        Err(_) => return Err("bad authority"),
    };
    let host = uri.host().filter(|h| !h.is_empty()).ok_or("no host")?;
    let body = match h1::request_body(&req) {
        Ok(Body::Length(n)) if n > MAX_BODY => return Err("a body to stream"),
        Ok(b @ (Body::None | Body::Length(_) | Body::Chunked)) => b,
        _ => return Err("a malformed body framing"),
    };
    let mut hosts = 0;
    let mut proxy_authorization = None;
    let mut looped = false;
    for f in req.headers.iter() {
        let n = f.name;
        if n.eq_ignore_ascii_case("upgrade")
            || n.eq_ignore_ascii_case("expect")
            || n.eq_ignore_ascii_case("http2-settings")
        {
            return Err("a protocol switch or Expect");
        }
        if n.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if n.eq_ignore_ascii_case("proxy-authorization") {
            if proxy_authorization.is_some() {
                return Err("two Proxy-Authorization fields");
            }
            proxy_authorization = Some(f.value.to_vec());
        } else if n.eq_ignore_ascii_case("via")
            && !via_token.is_empty()
            && f.value.windows(via_token.len()).any(|w| w == via_token)
        {
            looped = true;
        }
    }
    if hosts > 1 {
        return Err("more than one Host field");
    }
    let named: Vec<&[u8]> = h1::list(req.headers, "connection").collect();
    let close = has_option(&named, "close");

    // The head upstream: origin form, the client's fields in order minus
    // hop-by-hop ones, Host from the target, then Via.
    let (path, query) = uri
        .path_and_query()
        .map_or(("", None), |p| (p.path(), p.query()));
    let mut out = Vec::with_capacity(head_len + 64);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    if !path.starts_with('/') {
        // `http://host?q` asks for `/?q` (RFC 9112 §3.2.1).
        out.push(b'/');
    }
    out.extend_from_slice(path.as_bytes());
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(q.as_bytes());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host_written = false;
    let mut via_at = None;
    for f in req.headers.iter() {
        if f.name.eq_ignore_ascii_case("host") {
            field(&mut out, f.name.as_bytes(), authority.as_str().as_bytes());
            host_written = true;
        } else if !is_hop_by_hop(f.name, &named) {
            field(&mut out, f.name.as_bytes(), f.value);
            if f.name.eq_ignore_ascii_case("via") {
                via_at = Some(out.len());
            }
        }
    }
    if !host_written {
        field(&mut out, b"Host", authority.as_str().as_bytes());
    }
    Ok(Request {
        head_len,
        method: method.to_string(),
        target: target.to_string(),
        host: host.to_string(),
        port,
        body,
        body_data: 0,
        close,
        proxy_authorization,
        looped,
        upstream_head: out,
        via_at,
    })
}

/// Where the body that starts at `body[0]` ends: `Ok(Some((len, data)))`
/// with its length as sent and its data bytes, `Ok(None)` if it goes on
/// past `body`, `Err` if it is longer than [`MAX_BODY`] or its chunked
/// framing is broken (the general server answers that).
pub fn body_end(framing: Body, body: &[u8]) -> Result<Option<(usize, u64)>, Elsewhere> {
    let Some(mut f) = h1::Following::new(framing) else {
        return Ok(Some((0, 0)));
    };
    let mut data = 0u64;
    match f.advance(body, &mut |d| data += d.len() as u64) {
        Ok(h1::Progress::Ended(n)) => Ok(Some((n, data))),
        Ok(h1::Progress::More) if body.len() as u64 <= MAX_BODY => Ok(None),
        Ok(h1::Progress::More) => Err("a chunked body to stream"),
        Err(_) => Err("broken chunked framing"),
    }
}

/// Finish a head built by [`screen`] or [`response`]: `Via` (after the
/// head's own at `via_at`, else last), then the blank line.
pub fn finish(out: &mut Vec<u8>, via_at: Option<usize>, via: &[u8], close: bool) {
    match via_at.filter(|&at| at <= out.len()) {
        Some(at) => {
            let mut ours = Vec::with_capacity(via.len() + 7);
            field(&mut ours, b"Via", via);
            out.splice(at..at, ours);
        }
        None => field(out, b"Via", via),
    }
    if close {
        field(out, b"Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
}

/// A response from upstream, read.
#[derive(Debug)]
pub struct Response {
    pub head_len: usize,
    pub status: u16,
    /// How its body is delimited.
    pub reply: h1::Reply,
    /// The upstream connection may carry another request after this
    /// response (HTTP/1.1 and no `close`).
    pub reusable: bool,
    /// The head for the client, without `Via` and the blank line (see
    /// [`finish`]).
    pub client_head: Vec<u8>,
    /// Where this proxy's `Via` goes in it (see [`Request::via_at`]).
    pub via_at: Option<usize>,
}

/// Why a response cannot be forwarded: the 502's cause.
pub type BadResponse = String;

/// Read the response head at the front of `buf` (`Ok(None)`: not whole
/// yet) to a request that was a `HEAD` or not.
pub fn response(buf: &[u8], head_request: bool) -> Result<Option<Response>, BadResponse> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(format!("more than {MAX_FIELDS} response header fields"))
        }
        Err(e) => return Err(format!("malformed response head: {e}")),
    };
    let status = resp.code.unwrap_or(0);
    let asked = h1::Asked {
        head: head_request,
        connect: false,
        upgrade: false,
    };
    let reply = h1::response_body(asked, &resp).map_err(|e| format!("response framing: {e}"))?;
    if reply == h1::Reply::Switch {
        return Err("101 Switching Protocols to a protocol the request did not offer".into());
    }
    let named: Vec<&[u8]> = h1::list(resp.headers, "connection").collect();
    let reusable = resp.version == Some(1) && !has_option(&named, "close");
    // With Transfer-Encoding the body is read by it; a Content-Length
    // beside it goes (RFC 9112 §6.3 ¶3), or a client might read by it.
    let te = h1::has_te(resp.headers);
    let mut out = Vec::with_capacity(head_len + 64);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut via_at = None;
    for f in resp.headers.iter() {
        let dropped_length = te && f.name.eq_ignore_ascii_case("content-length");
        if !is_hop_by_hop(f.name, &named) && !dropped_length {
            field(&mut out, f.name.as_bytes(), f.value);
            if f.name.eq_ignore_ascii_case("via") {
                via_at = Some(out.len());
            }
        }
    }
    Ok(Some(Response {
        head_len,
        status,
        reply,
        reusable,
        client_head: out,
        via_at,
    }))
}

/// Write a response built by hyper's types (the proxy's own pages and
/// 407s) as HTTP/1.1 bytes: header names in title case, as the general
/// server writes them, and a `Content-Length`.
pub fn own_response(parts: &http::response::Parts, body: &[u8], head_request: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in &parts.headers {
        field(
            &mut out,
            title_case(name.as_str()).as_bytes(),
            value.as_bytes(),
        );
    }
    if !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
        field(
            &mut out,
            b"Content-Length",
            body.len().to_string().as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    if !head_request {
        out.extend_from_slice(body);
    }
    out
}

fn title_case(name: &str) -> String {
    let mut up = true;
    name.chars()
        .map(|c| {
            let c2 = if up { c.to_ascii_uppercase() } else { c };
            up = c == '-';
            c2
        })
        .collect()
}

/// Fuzzing entry: `data` as a request head (and body start) and as a
/// response head. Whatever the input, nothing panics, and what this path
/// would send is a whole head that parses back with the same meaning and
/// carries no hop-by-hop field.
pub fn fuzz_logic(data: &[u8]) {
    const VIA: &[u8] = b"1.1 chatwall-fuzz";
    if let Ok(r) = screen(data, 16 * 1024, MAX_FIELDS, b"chatwall-fuzz") {
        let _ = body_end(r.body, data.get(r.head_len..).unwrap_or_default());
        let mut out = r.upstream_head.clone();
        finish(&mut out, r.via_at, VIA, r.close);
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS + 3];
        let mut sent = httparse::Request::new(&mut fields);
        assert!(
            matches!(sent.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()),
            "the upstream head does not parse whole"
        );
        assert_eq!(sent.method, Some(r.method.as_str()));
        assert!(
            sent.path.is_some_and(|p| p.starts_with('/')),
            "not origin form"
        );
        assert_eq!(
            sent.headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"))
                .count(),
            1,
            "not one Host field"
        );
        for h in sent.headers.iter() {
            let hop = always_removed(h.name) && !h.name.eq_ignore_ascii_case("connection");
            assert!(!hop, "hop-by-hop field {} sent", h.name);
        }
        assert_eq!(h1::request_body(&sent), Ok(r.body), "the framing changed");
    }
    for head_request in [false, true] {
        let Ok(Some(r)) = response(data, head_request) else {
            continue;
        };
        let mut out = r.client_head;
        finish(&mut out, r.via_at, VIA, false);
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS + 3];
        let mut sent = httparse::Response::new(&mut fields);
        assert!(
            matches!(sent.parse(&out), Ok(httparse::Status::Complete(n)) if n == out.len()),
            "the client head does not parse whole"
        );
        assert_eq!(sent.code, Some(r.status));
        for h in sent.headers.iter() {
            assert!(!always_removed(h.name), "hop-by-hop field {} sent", h.name);
        }
        let asked = h1::Asked {
            head: head_request,
            ..h1::Asked::default()
        };
        assert_eq!(
            h1::response_body(asked, &sent),
            Ok(r.reply),
            "the framing changed"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VIA: &[u8] = b"chatwall-1234";

    fn head(s: &str) -> Request {
        screen(s.as_bytes(), 8192, 100, VIA).expect("taken")
    }

    #[test]
    fn the_request_goes_in_origin_form_with_fields_as_written() {
        let r = head(
            "GET http://Example.org:8080/a/b?c=d HTTP/1.1\r\nhost: example.org:8080\r\nX-CaSe: One,  two\r\nAccept: */*\r\n\r\n",
        );
        let mut out = r.upstream_head.clone();
        finish(&mut out, r.via_at, b"1.1 chatwall", false);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET /a/b?c=d HTTP/1.1\r\nhost: Example.org:8080\r\nX-CaSe: One,  two\r\nAccept: */*\r\nVia: 1.1 chatwall\r\n\r\n"
        );
        assert_eq!(r.host, "Example.org");
        assert_eq!(r.port, 8080);
        assert_eq!(r.body, Body::None);
        assert!(!r.close && !r.looped);
    }

    #[test]
    fn hop_by_hop_fields_go_and_host_is_added() {
        let r = head(
            "POST http://a.example/x HTTP/1.1\r\nProxy-Connection: keep-alive\r\nConnection: X-Secret, close\r\nX-Secret: 1\r\nContent-Length: 3\r\nTE: trailers\r\nKeep-Alive: 5\r\nProxy-Authorization: Basic eDp5\r\nX-Kept: 2\r\n\r\nabc",
        );
        let out = String::from_utf8_lossy(&r.upstream_head).into_owned();
        assert_eq!(
            out,
            "POST /x HTTP/1.1\r\nContent-Length: 3\r\nX-Kept: 2\r\nHost: a.example\r\n"
        );
        assert_eq!(r.body, Body::Length(3));
        assert!(r.close);
        let q = head("GET http://a.example?x=1 HTTP/1.1\r\n\r\n");
        assert!(q.upstream_head.starts_with(b"GET /?x=1 HTTP/1.1\r\n"));
        assert_eq!(r.proxy_authorization.as_deref(), Some(&b"Basic eDp5"[..]));
    }

    #[test]
    fn a_connection_option_cannot_remove_the_framing() {
        let r = head(
            "POST http://a.example/ HTTP/1.1\r\nConnection: content-length, host\r\nHost: a.example\r\nContent-Length: 1\r\n\r\nx",
        );
        let out = String::from_utf8_lossy(&r.upstream_head).into_owned();
        assert!(out.contains("Content-Length: 1\r\n"), "{out}");
        assert!(out.contains("Host: a.example\r\n"), "{out}");
    }

    #[test]
    fn everything_unusual_goes_to_the_general_server() {
        for h in [
            "GET http://a.example/ HTTP/1.0\r\n\r\n",
            "GET /origin HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET https://a.example/ HTTP/1.1\r\n\r\n",
            "CONNECT a.example:443 HTTP/1.1\r\n\r\n",
            "OPTIONS http://a.example HTTP/1.1\r\n\r\n",
            "GET http://a.example/ HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "GET http://a.example/ HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "POST http://a.example/ HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "POST http://a.example/ HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST http://a.example/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            "POST http://a.example/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST http://a.example/ HTTP/1.1\r\nContent-Length: 999999\r\n\r\n",
            "GET http://a.example/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET http://user@a.example/ HTTP/1.1\r\n\r\n",
            "GET http://a.example:99999/ HTTP/1.1\r\n\r\n",
            "GET http://a.example:/ HTTP/1.1\r\n\r\n",
            "GET http://a.example/ HTTP/1.1\r\nBad Field: x\r\n\r\n",
            "GET http://a.example/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
            "GET http://a.example/ HTTP/1.1\r\n",
            "GET http://a.example/ HTTP/1.1\r\nProxy-Authorization: a\r\nProxy-Authorization: b\r\n\r\n",
        ] {
            assert!(
                screen(h.as_bytes(), 8192, 100, VIA).is_err(),
                "{h:?} was taken"
            );
        }
        // Over the configured limits.
        let h = b"GET http://a.example/ HTTP/1.1\r\nA: 1\r\nB: 2\r\n\r\n";
        assert!(screen(h, 8192, 1, VIA).is_err());
        assert!(screen(h, 16, 100, VIA).is_err());
        assert_eq!(screen(&h[..20], 8192, 100, VIA).err(), Some(INCOMPLETE));
        assert_eq!(
            screen(&h[..20], 20, 100, VIA).err(),
            Some("over the head limits")
        );
    }

    #[test]
    fn chunked_bodies_are_taken_when_short() {
        let r = head("PUT http://a.example/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(r.body, Body::Chunked);
        assert_eq!(
            body_end(Body::Chunked, b"3\r\nabc\r\n0\r\n\r\nNEXT"),
            Ok(Some((13, 3)))
        );
        assert_eq!(body_end(Body::Chunked, b"3\r\nabc\r\n"), Ok(None));
        assert!(body_end(Body::Chunked, b"zz\r\n").is_err());
        let long = vec![b'a'; MAX_BODY as usize + 16];
        let mut chunk = format!("{:x}\r\n", long.len()).into_bytes();
        chunk.extend_from_slice(&long);
        assert!(body_end(Body::Chunked, &chunk).is_err());
        assert_eq!(body_end(Body::Length(2), b"abc"), Ok(Some((2, 2))));
        assert_eq!(body_end(Body::None, b"abc"), Ok(Some((0, 0))));
    }

    #[test]
    fn a_loop_is_seen_in_any_via_field() {
        let r = head("GET http://a.example/ HTTP/1.1\r\nVia: 1.1 other, 1.1 chatwall-1234\r\n\r\n");
        assert!(r.looped);
        let r = head(
            "GET http://a.example/ HTTP/1.1\r\nvia: 1.0 a\r\nX: 1\r\nVia: 1.1 b\r\nY: 2\r\n\r\n",
        );
        assert!(!r.looped);
        let mut out = r.upstream_head;
        finish(&mut out, r.via_at, b"1.1 c", true);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "GET / HTTP/1.1\r\nvia: 1.0 a\r\nX: 1\r\nVia: 1.1 b\r\nVia: 1.1 c\r\nY: 2\r\nHost: a.example\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn responses_keep_their_fields_and_reason() {
        let raw = b"HTTP/1.1 200 Fine Thanks\r\nServer: x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nset-COOKIE: a=b\r\nContent-Length: 2\r\n\r\nok";
        let r = response(raw, false).expect("valid").expect("whole");
        assert_eq!(r.head_len, raw.len() - 2);
        assert_eq!(r.status, 200);
        assert_eq!(r.reply, h1::Reply::Final(Body::Length(2)));
        assert!(r.reusable);
        let mut out = r.client_head;
        finish(&mut out, r.via_at, b"1.1 c", false);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 200 Fine Thanks\r\nServer: x\r\nset-COOKIE: a=b\r\nContent-Length: 2\r\nVia: 1.1 c\r\n\r\n"
        );
    }

    #[test]
    fn response_framing_and_reuse() {
        let r = |raw: &str, head: bool| response(raw.as_bytes(), head).expect("ok").expect("whole");
        assert_eq!(
            r(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            )
            .reply,
            h1::Reply::Final(Body::Chunked)
        );
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true).reply,
            h1::Reply::Final(Body::None)
        );
        assert_eq!(
            r("HTTP/1.1 204 No Content\r\n\r\n", false).reply,
            h1::Reply::Final(Body::None)
        );
        assert_eq!(
            r("HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n", false).reply,
            h1::Reply::Interim
        );
        let close = r("HTTP/1.0 200 OK\r\n\r\n", false);
        assert_eq!(close.reply, h1::Reply::Final(Body::UntilClose));
        assert!(!close.reusable);
        assert!(
            !r(
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                false
            )
            .reusable
        );
        assert!(response(b"HTTP/1.1 200 OK\r\nContent-Le", false)
            .expect("ok")
            .is_none());
        for bad in [
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(
                response(bad, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn own_responses_are_framed() {
        let mut resp = http::Response::new(());
        *resp.status_mut() = http::StatusCode::FORBIDDEN;
        resp.headers_mut().insert(
            "x-chatwall-block",
            http::HeaderValue::from_static("whatsapp"),
        );
        let (parts, ()) = resp.into_parts();
        let out = own_response(&parts, b"page", false);
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 403 Forbidden\r\nX-Chatwall-Block: whatsapp\r\nContent-Length: 4\r\n\r\npage"
        );
        let head = own_response(&parts, b"page", true);
        assert!(head.ends_with(b"Content-Length: 4\r\n\r\n"));
    }
}
