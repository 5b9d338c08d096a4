//! Explicit absolute-form HTTP/1.1 on the proxy's own forwarding path
//! (`proxy::forward`): keep-alive, pipelining, the upstream pool (reuse,
//! stale connections, expiry), interim responses, every response framing,
//! hand-overs to the general server in the middle of a connection, long
//! bodies, refusals, loops, bad origins and proxy credentials. Every pass
//! is checked byte for byte at both ends: what the origin received and
//! what the client received, with upstream connections counted.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::support::{assert_same_bytes, escape, Proxy, RawOrigin, OPEN, WAIT};

// ---------------------------------------------------------------------------
// A scripted raw HTTP/1.1 origin
// ---------------------------------------------------------------------------

/// One thing the origin does in answer to a request.
#[derive(Clone)]
enum Step {
    /// Write these bytes (and flush).
    Write(Vec<u8>),
    /// Wait (bounded) until the test adds a permit.
    Wait(Arc<Semaphore>),
    /// Close the connection (after what was written).
    Close,
    /// From now on write back every byte that comes (a switched protocol).
    Echo,
}

/// What to do with the `nth` request (from 0) of connection `conn` (from
/// 0), given its exact bytes.
type Script = Arc<dyn Fn(usize, usize, &[u8]) -> Vec<Step> + Send + Sync>;

/// What one upstream connection saw.
#[derive(Clone, Default, Debug)]
struct Seen {
    /// Every byte received, in order.
    raw: Vec<u8>,
    /// The complete requests framed in `raw`.
    requests: Vec<Vec<u8>>,
    /// The proxy closed its side (EOF or reset).
    ended: bool,
    /// The origin closed it (a `Close` step).
    closed_here: bool,
}

/// An HTTP/1.1 origin on raw sockets: frames requests as they come
/// (Content-Length or chunked bodies, pipelined or in pieces), answers each
/// as its script says, counts connections and records every byte.
struct Origin {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<Seen>>>,
}

