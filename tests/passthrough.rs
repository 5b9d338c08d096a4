//! "What passes, passes untouched": a tunnel is a byte-exact relay over one
//! upstream connection, whatever is inspected inside it. HTTP in a CONNECT
//! tunnel is decided request by request from the bytes as they pass, never
//! re-encoded; the origin's bytes reach the client as they were sent.
//! Refusals inside a tunnel (403 page, then the tunnel closes) let nothing
//! of the refused request through; what cannot be followed as HTTP falls
//! to the generic rules.
//!
//! Every test records the TCP bytes at both ends (the client's own writes
//! and reads, `ScriptOrigin` for the origin) and compares them exactly.
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{
    assert_same_bytes, connect_tunnel, escape, head_field, pattern_byte, read_n, read_n_within,
    read_to_close, rustls_client_hello, skip_or_fail, tls_server_config, wait_until,
    write_dribbled, Ending, HttpScript, Proxy, Script, ScriptOrigin, Tee, CONTINUE_100, WAIT,
};

// ---------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------

/// CONNECT to `addr` through the proxy; the tunnel after the `200`.
async fn tunnel_to(proxy: &Proxy, addr: SocketAddr) -> TcpStream {
    let s = connect_tunnel(proxy.addr, &addr.to_string())
        .await
        .unwrap_or_else(|st| panic!("CONNECT {addr} got {st}"));
    let _ = s.set_nodelay(true);
    s
}

async fn tunnel(proxy: &Proxy, origin: &ScriptOrigin) -> TcpStream {
    tunnel_to(proxy, origin.addr).await
}

/// Half-close the client's side, read what is left, and give the origin
/// the time to see the end; `got` plus what was left.
async fn end_session(mut s: TcpStream, mut got: Vec<u8>, origin: &ScriptOrigin) -> Vec<u8> {
    let _ = s.shutdown().await;
    let (rest, _) = read_to_close(&mut s).await;
    got.extend_from_slice(&rest);
    origin.wait_closed(1).await;
    got
}

/// One upstream connection, which received exactly what the client sent
/// and sent exactly what the client received.
#[track_caller]
fn assert_exact_relay(origin: &ScriptOrigin, client_sent: &[u8], client_got: &[u8]) {
    assert_eq!(
        origin.accepted(),
        1,
        "one upstream connection per tunnel:\n{}",
        origin.describe()
    );
    assert_same_bytes(
        "bytes at the origin vs bytes the client sent",
        &origin.received(0),
        client_sent,
    );
    assert_same_bytes(
        "bytes at the client vs bytes the origin sent",
        client_got,
        &origin.sent(0),
    );
}

/// Let anything in flight land before asserting that nothing did.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// A refusal page: status 403 and `X-Chatwall-Block` (its value).
#[track_caller]
fn assert_403(what: &str, page: &[u8]) -> String {
    assert!(
        page.starts_with(b"HTTP/1.1 403") || page.starts_with(b"HTTP/1.0 403"),
        "{what}: a 403 page, got {}",
        escape(page)
    );
    head_field(page, "x-chatwall-block")
        .unwrap_or_else(|| panic!("{what}: no X-Chatwall-Block in {}", escape(page)))
}

/// The tunnel ended (EOF or reset), rather than staying open.
#[track_caller]
fn assert_closed(what: &str, end: Ending) {
    assert_ne!(
        end,
        Ending::Timeout,
        "{what}: the tunnel stays open after a refusal"
    );
}

/// The first access-log record that `pred` accepts (bounded wait).
async fn record(proxy: &Proxy, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    match proxy.wait_record(pred).await {
        Some(r) => r,
        None => panic!("no access-log record for {what}: {:#?}", proxy.log()),
    }
}

/// verdict block, with this app (when given) and reason.
#[track_caller]
fn assert_block(r: &Value, app: Option<&str>, reason: &str) {
    assert_eq!(r["verdict"], "block", "{r}");
    if let Some(app) = app {
        assert_eq!(r["app"], app, "{r}");
    }
    assert_eq!(r["reason"], reason, "{r}");
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(pattern_byte).collect()
}

/// A canned response: `head` lines (status line first, no final CRLF
/// pair), a Content-Length, and `body`.
fn response(head: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!("{head}\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    r.extend_from_slice(body);
    r
}

/// A WebSocket frame (RFC 6455 §5.2), FIN set, masked when `mask` is given.
fn ws_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => f.push(m | n as u8),
        n if n < 65536 => {
            f.push(m | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(m | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => f.extend_from_slice(payload),
    }
    f
}

/// A scripted origin on port 80 of a loopback address of its own (binding
/// port 80 needs root; without it the test is skipped or fails, as the
/// environment says).
async fn origin_on_80(script: Script) -> Option<ScriptOrigin> {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let third = (std::process::id() % 250) as u8 + 1;
    for _ in 0..8 {
        let ip = Ipv4Addr::new(127, 80, third, NEXT.fetch_add(1, Ordering::SeqCst));
        match ScriptOrigin::start_at(SocketAddr::new(ip.into(), 80), script.clone(), None).await {
            Ok(o) => return Some(o),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                skip_or_fail(&format!("passthrough: binding port 80 needs root: {e}"));
                return None;
            }
            Err(_) => continue,
        }
    }
    skip_or_fail("passthrough: no free loopback address for port 80");
    None
}

// ---------------------------------------------------------------------------
// Requests and responses used by several tests
// ---------------------------------------------------------------------------

/// A keep-alive conversation: each request with the response the origin
/// gives it. Mixed-case names, hop-by-hop fields a re-encoding proxy would
/// drop, Content-Length and chunked bodies (extensions, trailers), HEAD,
/// 304, 204 and a chunked response with trailers.
fn conversation() -> Vec<(Vec<u8>, Vec<u8>)> {
    vec![
        (
            b"POST /form?a=1 HTTP/1.1\r\nHOST: www.example.test\r\nuser-agent: Mixed/1.0\r\nContent-Type: application/x-www-form-urlencoded\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5, max=100\r\nProxy-Connection: keep-alive\r\nContent-Length: 11\r\n\r\nname=x&y=zz"
                .to_vec(),
            response(
                "HTTP/1.1 201 Created\r\nlocation: /things/1\r\nX-Request-ID: AbC",
                b"ok",
            ),
        ),
        (
            b"POST /chunks HTTP/1.1\r\nHost: www.example.test\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\nTE: trailers\r\nConnection: TE, keep-alive\r\n\r\n5;ext=1\r\nhello\r\n7;name=\"quoted value\"\r\n, world\r\n0;last\r\nX-Checksum: abc123\r\nx-other-TRAILER: Two\r\n\r\n"
                .to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\ncontent-type: text/plain\r\n\r\n4;x=y\r\nwxyz\r\n0\r\nX-Sum: 9\r\n\r\n"
                .to_vec(),
        ),
        (
            b"HEAD /page HTTP/1.1\r\nhost: www.example.test\r\nAccept: text/html\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/html\r\n\r\n"
                .to_vec(),
        ),
        (
            b"GET /cached HTTP/1.1\r\nHost: www.example.test\r\nIf-None-Match: \"v1\"\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n"
                .to_vec(),
            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n".to_vec(),
        ),
        (
            b"DELETE /things/1 HTTP/1.1\r\nHost: www.example.test\r\nContent-Length: 0\r\n\r\n"
                .to_vec(),
            b"HTTP/1.1 204 No Content\r\nX-Empty: Yes\r\n\r\n".to_vec(),
        ),
        (
            b"GET /last HTTP/1.1\r\nHost: www.example.test\r\nConnection: keep-alive\r\nVia: 1.1 some-other-proxy\r\n\r\n"
                .to_vec(),
            response(
                "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5, max=100\r\nSERVER: Origin/1",
                b"end",
            ),
        ),
    ]
}

/// An allowed request and the origin's answer to it.
fn allowed() -> (Vec<u8>, Vec<u8>) {
    (
        b"GET /allowed HTTP/1.1\r\nHost: www.example.test\r\nConnection: keep-alive\r\n\r\n"
            .to_vec(),
        response("HTTP/1.1 200 OK\r\nX-Origin: One", b"allowed\n"),
    )
}

// ---------------------------------------------------------------------------
// HTTP inside CONNECT: byte-exact, one upstream connection
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_in_a_connect_tunnel_is_relayed_byte_exact() {
    let resp = response(
        "HTTP/1.1 200 OK\r\nServer: Test-Origin\r\nX-Mixed-CASE: Yes\r\ncontent-type: text/plain",
        b"hello, exactly\n",
    );
    let origin = ScriptOrigin::start(Script::http(vec![resp.clone()])).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let req: &[u8] = b"GET /index.html?q=1 HTTP/1.1\r\nHOST: www.example.test\r\nuser-agent: Mixed/1.0\r\nAccept: */*\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\n\r\n";
    s.write_all(req).await.expect("write");
    let got = read_n(&mut s, resp.len()).await;
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, req, &got);
    assert_same_bytes("the response", &got, &resp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_requests_with_bodies_are_relayed_byte_exact() {
    let conv = conversation();
    let origin =
        ScriptOrigin::start(Script::http(conv.iter().map(|(_, r)| r.clone()).collect())).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let (mut sent, mut got) = (Vec::new(), Vec::new());
    for (i, (req, resp)) in conv.iter().enumerate() {
        s.write_all(req).await.expect("write");
        sent.extend_from_slice(req);
        let r = read_n(&mut s, resp.len()).await;
        assert_same_bytes(&format!("response {i}"), &r, resp);
        got.extend_from_slice(&r);
    }
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, &sent, &got);
    assert_eq!(origin.requests(), conv.len());
}

/// A request head, its body, and the origin's final answer.
type Exchange = (Vec<u8>, Vec<u8>, Vec<u8>);

/// Two requests that wait for `100 Continue` before their bodies, and the
/// origin's answers to them.
fn expect_exchanges() -> (Vec<Exchange>, Script) {
    let r1 = response("HTTP/1.1 200 OK\r\nX-Stored: Yes", b"stored\n");
    let r2 = response("HTTP/1.1 201 Created\r\nx-lower: case", b"");
    let exchanges = vec![
        (
            b"PUT /upload HTTP/1.1\r\nHost: www.example.test\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n".to_vec(),
            b"hello world".to_vec(),
            r1.clone(),
        ),
        (
            b"POST /upload HTTP/1.1\r\nHost: www.example.test\r\nEXPECT: 100-Continue\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
            b"3;c=1\r\nabc\r\n0\r\n\r\n".to_vec(),
            r2.clone(),
        ),
    ];
    let script = Script::Http(HttpScript {
        responses: vec![r1, r2],
        continue_100: true,
        close_after: None,
    });
    (exchanges, script)
}

/// With no body rule loaded nothing needs a request's body before its head
/// goes on: the origin's `100 Continue` is what the client waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_relayed_byte_exact() {
    let (exchanges, script) = expect_exchanges();
    let origin = ScriptOrigin::start(script).await;
    let sigs = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/signatures/whatsapp.toml"),
        sigs.path().join("whatsapp.toml"),
    )
    .expect("copy a signature without body rules");
    let proxy = Proxy::start(&format!(
        "[access]\ndeny_destinations = []\n[signatures]\ndir = {:?}\n",
        sigs.path().display().to_string()
    ))
    .await;
    let mut s = tunnel(&proxy, &origin).await;
    let (mut sent, mut got) = (Vec::new(), Vec::new());
    for (i, (head, body, resp)) in exchanges.iter().enumerate() {
        s.write_all(head).await.expect("write head");
        sent.extend_from_slice(head);
        // The origin's interim answer comes before the client sends a byte
        // of the body.
        let interim = read_n(&mut s, CONTINUE_100.len()).await;
        assert_same_bytes(&format!("interim answer {i}"), &interim, CONTINUE_100);
        got.extend_from_slice(&interim);
        s.write_all(body).await.expect("write body");
        sent.extend_from_slice(body);
        let r = read_n(&mut s, resp.len()).await;
        assert_same_bytes(&format!("final answer {i}"), &r, resp);
        got.extend_from_slice(&r);
    }
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, &sent, &got);
}