impl Origin {
    async fn start(script: Script) -> Origin {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = l.local_addr().expect("origin address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns: Arc<Mutex<Vec<Seen>>> = Arc::new(Mutex::new(Vec::new()));
        let (acc, cs) = (Arc::clone(&accepted), Arc::clone(&conns));
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let idx = {
                    let mut c = cs.lock().expect("origin records");
                    c.push(Seen::default());
                    c.len() - 1
                };
                acc.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve_conn(s, idx, Arc::clone(&cs), Arc::clone(&script)));
            }
        });
        Origin {
            addr,
            accepted,
            conns,
        }
    }

    /// An origin that answers every request with `response`.
    async fn fixed(response: &[u8]) -> Origin {
        let r = response.to_vec();
        Origin::start(Arc::new(move |_, _, _| vec![Step::Write(r.clone())])).await
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn conn(&self, i: usize) -> Seen {
        self.conns
            .lock()
            .expect("origin records")
            .get(i)
            .cloned()
            .unwrap_or_default()
    }

    /// Every request of every connection: (connection, bytes).
    fn requests(&self) -> Vec<(usize, Vec<u8>)> {
        let c = self.conns.lock().expect("origin records");
        c.iter()
            .enumerate()
            .flat_map(|(i, s)| s.requests.iter().map(move |r| (i, r.clone())))
            .collect()
    }

    /// Everything received, for failure messages.
    fn describe(&self) -> String {
        let c = self.conns.lock().expect("origin records");
        c.iter()
            .enumerate()
            .map(|(i, s)| format!("connection {i}: {}", escape(&s.raw)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Wait (bounded) until `cond` holds of the records.
    async fn wait(&self, cond: impl Fn(&[Seen]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if cond(&self.conns.lock().expect("origin records")) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

async fn serve_conn(mut s: TcpStream, idx: usize, conns: Arc<Mutex<Vec<Seen>>>, script: Script) {
    let mut buf: Vec<u8> = Vec::new();
    let mut tmp = vec![0u8; 65536];
    let mut nth = 0;
    let mut echo = false;
    loop {
        while !echo {
            let Some(total) = request_len(&buf) else {
                break;
            };
            let req: Vec<u8> = buf.drain(..total).collect();
            conns.lock().expect("origin records")[idx]
                .requests
                .push(req.clone());
            for step in script(idx, nth, &req) {
                match step {
                    Step::Write(b) => {
                        if s.write_all(&b).await.is_err() {
                            return;
                        }
                        let _ = s.flush().await;
                    }
                    Step::Wait(gate) => {
                        let ok = tokio::time::timeout(WAIT, gate.acquire()).await;
                        if let Ok(Ok(p)) = ok {
                            p.forget();
                        }
                    }
                    Step::Close => {
                        let _ = s.shutdown().await;
                        conns.lock().expect("origin records")[idx].closed_here = true;
                        return;
                    }
                    Step::Echo => echo = true,
                }
            }
            nth += 1;
        }
        if echo && !buf.is_empty() {
            if s.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
        match s.read(&mut tmp).await {
            Ok(0) | Err(_) => {
                conns.lock().expect("origin records")[idx].ended = true;
                return;
            }
            Ok(n) => {
                conns.lock().expect("origin records")[idx]
                    .raw
                    .extend_from_slice(&tmp[..n]);
                buf.extend_from_slice(&tmp[..n]);
            }
        }
    }
}

/// The length of the whole request at the front of `buf`, if it is there.
fn request_len(buf: &[u8]) -> Option<usize> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let body = body_len(req.headers, &buf[head..], false)?;
    Some(head + body)
}

/// The length of a Content-Length or chunked body at the front of `b`
/// (`until_close`: none of those, the rest of the stream).
fn body_len(headers: &[httparse::Header<'_>], b: &[u8], until_close: bool) -> Option<usize> {
    let value = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
    };
    if value("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return chunked_len(b);
    }
    match value("content-length") {
        Some(n) => {
            let n: usize = n.trim().parse().expect("a numeric Content-Length");
            (b.len() >= n).then_some(n)
        }
        None if until_close => None,
        None => Some(0),
    }
}

/// The length of a whole chunked body (extensions and trailers included)
/// at the front of `b`, if it is all there.
fn chunked_len(b: &[u8]) -> Option<usize> {
    let line_end = |from: usize| {
        b.get(from..)?
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    };
    let mut pos = 0;
    loop {
        let end = line_end(pos)?;
        let text = String::from_utf8_lossy(&b[pos..end]).to_string();
        let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or_else(|_| panic!("bad chunk size line {text:?}"));
        pos = end + 2;
        if size == 0 {
            loop {
                let end = line_end(pos)?;
                let empty = end == pos;
                pos = end + 2;
                if empty {
                    return Some(pos);
                }
            }
        }
        pos += size + 2;
        if b.len() < pos {
            return None;
        }
    }
}

// ---------------------------------------------------------------------------
// A client that reads responses as exact bytes
// ---------------------------------------------------------------------------

/// A client connection to the proxy that splits what it reads into whole
/// responses, exactly as they came (pipelined ones stay buffered).
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(proxy: &Proxy) -> Client {
        let s = TcpStream::connect(proxy.addr).await.expect("connect proxy");
        Client { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.expect("write to the proxy");
    }

    /// Read more; false at EOF or reset.
    async fn more(&mut self) -> bool {
        let mut tmp = [0u8; 65536];
        match tokio::time::timeout(WAIT, self.s.read(&mut tmp))
            .await
            .expect("the proxy answers in time")
        {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    /// One whole response (an interim one alone), exactly as it came. A
    /// response without framing runs to EOF. `head_request`: no body.
    async fn response(&mut self, head_request: bool) -> Vec<u8> {
        loop {
            if let Some(n) = self.response_len(head_request) {
                return self.buf.drain(..n).collect();
            }
            let before = self.buf.len();
            if !self.more().await {
                // Close-delimited: all of it.
                let mut fields = [httparse::EMPTY_HEADER; 64];
                let complete = matches!(
                    httparse::Response::new(&mut fields).parse(&self.buf),
                    Ok(httparse::Status::Complete(_))
                );
                assert!(
                    complete,
                    "closed after {before} bytes, inside a response: {}",
                    escape(&self.buf)
                );
                return std::mem::take(&mut self.buf);
            }
        }
    }

    fn response_len(&self, head_request: bool) -> Option<usize> {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut fields);
        let head = match resp.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return None,
            Err(e) => panic!("not a response ({e}): {}", escape(&self.buf)),
        };
        let code = resp.code.unwrap_or(0);
        if head_request || (100..200).contains(&code) || code == 204 || code == 304 {
            return Some(head);
        }
        body_len(resp.headers, &self.buf[head..], true).map(|b| head + b)
    }

    /// The proxy ends the connection (bounded), with nothing more sent.
    async fn assert_closed(&mut self) {
        while self.more().await {}
        assert!(
            self.buf.is_empty(),
            "more bytes before the close: {}",
            escape(&self.buf)
        );
    }
}

/// This proxy's `Via` value.
fn via_of(proxy: &Proxy) -> String {
    proxy.shared.via.to_str().expect("via").to_string()
}

/// `response` (which has no hop-by-hop fields) as the client gets it: the
/// status line in HTTP/1.1, `Via` last, and `Connection: close` if asked.
fn relayed(response: &[u8], via: &str, close: bool) -> Vec<u8> {
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head")
        + 2;
    let mut out = response[..end].to_vec();
    if out.starts_with(b"HTTP/1.0 ") {
        out[..9].copy_from_slice(b"HTTP/1.1 ");
    }
    out.extend_from_slice(format!("Via: {via}\r\n").as_bytes());
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(&response[end..]);
    out
}

/// `request` (which has no hop-by-hop fields and a `Host` in its place) as
/// the origin gets it: `Via` last, before the blank line.
fn upstream(request: &str, via: &str) -> Vec<u8> {
    let (head, body) = request.split_once("\r\n\r\n").expect("a whole head");
    format!("{head}\r\nVia: {via}\r\n\r\n{body}").into_bytes()
}

/// The head of a response as text.
fn head_text(r: &[u8]) -> String {
    let end = r
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(r.len(), |p| p + 4);
    String::from_utf8_lossy(&r[..end]).to_string()
}

/// A response's status code.
fn status(r: &[u8]) -> u16 {
    head_text(r)
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn body_of(r: &[u8]) -> &[u8] {
    let at = r
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(r.len(), |p| p + 4);
    &r[at..]
}

/// A header's first value in a head.
fn header(r: &[u8], name: &str) -> Option<String> {
    head_text(r).lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Origin: 1\r\n\r\nok";

// ---------------------------------------------------------------------------
// Keep-alive, pipelining, the pool
// ---------------------------------------------------------------------------

/// A GET, a POST with a Content-Length body and a PUT with a chunked body
/// (chunk extensions and a trailer) on one client connection: one upstream
/// connection, every byte as it must be at both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_requests_on_one_connection_use_one_upstream_connection() {
    const R0: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: raw\r\n\r\nfirst";
    const R1: &[u8] =
        b"HTTP/1.1 201 Created Here\r\nlocation: /made\r\nContent-Length: 6\r\n\r\nsecond";
    const R2: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    let origin = Origin::start(Arc::new(|_, nth, _| {
        vec![Step::Write([R0, R1, R2][nth.min(2)].to_vec())]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let sent = [
        format!("GET http://{a}/one?x=1 HTTP/1.1\r\nHost: {a}\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n"),
        format!("POST http://{a}/two HTTP/1.1\r\nHost: {a}\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world"),
        format!("PUT http://{a}/three HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5;name=value\r\nhello\r\n6;a;b=\"c d\"\r\n world\r\n0;last\r\nX-Sum: 42\r\n\r\n"),
    ];
    let want_up = [
        upstream(&format!("GET /one?x=1 HTTP/1.1\r\nHost: {a}\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n"), &via),
        upstream(&format!("POST /two HTTP/1.1\r\nHost: {a}\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world"), &via),
        upstream(&format!("PUT /three HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n5;name=value\r\nhello\r\n6;a;b=\"c d\"\r\n world\r\n0;last\r\nX-Sum: 42\r\n\r\n"), &via),
    ];
    let mut c = Client::connect(&proxy).await;
    for (i, (req, resp)) in sent.iter().zip([R0, R1, R2]).enumerate() {
        c.send(req.as_bytes()).await;
        let got = c.response(false).await;
        assert_same_bytes(&format!("response {i}"), &got, &relayed(resp, &via, false));
    }
    let seen = origin.requests();
    assert_eq!(seen.len(), 3, "{}", origin.describe());
    for (i, ((conn, got), want)) in seen.iter().zip(&want_up).enumerate() {
        assert_same_bytes(&format!("request {i} at the origin"), got, want);
        assert_eq!(*conn, 0, "request {i} on another upstream connection");
    }
    assert_same_bytes("all the origin got", &origin.conn(0).raw, &want_up.concat());
    assert_eq!(origin.accepted(), 1, "one upstream connection");
    // This path's own pool holds it (the general server's does not).
    assert_eq!(proxy.shared.pool.idle(), 1);
}

/// Two GETs in one client write: two responses, in order, on one upstream
/// connection; the second request goes only after the first is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order() {
    const R0: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none";
    const R1: &[u8] = b"HTTP/1.1 404 Not Here\r\nContent-Length: 3\r\n\r\ntwo";
    let origin = Origin::start(Arc::new(|_, nth, _| {
        vec![Step::Write(if nth == 0 { R0 } else { R1 }.to_vec())]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(
        format!(
            "GET http://{a}/1 HTTP/1.1\r\nHost: {a}\r\n\r\nGET http://{a}/2 HTTP/1.1\r\nHost: {a}\r\nX-N: 2\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let first = c.response(false).await;
    let second = c.response(false).await;
    assert_same_bytes("first response", &first, &relayed(R0, &via, false));
    assert_same_bytes("second response", &second, &relayed(R1, &via, false));
    let want = [
        upstream(&format!("GET /1 HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
        upstream(
            &format!("GET /2 HTTP/1.1\r\nHost: {a}\r\nX-N: 2\r\n\r\n"),
            &via,
        ),
    ]
    .concat();
    assert_same_bytes("the origin's connection", &origin.conn(0).raw, &want);
    assert_eq!(origin.requests().len(), 2);
    assert_eq!(origin.accepted(), 1);
    assert_eq!(proxy.shared.pool.idle(), 1);
}

/// One GET on a fresh client connection, its response bytes.
async fn get_on_new_connection(proxy: &Proxy, authority: &str, path: &str) -> Vec<u8> {
    let mut c = Client::connect(proxy).await;
    c.send(
        format!("GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
    )
    .await;
    c.response(false).await
}

/// Client connections one after another share pooled upstream connections
/// by origin: the same host (in any case) and port reuse one, another port
/// or another host name opens another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_is_keyed_by_host_and_port() {
    let origin = Origin::fixed(OK).await;
    let other = Origin::fixed(OK).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let p = a.port();
    let want = relayed(OK, &via, false);
    for i in 0..2 {
        let got = get_on_new_connection(&proxy, &a.to_string(), &format!("/seq{i}")).await;
        assert_same_bytes(&format!("client {i}"), &got, &want);
        assert_eq!(origin.accepted(), 1, "client {i}: the pooled connection");
    }
    // Another port: another origin, another connection.
    let got = get_on_new_connection(&proxy, &other.addr.to_string(), "/other").await;
    assert_same_bytes("other port", &got, &want);
    assert_eq!(other.accepted(), 1);
    assert_eq!(origin.accepted(), 1);
    // Another name for the same address: another pool entry.
    let got = get_on_new_connection(&proxy, &format!("localhost:{p}"), "/byname").await;
    assert_same_bytes("by name", &got, &want);
    assert_eq!(origin.accepted(), 2, "{}", origin.describe());
    // The same name in another case: the same entry.
    let got = get_on_new_connection(&proxy, &format!("LocalHost:{p}"), "/case").await;
    assert_same_bytes("by name, other case", &got, &want);
    assert_eq!(origin.accepted(), 2, "{}", origin.describe());
    // What each connection carried, exactly.
    assert_same_bytes(
        "connection 0",
        &origin.conn(0).raw,
        &[
            upstream(&format!("GET /seq0 HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
            upstream(&format!("GET /seq1 HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
        ]
        .concat(),
    );
    assert_same_bytes(
        "connection 1",
        &origin.conn(1).raw,
        &[
            upstream(
                &format!("GET /byname HTTP/1.1\r\nHost: localhost:{p}\r\n\r\n"),
                &via,
            ),
            upstream(
                &format!("GET /case HTTP/1.1\r\nHost: LocalHost:{p}\r\n\r\n"),
                &via,
            ),
        ]
        .concat(),
    );
    assert_same_bytes(
        "the other origin",
        &other.conn(0).raw,
        &upstream(
            &format!("GET /other HTTP/1.1\r\nHost: {}\r\n\r\n", other.addr),
            &via,
        ),
    );
}

/// An origin that closes its side after each response (without saying
/// `Connection: close`): the pooled connection is found closed when it is
/// taken, and the next request, a GET or a POST, goes on a fresh
/// connection; the client sees only the origin's answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_while_idle_is_not_used() {
    let origin = Origin::start(Arc::new(|_, _, _| {
        vec![Step::Write(OK.to_vec()), Step::Close]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let want = relayed(OK, &via, false);
    let got = get_on_new_connection(&proxy, &a.to_string(), "/first").await;
    assert_same_bytes("first", &got, &want);
    assert_eq!(proxy.shared.pool.idle(), 1, "pooled after the response");
    assert!(origin.wait(|c| c[0].closed_here).await);
    let got = get_on_new_connection(&proxy, &a.to_string(), "/second").await;
    assert_same_bytes("GET after the close", &got, &want);
    assert_eq!(origin.accepted(), 2, "{}", origin.describe());
    assert!(origin.wait(|c| c[1].closed_here).await);
    // A POST: it is not sent on the closed connection either (it would
    // get no second chance), but on a fresh one, and succeeds.
    let mut c = Client::connect(&proxy).await;
    c.send(
        format!("POST http://{a}/post HTTP/1.1\r\nHost: {a}\r\nContent-Length: 3\r\n\r\nabc")
            .as_bytes(),
    )
    .await;
    assert_same_bytes("POST after the close", &c.response(false).await, &want);
    assert_eq!(origin.accepted(), 3, "{}", origin.describe());
    for (i, req) in [
        format!("GET /first HTTP/1.1\r\nHost: {a}\r\n\r\n"),
        format!("GET /second HTTP/1.1\r\nHost: {a}\r\n\r\n"),
        format!("POST /post HTTP/1.1\r\nHost: {a}\r\nContent-Length: 3\r\n\r\nabc"),
    ]
    .iter()
    .enumerate()
    {
        assert_same_bytes(
            &format!("connection {i}: one request and nothing else"),
            &origin.conn(i).raw,
            &upstream(req, &via),
        );
    }
}

/// A pooled connection that the origin closes on receiving the next
/// request, without answering: a GET is sent again on a fresh connection
/// (the client sees only the 200), a POST is not and gets a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_closed_before_answering_retries_only_idempotent_requests() {
    // Each connection answers its first request and hangs up on the next.
    let origin = Origin::start(Arc::new(|_, nth, _| {
        if nth == 0 {
            vec![Step::Write(OK.to_vec())]
        } else {
            vec![Step::Close]
        }
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let want = relayed(OK, &via, false);
    let got = get_on_new_connection(&proxy, &a.to_string(), "/a").await;
    assert_same_bytes("first", &got, &want);
    let got = get_on_new_connection(&proxy, &a.to_string(), "/b").await;
    assert_same_bytes("the GET sent again", &got, &want);
    assert_eq!(origin.accepted(), 2, "{}", origin.describe());
    let get_b = upstream(&format!("GET /b HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via);
    assert_same_bytes(
        "connection 0: /a, then /b unanswered",
        &origin.conn(0).raw,
        &[
            upstream(&format!("GET /a HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
            get_b.clone(),
        ]
        .concat(),
    );
    assert_same_bytes("connection 1: /b again", &origin.conn(1).raw, &get_b);

    // Connection 1 is pooled and will hang up on the POST.
    let mut c = Client::connect(&proxy).await;
    let post = format!("POST http://{a}/p HTTP/1.1\r\nHost: {a}\r\nContent-Length: 2\r\n\r\nhi");
    c.send(post.as_bytes()).await;
    let got = c.response(false).await;
    assert_eq!(status(&got), 502, "{}", escape(&got));
    let body = String::from_utf8_lossy(body_of(&got)).to_string();
    assert!(
        body.contains("upstream closed the connection"),
        "the 502 names the cause: {body}"
    );
    assert_eq!(origin.accepted(), 2, "the POST is not sent again");
    assert_same_bytes(
        "connection 1: /b, then the POST",
        &origin.conn(1).raw,
        &[
            get_b,
            upstream(
                &format!("POST /p HTTP/1.1\r\nHost: {a}\r\nContent-Length: 2\r\n\r\nhi"),
                &via,
            ),
        ]
        .concat(),
    );
    // The 502 leaves the client connection usable.
    c.send(format!("GET http://{a}/c HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes("after the 502", &c.response(false).await, &want);
    assert_eq!(origin.accepted(), 3);
}

/// With `upstream_idle_timeout_ms = 300` an idle pooled connection is
/// closed: the origin sees its end, not before the timeout and well
/// within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_pooled_connections_are_closed_after_the_idle_timeout() {
    let origin = Origin::fixed(OK).await;
    let proxy = Proxy::start(&format!(
        "{OPEN}\n[limits]\nupstream_idle_timeout_ms = 300\n"
    ))
    .await;
    let via = via_of(&proxy);
    let a = origin.addr;
    // Before the request: the connection cannot be pooled (and expire)
    // any earlier.
    let asked = tokio::time::Instant::now();
    let got = get_on_new_connection(&proxy, &a.to_string(), "/idle").await;
    assert_same_bytes("response", &got, &relayed(OK, &via, false));
    assert!(
        origin.wait(|c| c[0].ended).await,
        "the origin's connection is still open after {WAIT:?}"
    );
    let after = asked.elapsed();
    assert!(
        after >= Duration::from_millis(300),
        "closed after only {after:?}"
    );
    assert!(!origin.conn(0).closed_here);
    assert_eq!(proxy.shared.pool.idle(), 0);
    // The next request opens a new connection.
    let got = get_on_new_connection(&proxy, &a.to_string(), "/again").await;
    assert_same_bytes("response", &got, &relayed(OK, &via, false));
    assert_eq!(origin.accepted(), 2);
}

// ---------------------------------------------------------------------------
// Response framings
// ---------------------------------------------------------------------------

/// 103 Early Hints, then the 200: the client gets the 103 (with Via)
/// before the origin has even sent the 200, then the 200, body exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_hints_are_passed_on_before_the_final_response() {
    const HINTS: &[u8] =
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n\r\n";
    const FINAL: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 12\r\n\r\n<p>hello</p>";
    let gate = Arc::new(Semaphore::new(0));
    let g = Arc::clone(&gate);
    let origin = Origin::start(Arc::new(move |_, _, _| {
        vec![
            Step::Write(HINTS.to_vec()),
            Step::Wait(Arc::clone(&g)),
            Step::Write(FINAL.to_vec()),
        ]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/page HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    let hints = c.response(false).await;
    assert_same_bytes("the 103", &hints, &relayed(HINTS, &via, false));
    gate.add_permits(1);
    let last = c.response(false).await;
    assert_same_bytes("the 200", &last, &relayed(FINAL, &via, false));
    assert_same_bytes(
        "at the origin",
        &origin.conn(0).raw,
        &upstream(&format!("GET /page HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
    );
    // The connection goes on, on the same upstream connection.
    gate.add_permits(1);
    c.send(format!("GET http://{a}/next HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes(
        "103 again",
        &c.response(false).await,
        &relayed(HINTS, &via, false),
    );
    assert_same_bytes(
        "200 again",
        &c.response(false).await,
        &relayed(FINAL, &via, false),
    );
    assert_eq!(origin.accepted(), 1);
}

/// A body delimited by the origin's close (an HTTP/1.0 response without a
/// length, or an HTTP/1.1 one without framing): all of it reaches the
/// client, with `Connection: close`, then the proxy closes; the next
/// request needs (and gets) a new connection at both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_delimited_bodies_end_the_connection() {
    const R10: &[u8] =
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nold style body\r\nwith lines";
    const R11: &[u8] = b"HTTP/1.1 200 Fine\r\nContent-Type: text/plain\r\n\r\nno framing at all";
    let gate = Arc::new(Semaphore::new(0));
    let g = Arc::clone(&gate);
    let origin = Origin::start(Arc::new(move |conn, _, _| {
        let body = if conn == 0 { R10 } else { R11 };
        let (head, rest) = body.split_at(body.len() - 5);
        // The body in two writes, the last one after the client has read
        // the first.
        vec![
            Step::Write(head.to_vec()),
            Step::Wait(Arc::clone(&g)),
            Step::Write(rest.to_vec()),
            Step::Close,
        ]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    for (i, resp) in [R10, R11].iter().enumerate() {
        let mut c = Client::connect(&proxy).await;
        c.send(format!("GET http://{a}/{i} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .await;
        // The head comes before the body ends.
        while !c.buf.windows(4).any(|w| w == b"\r\n\r\n") {
            assert!(c.more().await, "closed before the head");
        }
        gate.add_permits(1);
        let got = c.response(false).await;
        assert_same_bytes(&format!("response {i}"), &got, &relayed(resp, &via, true));
        assert_eq!(header(&got, "connection").as_deref(), Some("close"));
        c.assert_closed().await;
        assert_eq!(origin.accepted(), i + 1);
        assert_same_bytes(
            &format!("connection {i} at the origin"),
            &origin.conn(i).raw,
            &upstream(&format!("GET /{i} HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
        );
    }
}

/// A chunked response with chunk extensions and trailer fields reaches the
/// client exactly as the origin framed it; the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_responses_keep_their_extensions_and_trailers() {
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum, X-Other\r\n\r\n\
        5;ext=1\r\nhello\r\n\
        6;a;b=\"q s\"\r\n world\r\n\
        A\r\n0123456789\r\n\
        0;final=yes\r\nX-Checksum: abc\r\nX-Other: 2\r\n\r\n";
    let origin = Origin::start(Arc::new(|_, nth, _| {
        vec![Step::Write(if nth == 0 { CHUNKED } else { OK }.to_vec())]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/chunks HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes(
        "chunked",
        &c.response(false).await,
        &relayed(CHUNKED, &via, false),
    );
    c.send(format!("GET http://{a}/after HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes("after", &c.response(false).await, &relayed(OK, &via, false));
    assert_same_bytes(
        "at the origin",
        &origin.conn(0).raw,
        &[
            upstream(&format!("GET /chunks HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
            upstream(&format!("GET /after HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
        ]
        .concat(),
    );
    assert_eq!(origin.accepted(), 1);
}

/// HEAD (with the length of the body it does not carry), 204 and 304:
/// no body bytes, and the connection carries the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodiless_responses_keep_the_connection_going() {
    const HEAD: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/zip\r\nContent-Length: 123456\r\n\r\n";
    const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n";
    const NOT_MODIFIED: &[u8] =
        b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 99\r\n\r\n";
    let origin = Origin::start(Arc::new(|_, nth, _| {
        vec![Step::Write(
            [HEAD, NO_CONTENT, NOT_MODIFIED, OK][nth.min(3)].to_vec(),
        )]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let requests = [
        ("HEAD", "/file.zip", ""),
        ("GET", "/nothing", ""),
        ("GET", "/cached", "If-None-Match: \"v1\"\r\n"),
        ("GET", "/last", ""),
    ];
    let mut c = Client::connect(&proxy).await;
    let mut want_up = Vec::new();
    for (i, ((method, path, extra), resp)) in requests
        .iter()
        .zip([HEAD, NO_CONTENT, NOT_MODIFIED, OK])
        .enumerate()
    {
        c.send(
            format!("{method} http://{a}{path} HTTP/1.1\r\nHost: {a}\r\n{extra}\r\n").as_bytes(),
        )
        .await;
        let got = c.response(*method == "HEAD").await;
        assert_same_bytes(&format!("response {i}"), &got, &relayed(resp, &via, false));
        want_up.extend(upstream(
            &format!("{method} {path} HTTP/1.1\r\nHost: {a}\r\n{extra}\r\n"),
            &via,
        ));
    }
    assert!(c.buf.is_empty(), "stray bytes: {}", escape(&c.buf));
    assert_same_bytes("at the origin", &origin.conn(0).raw, &want_up);
    assert_eq!(origin.accepted(), 1);
}

// ---------------------------------------------------------------------------
// Hand-overs to the general server in the middle of a connection
// ---------------------------------------------------------------------------

const WS_101: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

/// A GET on this path, then a WebSocket upgrade on the same client
/// connection: the upgrade goes through (the general server's) and the
/// bytes after it echo exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_after_a_get_is_handed_over() {
    let origin = Origin::start(Arc::new(|_, _, req| {
        let head = String::from_utf8_lossy(req).to_ascii_lowercase();
        if head.contains("upgrade: websocket") {
            vec![Step::Write(WS_101.to_vec()), Step::Echo]
        } else {
            vec![Step::Write(OK.to_vec())]
        }
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/plain HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes("GET", &c.response(false).await, &relayed(OK, &via, false));
    c.send(
        format!(
            "GET http://{a}/chat HTTP/1.1\r\nHost: {a}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    let got = c.response(false).await;
    assert_same_bytes(
        "101",
        &got,
        format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nVia: {via}\r\n\r\n").as_bytes(),
    );
    let frame = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
    c.send(frame).await;
    while c.buf.len() < frame.len() {
        assert!(c.more().await, "the tunnel closed");
    }
    assert_same_bytes("echo", &c.buf, frame);
    let upgrade = format!("GET /chat HTTP/1.1\r\nHost: {a}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nVia: {via}\r\n\r\n");
    let seen = origin.requests();
    assert_eq!(seen.len(), 2, "{}", origin.describe());
    assert_same_bytes(
        "the GET at the origin",
        &seen[0].1,
        &upstream(&format!("GET /plain HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
    );
    assert_same_bytes("the upgrade at the origin", &seen[1].1, upgrade.as_bytes());
    let (conn, _) = seen[1];
    assert_same_bytes(
        "the upgraded connection",
        &origin.conn(conn).raw,
        &[upgrade.as_bytes(), &frame[..]].concat(),
    );
}

/// A GET on this path, then an HTTP/1.0 request on the same connection:
/// answered (by the general server), the origin gets it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_request_after_a_get_is_handed_over() {
    const R: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nfor1.0";
    let origin = Origin::start(Arc::new(|_, _, req| {
        vec![Step::Write(
            if req.starts_with(b"GET /old") { R } else { OK }.to_vec(),
        )]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/new HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes("GET", &c.response(false).await, &relayed(OK, &via, false));
    c.send(format!("GET http://{a}/old HTTP/1.0\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    // The general server answers in the client's version.
    let got = c.response(false).await;
    assert_same_bytes(
        "the HTTP/1.0 answer",
        &got,
        format!("HTTP/1.0 200 OK\r\nContent-Length: 6\r\nVia: {via}\r\n\r\nfor1.0").as_bytes(),
    );
    // An HTTP/1.0 client without keep-alive: the proxy closes after.
    c.assert_closed().await;
    let seen = origin.requests();
    assert_eq!(seen.len(), 2, "{}", origin.describe());
    assert_same_bytes(
        "the GET at the origin",
        &seen[0].1,
        &upstream(&format!("GET /new HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
    );
    assert_same_bytes(
        "the HTTP/1.0 request at the origin",
        &seen[1].1,
        &upstream(&format!("GET /old HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
    );
    // The general server has a pool of its own: the second request went on
    // a connection of its own.
    assert_eq!(seen[0].0, 0);
    assert_eq!(seen[1].0, 1);
    assert_eq!(origin.accepted(), 2);
}

/// A GET on this path, then a CONNECT on the same connection: the tunnel
/// opens (the general server's) and bytes echo exactly through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_after_a_get_is_handed_over() {
    let origin = Origin::fixed(OK).await;
    let echo = RawOrigin::start(None, true).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let e = echo.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/before HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes("GET", &c.response(false).await, &relayed(OK, &via, false));
    // The CONNECT and the first tunnel bytes in one write.
    c.send(format!("CONNECT {e} HTTP/1.1\r\nHost: {e}\r\n\r\nfirst-").as_bytes())
        .await;
    let got = c.response(true).await;
    assert_eq!(status(&got), 200, "{}", escape(&got));
    c.send(b"second").await;
    while c.buf.len() < 12 {
        assert!(c.more().await, "the tunnel closed: {}", escape(&c.buf));
    }
    assert_same_bytes("echo", &c.buf, b"first-second");
    assert_eq!(echo.accepted.load(Ordering::SeqCst), 1);
    assert_same_bytes(
        "at the echo origin",
        &echo.connection_bytes(0),
        b"first-second",
    );
    assert_same_bytes(
        "at the HTTP origin",
        &origin.conn(0).raw,
        &upstream(&format!("GET /before HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
    );
    assert_eq!(origin.accepted(), 1);
}

// ---------------------------------------------------------------------------
// Long request bodies
// ---------------------------------------------------------------------------

/// 1 MiB request bodies, Content-Length and chunked, are not held by this
/// path: they reach the origin byte for byte, and the answer the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_over_64_kib_reach_the_origin_whole() {
    const R: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngot!";
    let origin = Origin::fixed(R).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let body: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();

    // Content-Length.
    let mut c = Client::connect(&proxy).await;
    let mut req = format!(
        "POST http://{a}/upload HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    c.send(&req).await;
    let got = c.response(false).await;
    assert_eq!(status(&got), 200, "{}", escape(&got));
    assert_eq!(body_of(&got), b"got!");
    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    let got_req = &seen[0].1;
    let head_end = got_req
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let head = String::from_utf8_lossy(&got_req[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("post /upload http/1.1\r\n"), "{head}");
    assert!(head.contains("content-length: 1048576\r\n"), "{head}");
    assert_same_bytes("the body at the origin", &got_req[head_end..], &body);

    // Chunked, in chunks of 100 KiB.
    let mut c = Client::connect(&proxy).await;
    let mut framed = Vec::new();
    for chunk in body.chunks(100 * 1024) {
        framed.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        framed.extend_from_slice(chunk);
        framed.extend_from_slice(b"\r\n");
    }
    framed.extend_from_slice(b"0\r\n\r\n");
    let mut req = format!(
        "PUT http://{a}/chunked HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    req.extend_from_slice(&framed);
    c.send(&req).await;
    let got = c.response(false).await;
    assert_eq!(status(&got), 200, "{}", escape(&got));
    let seen = origin.requests();
    assert_eq!(seen.len(), 2, "{}", escape(&seen[0].1[..200]));
    let got_req = &seen[1].1;
    let head_end = got_req
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a head")
        + 4;
    let head = String::from_utf8_lossy(&got_req[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("put /chunked http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("via: {}", via.to_ascii_lowercase())),
        "{head}"
    );
    let got_body = dechunk(&got_req[head_end..]);
    assert_same_bytes("the chunked body's data at the origin", &got_body, &body);
}

/// The data of a whole chunked body.
fn dechunk(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let end = pos
            + b[pos..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .expect("a chunk size line");
        let text = String::from_utf8_lossy(&b[pos..end]).to_string();
        let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16)
            .expect("a chunk size");
        pos = end + 2;
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[pos..pos + size]);
        pos += size + 2;
    }
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

/// A refused request and then an allowed one on the same connection: the
/// 403 page, then the origin's answer; the origin sees only the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_then_an_allowed_request_on_one_connection() {
    let origin = Origin::fixed(OK).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(b"GET http://web.whatsapp.com/ HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
        .await;
    let refused = c.response(false).await;
    assert_eq!(status(&refused), 403, "{}", escape(&refused));
    assert!(
        head_text(&refused).starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{}",
        head_text(&refused)
    );
    assert_eq!(
        header(&refused, "x-chatwall-block").as_deref(),
        Some("whatsapp")
    );
    assert_eq!(
        header(&refused, "content-length"),
        Some(body_of(&refused).len().to_string())
    );
    assert_eq!(header(&refused, "connection"), None);
    c.send(format!("GET http://{a}/allowed HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes(
        "allowed",
        &c.response(false).await,
        &relayed(OK, &via, false),
    );
    assert_same_bytes(
        "at the origin",
        &origin.conn(0).raw,
        &upstream(&format!("GET /allowed HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
    );
    assert_eq!(origin.accepted(), 1);
}

/// A request that already came through this proxy (its own token in a
/// Via field, in any place of the list) is refused with 508 and never
/// reaches the origin; the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarding_loop_is_refused() {
    let origin = Origin::fixed(OK).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    for (i, vias) in [
        format!("Via: {via}\r\n"),
        format!("Via: 1.1 first, {via}, 1.0 last\r\n"),
        format!("Via: 1.0 other\r\nvia: {via}\r\n"),
    ]
    .iter()
    .enumerate()
    {
        c.send(format!("GET http://{a}/loop HTTP/1.1\r\nHost: {a}\r\n{vias}\r\n").as_bytes())
            .await;
        let got = c.response(false).await;
        assert_eq!(status(&got), 508, "loop {i}: {}", escape(&got));
        assert!(
            String::from_utf8_lossy(body_of(&got)).contains("forwarding loop"),
            "loop {i}: {}",
            escape(&got)
        );
    }
    assert_eq!(origin.accepted(), 0, "{}", origin.describe());
    // Another proxy's Via is no loop.
    c.send(
        format!("GET http://{a}/ok HTTP/1.1\r\nHost: {a}\r\nVia: 1.1 chatwall-other\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_same_bytes(
        "not a loop",
        &c.response(false).await,
        &relayed(OK, &via, false),
    );
    assert_same_bytes(
        "at the origin",
        &origin.conn(0).raw,
        format!("GET /ok HTTP/1.1\r\nHost: {a}\r\nVia: 1.1 chatwall-other\r\nVia: {via}\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(origin.accepted(), 1);
}

/// An origin that answers a plain GET with 101, or with a malformed head:
/// 502 naming the cause, in the page and in the access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_origin_answers_are_502() {
    const SWITCH: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    const MALFORMED: &[u8] =
        b"HTTP/1.1 200 OK\r\nBad Header Name: x\r\nContent-Length: 2\r\n\r\nok";
    let switching = Origin::fixed(SWITCH).await;
    let malformed = Origin::fixed(MALFORMED).await;
    let proxy = Proxy::start_open().await;
    for (origin, cause) in [
        (&switching, "101 Switching Protocols"),
        (&malformed, "malformed response head"),
    ] {
        let a = origin.addr;
        let mut c = Client::connect(&proxy).await;
        c.send(format!("GET http://{a}/x HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .await;
        let got = c.response(false).await;
        assert_eq!(status(&got), 502, "{cause}: {}", escape(&got));
        let page = String::from_utf8_lossy(body_of(&got)).to_string();
        assert!(page.contains("invalid response from upstream"), "{page}");
        assert!(page.contains(cause), "{cause}: {page}");
        assert_eq!(origin.accepted(), 1);
        assert_eq!(origin.requests().len(), 1);
        let authority = a.to_string();
        let rec = proxy
            .wait_record(|r| {
                r.get("status").and_then(|s| s.as_u64()) == Some(502)
                    && r.to_string().contains(&authority)
            })
            .await
            .unwrap_or_else(|| panic!("no 502 record for {authority}: {:?}", proxy.log()));
        assert!(rec.to_string().contains(cause), "{cause}: {rec}");
        // The client connection goes on after the 502.
        c.send(format!("GET http://{a}/y HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .await;
        assert_eq!(status(&c.response(false).await), 502);
    }
}

// ---------------------------------------------------------------------------
// Proxy credentials
// ---------------------------------------------------------------------------

/// With Basic credentials required: none gets a 407 and the connection
/// goes on; good ones get the origin's answer, and Proxy-Authorization
/// never reaches the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credentials_are_checked_and_never_forwarded() {
    use base64::Engine as _;
    let origin = Origin::fixed(OK).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let line = chatwall::auth::hash_line("alice", "correct horse").expect("hash");
    std::fs::write(&users, format!("{line}\n")).expect("write users");
    let proxy = Proxy::start(&format!(
        "{OPEN}\n[auth]\nusers_file = {:?}\n",
        users.display().to_string()
    ))
    .await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let good = base64::engine::general_purpose::STANDARD.encode("alice:correct horse");
    let bad = base64::engine::general_purpose::STANDARD.encode("alice:wrong");
    let mut c = Client::connect(&proxy).await;
    for creds in [
        String::new(),
        format!("Proxy-Authorization: Basic {bad}\r\n"),
    ] {
        c.send(format!("GET http://{a}/x HTTP/1.1\r\nHost: {a}\r\n{creds}\r\n").as_bytes())
            .await;
        let got = c.response(false).await;
        assert_eq!(status(&got), 407, "{creds:?}: {}", escape(&got));
        assert!(
            header(&got, "proxy-authenticate").is_some_and(|v| v.starts_with("Basic realm=")),
            "{}",
            head_text(&got)
        );
        assert_eq!(header(&got, "connection"), None, "{}", head_text(&got));
    }
    assert_eq!(origin.accepted(), 0);
    c.send(
        format!(
            "GET http://{a}/x HTTP/1.1\r\nHost: {a}\r\nProxy-Authorization: Basic {good}\r\nAccept: */*\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_same_bytes(
        "with credentials",
        &c.response(false).await,
        &relayed(OK, &via, false),
    );
    assert_same_bytes(
        "at the origin",
        &origin.conn(0).raw,
        &upstream(
            &format!("GET /x HTTP/1.1\r\nHost: {a}\r\nAccept: */*\r\n\r\n"),
            &via,
        ),
    );
    assert_eq!(origin.accepted(), 1);
    let rec = proxy
        .wait_record(|r| r.get("status").and_then(|s| s.as_u64()) == Some(200))
        .await
        .expect("a record of the 200");
    assert_eq!(
        rec.get("user").and_then(|u| u.as_str()),
        Some("alice"),
        "{rec}"
    );
}

// ---------------------------------------------------------------------------
// Targets, connection options, what follows a body
// ---------------------------------------------------------------------------

/// A target with a query and an empty path (`http://host:port?q=1`) goes
/// upstream as `/?q=1` (RFC 9112 §3.2.1: an empty path is sent as "/"),
/// as the general server sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_path_with_a_query_goes_as_slash() {
    let origin = Origin::fixed(OK).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}?q=1 HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes(
        "response",
        &c.response(false).await,
        &relayed(OK, &via, false),
    );
    assert_same_bytes(
        "at the origin",
        &origin.conn(0).raw,
        &upstream(&format!("GET /?q=1 HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
    );
}

/// Targets without a path, without a Host field or with a wrong one:
/// origin form with "/", Host from the target in its place or appended;
/// Via after the client's own Via fields, in requests and responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_via_are_placed_as_a_forward_proxy_must() {
    const R: &[u8] =
        b"HTTP/1.1 200 OK\r\nVia: 1.1 origin-cache\r\nX-After: 1\r\nContent-Length: 2\r\n\r\nok";
    let origin = Origin::fixed(R).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    // The origin's Via, then ours, then the rest of its head.
    let want = format!(
        "HTTP/1.1 200 OK\r\nVia: 1.1 origin-cache\r\nVia: {via}\r\nX-After: 1\r\nContent-Length: 2\r\n\r\nok"
    );
    let cases = [
        (
            format!("GET http://{a} HTTP/1.1\r\nAccept: */*\r\n\r\n"),
            format!("GET / HTTP/1.1\r\nAccept: */*\r\nHost: {a}\r\nVia: {via}\r\n\r\n"),
        ),
        (
            format!("DELETE http://{a}/x HTTP/1.1\r\nX-A: 1\r\nhOsT: elsewhere.example\r\nX-B: 2\r\n\r\n"),
            format!("DELETE /x HTTP/1.1\r\nX-A: 1\r\nhOsT: {a}\r\nX-B: 2\r\nVia: {via}\r\n\r\n"),
        ),
        (
            format!("GET http://{a}/v HTTP/1.1\r\nHost: {a}\r\nVia: 1.0 one\r\nX-C: 3\r\nvia: 1.1 two\r\nX-D: 4\r\n\r\n"),
            format!("GET /v HTTP/1.1\r\nHost: {a}\r\nVia: 1.0 one\r\nX-C: 3\r\nvia: 1.1 two\r\nVia: {via}\r\nX-D: 4\r\n\r\n"),
        ),
    ];
    let mut c = Client::connect(&proxy).await;
    let mut want_up = Vec::new();
    for (i, (sent, up)) in cases.iter().enumerate() {
        c.send(sent.as_bytes()).await;
        assert_same_bytes(
            &format!("response {i}"),
            &c.response(false).await,
            want.as_bytes(),
        );
        want_up.extend_from_slice(up.as_bytes());
    }
    assert_same_bytes("at the origin", &origin.conn(0).raw, &want_up);
    assert_eq!(origin.accepted(), 1);
}

/// A client's `Connection: close` (among other options): the fields it
/// names and it go, the response says `Connection: close` and the proxy
/// closes; the upstream connection stays pooled for the next client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_close_closes_after_the_response() {
    let origin = Origin::fixed(OK).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(
        format!("GET http://{a}/bye HTTP/1.1\r\nHost: {a}\r\nConnection: X-Secret, close\r\nX-Secret: s\r\nX-Kept: k\r\n\r\n")
            .as_bytes(),
    )
    .await;
    assert_same_bytes(
        "response",
        &c.response(false).await,
        &relayed(OK, &via, true),
    );
    c.assert_closed().await;
    assert_same_bytes(
        "at the origin",
        &origin.conn(0).raw,
        &upstream(
            &format!("GET /bye HTTP/1.1\r\nHost: {a}\r\nX-Kept: k\r\n\r\n"),
            &via,
        ),
    );
    assert_eq!(proxy.shared.pool.idle(), 1);
    let got = get_on_new_connection(&proxy, &a.to_string(), "/next").await;
    assert_same_bytes("next client", &got, &relayed(OK, &via, false));
    assert_eq!(origin.accepted(), 1);
}

/// A refusal to a client that asked to close: the page, then the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_to_a_closing_client_closes() {
    let proxy = Proxy::start_open().await;
    let mut c = Client::connect(&proxy).await;
    c.send(b"GET http://web.whatsapp.com/ HTTP/1.1\r\nHost: web.whatsapp.com\r\nConnection: close\r\n\r\n")
        .await;
    let got = c.response(false).await;
    assert_eq!(status(&got), 403, "{}", escape(&got));
    assert_eq!(header(&got, "connection").as_deref(), Some("close"));
    c.assert_closed().await;
    // A HEAD gets the page's head only.
    let mut c = Client::connect(&proxy).await;
    c.send(b"HEAD http://web.whatsapp.com/ HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
        .await;
    let got = c.response(true).await;
    assert_eq!(status(&got), 403, "{}", escape(&got));
    assert!(header(&got, "content-length").is_some_and(|n| n != "0"));
    assert_eq!(body_of(&got), b"");
    c.send(b"GET http://web.whatsapp.com/ HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
        .await;
    let got = c.response(false).await;
    assert_eq!(status(&got), 403);
    assert_eq!(
        header(&got, "content-length"),
        Some(body_of(&got).len().to_string())
    );
}

/// Bytes after a response's end (more than its Content-Length): the
/// client gets the response only, and the upstream connection is not
/// reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_after_a_response_keep_its_connection_out_of_the_pool() {
    let origin =
        Origin::fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Origin: 1\r\n\r\nokSURPLUS")
            .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    for i in 0..2 {
        c.send(format!("GET http://{a}/{i} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .await;
        assert_same_bytes(
            &format!("response {i}"),
            &c.response(false).await,
            &relayed(OK, &via, false),
        );
        assert_eq!(origin.accepted(), i + 1, "{}", origin.describe());
    }
    assert_eq!(proxy.shared.pool.idle(), 0);
    assert!(c.buf.is_empty(), "{}", escape(&c.buf));
}

/// An origin that closes inside a body: the client gets what came and
/// then the close (no second response), and the log says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_cut_short_closes_the_client_connection() {
    const CUT: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc";
    let origin = Origin::start(Arc::new(|_, _, _| {
        vec![Step::Write(CUT.to_vec()), Step::Close]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/cut HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    while c.more().await {}
    assert_same_bytes("what came", &c.buf, &relayed(CUT, &via, false));
    let rec = proxy
        .wait_record(|r| r.to_string().contains("inside a body"))
        .await;
    assert!(rec.is_some(), "{:?}", proxy.log());
    assert_eq!(proxy.shared.pool.idle(), 0);
}

/// Long response bodies, Content-Length and chunked, relayed exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_response_bodies_are_relayed_exactly() {
    let data: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let mut by_length =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", data.len()).into_bytes();
    by_length.extend_from_slice(&data);
    let mut chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for (i, part) in data.chunks(70_000).enumerate() {
        chunked.extend_from_slice(format!("{:x};n={i}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let responses = [by_length.clone(), chunked.clone()];
    let origin = Origin::start(Arc::new(move |_, nth, _| {
        vec![Step::Write(responses[nth % 2].clone())]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    for (i, resp) in [by_length, chunked].iter().enumerate() {
        c.send(format!("GET http://{a}/{i} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .await;
        assert_same_bytes(
            &format!("response {i}"),
            &c.response(false).await,
            &relayed(resp, &via, false),
        );
    }
    assert_eq!(origin.accepted(), 1);
    assert_eq!(proxy.shared.pool.idle(), 1);
}

// ---------------------------------------------------------------------------
// Limits: the 64 KiB request body, the pool's size, retried methods
// ---------------------------------------------------------------------------

/// A Content-Length body of exactly 64 KiB and a chunked body that ends
/// within 64 KiB are held and sent by this path (byte for byte, chunk
/// framing as sent, on its pooled connection); one byte more goes to the
/// general server (a connection of its own), body intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_64_kib_request_body_boundary() {
    let origin = Origin::fixed(OK).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let data: Vec<u8> = (0..64 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
    let mut c = Client::connect(&proxy).await;

    // Exactly 64 KiB with a length.
    let head =
        format!("POST http://{a}/max HTTP/1.1\r\nHost: {a}\r\nContent-Length: 65536\r\n\r\n");
    c.send(&[head.as_bytes(), &data].concat()).await;
    assert_same_bytes(
        "64 KiB",
        &c.response(false).await,
        &relayed(OK, &via, false),
    );
    let mut want_up = [
        upstream(
            &format!("POST /max HTTP/1.1\r\nHost: {a}\r\nContent-Length: 65536\r\n\r\n"),
            &via,
        ),
        data.clone(),
    ]
    .concat();
    assert_same_bytes("64 KiB at the origin", &origin.conn(0).raw, &want_up);

    // Chunked, ending within 64 KiB (framing included).
    let mut framed = Vec::new();
    for (i, part) in data[..60_000].chunks(7_000).enumerate() {
        framed.extend_from_slice(format!("{:X};i={i}\r\n", part.len()).as_bytes());
        framed.extend_from_slice(part);
        framed.extend_from_slice(b"\r\n");
    }
    framed.extend_from_slice(b"0\r\nX-T: 1\r\n\r\n");
    assert!(framed.len() <= 64 * 1024);
    let head = format!(
        "PUT http://{a}/chunks HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    c.send(&[head.as_bytes(), &framed].concat()).await;
    assert_same_bytes(
        "chunked",
        &c.response(false).await,
        &relayed(OK, &via, false),
    );
    want_up.extend(upstream(
        &format!("PUT /chunks HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n"),
        &via,
    ));
    want_up.extend_from_slice(&framed);
    assert_same_bytes("chunked at the origin", &origin.conn(0).raw, &want_up);
    assert_eq!(origin.accepted(), 1);
    assert_eq!(proxy.shared.pool.idle(), 1);

    // One byte more: the general server's, on a connection of its own.
    let mut more = data.clone();
    more.push(b'!');
    let head =
        format!("POST http://{a}/over HTTP/1.1\r\nHost: {a}\r\nContent-Length: 65537\r\n\r\n");
    c.send(&[head.as_bytes(), &more].concat()).await;
    let got = c.response(false).await;
    assert_eq!(status(&got), 200, "{}", escape(&got));
    assert_eq!(body_of(&got), b"ok");
    assert_eq!(origin.accepted(), 2, "{}", origin.describe());
    let seen = origin.conn(1).requests;
    assert_eq!(seen.len(), 1);
    assert!(seen[0].ends_with(&[b"\r\n\r\n".as_slice(), &more].concat()));
    assert!(String::from_utf8_lossy(&seen[0]).starts_with("POST /over HTTP/1.1\r\n"));
}

/// A pooled connection that the origin closes on receiving a PUT (with a
/// body), a DELETE or a HEAD: each is sent again, whole and exact, on a
/// fresh connection, and the client sees one answer each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_sent_again_whole() {
    const HEAD_OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n";
    let origin = Origin::start(Arc::new(|_, nth, req| {
        if nth > 0 {
            vec![Step::Close]
        } else if req.starts_with(b"HEAD ") {
            vec![Step::Write(HEAD_OK.to_vec())]
        } else {
            vec![Step::Write(OK.to_vec())]
        }
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/a HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    assert_same_bytes("first", &c.response(false).await, &relayed(OK, &via, false));
    let cases = [
        (
            format!("PUT http://{a}/p HTTP/1.1\r\nHost: {a}\r\nContent-Length: 9\r\n\r\nput data!"),
            format!("PUT /p HTTP/1.1\r\nHost: {a}\r\nContent-Length: 9\r\n\r\nput data!"),
            OK,
        ),
        (
            format!("DELETE http://{a}/d HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            format!("DELETE /d HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            OK,
        ),
        (
            format!("HEAD http://{a}/h HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            format!("HEAD /h HTTP/1.1\r\nHost: {a}\r\n\r\n"),
            HEAD_OK,
        ),
    ];
    for (i, (sent, up, resp)) in cases.iter().enumerate() {
        c.send(sent.as_bytes()).await;
        let got = c.response(sent.starts_with("HEAD")).await;
        assert_same_bytes(&format!("case {i}"), &got, &relayed(resp, &via, false));
        assert_eq!(origin.accepted(), i + 2, "{}", origin.describe());
        let up = upstream(up, &via);
        // Hung up on at the pooled connection, then on a fresh one.
        let last = origin.conn(i).requests;
        assert_same_bytes(&format!("case {i}, first try"), &last[last.len() - 1], &up);
        assert_same_bytes(&format!("case {i}, again"), &origin.conn(i + 1).raw, &up);
    }
    assert!(c.buf.is_empty(), "{}", escape(&c.buf));
    // One record for each request, each a 200.
    let recs = proxy.wait_log(4).await;
    let statuses: Vec<u64> = recs
        .iter()
        .filter_map(|r| r.get("status").and_then(|s| s.as_u64()))
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200], "{recs:?}");
}

/// At most `MAX_IDLE_PER_ORIGIN` idle connections are kept per origin:
/// one more answered at once leaves that many in the pool, and the origin
/// sees the oldest closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_keeps_a_bounded_number_of_idle_connections_per_origin() {
    const N: usize = chatwall::proxy::forward::MAX_IDLE_PER_ORIGIN + 1;
    // A gate for each request (`GET /i`).
    let gates: Arc<Vec<Arc<Semaphore>>> =
        Arc::new((0..N).map(|_| Arc::new(Semaphore::new(0))).collect());
    let g = Arc::clone(&gates);
    let origin = Origin::start(Arc::new(move |_, _, req| {
        let path = String::from_utf8_lossy(req)
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.trim_start_matches('/').parse::<usize>().ok())
            .expect("GET /i");
        vec![Step::Wait(Arc::clone(&g[path])), Step::Write(OK.to_vec())]
    }))
    .await;
    // One client address holds all of them: above its default cap.
    let proxy = Proxy::start(&format!(
        "{OPEN}\n[limits]\nmax_connections_per_client = {}\n",
        2 * N
    ))
    .await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut c = Client::connect(&proxy).await;
        c.send(format!("GET http://{a}/{i} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .await;
        clients.push(c);
    }
    assert!(
        origin
            .wait(|c| c.iter().filter(|s| !s.requests.is_empty()).count() == N)
            .await,
        "{} connections",
        origin.accepted()
    );
    // Answer them one at a time, so that they are pooled in order.
    for (i, c) in clients.iter_mut().enumerate() {
        gates[i].add_permits(1);
        assert_same_bytes(
            "response",
            &c.response(false).await,
            &relayed(OK, &via, false),
        );
    }
    assert_eq!(origin.accepted(), N);
    assert_eq!(proxy.shared.pool.idle(), N - 1);
    assert!(origin.wait(|c| c.iter().any(|s| s.ended)).await);
    let ended: Vec<usize> = (0..N).filter(|&i| origin.conn(i).ended).collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    // The oldest: the first answered.
    let first = &origin.conn(ended[0]).requests[0];
    assert!(
        first.starts_with(b"GET /0 HTTP/1.1\r\n"),
        "{}",
        escape(first)
    );
}

/// Interim answers the request did not ask for (100 Continue without
/// Expect) are passed on too, before the final one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_100_continue_is_passed_on() {
    const CONT: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    let origin = Origin::start(Arc::new(|_, _, _| {
        vec![Step::Write(CONT.to_vec()), Step::Write(OK.to_vec())]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(
        format!("POST http://{a}/c HTTP/1.1\r\nHost: {a}\r\nContent-Length: 1\r\n\r\nx").as_bytes(),
    )
    .await;
    assert_same_bytes("100", &c.response(false).await, &relayed(CONT, &via, false));
    assert_same_bytes("200", &c.response(false).await, &relayed(OK, &via, false));
    assert_same_bytes(
        "at the origin",
        &origin.conn(0).raw,
        &upstream(
            &format!("POST /c HTTP/1.1\r\nHost: {a}\r\nContent-Length: 1\r\n\r\nx"),
            &via,
        ),
    );
}

/// An origin that says `Connection: close` with a length, or answers in
/// HTTP/1.0 with a length: the field goes, the client connection goes on
/// (its framing is known), the upstream one is not reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_close_with_a_length_keeps_the_client_connection() {
    const CLOSING: &[u8] =
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\nX-Origin: 1\r\n\r\nok";
    const OLD: &[u8] = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nX-Origin: 1\r\n\r\nok";
    let origin = Origin::start(Arc::new(|conn, _, _| {
        let r = if conn == 0 { CLOSING } else { OLD };
        vec![Step::Write(r.to_vec()), Step::Close]
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    for i in 0..2 {
        c.send(format!("GET http://{a}/{i} HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .await;
        // Both as `OK` with Via: the status line in HTTP/1.1, no Connection.
        assert_same_bytes(
            &format!("response {i}"),
            &c.response(false).await,
            &relayed(OK, &via, false),
        );
        assert_eq!(origin.accepted(), i + 1);
        assert_same_bytes(
            &format!("connection {i}"),
            &origin.conn(i).raw,
            &upstream(&format!("GET /{i} HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
        );
    }
    assert_eq!(proxy.shared.pool.idle(), 0);
}

/// A response with both Transfer-Encoding: chunked and Content-Length is
/// framed by the chunks, and reaches the client without the
/// Content-Length (RFC 9112 §6.3: an intermediary that forwards it must
/// remove it first), so that no client reads it by the wrong one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_both_framings_loses_its_content_length() {
    const BOTH: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    const CLEAN: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let origin = Origin::fixed(BOTH).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/both HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    let got = c.response(false).await;
    assert_same_bytes("response", &got, &relayed(CLEAN, &via, false));
}

/// A response head over 64 KiB: 502 naming the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_over_64_kib_is_502() {
    let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
    // Well over the limit: a head read in growing pieces may end within
    // the read that crosses 64 KiB and pass; this one cannot.
    for i in 0..60 {
        big.extend_from_slice(format!("X-Big-{i}: {}\r\n", "v".repeat(3000)).as_bytes());
    }
    big.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
    let origin = Origin::fixed(&big).await;
    let proxy = Proxy::start_open().await;
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/big HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    let got = c.response(false).await;
    assert_eq!(status(&got), 502, "{} bytes", got.len());
    let page = String::from_utf8_lossy(body_of(&got)).to_string();
    assert!(page.contains("response head over 64 KiB"), "{page}");
}

/// A response head of about 70 KB, a little over the 64 KiB limit: 502
/// as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_head_a_little_over_64_kib_is_502() {
    let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..35 {
        big.extend_from_slice(format!("X-Big-{i}: {}\r\n", "v".repeat(2000)).as_bytes());
    }
    big.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
    assert!(big.len() > 70_000);
    let origin = Origin::fixed(&big).await;
    let proxy = Proxy::start_open().await;
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("GET http://{a}/big HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    let got = c.response(false).await;
    assert_eq!(status(&got), 502, "{} bytes", got.len());
}

/// A request that asks to close, pipelined with another: the first is
/// answered with `Connection: close`, the second never goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_after_a_close_request_is_forwarded() {
    let origin = Origin::fixed(OK).await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(
        format!(
            "GET http://{a}/1 HTTP/1.1\r\nHost: {a}\r\nConnection: close\r\n\r\nGET http://{a}/2 HTTP/1.1\r\nHost: {a}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_same_bytes(
        "response",
        &c.response(false).await,
        &relayed(OK, &via, true),
    );
    c.assert_closed().await;
    assert_same_bytes(
        "at the origin",
        &origin.conn(0).raw,
        &upstream(&format!("GET /1 HTTP/1.1\r\nHost: {a}\r\n\r\n"), &via),
    );
    assert_eq!(origin.requests().len(), 1);
}

/// The same on the general server's path (OPTIONS goes there): the
/// response comes, framed by its chunks, without the Content-Length
/// (which made the general server abort it after the head was decided).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_framings_on_the_general_path() {
    const BOTH: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let origin = Origin::fixed(BOTH).await;
    let proxy = Proxy::start_open().await;
    let a = origin.addr;
    let mut c = Client::connect(&proxy).await;
    c.send(format!("OPTIONS http://{a}/both HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await;
    let got = c.response(false).await;
    assert_eq!(status(&got), 200, "{}", escape(&got));
    assert_eq!(header(&got, "content-length"), None, "{}", escape(&got));
    // Chunked again by the general server: one chunk of the three bytes.
    assert_eq!(body_of(&got), b"3\r\nabc\r\n0\r\n\r\n");
    assert_eq!(origin.accepted(), 1);
    let sent = &origin.conn(0).requests[0];
    assert!(
        sent.starts_with(b"OPTIONS /both HTTP/1.1\r\n"),
        "{}",
        escape(sent)
    );
}