/// With the bundled set, whose body rules may need a body before its head
/// can go on: the client waits a second for an interim answer, as curl
/// does, then sends the body anyway. Whichever way it goes, the bytes are
/// exact both ways and a `100 Continue` the client sees is the origin's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_with_body_rules_is_relayed_byte_exact() {
    let (exchanges, script) = expect_exchanges();
    let origin = ScriptOrigin::start(script).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let (mut sent, mut got) = (Vec::new(), Vec::new());
    for (i, (head, body, resp)) in exchanges.iter().enumerate() {
        s.write_all(head).await.expect("write head");
        sent.extend_from_slice(head);
        let mut interim = read_n_within(&mut s, CONTINUE_100.len(), Duration::from_secs(1)).await;
        if !interim.is_empty() && interim.len() < CONTINUE_100.len() {
            interim.extend(read_n(&mut s, CONTINUE_100.len() - interim.len()).await);
        }
        if !interim.is_empty() {
            assert_same_bytes(&format!("interim answer {i}"), &interim, CONTINUE_100);
        }
        got.extend_from_slice(&interim);
        s.write_all(body).await.expect("write body");
        sent.extend_from_slice(body);
        let mut r = read_n(&mut s, resp.len()).await;
        if interim.is_empty() && r.starts_with(CONTINUE_100) {
            // The origin's interim answer, late: the final one follows.
            r.extend(read_n(&mut s, CONTINUE_100.len()).await);
        }
        let last = if interim.is_empty() && r.starts_with(CONTINUE_100) {
            &r[CONTINUE_100.len()..]
        } else {
            &r[..]
        };
        assert_same_bytes(&format!("final answer {i}"), last, resp);
        got.extend_from_slice(&r);
    }
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, &sent, &got);
}

/// A client that waits for `100 Continue` gets it without delay: its head
/// goes on at once, and its body is held for the body rules. An IM body is
/// refused by reset; none of it reaches the origin, the head alone did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_with_an_im_body_is_reset_before_the_body_goes() {
    let script = Script::Http(HttpScript {
        responses: vec![response("HTTP/1.1 200 OK", b"ok\n")],
        continue_100: true,
        close_after: None,
    });
    let origin = ScriptOrigin::start(script).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let body = b"<body rid='7' xmlns='http://jabber.org/protocol/httpbind' to='example.org'/>";
    let head = format!(
        "POST /http-bind HTTP/1.1\r\nHost: bosh.example.test\r\nContent-Type: text/xml\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let started = std::time::Instant::now();
    s.write_all(head.as_bytes()).await.expect("write head");
    let interim = read_n(&mut s, CONTINUE_100.len()).await;
    assert_same_bytes("the origin's 100 Continue", &interim, CONTINUE_100);
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the head was not held: {:?}",
        started.elapsed()
    );
    s.write_all(body).await.expect("write body");
    let (rest, ending) = read_to_close(&mut s).await;
    assert!(rest.is_empty(), "nothing after the 100: {}", escape(&rest));
    assert_eq!(ending, Ending::Reset, "the tunnel is reset");
    origin.wait_closed(1).await;
    assert_same_bytes(
        "the origin got the head and not a byte of the body",
        &origin.received(0),
        head.as_bytes(),
    );
    let rec = proxy
        .wait_record(|r| r["method"] == "POST")
        .await
        .expect("a record of the POST");
    assert_eq!(rec["verdict"], "block", "{rec}");
    assert_eq!(rec["app"], "xmpp", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_in_one_write_are_relayed_byte_exact() {
    let conv = conversation();
    let origin =
        ScriptOrigin::start(Script::http(conv.iter().map(|(_, r)| r.clone()).collect())).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let sent: Vec<u8> = conv.iter().flat_map(|(q, _)| q.clone()).collect();
    let want: Vec<u8> = conv.iter().flat_map(|(_, r)| r.clone()).collect();
    s.write_all(&sent).await.expect("write");
    let got = read_n(&mut s, want.len()).await;
    assert_same_bytes("the pipelined responses", &got, &want);
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, &sent, &got);
    assert_eq!(origin.requests(), conv.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_dribbled_are_relayed_byte_exact() {
    let conv = conversation();
    let origin =
        ScriptOrigin::start(Script::http(conv.iter().map(|(_, r)| r.clone()).collect())).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let sent: Vec<u8> = conv.iter().flat_map(|(q, _)| q.clone()).collect();
    let want: Vec<u8> = conv.iter().flat_map(|(_, r)| r.clone()).collect();
    // Three bytes per write: heads, chunk lines and trailers all split.
    write_dribbled(&mut s, &sent, 3, Duration::from_millis(1)).await;
    let got = read_n(&mut s, want.len()).await;
    assert_same_bytes("the responses", &got, &want);
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, &sent, &got);
}

/// Framing is followed: a body is a body, even when it reads like a request
/// to an IM host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_read_like_requests_are_relayed_as_bodies() {
    let inner = b"GET /ws HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n";
    let mut cl = format!(
        "POST /paste HTTP/1.1\r\nHost: www.example.test\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        inner.len()
    )
    .into_bytes();
    cl.extend_from_slice(inner);
    let mut chunked = format!(
        "POST /paste HTTP/1.1\r\nHost: www.example.test\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
        inner.len()
    )
    .into_bytes();
    chunked.extend_from_slice(inner);
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let resp = response("HTTP/1.1 200 OK", b"pasted\n");
    let origin = ScriptOrigin::start(Script::http(vec![resp.clone()])).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let sent = cat(&[&cl, &chunked]);
    s.write_all(&sent).await.expect("write");
    let want = cat(&[&resp, &resp]);
    let got = read_n(&mut s, want.len()).await;
    assert_same_bytes("two answers", &got, &want);
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, &sent, &got);
    assert_eq!(origin.requests(), 2);
}

// ---------------------------------------------------------------------------
// Responses are never rewritten
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_reach_the_client_as_the_origin_sent_them() {
    let proxy = Proxy::start_open().await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "odd status and reason",
            response(
                "HTTP/1.1 299 Quite Unusual Reason\r\nx-ALL-sorts: of case\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2",
                b"odd",
            ),
        ),
        (
            "HTTP/1.0, close-delimited",
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the origin closes\n".to_vec(),
        ),
        (
            "folded header and bare LF",
            b"HTTP/1.1 200 OK\r\nX-Folded: first\r\n  second\r\nX-Bare: lf\nContent-Length: 2\r\n\r\nok"
                .to_vec(),
        ),
        (
            "not HTTP at all",
            b"\x00\x01\x02 this is no status line \xff\xfe\r\n\r\n".to_vec(),
        ),
    ];
    for (name, resp) in cases {
        let origin = ScriptOrigin::start(Script::Http(HttpScript {
            responses: vec![resp.clone()],
            continue_100: false,
            close_after: Some(1),
        }))
        .await;
        let mut s = tunnel(&proxy, &origin).await;
        let req: &[u8] = b"GET /odd HTTP/1.1\r\nHost: www.example.test\r\n\r\n";
        s.write_all(req).await.expect("write");
        let (got, end) = read_to_close(&mut s).await;
        origin.wait_closed(1).await;
        assert_same_bytes(name, &got, &resp);
        assert_exact_relay(&origin, req, &got);
        assert_eq!(
            end,
            Ending::Eof,
            "{name}: the origin's close reaches the client"
        );
    }
}

// ---------------------------------------------------------------------------
// TLS, WebSocket and CONNECT inside CONNECT
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_through_connect_is_relayed_byte_exact_at_the_tcp_level() {
    let (cfg, cert) = tls_server_config(&["tls.example.test"]);
    let resp = response(
        "HTTP/1.1 200 OK\r\nX-Over-TLS: Yes",
        b"hello over tls, byte for byte\n",
    );
    let origin = ScriptOrigin::start_tls(Script::http(vec![resp.clone()]), cfg).await;
    let proxy = Proxy::start_open().await;
    let s = tunnel(&proxy, &origin).await;
    let (tee, client) = Tee::new(s);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ccfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(ccfg));
    let name = rustls::pki_types::ServerName::try_from("tls.example.test").expect("name");
    let mut tls = tokio::time::timeout(WAIT, connector.connect(name, tee))
        .await
        .expect("handshake in time")
        .expect("TLS handshake through the tunnel");
    let req = b"GET /secret HTTP/1.1\r\nHost: tls.example.test\r\n\r\n";
    tls.write_all(req).await.expect("write");
    tls.flush().await.expect("flush");
    let got = read_n(&mut tls, resp.len()).await;
    assert_same_bytes("application data", &got, &resp);
    // close_notify and FIN one way, then the other.
    let _ = tls.shutdown().await;
    let (rest, _) = read_to_close(&mut tls).await;
    assert!(rest.is_empty(), "{}", escape(&rest));
    origin.wait_closed(1).await;
    assert_eq!(origin.accepted(), 1, "{}", origin.describe());
    assert_same_bytes(
        "TCP bytes at the origin vs TCP bytes the client wrote",
        &origin.received(0),
        &client.written_bytes(),
    );
    assert_same_bytes(
        "TCP bytes the client read vs TCP bytes the origin wrote",
        &client.read_bytes(),
        &origin.sent(0),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_then_frames_are_relayed_byte_exact() {
    // The 101 and a first server frame in one write.
    let mut answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nX-Origin-Case: MiXeD\r\n\r\n".to_vec();
    answer.extend_from_slice(&ws_frame(0x2, &[1, 2, 3, 4], None));
    let origin = ScriptOrigin::start(Script::websocket(answer.clone())).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let upgrade: &[u8] = b"GET /chat HTTP/1.1\r\nHost: ws.example.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://ws.example.test\r\n\r\n";
    s.write_all(upgrade).await.expect("write");
    let mut got = read_n(&mut s, answer.len()).await;
    assert_same_bytes("101 and the first server frame", &got, &answer);
    let mut sent = upgrade.to_vec();
    // Binary frames; one with a zero mask whose payload reads like an HTTP
    // request to an IM host (after the upgrade it is payload, not HTTP),
    // and one of 70000 bytes (64-bit length).
    let frames = [
        ws_frame(0x2, &pattern(200), Some([0x11, 0x22, 0x33, 0x44])),
        ws_frame(
            0x1,
            b"GET / HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n",
            Some([0, 0, 0, 0]),
        ),
        ws_frame(0x2, &pattern(70_000), Some([0xa5, 0x5a, 0x01, 0x10])),
    ];
    for f in &frames {
        s.write_all(f).await.expect("write frame");
        sent.extend_from_slice(f);
        // The origin echoes.
        let echo = read_n(&mut s, f.len()).await;
        assert_same_bytes("echoed frame", &echo, f);
        got.extend_from_slice(&echo);
    }
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, &sent, &got);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_inside_a_tunnel_ends_parsing_and_relays_opaquely() {
    // The origin is a parent proxy: it answers the inner CONNECT, then
    // echoes.
    let answer = b"HTTP/1.1 200 Connection Established\r\nX-Parent: Yes\r\n\r\n".to_vec();
    let origin = ScriptOrigin::start(Script::http(vec![answer.clone()])).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let inner = format!(
        "CONNECT {a} HTTP/1.1\r\nHost: {a}\r\nUser-Agent: Nested/1.0\r\nProxy-Authorization: Basic dTpw\r\n\r\n",
        a = origin.addr
    )
    .into_bytes();
    s.write_all(&inner).await.expect("write");
    let mut got = read_n(&mut s, answer.len()).await;
    assert_same_bytes("the parent's 200", &got, &answer);
    let opaque = cat(&[
        &rustls_client_hello("www.example.test"),
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        &pattern(5000),
    ]);
    s.write_all(&opaque).await.expect("write");
    let echo = read_n(&mut s, opaque.len()).await;
    assert_same_bytes("opaque bytes echoed", &echo, &opaque);
    got.extend_from_slice(&echo);
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, &cat(&[&inner, &opaque]), &got);
}

// ---------------------------------------------------------------------------
// Refusals inside a tunnel
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_host_after_an_allowed_pipelined_request_gets_403_after_the_first_answer() {
    let (req1, resp1) = allowed();
    let origin = ScriptOrigin::start(Script::http(vec![resp1.clone()])).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    let im: &[u8] = b"GET /ws HTTP/1.1\r\nHost: web.whatsapp.com\r\nConnection: keep-alive\r\n\r\n";
    s.write_all(&cat(&[&req1, im])).await.expect("write");
    let (got, end) = read_to_close(&mut s).await;
    let n = resp1.len().min(got.len());
    assert_same_bytes("the allowed request's answer", &got[..n], &resp1);
    assert_eq!(assert_403("the IM request", &got[n..]), "whatsapp");
    assert_closed("IM Host", end);
    settle().await;
    assert_eq!(origin.accepted(), 1, "{}", origin.describe());
    assert_same_bytes(
        "the origin received the allowed request only",
        &origin.received(0),
        &req1,
    );
    let r = record(&proxy, "the IM request", |r| r["verdict"] == "block").await;
    assert_block(&r, Some("whatsapp"), "host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_host_as_the_first_request_gets_403_and_the_origin_not_a_byte() {
    let origin = ScriptOrigin::start(Script::http(vec![allowed().1])).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: web.whatsapp.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .expect("write");
    let (got, end) = read_to_close(&mut s).await;
    assert_eq!(assert_403("the IM request", &got), "whatsapp");
    assert_closed("IM Host", end);
    settle().await;
    assert!(origin.accepted() <= 1, "{}", origin.describe());
    assert_eq!(origin.total_received(), 0, "{}", origin.describe());
    let r = record(&proxy, "the IM request", |r| r["verdict"] == "block").await;
    assert_block(&r, Some("whatsapp"), "host");
}

/// Path, header and body rules: each in its own tunnel, after an allowed
/// request or as the first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_path_header_and_body_rules_refuse_inside_a_tunnel() {
    let bosh = b"<body rid='1' xmlns='http://jabber.org/protocol/httpbind' to='example.com' wait='60' hold='1' ver='1.6'/>";
    let bosh_cl = cat(&[
        format!(
            "POST /http-bind HTTP/1.1\r\nHost: chat.example.test\r\nContent-Type: text/xml; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
            bosh.len()
        )
        .as_bytes(),
        bosh,
    ]);
    let bosh_chunked = cat(&[
        b"POST /http-bind HTTP/1.1\r\nHost: chat.example.test\r\nTransfer-Encoding: chunked\r\n\r\n",
        format!("{:x};x=1\r\n", bosh.len()).as_bytes(),
        bosh,
        b"\r\n0\r\nX-Trailer: 1\r\n\r\n",
    ]);
    let cases: Vec<(&str, bool, Vec<u8>)> = vec![
        (
            "msn-messenger",
            false,
            b"POST /gateway/gateway.dll?Action=open&Server=NS&IP=messenger.hotmail.com HTTP/1.1\r\nHost: gateway.example.test\r\nContent-Length: 18\r\n\r\nVER 1 MSNP8 CVR0\r\n"
                .to_vec(),
        ),
        (
            "icq",
            true,
            b"GET /status HTTP/1.1\r\nHost: www.example.test\r\nUser-Agent: ICQ/8.1\r\n\r\n".to_vec(),
        ),
        ("xmpp", false, bosh_cl),
        ("xmpp", true, bosh_chunked),
        (
            "matrix",
            true,
            b"GET /_matrix/client/v3/sync HTTP/1.1\r\nHost: www.example.test\r\n\r\n".to_vec(),
        ),
    ];
    let proxy = Proxy::start_open().await;
    let (req1, resp1) = allowed();
    for (app, after_allowed, im) in &cases {
        let what = format!("{app} (after an allowed request: {after_allowed})");
        let origin = ScriptOrigin::start(Script::http(vec![resp1.clone()])).await;
        let mut s = tunnel(&proxy, &origin).await;
        let (prefix, first): (&[u8], &[u8]) = if *after_allowed {
            (&req1, &resp1)
        } else {
            (b"", b"")
        };
        s.write_all(&cat(&[prefix, im])).await.expect("write");
        let (got, end) = read_to_close(&mut s).await;
        let n = first.len().min(got.len());
        assert_same_bytes(&format!("{what}: first answer"), &got[..n], first);
        assert_eq!(assert_403(&what, &got[n..]), *app, "{what}");
        assert_closed(&what, end);
        settle().await;
        assert!(origin.accepted() <= 1, "{what}: {}", origin.describe());
        assert_same_bytes(
            &format!("{what}: what reached the origin"),
            &origin.received(0),
            prefix,
        );
    }
    for app in ["msn-messenger", "icq", "xmpp", "matrix"] {
        let r = record(&proxy, app, |r| r["verdict"] == "block" && r["app"] == app).await;
        assert_block(&r, Some(app), "http");
    }
}

/// h2c would take the rest of the connection out of per-request
/// inspection: refused, and nothing of it reaches the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_inside_a_tunnel_is_refused() {
    let h2c: &[u8] = b"GET / HTTP/1.1\r\nHost: www.example.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    let proxy = Proxy::start_open().await;
    let (req1, resp1) = allowed();
    for after_allowed in [false, true] {
        let what = format!("h2c (after an allowed request: {after_allowed})");
        let origin = ScriptOrigin::start(Script::http(vec![resp1.clone()])).await;
        let mut s = tunnel(&proxy, &origin).await;
        let (prefix, first): (&[u8], &[u8]) = if after_allowed {
            (&req1, &resp1)
        } else {
            (b"", b"")
        };
        s.write_all(&cat(&[prefix, h2c])).await.expect("write");
        let (got, end) = read_to_close(&mut s).await;
        let n = first.len().min(got.len());
        assert_same_bytes(&format!("{what}: first answer"), &got[..n], first);
        assert_403(&what, &got[n..]);
        assert_closed(&what, end);
        settle().await;
        assert!(origin.accepted() <= 1, "{what}: {}", origin.describe());
        assert_same_bytes(
            &format!("{what}: what reached the origin"),
            &origin.received(0),
            prefix,
        );
    }
    record(&proxy, "h2c", |r| r["verdict"] == "block").await;
}

// ---------------------------------------------------------------------------
// What cannot be followed as HTTP: the generic rules
// ---------------------------------------------------------------------------

/// Not HTTP after a first request, on a port other than 80: relayed
/// byte-exact under the payload signatures (none matches here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_http_after_a_request_on_another_port_is_relayed_byte_exact() {
    let (req1, resp1) = allowed();
    // The script origin echoes once the bytes are not HTTP.
    let origin = ScriptOrigin::start(Script::http(vec![resp1.clone()])).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(&req1).await.expect("write");
    let mut got = read_n(&mut s, resp1.len()).await;
    assert_same_bytes("the first answer", &got, &resp1);
    let other = cat(&[
        b"\x00\x01\x02 binary after HTTP \xff\xfe\r\n\r\n",
        &pattern(3000),
    ]);
    s.write_all(&other).await.expect("write");
    let echo = read_n(&mut s, other.len()).await;
    assert_same_bytes("the non-HTTP bytes echoed", &echo, &other);
    got.extend_from_slice(&echo);
    let got = end_session(s, got, &origin).await;
    assert_exact_relay(&origin, &cat(&[&req1, &other]), &got);
}

/// Not HTTP after a first request, and an IM protocol: the payload
/// signatures see it where HTTP parsing stopped, and reset the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_payload_after_a_request_on_another_port_is_reset() {
    let (req1, resp1) = allowed();
    let origin = ScriptOrigin::start(Script::http(vec![resp1.clone()])).await;
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(&req1).await.expect("write");
    let got = read_n(&mut s, resp1.len()).await;
    assert_same_bytes("the first answer", &got, &resp1);
    // A YMSG login header (signatures/yahoo-messenger.toml).
    s.write_all(b"YMSG\x00\x10\x00\x00\x00\x00\x00\x57\x00\x00\x00\x00\x00\x00\x00\x00")
        .await
        .expect("write");
    let (rest, end) = read_to_close(&mut s).await;
    assert!(
        rest.is_empty(),
        "nothing after a payload refusal: {}",
        escape(&rest)
    );
    assert_closed("YMSG after HTTP", end);
    settle().await;
    assert_eq!(origin.accepted(), 1, "{}", origin.describe());
    assert_same_bytes("what reached the origin", &origin.received(0), &req1);
    let r = record(&proxy, "YMSG", |r| r["verdict"] == "block").await;
    assert_block(&r, Some("yahoo-messenger"), "payload");
}

/// Heads that cannot be framed or are too large to follow.
fn unfollowable() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "two Content-Length values",
            b"POST /upload HTTP/1.1\r\nHost: www.example.test\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello!!".to_vec(),
        ),
        (
            "a Transfer-Encoding that is not chunked",
            b"POST /upload HTTP/1.1\r\nHost: www.example.test\r\nTransfer-Encoding: gzip\r\n\r\n\x1f\x8b\x08\x00 compressed".to_vec(),
        ),
        (
            "a head over the head limit",
            cat(&[
                b"GET /big HTTP/1.1\r\nHost: www.example.test\r\nX-Filler: ",
                &[b'a'; 8000],
                b"\r\n\r\n",
            ]),
        ),
    ]
}

/// The head limit the unfollowable cases exceed.
const SMALL_HEADS: &str =
    "[access]\ndeny_destinations = []\n[limits]\nmax_request_head_bytes = 4096\n";

/// Framing servers could read differently, and a head past the limit, get
/// a 400 inside the tunnel (RFC 9112 §3.2, §6.3): not a byte of them goes
/// on, whatever the port.
async fn unfollowable_gets_400(on_port_80: bool) {
    let proxy = Proxy::start(SMALL_HEADS).await;
    for (name, bytes) in unfollowable() {
        let origin = if on_port_80 {
            match origin_on_80(Script::Echo).await {
                Some(o) => o,
                None => return,
            }
        } else {
            ScriptOrigin::start(Script::Echo).await
        };
        let mut s = tunnel(&proxy, &origin).await;
        s.write_all(&bytes).await.expect("write");
        let (got, end) = read_to_close(&mut s).await;
        assert!(
            got.starts_with(b"HTTP/1.1 400 "),
            "{name}: the client got {}",
            escape(&got)
        );
        assert!(
            head_field(&got, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")),
            "{name}: {}",
            escape(&got)
        );
        assert_ne!(end, Ending::Timeout, "{name}: the tunnel closes");
        settle().await;
        assert!(origin.accepted() <= 1, "{name}: {}", origin.describe());
        assert_eq!(origin.total_received(), 0, "{name}: {}", origin.describe());
    }
    let bad = || -> Vec<Value> {
        proxy
            .log()
            .into_iter()
            .filter(|r| r["status"] == 400)
            .collect()
    };
    wait_until(|| bad().len() >= 3).await;
    assert_eq!(
        bad().len(),
        3,
        "a 400 record per tunnel: {:#?}",
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfollowable_framing_on_another_port_gets_400() {
    unfollowable_gets_400(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfollowable_framing_on_port_80_gets_400() {
    unfollowable_gets_400(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_http_after_a_request_on_port_80_is_reset() {
    let (req1, resp1) = allowed();
    let Some(origin) = origin_on_80(Script::http(vec![resp1.clone()])).await else {
        return;
    };
    let proxy = Proxy::start_open().await;
    let mut s = tunnel(&proxy, &origin).await;
    s.write_all(&req1).await.expect("write");
    let got = read_n(&mut s, resp1.len()).await;
    assert_same_bytes("the first answer", &got, &resp1);
    s.write_all(b"\x00\x01\x02 binary after HTTP \xff\xfe\r\n\r\n")
        .await
        .expect("write");
    let (rest, end) = read_to_close(&mut s).await;
    assert!(rest.is_empty(), "the client got {}", escape(&rest));
    assert_closed("non-HTTP on 80", end);
    settle().await;
    assert_eq!(origin.accepted(), 1, "{}", origin.describe());
    assert_same_bytes("what reached the origin", &origin.received(0), &req1);
    let r = record(&proxy, "non-HTTP on 80", |r| r["verdict"] == "block").await;
    assert_block(&r, None, "non_http");
}
