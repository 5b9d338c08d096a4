//! The explicit listener end to end: absolute-form HTTP and CONNECT through a
//! real in-process chatwall to real loopback origins. Every refusal kind,
//! every upstream failure, the metrics text, the access log and the admin
//! endpoints.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{
    self, connect_tunnel, pattern_byte, proxy_request, raw_exchange, read_response, HttpOrigin,
    Proxy, RawOrigin, TlsOrigin, OPEN, WAIT,
};

// ---------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------

/// A signature fixture directory (absolute).
fn sig_dir(name: &str) -> String {
    format!(
        "{}/tests/fixtures/signatures/valid/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `[access]` open to loopback plus `[signatures] dir` of a fixture.
fn open_with_sigs(name: &str) -> String {
    format!("{OPEN}\n[signatures]\ndir = {:?}\n", sig_dir(name))
}

/// One response read off a stream: status, head text, decoded body.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        header_of(&self.head, name)
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).to_string()
    }
}

/// The first value of a header in a response or request head.
fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Read exactly `n` more bytes into `buf` (bounded).
async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) {
    let mut tmp = [0u8; 16384];
    while buf.len() < n {
        let r = tokio::time::timeout(WAIT, s.read(&mut tmp))
            .await
            .expect("bytes in time")
            .expect("read");
        assert!(r > 0, "closed early: have {} of {n} bytes", buf.len());
        buf.extend_from_slice(&tmp[..r]);
    }
}

/// Read one full HTTP/1.1 response: Content-Length or chunked bodies, or no
/// body (`no_body` for HEAD and CONNECT 2xx). Leftover bytes are an error:
/// the tests never pipeline.
async fn read_full(s: &mut TcpStream, no_body: bool) -> Resp {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = tokio::time::timeout(WAIT, s.read(&mut tmp))
            .await
            .expect("head in time")
            .expect("read");
        assert!(
            n > 0,
            "closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut rest = buf[head_end..].to_vec();
    if no_body || status == 204 || status == 304 || (100..200).contains(&status) {
        return Resp {
            status,
            head,
            body: rest,
        };
    }
    let chunked = header_of(&head, "transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut body = Vec::new();
        let mut pos = 0;
        loop {
            let line_end = loop {
                if let Some(p) = rest[pos..].windows(2).position(|w| w == b"\r\n") {
                    break pos + p;
                }
                let need = rest.len() + 1;
                fill(s, &mut rest, need).await;
            };
            let size_text = String::from_utf8_lossy(&rest[pos..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size {size_text:?}"));
            pos = line_end + 2;
            if size == 0 {
                // Trailers (none expected) end with an empty line.
                loop {
                    if let Some(p) = rest[pos..].windows(2).position(|w| w == b"\r\n") {
                        let empty = p == 0;
                        pos += p + 2;
                        if empty {
                            break;
                        }
                        continue;
                    }
                    let need = rest.len() + 1;
                    fill(s, &mut rest, need).await;
                }
                break;
            }
            let need = pos + size + 2;
            if rest.len() < need {
                fill(s, &mut rest, need).await;
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
        return Resp { status, head, body };
    }
    match header_of(&head, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(len) => {
            fill(s, &mut rest, len).await;
            Resp {
                status,
                head,
                body: rest,
            }
        }
        None => {
            // Close-delimited.
            let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
                .await
                .expect("close-delimited body in time");
            Resp {
                status,
                head,
                body: rest,
            }
        }
    }
}

/// One request on a fresh connection.
async fn one(proxy: SocketAddr, raw: &str) -> Resp {
    let mut s = TcpStream::connect(proxy).await.expect("connect proxy");
    s.write_all(raw.as_bytes()).await.expect("write");
    read_full(&mut s, raw.starts_with("HEAD ")).await
}

/// `GET url` in absolute form on a fresh connection.
async fn get(proxy: SocketAddr, url: &str) -> Resp {
    let host = url
        .split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("");
    one(
        proxy,
        &format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    )
    .await
}

/// `CONNECT authority` on a fresh connection; returns the response and the
/// stream (a tunnel when the status is 200).
async fn connect(proxy: SocketAddr, authority: &str) -> (Resp, TcpStream) {
    let mut s = TcpStream::connect(proxy).await.expect("connect proxy");
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, head, body) = read_response(&mut s).await;
    (Resp { status, head, body }, s)
}

/// Write `bytes`, read until the peer closes: (bytes, closed within WAIT).
async fn until_close(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let closed = match tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await {
        Ok(Ok(_)) => true,
        // A reset after the response still ends the connection.
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Err(_) => false,
    };
    (out, closed)
}

/// One sample of the metrics text by name and labels, in any label order
/// (0 when absent).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (n, rest) = match key.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (key, ""),
            };
            if n != name {
                return None;
            }
            let have: Vec<&str> = if rest.is_empty() {
                Vec::new()
            } else {
                rest.split("\",").collect()
            };
            if have.len() != labels.len() {
                return None;
            }
            let all = labels.iter().all(|(k, v)| {
                have.iter()
                    .any(|h| h.trim_end_matches('"') == format!("{k}=\"{v}").as_str())
            });
            all.then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Wait until a log record satisfies `pred` (bounded), and return it.
async fn wait_record(proxy: &Proxy, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(r) = proxy.log().into_iter().find(&pred) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no matching access-log record in {:?}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn field(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

fn num(v: &Value, k: &str) -> u64 {
    v.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{k} is not a number in {v}"))
}

/// A port on loopback that nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A loopback upstream that accepts and then does `behave` with each stream.
async fn misbehaving_upstream<F, Fut>(behave: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(behave(s));
        }
    });
    addr
}

/// Read a request head off `s` (bounded; whatever comes).
async fn read_head(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(WAIT, s.read(&mut tmp)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&tmp[..n]),
            _ => return,
        }
    }
}

// ---------------------------------------------------------------------------
// Plain HTTP forwarding
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_is_forwarded_in_origin_form() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let url = format!("http://{}/hello?x=1", origin.addr);
    let req = Request::get(&url)
        .header("host", origin.addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = proxy_request(proxy.addr, req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("x-origin").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    let via: Vec<_> = resp
        .headers()
        .get_all("via")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert!(
        via.iter().any(|v| v.contains("chatwall")),
        "no Via on the response: {via:?}"
    );
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("in time")
        .expect("body")
        .to_bytes();
    assert_eq!(&body[..], b"hello from origin\n");
    let seen = origin.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "GET");
    assert_eq!(seen[0].uri, "/hello?x=1", "the origin must get origin-form");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_returns_headers_without_a_body() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let raw = format!(
        "HEAD http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n",
        a = origin.addr
    );
    s.write_all(raw.as_bytes()).await.expect("write");
    let r = read_full(&mut s, true).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.body.is_empty(),
        "HEAD response carried {} body bytes",
        r.body.len()
    );
    assert_eq!(r.header("x-origin").as_deref(), Some("1"));
    // The connection is still in step: a GET on it gets its own full body.
    let raw = format!(
        "GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n",
        a = origin.addr
    );
    s.write_all(raw.as_bytes()).await.expect("write");
    let r = read_full(&mut s, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from origin\n");
    let methods: Vec<_> = origin.requests().into_iter().map(|r| r.method).collect();
    assert_eq!(methods, ["HEAD", "GET"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_bodies_reach_the_origin_whole() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let a = origin.addr;
    // (name, request head + body as sent, body length the origin must see)
    let payload: Vec<u8> = (0..100_000).map(pattern_byte).collect();
    let mut chunked = Vec::new();
    for part in payload.chunks(7_777) {
        chunked.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        chunked.extend_from_slice(part);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        (
            "content-length",
            [format!("POST http://{a}/echo HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\n\r\n", payload.len()).into_bytes(), payload.clone()].concat(),
            payload.len(),
        ),
        (
            "chunked",
            [format!("POST http://{a}/echo HTTP/1.1\r\nHost: {a}\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes(), chunked].concat(),
            payload.len(),
        ),
        (
            "empty",
            format!("POST http://{a}/echo HTTP/1.1\r\nHost: {a}\r\nContent-Length: 0\r\n\r\n").into_bytes(),
            0,
        ),
    ];
    for (i, (name, raw, len)) in cases.iter().enumerate() {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.write_all(raw).await.expect("write");
        let r = read_full(&mut s, false).await;
        assert_eq!(r.status, 200, "{name}: {}", r.head);
        assert_eq!(r.body.len(), *len, "{name}: echoed length");
        assert!(r.body == payload[..*len], "{name}: echoed bytes differ");
        let seen = origin.requests();
        assert_eq!(seen.len(), i + 1, "{name}");
        assert_eq!(seen[i].method, "POST", "{name}");
        assert_eq!(
            seen[i].body_len, *len,
            "{name}: the origin saw a different body length"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_body_streams_byte_exact() {
    const N: usize = 64 * 1024 * 1024;
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let url = format!("http://{}/bytes/{N}", origin.addr);
    let req = Request::get(&url)
        .header("host", origin.addr.to_string())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = proxy_request(proxy.addr, req).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut pos = 0usize;
    let started = Instant::now();
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("frame in time")
    {
        let frame = frame.expect("body frame");
        if let Some(d) = frame.data_ref() {
            for (i, &b) in d.iter().enumerate() {
                if b != pattern_byte(pos + i) {
                    panic!("byte {} is {b}, want {}", pos + i, pattern_byte(pos + i));
                }
            }
            pos += d.len();
        }
        assert!(
            started.elapsed() < WAIT * 12,
            "64 MiB took too long ({pos} bytes so far)"
        );
    }
    assert_eq!(pos, N, "body length");
    let rec = wait_record(&proxy, |r| {
        field(r, "target") == url && r.get("bytes_down").and_then(Value::as_u64) == Some(N as u64)
    })
    .await;
    assert_eq!(num(&rec, "status"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_survives_a_block_on_the_same_connection() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let a = origin.addr;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    let local = s.local_addr().expect("local addr");

    s.write_all(format!("GET http://{a}/one HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"hello from origin\n");

    s.write_all(b"GET http://web.whatsapp.com/ HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
        .await
        .expect("write");
    let (status, head, body) = read_response(&mut s).await;
    assert_eq!(status, 403, "{head}");
    assert_eq!(
        header_of(&head, "x-chatwall-block").as_deref(),
        Some("whatsapp"),
        "{head}"
    );
    let page = String::from_utf8_lossy(&body);
    assert!(page.contains("WhatsApp"), "the page names the app: {page}");
    assert!(
        !header_of(&head, "connection").is_some_and(|c| c.eq_ignore_ascii_case("close")),
        "a block must keep the connection: {head}"
    );

    s.write_all(format!("GET http://{a}/three HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"hello from origin\n");

    let uris: Vec<_> = origin.requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(uris, ["/one", "/three"]);
    // All three on one client connection.
    let recs = proxy.wait_log(3).await;
    assert_eq!(recs.len(), 3, "{recs:?}");
    for r in &recs {
        assert_eq!(field(r, "client"), local.to_string(), "{r}");
    }
    assert_eq!(
        proxy
            .metric("chatwall_connections_total{listener=\"explicit\"}")
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_removed_via_added_host_rewritten() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let a = origin.addr;
    let raw = format!(
        "GET http://{a}/hop?x=1 HTTP/1.1\r\n\
         Host: wrong.example:1234\r\n\
         Connection: keep-alive, X-Secret\r\n\
         X-Secret: s3cret\r\n\
         Proxy-Connection: keep-alive\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
         Via: 1.0 first-hop\r\n\
         X-Keep: kept\r\n\r\n"
    );
    let r = one(proxy.addr, &raw).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(
        r.header("via").is_some_and(|v| v.contains("chatwall")),
        "response Via: {}",
        r.head
    );

    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    let get = |name: &str| {
        h.iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect::<Vec<_>>()
    };
    for gone in [
        "x-secret",
        "proxy-connection",
        "keep-alive",
        "te",
        "proxy-authorization",
    ] {
        assert!(get(gone).is_empty(), "{gone} reached the origin: {h:?}");
    }
    assert!(
        !get("connection")
            .iter()
            .any(|v| v.to_ascii_lowercase().contains("x-secret")),
        "{h:?}"
    );
    assert_eq!(get("x-keep"), ["kept"], "end-to-end headers pass");
    assert_eq!(
        get("host"),
        [a.to_string()],
        "Host comes from the absolute URI"
    );
    let via = get("via").join(", ");
    assert!(
        via.contains("1.0 first-hop") && via.contains("1.1 chatwall"),
        "Via: {via}"
    );
    assert_eq!(seen[0].uri, "/hop?x=1");
}

// ---------------------------------------------------------------------------
// CONNECT tunnels
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_carries_a_real_tls_handshake() {
    const N: usize = 300_000;
    let proxy = Proxy::start_open().await;
    let origin = TlsOrigin::start(&["localhost"]).await;
    let tunnel = connect_tunnel(proxy.addr, &format!("127.0.0.1:{}", origin.addr.port()))
        .await
        .expect("CONNECT answered 200");
    let connector = tokio_rustls::TlsConnector::from(origin.client_config());
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    let mut tls = tokio::time::timeout(WAIT, connector.connect(name, tunnel))
        .await
        .expect("handshake in time")
        .expect("TLS handshake through the tunnel");
    tls.write_all(
        format!("GET /bytes/{N} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    let mut tmp = vec![0u8; 65536];
    loop {
        match tokio::time::timeout(WAIT, tls.read(&mut tmp))
            .await
            .expect("read in time")
        {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("TLS read: {e}"),
        }
    }
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head")
        + 4;
    let head = String::from_utf8_lossy(&out[..head_end]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = &out[head_end..];
    assert_eq!(body.len(), N);
    assert!(
        body.iter().enumerate().all(|(i, &b)| b == pattern_byte(i)),
        "tunnelled bytes differ"
    );
    // The tunnel's record is written when both sides have closed.
    drop(tls);

    let rec = wait_record(&proxy, |r| field(r, "method") == "CONNECT").await;
    assert_eq!(field(&rec, "sni"), "localhost", "{rec}");
    assert_eq!(field(&rec, "verdict"), "allow");
    assert_eq!(num(&rec, "status"), 200);
    assert!(num(&rec, "bytes_down") >= N as u64, "{rec}");
    assert!(num(&rec, "bytes_up") > 0, "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_https_through_the_proxy_is_byte_exact() {
    if !support::have_curl() {
        support::skip_or_fail("curl is not installed");
        return;
    }
    const N: usize = 1_000_000;
    let proxy = Proxy::start_open().await;
    let origin = TlsOrigin::start(&["localhost"]).await;
    let port = origin.addr.port();
    let cacert = origin.cert_pem_path.display().to_string();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let url = format!("https://localhost:{port}/bytes/{N}");
    let proxy_url = proxy.proxy_url();
    let (code, out, err) = support::curl(&[
        "-p",
        "-x",
        &proxy_url,
        "--cacert",
        &cacert,
        "--resolve",
        &resolve,
        &url,
    ])
    .await;
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(out.len(), N);
    assert!(
        out.iter().enumerate().all(|(i, &b)| b == pattern_byte(i)),
        "bytes differ"
    );
    // Also with --connect-to, and plain text through the same proxy.
    let connect_to = format!("localhost:{port}:127.0.0.1:{port}");
    let url = format!("https://localhost:{port}/");
    let (code, out, err) = support::curl(&[
        "-p",
        "-x",
        &proxy_url,
        "--cacert",
        &cacert,
        "--connect-to",
        &connect_to,
        &url,
    ])
    .await;
    assert_eq!(code, 0, "curl failed: {err}");
    assert_eq!(out, b"hello over tls\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnel_keeps_flowing_after_the_client_half_closes() {
    let proxy = Proxy::start_open().await;

    // An echo origin: what comes back after our FIN must still arrive.
    let echo = RawOrigin::start(None, true).await;
    let mut t = connect_tunnel(proxy.addr, &echo.addr.to_string())
        .await
        .expect("CONNECT 200");
    let msg = b"half-close echo check 0123456789\n".repeat(50);
    t.write_all(&msg).await.expect("write");
    t.shutdown().await.expect("shutdown write");
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, t.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    assert_eq!(back, msg, "echoed bytes");
    assert_eq!(echo.connection_bytes(0), msg, "the origin saw every byte");

    // An origin that answers only after the client's FIN reached it.
    let after_eof = misbehaving_upstream(|mut s| async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await;
        let _ = s
            .write_all(format!("got {} bytes", got.len()).as_bytes())
            .await;
        let _ = s.shutdown().await;
    })
    .await;
    let mut t = connect_tunnel(proxy.addr, &after_eof.to_string())
        .await
        .expect("CONNECT 200");
    t.write_all(b"abcdefghij").await.expect("write");
    t.shutdown().await.expect("shutdown write");
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, t.read_to_end(&mut back))
        .await
        .expect("reply in time")
        .expect("read");
    assert_eq!(String::from_utf8_lossy(&back), "got 10 bytes");

    let rec = wait_record(&proxy, |r| field(r, "target") == after_eof.to_string()).await;
    assert_eq!(num(&rec, "status"), 200, "{rec}");
    assert!(
        rec["error"].is_null(),
        "a clean half-close is no error: {rec}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_log_counts_bytes_both_ways() {
    // A non-TLS, non-HTTP tunnel: the client's first bytes go through the
    // payload inspector before they are relayed, and count all the same.
    let proxy = Proxy::start_open().await;
    let echo = RawOrigin::start(None, true).await;
    let mut t = connect_tunnel(proxy.addr, &echo.addr.to_string())
        .await
        .expect("CONNECT 200");
    let first = b"hello, first bytes\n";
    t.write_all(first).await.expect("write");
    let mut back = vec![0u8; first.len()];
    tokio::time::timeout(WAIT, t.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("read");
    let more = vec![b'z'; 40_000];
    t.write_all(&more).await.expect("write");
    let mut back = vec![0u8; more.len()];
    tokio::time::timeout(WAIT, t.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("read");
    drop(t);
    let total = (first.len() + more.len()) as u64;
    assert_eq!(echo.connection_bytes(0).len() as u64, total);
    let rec = wait_record(&proxy, |r| field(r, "target") == echo.addr.to_string()).await;
    assert_eq!(num(&rec, "bytes_down"), total, "{rec}");
    assert_eq!(num(&rec, "bytes_up"), total, "bytes up the tunnel: {rec}");
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "chatwall_bytes_total", &[("direction", "up")]),
        total as f64,
        "{m}"
    );
}

// ---------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_name_the_app_without_contacting_anything() {
    let proxy = Proxy::start_open().await;
    // (request line target or CONNECT authority, app, reason)
    let cases: &[(&str, &str, &str, &str)] = &[
        ("GET", "http://web.whatsapp.com/", "whatsapp", "host"),
        ("CONNECT", "web.whatsapp.com:443", "whatsapp", "host"),
        ("CONNECT", "x.y.telegram.org:443", "telegram", "host"),
        ("GET", "http://x.y.telegram.org/a/b", "telegram", "host"),
        ("GET", "http://WEB.WhatsApp.COM/", "whatsapp", "host"),
        ("CONNECT", "WEB.WhatsApp.COM:443", "whatsapp", "host"),
        ("GET", "http://web.whatsapp.com./", "whatsapp", "host"),
        ("CONNECT", "web.whatsapp.com.:443", "whatsapp", "host"),
        ("CONNECT", "149.154.167.51:443", "telegram", "ip"),
        ("GET", "http://149.154.167.51/", "telegram", "ip"),
        ("CONNECT", "[2001:67c:4e8::1]:443", "telegram", "ip"),
        ("CONNECT", "[::ffff:149.154.167.51]:443", "telegram", "ip"),
        ("CONNECT", "example.invalid:5190", "aim", "port"),
        ("CONNECT", "example.invalid:5050", "yahoo-messenger", "port"),
        ("CONNECT", "example.invalid:1863", "msn-messenger", "port"),
        // The name decides before the port does.
        ("CONNECT", "web.whatsapp.com:5190", "whatsapp", "host"),
        ("GET", "http://example.invalid:5190/", "aim", "port"),
        (
            "GET",
            "http://gateway.messenger.hotmail.com/gateway/gateway.dll?Action=open",
            "msn-messenger",
            "host",
        ),
        // The path rule alone, on a name no rule lists (no DNS needed).
        (
            "GET",
            "http://example.invalid/gateway/gateway.dll?Action=open",
            "msn-messenger",
            "http",
        ),
    ];
    for (method, target, app, reason) in cases {
        let raw = if *method == "CONNECT" {
            format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
        } else {
            let host = target
                .split("://")
                .nth(1)
                .and_then(|r| r.split('/').next())
                .unwrap_or("");
            format!("GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n")
        };
        let started = Instant::now();
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.write_all(raw.as_bytes()).await.expect("write");
        let (status, head, body) = read_response(&mut s).await;
        assert_eq!(status, 403, "{method} {target}: {head}");
        assert_eq!(
            header_of(&head, "x-chatwall-block").as_deref(),
            Some(*app),
            "{method} {target}: {head}"
        );
        assert!(
            String::from_utf8_lossy(&body).contains(app),
            "{method} {target}: the page names {app}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{method} {target}: refusal took {:?}",
            started.elapsed()
        );
        let rec = wait_record(&proxy, |r| {
            field(r, "method") == *method
                && field(r, "target").contains(
                    target
                        .trim_start_matches("http://")
                        .split('/')
                        .next()
                        .unwrap_or(""),
                )
                && field(r, "app") == *app
                && field(r, "reason") == *reason
        })
        .await;
        assert_eq!(field(&rec, "verdict"), "block", "{rec}");
        assert_eq!(num(&rec, "status"), 403, "{rec}");
        assert!(
            rec.get("upstream").map_or(true, Value::is_null),
            "{method} {target}: an upstream was contacted: {rec}"
        );
    }
    let m = proxy.metrics().await;
    for kind in [
        "dns",
        "connect_refused",
        "connect_timeout",
        "connect",
        "reset",
        "timeout",
    ] {
        assert_eq!(
            sample(&m, "chatwall_upstream_errors_total", &[("kind", kind)]),
            0.0,
            "{kind}"
        );
    }
    assert_eq!(
        sample(
            &m,
            "chatwall_blocked_total",
            &[("app", "whatsapp"), ("reason", "host")]
        ),
        7.0
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_blocked_total",
            &[("app", "telegram"), ("reason", "ip")]
        ),
        4.0
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_blocked_total",
            &[("app", "aim"), ("reason", "port")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_blocked_total",
            &[("app", "msn-messenger"), ("reason", "http")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_requests_total",
            &[("listener", "explicit"), ("verdict", "block")]
        ),
        cases.len() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_http_rule_never_reaches_a_loopback_origin() {
    // The MSN gateway path rule of the bundled set, on a reachable origin.
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let r = get(
        proxy.addr,
        &format!(
            "http://{}/gateway/gateway.dll?Action=open&Server=NS",
            origin.addr
        ),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(
        r.header("x-chatwall-block").as_deref(),
        Some("msn-messenger")
    );
    let r = one(
        proxy.addr,
        &format!(
            "POST http://{a}/messenger HTTP/1.1\r\nHost: {a}\r\nContent-Type: application/x-msn-messenger\r\nContent-Length: 3\r\n\r\nVER",
            a = origin.addr
        ),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(
        r.header("x-chatwall-block").as_deref(),
        Some("msn-messenger")
    );
    assert!(
        origin.requests().is_empty(),
        "the origin was contacted: {:?}",
        origin.requests()
    );
    // An ordinary path on the same origin passes.
    let r = get(proxy.addr, &format!("http://{}/gateway/other", origin.addr)).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn im_ports_are_refused_before_any_connection() {
    let proxy = Proxy::start_open().await;
    for (port, app) in [
        (5190u16, "aim"),
        (5050, "yahoo-messenger"),
        (1863, "msn-messenger"),
    ] {
        // Listen there when the port is free, to see that nothing connects.
        let listener = TcpListener::bind(("127.0.0.1", port)).await.ok();
        let (r, _) = connect(proxy.addr, &format!("127.0.0.1:{port}")).await;
        assert_eq!(r.status, 403, "{port}: {}", r.head);
        assert_eq!(r.header("x-chatwall-block").as_deref(), Some(app), "{port}");
        if let Some(l) = listener {
            let accepted = tokio::time::timeout(Duration::from_millis(200), l.accept()).await;
            assert!(
                accepted.is_err(),
                "port {port}: the proxy connected to the IM port"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_resolving_into_an_im_range_is_refused_by_ip() {
    let proxy = Proxy::start(&open_with_sigs("loopback-cidr")).await;
    let origin = RawOrigin::start(None, true).await;
    let http = HttpOrigin::start().await;
    let port = origin.addr.port();

    let (r, _) = connect(proxy.addr, &format!("localhost:{port}")).await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(r.header("x-chatwall-block").as_deref(), Some("loopnet"));
    let rec = wait_record(&proxy, |r| field(r, "method") == "CONNECT").await;
    assert_eq!(field(&rec, "reason"), "ip", "{rec}");
    assert_eq!(field(&rec, "host"), "localhost", "{rec}");

    // The literal address too, and plain HTTP by name.
    let (r, _) = connect(proxy.addr, &format!("127.0.0.1:{port}")).await;
    assert_eq!(r.status, 403);
    let r = get(
        proxy.addr,
        &format!("http://localhost:{}/", http.addr.port()),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.head);
    assert_eq!(r.header("x-chatwall-block").as_deref(), Some("loopnet"));

    assert_eq!(
        origin.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the IM address was contacted"
    );
    assert!(http.requests().is_empty());
    let m = proxy.metrics().await;
    assert_eq!(
        sample(
            &m,
            "chatwall_blocked_total",
            &[("app", "loopnet"), ("reason", "ip")]
        ),
        3.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idn_names_compare_in_punycode() {
    let proxy = Proxy::start(&open_with_sigs("localhost-host")).await;
    // The fixture writes `bücher.example` and `*.пример.example` in Unicode;
    // requests carry the punycode (any case).
    for (method, target) in [
        ("CONNECT", "xn--bcher-kva.example:443"),
        ("CONNECT", "XN--BCHER-KVA.EXAMPLE.:443"),
        ("GET", "http://xn--bcher-kva.example/"),
        ("CONNECT", "www.xn--e1afmkfd.example:443"),
    ] {
        let r = if method == "CONNECT" {
            connect(proxy.addr, target).await.0
        } else {
            get(proxy.addr, target).await
        };
        assert_eq!(r.status, 403, "{method} {target}: {}", r.head);
        assert_eq!(
            r.header("x-chatwall-block").as_deref(),
            Some("idnim"),
            "{method} {target}"
        );
    }
    // Raw UTF-8 in the request line: refused (400 or 403), never forwarded,
    // never a crash.
    for raw in [
        "CONNECT bücher.example:443 HTTP/1.1\r\nHost: bücher.example:443\r\n\r\n",
        "GET http://bücher.example/ HTTP/1.1\r\nHost: bücher.example\r\n\r\n",
    ] {
        let (out, _) = until_close(proxy.addr, raw.as_bytes()).await;
        let (status, _) = support::parse_response(&out);
        assert!(status == 400 || status == 403, "{raw:?} -> {status}");
    }
    // Still serving.
    let r = connect(proxy.addr, "xn--bcher-kva.example:443").await.0;
    assert_eq!(r.status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idn_names_in_the_allow_list() {
    // Without the allow-list the IDN app is refused; with the Unicode name
    // on the allow-list the name passes (and then fails DNS: 502, no block).
    let base = format!(
        "{}\n[limits]\ndns_timeout_ms = 3000\n",
        open_with_sigs("localhost-host")
    );
    let cases: &[(&str, u16)] = &[
        ("", 403),
        ("[[policy.allow]]\nhosts = [\"bücher.example\"]\n", 502),
        ("[[policy.allow]]\nhosts = [\"BÜCHER.example.\"]\n", 502),
        ("[[policy.allow]]\nhosts = [\"*.пример.example\"]\n", 403),
    ];
    for (allow, want) in cases {
        let proxy = Proxy::start(&format!("{base}{allow}")).await;
        let r = connect(proxy.addr, "xn--bcher-kva.example:443").await.0;
        assert_eq!(r.status, *want, "allow {allow:?}: {}", r.head);
        if *want == 502 {
            assert!(r.header("x-chatwall-block").is_none(), "{}", r.head);
        }
        if *allow == cases[3].0 {
            let r = connect(proxy.addr, "www.xn--e1afmkfd.example:443").await.0;
            assert_eq!(
                r.status, 502,
                "a Unicode wildcard on the allow-list: {}",
                r.head
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_mode_passes_logs_and_counts() {
    let extra = format!(
        "{}\n[policy]\ndefault = \"monitor\"\n",
        open_with_sigs("localhost-host")
    );
    let proxy = Proxy::start(&extra).await;
    let origin = HttpOrigin::start().await;
    let echo = RawOrigin::start(None, true).await;
    let before = proxy.metrics().await;
    assert_eq!(
        sample(
            &before,
            "chatwall_detections_total",
            &[("action", "monitor"), ("app", "localim")]
        ),
        0.0
    );

    let url = format!("http://localhost:{}/watched", origin.addr.port());
    let r = get(proxy.addr, &url).await;
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(r.header("x-chatwall-block").is_none());
    assert_eq!(r.text(), "hello from origin\n");
    assert_eq!(origin.requests().len(), 1, "monitor passes the request on");
    let rec = wait_record(&proxy, |r| field(r, "target") == url).await;
    assert_eq!(field(&rec, "verdict"), "monitor", "{rec}");
    assert_eq!(field(&rec, "app"), "localim", "{rec}");
    assert_eq!(field(&rec, "reason"), "host", "{rec}");
    assert_eq!(num(&rec, "status"), 200);

    // A tunnel too.
    let mut t = connect_tunnel(proxy.addr, &format!("localhost:{}", echo.addr.port()))
        .await
        .expect("monitor tunnel is 200");
    t.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    tokio::time::timeout(WAIT, t.read_exact(&mut back))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&back, b"ping");
    drop(t);
    let rec = wait_record(&proxy, |r| field(r, "method") == "CONNECT").await;
    assert_eq!(field(&rec, "verdict"), "monitor", "{rec}");
    assert_eq!(field(&rec, "app"), "localim", "{rec}");

    let m = proxy.metrics().await;
    assert_eq!(
        sample(
            &m,
            "chatwall_detections_total",
            &[("action", "monitor"), ("app", "localim")]
        ),
        2.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_requests_total",
            &[("listener", "explicit"), ("verdict", "monitor")]
        ),
        2.0
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_requests_total",
            &[("listener", "explicit"), ("verdict", "block")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_exceptions_apply_to_matching_clients_only() {
    // (policy sections, expected status, expected verdict)
    let cases: &[(&str, u16, &str)] = &[
        ("[[policy.exceptions]]\nclients = [\"127.0.0.0/8\"]\napps = [\"localim\"]\naction = \"allow\"\n", 200, "allow"),
        ("[[policy.exceptions]]\nclients = [\"10.0.0.0/8\"]\napps = [\"localim\"]\naction = \"allow\"\n", 403, "block"),
        ("[[policy.exceptions]]\nclients = [\"127.0.0.1\"]\ncategories = [\"consumer-im\"]\naction = \"monitor\"\n", 200, "monitor"),
        ("[[policy.exceptions]]\nclients = [\"127.0.0.0/8\"]\napps = [\"idnim\"]\naction = \"allow\"\n", 403, "block"),
        (
            "[policy]\ndefault = \"monitor\"\n\n[[policy.exceptions]]\nclients = [\"127.0.0.0/8\"]\napps = [\"localim\"]\naction = \"block\"\n",
            403,
            "block",
        ),
        // The first matching exception wins.
        (
            "[[policy.exceptions]]\nclients = [\"127.0.0.0/8\"]\napps = [\"localim\"]\naction = \"allow\"\n\n[[policy.exceptions]]\napps = [\"localim\"]\naction = \"block\"\n",
            200,
            "allow",
        ),
    ];
    for (policy, status, verdict) in cases {
        let proxy = Proxy::start(&format!("{}\n{policy}", open_with_sigs("localhost-host"))).await;
        let origin = HttpOrigin::start().await;
        let url = format!("http://localhost:{}/", origin.addr.port());
        let r = get(proxy.addr, &url).await;
        assert_eq!(r.status, *status, "{policy}: {}", r.head);
        assert_eq!(
            origin.requests().len(),
            usize::from(*status == 200),
            "{policy}"
        );
        if *status == 403 {
            assert_eq!(r.header("x-chatwall-block").as_deref(), Some("localim"));
        }
        let rec = wait_record(&proxy, |r| field(r, "target") == url).await;
        assert_eq!(field(&rec, "verdict"), *verdict, "{policy}: {rec}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_list_overrides_signatures() {
    // (signature fixture, allow-list, expected status)
    let cases: &[(&str, &str, u16)] = &[
        ("localhost-host", "", 403),
        (
            "localhost-host",
            "[[policy.allow]]\nhosts = [\"localhost\"]\n",
            200,
        ),
        (
            "localhost-host",
            "[[policy.allow]]\nhosts = [\"LOCALHOST.\"]\n",
            200,
        ),
        // A wildcard never covers the apex.
        (
            "localhost-host",
            "[[policy.allow]]\nhosts = [\"*.localhost\"]\n",
            403,
        ),
        ("loopback-cidr", "", 403),
        (
            "loopback-cidr",
            "[[policy.allow]]\ncidrs = [\"127.0.0.0/8\", \"::1\"]\n",
            200,
        ),
        (
            "loopback-cidr",
            "[[policy.allow]]\nhosts = [\"localhost\"]\n",
            200,
        ),
    ];
    for (sigs, allow, want) in cases {
        let proxy = Proxy::start(&format!("{}\n{allow}", open_with_sigs(sigs))).await;
        let origin = HttpOrigin::start().await;
        let echo = RawOrigin::start(None, true).await;
        let r = get(
            proxy.addr,
            &format!("http://localhost:{}/", origin.addr.port()),
        )
        .await;
        assert_eq!(r.status, *want, "{sigs} {allow:?}: {}", r.head);
        let (r, mut t) = connect(proxy.addr, &format!("localhost:{}", echo.addr.port())).await;
        assert_eq!(r.status, *want, "CONNECT {sigs} {allow:?}: {}", r.head);
        if *want == 200 {
            t.write_all(b"allowed").await.expect("write");
            let mut back = [0u8; 7];
            tokio::time::timeout(WAIT, t.read_exact(&mut back))
                .await
                .expect("in time")
                .expect("read");
            assert_eq!(&back, b"allowed");
            assert_eq!(origin.requests().len(), 1);
        } else {
            assert!(origin.requests().is_empty());
            assert_eq!(echo.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_outside_allow_clients_get_403_and_close() {
    let proxy =
        Proxy::start("[access]\nallow_clients = [\"10.0.0.0/8\"]\ndeny_destinations = []\n").await;
    let origin = HttpOrigin::start().await;
    // Saying nothing, and sending a request at once.
    let (out, closed) = until_close(proxy.addr, b"").await;
    assert!(closed, "the connection stays open");
    assert_eq!(
        support::parse_response(&out).0,
        403,
        "{}",
        String::from_utf8_lossy(&out)
    );
    let raw = format!(
        "GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n",
        a = origin.addr
    );
    let (out, closed) = until_close(proxy.addr, raw.as_bytes()).await;
    assert!(closed, "the connection stays open");
    assert_eq!(
        support::parse_response(&out).0,
        403,
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(origin.requests().is_empty());
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "chatwall_refused_clients_total", &[]),
        2.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_connections_total",
            &[("listener", "explicit")]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_destinations_are_refused_by_default() {
    let proxy = Proxy::start("").await;
    let origin = HttpOrigin::start().await;
    let port = origin.addr.port();
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
        format!("http://127.1:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
    ] {
        let r = get(proxy.addr, &url).await;
        assert_eq!(r.status, 403, "{url}: {}", r.head);
        assert_eq!(
            r.header("x-chatwall-block").as_deref(),
            Some("destination"),
            "{url}"
        );
    }
    assert!(
        origin.requests().is_empty(),
        "a denied destination was contacted"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        sample(
            &m,
            "chatwall_upstream_errors_total",
            &[("kind", "denied_destination")]
        ),
        4.0
    );
}

/// CONNECT to the proxy's own ports under different spellings.
async fn own_port_spellings(proxy: &Proxy, open: bool) {
    for port in [proxy.addr.port(), proxy.admin.port()] {
        for host in [
            "127.0.0.1",
            "localhost",
            "[::1]",
            "0.0.0.0",
            "0x7f000001",
            "127.1",
            "[::ffff:127.0.0.1]",
            "[::]",
        ] {
            let authority = format!("{host}:{port}");
            let (r, _) = connect(proxy.addr, &authority).await;
            assert_ne!(
                r.status, 200,
                "CONNECT {authority} (open={open}) reached the proxy itself"
            );
            let allowed: &[u16] = match (host, open) {
                // Nothing listens on ::1 here: with the loopback ranges open,
                // the attempt fails upstream (it is not this proxy).
                ("[::1]", true) => &[403, 502],
                ("0x7f000001", _) => &[400, 403],
                _ => &[403],
            };
            assert!(
                allowed.contains(&r.status),
                "CONNECT {authority} (open={open}) -> {}",
                r.head
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_own_ports_is_refused() {
    let proxy = Proxy::start("").await;
    own_port_spellings(&proxy, false).await;
    let proxy = Proxy::start_open().await;
    own_port_spellings(&proxy, true).await;
    // Plain HTTP to the admin port through the proxy, with the loopback open.
    let r = get(
        proxy.addr,
        &format!("http://127.0.0.1:{}/metrics", proxy.admin.port()),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.head);
    let r = get(
        proxy.addr,
        &format!("http://localhost:{}/healthz", proxy.admin.port()),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_close() {
    let proxy = Proxy::start_open().await;
    let cases: &[(&str, &[u8])] = &[
        (
            "origin-form",
            b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        ),
        ("ftp scheme", b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "https scheme",
            b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
        ),
        ("garbage", b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n"),
        (
            "CONNECT without port",
            b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
        ),
        (
            "CONNECT port 0",
            b"CONNECT example.com:0 HTTP/1.1\r\nHost: example.com:0\r\n\r\n",
        ),
        (
            "CONNECT bad name",
            b"CONNECT exa_mple..com:443 HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        ("no host", b"GET http:///x HTTP/1.1\r\nHost: x\r\n\r\n"),
    ];
    for (name, raw) in cases {
        let (out, closed) = until_close(proxy.addr, raw).await;
        let (status, _) = support::parse_response(&out);
        assert_eq!(status, 400, "{name}: {}", String::from_utf8_lossy(&out));
        assert!(closed, "{name}: the connection stays open after a 400");
    }
    // Still serving.
    let origin = HttpOrigin::start().await;
    assert_eq!(
        get(proxy.addr, &format!("http://{}/", origin.addr))
            .await
            .status,
        200
    );
}

// ---------------------------------------------------------------------------
// Upstream failures
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upstream_is_502_naming_the_cause() {
    let proxy = Proxy::start_open().await;
    let port = closed_port();
    let r = get(proxy.addr, &format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(r.status, 502, "{}", r.head);
    assert!(r.text().to_lowercase().contains("refused"), "{}", r.text());
    let (r, _) = connect(proxy.addr, &format!("127.0.0.1:{port}")).await;
    assert_eq!(r.status, 502, "{}", r.head);
    assert!(String::from_utf8_lossy(&r.body)
        .to_lowercase()
        .contains("refused"));
    let m = proxy.metrics().await;
    assert_eq!(
        sample(
            &m,
            "chatwall_upstream_errors_total",
            &[("kind", "connect_refused")]
        ),
        2.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_failure_is_502() {
    let proxy = Proxy::start_open().await;
    let r = get(proxy.addr, "http://no-such-host.invalid/").await;
    assert_eq!(r.status, 502, "{}", r.head);
    assert!(r.text().contains("DNS"), "{}", r.text());
    let (r, _) = connect(proxy.addr, "no-such-host.invalid:443").await;
    assert_eq!(r.status, 502, "{}", r.head);
    assert!(String::from_utf8_lossy(&r.body).contains("DNS"));
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "chatwall_upstream_errors_total", &[("kind", "dns")]),
        2.0,
        "{m}"
    );
    let rec = wait_record(&proxy, |r| {
        field(r, "target") == "http://no-such-host.invalid/"
    })
    .await;
    assert_eq!(num(&rec, "status"), 502);
    assert!(field(&rec, "error").contains("DNS"), "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_closes_or_resets_without_answering_is_502() {
    let proxy = Proxy::start_open().await;
    let closes = misbehaving_upstream(|mut s| async move {
        read_head(&mut s).await;
        drop(s);
    })
    .await;
    let resets = misbehaving_upstream(|mut s| async move {
        read_head(&mut s).await;
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        drop(s);
    })
    .await;
    let garbage = misbehaving_upstream(|mut s| async move {
        read_head(&mut s).await;
        let _ = s.write_all(b"SSH-2.0-not-http\r\n\r\n").await;
        let _ = s.shutdown().await;
    })
    .await;
    for (name, addr) in [("close", closes), ("reset", resets), ("garbage", garbage)] {
        let started = Instant::now();
        let r = get(proxy.addr, &format!("http://{addr}/")).await;
        assert_eq!(r.status, 502, "{name}: {}", r.head);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name}: took {:?}",
            started.elapsed()
        );
    }
    let m = proxy.metrics().await;
    let errors = sample(&m, "chatwall_upstream_errors_total", &[("kind", "reset")])
        + sample(
            &m,
            "chatwall_upstream_errors_total",
            &[("kind", "protocol")],
        );
    assert_eq!(errors, 3.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_answers_is_504() {
    let proxy = Proxy::start(&format!(
        "{OPEN}\n[limits]\nupstream_response_timeout_ms = 500\n"
    ))
    .await;
    let (hold_tx, hold_rx) = tokio::sync::mpsc::unbounded_channel::<TcpStream>();
    let silent = misbehaving_upstream(move |mut s| {
        let hold = hold_tx.clone();
        async move {
            read_head(&mut s).await;
            let _ = hold.send(s);
        }
    })
    .await;
    let started = Instant::now();
    let r = get(proxy.addr, &format!("http://{silent}/")).await;
    assert_eq!(r.status, 504, "{}", r.head);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        sample(&m, "chatwall_upstream_errors_total", &[("kind", "timeout")]),
        1.0,
        "{m}"
    );
    drop(hold_rx);
}

// ---------------------------------------------------------------------------
// Metrics, access log, admin
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_text_counts_what_happened() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    assert_eq!(
        get(proxy.addr, &format!("http://{}/", origin.addr))
            .await
            .status,
        200
    );
    assert_eq!(
        get(proxy.addr, "http://web.whatsapp.com/").await.status,
        403
    );
    assert_eq!(
        get(proxy.addr, "http://no-such-host.invalid/").await.status,
        502
    );

    let (status, m) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for family in [
        "chatwall_connections_total",
        "chatwall_connections_active",
        "chatwall_requests_total",
        "chatwall_blocked_total",
        "chatwall_detections_total",
        "chatwall_bytes_total",
        "chatwall_upstream_errors_total",
        "chatwall_inspection_duration_seconds",
        "chatwall_signatures_loaded",
        "chatwall_build_info",
    ] {
        assert!(
            m.contains(&format!("# TYPE {family} ")),
            "no {family} in\n{m}"
        );
    }
    let allow = sample(
        &m,
        "chatwall_requests_total",
        &[("listener", "explicit"), ("verdict", "allow")],
    );
    let block = sample(
        &m,
        "chatwall_requests_total",
        &[("listener", "explicit"), ("verdict", "block")],
    );
    // The request that failed on DNS was decided (allowed) too.
    assert_eq!((allow, block), (2.0, 1.0), "{m}");
    assert_eq!(
        sample(
            &m,
            "chatwall_blocked_total",
            &[("app", "whatsapp"), ("reason", "host")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_detections_total",
            &[("action", "block"), ("app", "whatsapp")]
        ),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_connections_total",
            &[("listener", "explicit")]
        ),
        3.0
    );
    assert_eq!(
        sample(&m, "chatwall_upstream_errors_total", &[("kind", "dns")]),
        1.0
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_upstream_errors_total",
            &[("kind", "connect_refused")]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert!(sample(&m, "chatwall_bytes_total", &[("direction", "down")]) >= 18.0);
    assert!(sample(&m, "chatwall_signatures_loaded", &[("app", "whatsapp")]) > 0.0);
    // Labels are bounded: no label value taken from traffic.
    assert!(!m.contains("no-such-host"), "a host name became a label");

    // Connections end: the gauge returns to 0.
    let deadline = Instant::now() + WAIT;
    loop {
        let active = sample(
            &proxy.metrics().await,
            "chatwall_connections_active",
            &[("listener", "explicit")],
        );
        if active == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "connections_active stuck at {active}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_records_every_field() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let a = origin.addr;
    let mut c = TcpStream::connect(proxy.addr).await.expect("connect");
    let client = c.local_addr().expect("local").to_string();
    c.write_all(
        format!(
            "POST http://{a}/echo HTTP/1.1\r\nHost: {a}\r\nContent-Length: 11\r\n\r\nhello world"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let r = read_full(&mut c, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    c.write_all(b"GET http://web.whatsapp.com/x HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
        .await
        .expect("write");
    let blocked = read_full(&mut c, false).await;
    assert_eq!(blocked.status, 403);
    drop(c);

    let recs = proxy.wait_log(2).await;
    assert_eq!(recs.len(), 2, "{recs:?}");
    for r in &recs {
        for field in [
            "ts",
            "client",
            "user",
            "listener",
            "method",
            "target",
            "host",
            "sni",
            "app",
            "verdict",
            "reason",
            "status",
            "bytes_up",
            "bytes_down",
            "duration_ms",
        ] {
            assert!(r.get(field).is_some(), "no {field} in {r}");
        }
        let ts = field(r, "ts");
        assert!(
            ts.len() >= 20 && ts.as_bytes()[4] == b'-' && ts.contains('T') && ts.ends_with('Z'),
            "ts {ts:?} is not RFC 3339 UTC"
        );
        assert_eq!(field(r, "client"), client);
        assert_eq!(field(r, "listener"), "explicit");
        num(r, "duration_ms");
        num(r, "bytes_up");
    }
    let post = recs
        .iter()
        .find(|r| field(r, "method") == "POST")
        .expect("POST record");
    assert_eq!(field(post, "target"), format!("http://{a}/echo"));
    assert_eq!(field(post, "host"), "127.0.0.1");
    assert!(post["app"].is_null(), "{post}");
    assert!(post["reason"].is_null(), "{post}");
    assert_eq!(field(post, "verdict"), "allow");
    assert_eq!(num(post, "status"), 200);
    assert_eq!(num(post, "bytes_down"), 11);

    let get = recs
        .iter()
        .find(|r| field(r, "method") == "GET")
        .expect("GET record");
    assert_eq!(field(get, "target"), "http://web.whatsapp.com/x");
    assert_eq!(field(get, "host"), "web.whatsapp.com");
    assert_eq!(field(get, "app"), "whatsapp");
    assert_eq!(field(get, "verdict"), "block");
    assert_eq!(field(get, "reason"), "host");
    assert_eq!(num(get, "status"), 403);
    assert_eq!(num(get, "bytes_up"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_counts_request_body_bytes_up() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let a = origin.addr;
    let body = "x".repeat(5000);
    let r = one(
        proxy.addr,
        &format!(
            "POST http://{a}/echo HTTP/1.1\r\nHost: {a}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(origin.requests()[0].body_len, 5000);
    let rec = wait_record(&proxy, |r| field(r, "method") == "POST").await;
    assert_eq!(num(&rec, "bytes_down"), 5000, "{rec}");
    assert_eq!(
        num(&rec, "bytes_up"),
        5000,
        "the request body sent upstream is not counted: {rec}"
    );
    let m = proxy.metrics().await;
    assert!(
        sample(&m, "chatwall_bytes_total", &[("direction", "up")]) >= 5000.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squid_log_format_has_ten_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("access.log");
    let config_path = dir.path().join("chatwall.toml");
    let text = format!(
        "[listen]\nexplicit = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n\n[log]\naccess = {:?}\nformat = \"squid\"\nlevel = \"warn\"\n\n{OPEN}",
        log_path.display().to_string()
    );
    std::fs::write(&config_path, text).expect("write config");
    let proxy = Proxy::start_file(dir, config_path, log_path.clone()).await;
    let origin = HttpOrigin::start().await;
    assert_eq!(
        get(proxy.addr, &format!("http://{}/", origin.addr))
            .await
            .status,
        200
    );
    assert_eq!(
        get(proxy.addr, "http://web.whatsapp.com/").await.status,
        403
    );

    let deadline = Instant::now() + WAIT;
    let lines = loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= 2 {
            break lines;
        }
        assert!(Instant::now() < deadline, "squid log: {lines:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert_eq!(f.len(), 10, "{l}");
        let (secs, millis) = f[0].split_once('.').expect("ts.ms");
        assert!(
            secs.parse::<u64>().is_ok() && millis.len() == 3 && millis.parse::<u32>().is_ok(),
            "{l}"
        );
        assert!(f[1].parse::<u64>().is_ok(), "elapsed: {l}");
        assert_eq!(f[2], "127.0.0.1", "{l}");
        assert_eq!(f[5], "GET", "{l}");
    }
    let allowed: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(allowed[3], "TCP_MISS/200", "{}", lines[0]);
    assert_eq!(allowed[4], "18", "{}", lines[0]);
    assert_eq!(allowed[6], format!("http://{}/", origin.addr));
    assert_eq!(allowed[8], "HIER_DIRECT/127.0.0.1");
    let denied: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(denied[3], "TCP_DENIED/403", "{}", lines[1]);
    assert_eq!(denied[6], "http://web.whatsapp.com/");
    assert_eq!(denied[8], "HIER_NONE/-");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_health_and_readiness() {
    let proxy = Proxy::start_open().await;
    let (status, body) = proxy.admin_get("/healthz").await;
    assert_eq!(status, 200);
    assert!(body.contains("ok"), "{body}");
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = proxy.admin_get("/readyz").await;
        if status == 200 {
            assert!(body.contains("ready"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "/readyz stayed {status}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(proxy.admin_get("/no-such-page").await.0, 404);
    let (status, pac) = proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200);
    assert!(pac.contains("FindProxyForURL"), "{pac}");
    // The admin port does not proxy.
    let out = raw_exchange(
        proxy.admin,
        b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_ne!(support::parse_response(&out).0, 200);
}

// ---------------------------------------------------------------------------
// CONNECT as a connection's first request (answered before the HTTP server)
// ---------------------------------------------------------------------------

/// Write `send` into an echoing tunnel and read back exactly `want`.
async fn echoes(s: &mut TcpStream, send: &[u8], want: &[u8]) {
    s.write_all(send).await.expect("write");
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut got))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(got, want);
}

/// A CONNECT refused on the first request leaves the connection usable, as
/// any refusal does: the next request on it is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_first_connect_keeps_the_connection() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let a = origin.addr;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(b"CONNECT web.whatsapp.com:443 HTTP/1.1\r\nHost: web.whatsapp.com:443\r\n\r\n")
        .await
        .expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 403, "{head}");
    assert_eq!(
        header_of(&head, "x-chatwall-block").as_deref(),
        Some("whatsapp"),
        "{head}"
    );
    s.write_all(format!("GET http://{a}/after HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"hello from origin\n");
    // One refusal logged and counted once, then the GET.
    let recs = proxy.wait_log(2).await;
    assert_eq!(field(&recs[0], "method"), "CONNECT", "{recs:?}");
    assert_eq!(field(&recs[0], "verdict"), "block", "{recs:?}");
    assert_eq!(field(&recs[1], "verdict"), "allow", "{recs:?}");
    assert_eq!(
        proxy
            .metric("chatwall_requests_total{listener=\"explicit\",verdict=\"block\"}")
            .await,
        1.0
    );
}

/// curl's way with proxy credentials: CONNECT, 407, then CONNECT with
/// credentials on the same connection, which the HTTP server hands over as
/// a tunnel (the bytes read before it included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_after_a_407_on_the_same_connection_tunnels() {
    use base64::Engine as _;
    let echo = RawOrigin::start(None, true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let line = chatwall::auth::hash_line("alice", "correct horse").expect("hash");
    std::fs::write(&users, format!("{line}\n")).expect("write users");
    let proxy = Proxy::start(&format!(
        "{OPEN}\n[auth]\nusers_file = {:?}\n",
        users.display().to_string()
    ))
    .await;
    let o = echo.addr;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(format!("CONNECT {o} HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    assert_eq!(read_response(&mut s).await.0, 407);
    let creds = base64::engine::general_purpose::STANDARD.encode("alice:correct horse");
    // The credentials and the first tunnel bytes in one write.
    s.write_all(
        format!(
            "CONNECT {o} HTTP/1.1\r\nHost: {o}\r\nProxy-Authorization: Basic {creds}\r\n\r\nping-1"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 200, "{head}");
    echoes(&mut s, b"|ping-2", b"ping-1|ping-2").await;
    // And with the credentials on the first request, straight through.
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(
        format!("CONNECT {o} HTTP/1.1\r\nHost: {o}\r\nProxy-Authorization: Basic {creds}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    assert_eq!(read_response(&mut s).await.0, 200);
    echoes(&mut s, b"direct", b"direct").await;
    drop(s);
    let recs = proxy.wait_log(3).await;
    let users: Vec<String> = recs.iter().map(|r| field(r, "user")).collect();
    assert!(
        users.iter().filter(|u| u.as_str() == "alice").count() >= 1,
        "{recs:?}"
    );
}

/// An open tunnel holds its client's connection slot and counts as an
/// active connection until it ends, whichever way it was opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_count_against_the_connection_caps() {
    let echo = RawOrigin::start(None, true).await;
    let origin = HttpOrigin::start().await;
    let proxy = Proxy::start(&format!(
        "{OPEN}\n[limits]\nmax_connections_per_client = 2\n"
    ))
    .await;
    let o = echo.addr;
    // One tunnel as a first request, one after a GET (the HTTP server's path).
    let first = connect_tunnel(proxy.addr, &o.to_string())
        .await
        .expect("tunnel");
    let mut second = TcpStream::connect(proxy.addr).await.expect("connect");
    let a = origin.addr;
    second
        .write_all(format!("GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    assert_eq!(read_response(&mut second).await.0, 200);
    second
        .write_all(format!("CONNECT {o} HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    assert_eq!(read_response(&mut second).await.0, 200);
    echoes(&mut second, b"still here", b"still here").await;
    assert_eq!(
        proxy
            .metric("chatwall_connections_active{listener=\"explicit\"}")
            .await,
        2.0
    );
    // Both slots are taken by tunnels: a third connection is refused.
    let out = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(
        support::parse_response(&out).0,
        503,
        "{}",
        String::from_utf8_lossy(&out)
    );
    // Closing a tunnel frees its slot.
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let s = connect_tunnel(proxy.addr, &o.to_string()).await;
        if s.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed tunnel's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
}

/// A first head that arrives in pieces (a slow client, a proxy chain that
/// forwards segment by segment) is served like one that arrives whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_head_in_pieces_is_served() {
    let proxy = Proxy::start_open().await;
    let origin = HttpOrigin::start().await;
    let echo = RawOrigin::start(None, true).await;
    let (a, o) = (origin.addr, echo.addr);
    let pieces = |head: String| {
        let b = head.into_bytes();
        let (x, rest) = b.split_at(5);
        let (y, z) = rest.split_at(rest.len() - 3);
        [x.to_vec(), y.to_vec(), z.to_vec()]
    };
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    for p in pieces(format!("GET http://{a}/slow HTTP/1.1\r\nHost: {a}\r\n\r\n")) {
        s.write_all(&p).await.expect("write");
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!(status, 200);
    assert_eq!(body, b"hello from origin\n");

    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    for p in pieces(format!("CONNECT {o} HTTP/1.1\r\nHost: {o}\r\n\r\n")) {
        s.write_all(&p).await.expect("write");
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(read_response(&mut s).await.0, 200);
    echoes(&mut s, b"in pieces", b"in pieces").await;
}

/// An origin that answers any request head with 101 and then echoes.
async fn upgrading_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match s.read(&mut b).await {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A WebSocket relay (after a 101) holds its connection's slot until it
/// ends, like a CONNECT tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_holds_its_slot() {
    let o = upgrading_origin().await;
    let proxy = Proxy::start(&format!(
        "{OPEN}\n[limits]\nmax_connections_per_client = 1\n"
    ))
    .await;
    let mut ws = TcpStream::connect(proxy.addr).await.expect("connect");
    ws.write_all(
        format!(
            "GET http://{o}/socket HTTP/1.1\r\nHost: {o}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: chat\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (status, head, _) = read_response(&mut ws).await;
    assert_eq!(status, 101, "{head}");
    echoes(&mut ws, b"frame", b"frame").await;
    let out = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(
        support::parse_response(&out).0,
        503,
        "{}",
        String::from_utf8_lossy(&out)
    );
    drop(ws);
    let deadline = Instant::now() + WAIT;
    loop {
        let out = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await;
        if support::parse_response(&out).0 == 400 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upgraded connection's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A WebSocket relay ends when no byte has moved for the tunnel idle
/// timeout, and never while it is busy, however long that lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_times_out_on_idleness_not_age() {
    let o = upgrading_origin().await;
    let idle = Duration::from_millis(300);
    let proxy = Proxy::start(&format!(
        "{OPEN}\n[limits]\ntunnel_idle_timeout_ms = {}\n",
        idle.as_millis()
    ))
    .await;
    let mut ws = TcpStream::connect(proxy.addr).await.expect("connect");
    ws.write_all(
        format!(
            "GET http://{o}/socket HTTP/1.1\r\nHost: {o}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (status, head, _) = read_response(&mut ws).await;
    assert_eq!(status, 101, "{head}");
    // Busy for well past eight idle timeouts (what bounded it before).
    let busy = Instant::now();
    while busy.elapsed() < idle * 10 {
        echoes(&mut ws, b"ping", b"ping").await;
        tokio::time::sleep(idle / 4).await;
    }
    // Then silent: closed within a few idle timeouts.
    let silent = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, ws.read(&mut buf)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "the idle relay is closed: {n:?}"
    );
    // The last echo was up to a quarter of the timeout before the silence.
    assert!(
        silent.elapsed() >= idle / 2 && silent.elapsed() < idle * 10,
        "closed after {:?} of silence",
        silent.elapsed()
    );
    let rec = proxy
        .wait_record(|r| r["status"] == 101)
        .await
        .expect("the relay's record");
    assert_eq!(rec["error"], "idle timeout", "{rec}");
}

// ---------------------------------------------------------------------------
// CONNECT ports ([access] connect_ports)
// ---------------------------------------------------------------------------

/// A proxy from a whole file that leaves `connect_ports` at its default
/// (the test support opens every port otherwise): loopback reachable, the
/// bundled signatures.
async fn proxy_with_default_connect_ports() -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let log_path = dir.path().join("access.log");
    let config_path = dir.path().join("chatwall.toml");
    let text = format!(
        "{}[access]\ndeny_destinations = []\n",
        support::base_toml(&log_path)
    );
    assert!(!text.contains("connect_ports"));
    std::fs::write(&config_path, text).expect("write config");
    Proxy::start_file(dir, config_path, log_path).await
}

/// Assert a `connect_ports` refusal: 403, the header, a page that says so.
fn assert_port_refusal(r: &Resp, port: u16, what: &str) {
    assert_eq!(r.status, 403, "{what}: {}", r.head);
    assert_eq!(
        r.header("x-chatwall-block").as_deref(),
        Some("port"),
        "{what}: {}",
        r.head
    );
    let page = r.text();
    assert!(
        page.contains(&format!("port {port} is not allowed")),
        "{what}: the page must say the port is not allowed: {page}"
    );
}

/// With the default `connect_ports` (443), CONNECT to any other port is
/// refused with 403 and reason `port` before any DNS lookup or upstream
/// connection, on the fast path (a connection's first request) and on the
/// HTTP server's path (a CONNECT after another request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ports_default_refuses_other_ports_before_dns() {
    let proxy = proxy_with_default_connect_ports().await;
    let origin = RawOrigin::start(None, true).await;
    let http_origin = HttpOrigin::start().await;
    let o = origin.addr;
    let port = o.port();
    // (authority, the port, the app the refusal is counted under)
    let cases = [
        (o.to_string(), port, "unidentified"),
        // A name that does not resolve: a lookup would make this a 502.
        (
            "chat.example.invalid:8443".to_string(),
            8443,
            "unidentified",
        ),
        ("chat.example.invalid:5222".to_string(), 5222, "xmpp"),
        ("[::1]:8443".to_string(), 8443, "unidentified"),
    ];
    // Refused for its port: by `connect_ports`, or by a signature's port
    // rule, which names its app.
    let refused = |r: &Resp, port: u16, app: &str, what: &str| {
        if app == "unidentified" {
            assert_port_refusal(r, port, what);
        } else {
            assert_eq!(r.status, 403, "{what}: {}", r.head);
            assert_eq!(r.header("x-chatwall-block").as_deref(), Some(app), "{what}");
        }
    };
    for (authority, port, app) in &cases {
        // Fast path: CONNECT as the connection's first request.
        let (r, mut s) = connect(proxy.addr, authority).await;
        refused(&r, *port, app, &format!("first CONNECT {authority}"));
        // The connection stays usable: the HTTP server's CONNECT path.
        let a = http_origin.addr;
        s.write_all(format!("GET http://{a}/ HTTP/1.1\r\nHost: {a}\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let r = read_full(&mut s, false).await;
        assert_eq!(r.status, 200, "{}", r.head);
        s.write_all(
            format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let (status, head, body) = read_response(&mut s).await;
        refused(
            &Resp { status, head, body },
            *port,
            app,
            &format!("CONNECT {authority} after a GET"),
        );
    }
    assert_eq!(
        origin.accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a refused CONNECT reached the origin"
    );
    let m = proxy.metrics().await;
    for kind in ["dns", "connect_refused", "connect", "connect_timeout"] {
        assert_eq!(
            sample(&m, "chatwall_upstream_errors_total", &[("kind", kind)]),
            0.0,
            "{kind}: {m}"
        );
    }
    assert_eq!(
        sample(
            &m,
            "chatwall_blocked_total",
            &[("app", "unidentified"), ("reason", "port")]
        ),
        6.0,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "chatwall_blocked_total",
            &[("app", "xmpp"), ("reason", "port")]
        ),
        2.0,
        "{m}"
    );
    let recs = proxy.wait_log(12).await;
    let refused: Vec<&Value> = recs
        .iter()
        .filter(|r| field(r, "method") == "CONNECT")
        .collect();
    assert_eq!(refused.len(), 8, "{recs:?}");
    for r in refused {
        assert_eq!(field(r, "reason"), "port", "{r}");
        assert_eq!(field(r, "verdict"), "block", "{r}");
        assert_eq!(num(r, "status"), 403, "{r}");
        assert!(r.get("upstream").map_or(true, Value::is_null), "{r}");
        let app = field(r, "app");
        let target = field(r, "target");
        let want = cases
            .iter()
            .find(|(a, _, _)| target == *a)
            .map(|c| c.2)
            .unwrap_or_else(|| panic!("unexpected target in {r}"));
        assert_eq!(app, want, "{r}");
    }
}

/// 443 passes the default port check: CONNECT to a loopback 443 where
/// nothing listens (or whatever listens) is never refused for its port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ports_default_lets_443_through_the_port_check() {
    let proxy = proxy_with_default_connect_ports().await;
    for first in [true, false] {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        if !first {
            // Through the HTTP server: a refused request first.
            s.write_all(b"GET http://web.whatsapp.com/ HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
                .await
                .expect("write");
            assert_eq!(read_response(&mut s).await.0, 403);
        }
        s.write_all(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n")
            .await
            .expect("write");
        let (status, head, _) = read_response(&mut s).await;
        assert!(
            status == 200 || status == 502,
            "CONNECT 127.0.0.1:443 (first={first}): {head}"
        );
        assert_ne!(
            header_of(&head, "x-chatwall-block").as_deref(),
            Some("port")
        );
    }
    let recs = proxy.wait_log(3).await;
    assert!(
        recs.iter()
            .filter(|r| field(r, "method") == "CONNECT")
            .all(|r| field(r, "reason") != "port"),
        "{recs:?}"
    );
    assert_eq!(
        sample(
            &proxy.metrics().await,
            "chatwall_blocked_total",
            &[("app", "unidentified"), ("reason", "port")]
        ),
        0.0
    );
}

/// A port (or range) listed in `connect_ports` tunnels byte for byte over
/// one upstream connection; the port next to it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_ports_listed_pass_byte_for_byte() {
    let origin = RawOrigin::start(None, true).await;
    let o = origin.addr;
    let port = o.port();
    let other = if port == u16::MAX { port - 1 } else { port + 1 };
    for listed in [format!("[{port}]"), format!("[443, \"{port}-{port}\"]")] {
        let proxy = Proxy::start(&format!(
            "[access]\ndeny_destinations = []\nconnect_ports = {listed}\n"
        ))
        .await;
        let before = origin.accepted.load(std::sync::atomic::Ordering::SeqCst);
        let received_before = origin.total_received();
        // Fast path, then the HTTP server's path.
        let mut s = connect_tunnel(proxy.addr, &o.to_string())
            .await
            .unwrap_or_else(|st| panic!("{listed}: CONNECT {o} -> {st}"));
        echoes(&mut s, b"\x00first bytes\xff", b"\x00first bytes\xff").await;
        drop(s);
        let (r, mut s) = connect(proxy.addr, &format!("127.0.0.1:{other}")).await;
        assert_port_refusal(&r, other, &listed);
        s.write_all(format!("CONNECT {o} HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes())
            .await
            .expect("write");
        assert_eq!(read_response(&mut s).await.0, 200, "{listed}");
        echoes(&mut s, b"second tunnel", b"second tunnel").await;
        drop(s);
        assert_eq!(
            origin.accepted.load(std::sync::atomic::Ordering::SeqCst) - before,
            2,
            "{listed}: one upstream connection per tunnel"
        );
        let n = origin.received.lock().expect("lock").len();
        assert_eq!(origin.connection_bytes(n - 2), b"\x00first bytes\xff");
        assert_eq!(origin.connection_bytes(n - 1), b"second tunnel");
        assert_eq!(
            origin.total_received() - received_before,
            b"\x00first bytes\xff".len() + b"second tunnel".len()
        );
        proxy.stop().await;
    }
}

// ---------------------------------------------------------------------------
// A raw HTTP/1.1 origin: exact bytes in, exact bytes out
// ---------------------------------------------------------------------------

/// What a raw origin answers to one request head (as received).
type Answer = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// (connection number, request bytes) of each request a raw origin got.
type Received = Arc<Mutex<Vec<(usize, Vec<u8>)>>>;

/// An HTTP/1.1 origin on raw sockets: it records every request's exact
/// bytes (head and body, Content-Length or chunked framing) and answers each
/// with exact bytes. A `101` answer turns the connection into an echo.
struct RawHttpOrigin {
    addr: SocketAddr,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
    /// In arrival order.
    requests: Received,
}

impl RawHttpOrigin {
    async fn start(answer: Answer) -> RawHttpOrigin {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        RawHttpOrigin::serve(l, answer)
    }

    /// An origin on port 80 of a loopback address of its own (127.x.y.z),
    /// where a target whose port fails to parse would land if it fell back
    /// to the default port. `None` when no such address can be bound.
    async fn start_on_port_80(answer: Answer) -> Option<RawHttpOrigin> {
        let seed = std::process::id() as u64
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
        for i in 0..8u64 {
            let n = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(i * 1442695040888963407);
            let ip = std::net::Ipv4Addr::new(
                127,
                (n >> 40) as u8 | 1,
                (n >> 24) as u8,
                (n >> 8) as u8 | 1,
            );
            if let Ok(l) = TcpListener::bind((ip, 80)).await {
                return Some(RawHttpOrigin::serve(l, answer));
            }
        }
        None
    }

    fn serve(l: TcpListener, answer: Answer) -> RawHttpOrigin {
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (acc, reqs) = (Arc::clone(&accepted), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let conn = acc.fetch_add(1, Ordering::SeqCst);
                let (reqs, answer) = (Arc::clone(&reqs), Arc::clone(&answer));
                tokio::spawn(raw_http_connection(s, conn, reqs, answer));
            }
        });
        RawHttpOrigin {
            addr,
            accepted,
            requests,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<(usize, Vec<u8>)> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// Serve one origin connection: request after request until the peer
/// closes; after a `101`, echo.
async fn raw_http_connection(mut s: TcpStream, conn: usize, reqs: Received, answer: Answer) {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16384];
    loop {
        // The head.
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            match s.read(&mut tmp).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        // The body: Content-Length, or chunked up to the last chunk (no
        // trailers in these tests).
        let chunked = header_of(&head, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let end = if chunked {
            loop {
                if let Some(p) = buf[head_end..].windows(5).position(|w| w == b"0\r\n\r\n") {
                    break head_end + p + 5;
                }
                match s.read(&mut tmp).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                    _ => return,
                }
            }
        } else {
            let len = header_of(&head, "content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                match s.read(&mut tmp).await {
                    Ok(n) if n > 0 => buf.extend_from_slice(&tmp[..n]),
                    _ => return,
                }
            }
            head_end + len
        };
        let request: Vec<u8> = buf.drain(..end).collect();
        if let Ok(mut r) = reqs.lock() {
            r.push((conn, request.clone()));
        }
        let response = answer(&request);
        if s.write_all(&response).await.is_err() {
            return;
        }
        if response.starts_with(b"HTTP/1.1 101") {
            let _ = s.write_all(&buf).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            return;
        }
    }
}

/// An answer of fixed bytes.
fn fixed(response: &'static [u8]) -> Answer {
    Arc::new(move |_| response.to_vec())
}

// ---------------------------------------------------------------------------
// Strict request targets
// ---------------------------------------------------------------------------

/// A port above 65535, an empty port, a port that is not a number and
/// userinfo in an absolute-form target, and the same in a CONNECT target,
/// get 400 and a closed connection; nothing reaches an upstream (the
/// origin listens on port 80, where a port that failed to parse would
/// have fallen back to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targets_with_bad_ports_or_userinfo_are_400_and_never_forwarded() {
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    // Where a port that failed to parse would have gone; without a port 80
    // to bind (not root), an origin elsewhere still counts connections.
    let origin = match RawHttpOrigin::start_on_port_80(fixed(OK)).await {
        Some(o) => o,
        None => RawHttpOrigin::start(fixed(OK)).await,
    };
    let proxy = Proxy::start_open().await;
    let (h, o) = (origin.addr.ip(), origin.addr);
    let absolute = [
        format!("http://{h}:99999/"),
        format!("http://{h}:65536/"),
        format!("http://{h}:4294967376/"),
        format!("http://{h}:/"),
        format!("http://{h}:8o/"),
        format!("http://{h}:0/"),
        format!("http://user@{h}/"),
        format!("http://user:secret@{h}:80/"),
        format!("http://@{h}/"),
    ];
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for t in &absolute {
        let authority = t.trim_start_matches("http://").trim_end_matches('/');
        cases.push((
            format!("GET {t}"),
            format!("GET {t} HTTP/1.1\r\nHost: {authority}\r\n\r\n").into_bytes(),
        ));
    }
    // A raw space in the target.
    cases.push((
        "space in the path".into(),
        format!("GET http://{h}/a b HTTP/1.1\r\nHost: {h}\r\n\r\n").into_bytes(),
    ));
    cases.push((
        "space in the authority".into(),
        format!("GET http://{h} /x HTTP/1.1\r\nHost: {h}\r\n\r\n").into_bytes(),
    ));
    for target in [
        format!("{h}:70000"),
        format!("{h}:99999"),
        format!("{h}:"),
        format!("{h}:8o"),
        format!("user@{h}:80"),
        format!("{h} :80"),
    ] {
        let connect = format!("CONNECT {target} HTTP/1.1\r\nHost: {h}\r\n\r\n");
        // As the first request (the fast path) and after a GET (hyper's).
        cases.push((format!("CONNECT {target}"), connect.clone().into_bytes()));
        cases.push((
            format!("CONNECT {target} after a GET"),
            [
                format!("GET http://{o}/first HTTP/1.1\r\nHost: {o}\r\n\r\n").into_bytes(),
                connect.into_bytes(),
            ]
            .concat(),
        ));
    }
    let mut served = 0;
    for (name, raw) in &cases {
        let (out, closed) = until_close(proxy.addr, raw).await;
        let text = String::from_utf8_lossy(&out).to_string();
        let statuses: Vec<&str> = text
            .match_indices("HTTP/1.1 ")
            .filter_map(|(i, _)| text.get(i + 9..i + 12))
            .collect();
        let after_get = name.ends_with("after a GET");
        if after_get {
            served += 1;
        }
        let want: &[&str] = if after_get { &["200", "400"] } else { &["400"] };
        assert_eq!(statuses, want, "{name}: {text}");
        assert!(closed, "{name}: the connection stays open after a 400");
    }
    // Only the GETs before the CONNECTs reached the origin.
    let seen = origin.requests();
    assert_eq!(seen.len(), served, "{seen:?}");
    assert!(seen
        .iter()
        .all(|(_, r)| r.starts_with(b"GET /first HTTP/1.1\r\n")));
    assert!(origin.accepted() <= served);
    let m = proxy.metrics().await;
    assert_eq!(
        sample(
            &m,
            "chatwall_upstream_errors_total",
            &[("kind", "connect_refused")]
        ),
        0.0
    );
}

/// Ports written in full, with leading zeros, or left out pass as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_ports_in_targets_pass() {
    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    let origin = RawHttpOrigin::start(fixed(OK)).await;
    let proxy = Proxy::start_open().await;
    let p = origin.addr.port();
    for (i, authority) in [format!("127.0.0.1:{p}"), format!("127.0.0.1:00{p}")]
        .iter()
        .enumerate()
    {
        let r = one(
            proxy.addr,
            &format!("GET http://{authority}/x HTTP/1.1\r\nHost: {authority}\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 200, "{authority}: {}", r.head);
        assert_eq!(r.body, b"ok");
        let seen = origin.requests();
        assert!(
            seen[i].1.starts_with(b"GET /x HTTP/1.1\r\n"),
            "{}",
            String::from_utf8_lossy(&seen[i].1)
        );
    }
    // One origin, however its port is written: the second request reuses
    // the first one's upstream connection.
    assert_eq!(origin.accepted(), 1);
}

// ---------------------------------------------------------------------------
// Only the rewrites a forward proxy must make, byte for byte
// ---------------------------------------------------------------------------

/// This proxy's `Via` value.
fn via_of(proxy: &Proxy) -> String {
    proxy.shared.via.to_str().expect("via").to_string()
}

/// Read one response off `s` and return its exact bytes (head and a
/// Content-Length or chunked body, decoded for chunked).
async fn response_bytes(s: &mut TcpStream) -> (String, Vec<u8>) {
    let r = read_full(s, false).await;
    (r.head, r.body)
}

/// Requests reach the origin with only the rewrites a forward proxy must
/// make: origin-form request line, hop-by-hop fields gone, Host from the
/// target (where it stood), Via added; every other field with its name as
/// written and in its place. Responses reach the client as the origin sent
/// them minus hop-by-hop fields plus Via, with no Date the origin did not
/// send, custom reason phrases kept. Two (three) requests on one client
/// connection use one pooled upstream connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_http_is_forwarded_byte_for_byte_but_for_the_required_rewrites() {
    const FIRST: &[u8] = b"HTTP/1.1 200 OK\r\n\
        Server: RawOrigin/1\r\n\
        X-MiXeD-Response: yes\r\n\
        content-type: text/plain\r\n\
        Connection: keep-alive, X-Resp-Hop\r\n\
        X-Resp-Hop: gone\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Authenticate: Basic realm=\"origin\"\r\n\
        Content-Length: 5\r\n\
        set-cookie: a=1\r\n\
        Set-Cookie: b=2\r\n\
        \r\n\
        first";
    const SECOND: &[u8] = b"HTTP/1.1 201 Made It\r\n\
        LOCATION: /made\r\n\
        Date: Tue, 01 Jan 2030 00:00:00 GMT\r\n\
        Content-Length: 6\r\n\
        x-trailing: 1\r\n\
        \r\n\
        second";
    const THIRD: &[u8] = b"HTTP/1.1 200 OK\r\n\
        Transfer-Encoding: chunked\r\n\
        X-After-Te: 1\r\n\
        \r\n\
        10\r\n0123456789abcdef\r\n0\r\n\r\n";
    let origin = RawHttpOrigin::start(Arc::new(|req: &[u8]| {
        if req.starts_with(b"GET /first") {
            FIRST.to_vec()
        } else if req.starts_with(b"POST /second") {
            SECOND.to_vec()
        } else {
            THIRD.to_vec()
        }
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;

    let requests: [(Vec<u8>, Vec<u8>); 3] = [
        (
            format!(
                "GET http://{a}/first?q=1&r=%20 HTTP/1.1\r\n\
                 Host: {a}\r\n\
                 User-Agent: raw-test/1.0\r\n\
                 X-MiXeD-CaSe: one\r\n\
                 accept: */*\r\n\
                 Proxy-Connection: Keep-Alive\r\n\
                 Connection: Keep-Alive, X-Hop\r\n\
                 X-Hop: gone\r\n\
                 Keep-Alive: timeout=5\r\n\
                 TE: trailers\r\n\
                 Proxy-Authorization: Basic dXNlcjpwYXNz\r\n\
                 X-Order-A: 1\r\n\
                 COOKIE: a=b\r\n\
                 \r\n"
            )
            .into_bytes(),
            format!(
                "GET /first?q=1&r=%20 HTTP/1.1\r\n\
                 Host: {a}\r\n\
                 User-Agent: raw-test/1.0\r\n\
                 X-MiXeD-CaSe: one\r\n\
                 accept: */*\r\n\
                 X-Order-A: 1\r\n\
                 COOKIE: a=b\r\n\
                 Via: {via}\r\n\
                 \r\n"
            )
            .into_bytes(),
        ),
        (
            format!(
                "POST http://{a}/second HTTP/1.1\r\n\
                 host: wrong.example:1\r\n\
                 Content-Type: text/plain\r\n\
                 content-LENGTH: 11\r\n\
                 VIA: 1.0 earlier-proxy\r\n\
                 X-Z: z\r\n\
                 \r\n\
                 hello world"
            )
            .into_bytes(),
            format!(
                "POST /second HTTP/1.1\r\n\
                 host: {a}\r\n\
                 Content-Type: text/plain\r\n\
                 content-LENGTH: 11\r\n\
                 VIA: 1.0 earlier-proxy\r\n\
                 Via: {via}\r\n\
                 X-Z: z\r\n\
                 \r\n\
                 hello world"
            )
            .into_bytes(),
        ),
        (
            format!(
                "PUT http://{a}/third HTTP/1.1\r\n\
                 Host: {a}\r\n\
                 transfer-encoding: chunked\r\n\
                 Trailer: X-Sum\r\n\
                 X-After: 1\r\n\
                 \r\n\
                 10\r\n0123456789abcdef\r\n0\r\n\r\n"
            )
            .into_bytes(),
            format!(
                "PUT /third HTTP/1.1\r\n\
                 Host: {a}\r\n\
                 transfer-encoding: chunked\r\n\
                 Trailer: X-Sum\r\n\
                 X-After: 1\r\n\
                 Via: {via}\r\n\
                 \r\n\
                 10\r\n0123456789abcdef\r\n0\r\n\r\n"
            )
            .into_bytes(),
        ),
    ];
    let responses: [(&str, &[u8]); 3] = [
        (
            "HTTP/1.1 200 OK\r\n\
             Server: RawOrigin/1\r\n\
             X-MiXeD-Response: yes\r\n\
             content-type: text/plain\r\n\
             Content-Length: 5\r\n\
             set-cookie: a=1\r\n\
             Set-Cookie: b=2\r\n",
            b"first",
        ),
        (
            "HTTP/1.1 201 Made It\r\n\
             LOCATION: /made\r\n\
             Date: Tue, 01 Jan 2030 00:00:00 GMT\r\n\
             Content-Length: 6\r\n\
             x-trailing: 1\r\n",
            b"second",
        ),
        (
            "HTTP/1.1 200 OK\r\n\
             Transfer-Encoding: chunked\r\n\
             X-After-Te: 1\r\n",
            b"0123456789abcdef",
        ),
    ];

    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    for (i, ((sent, _), (head, body))) in requests.iter().zip(&responses).enumerate() {
        s.write_all(sent).await.expect("write");
        let (got_head, got_body) = response_bytes(&mut s).await;
        assert_eq!(
            got_head,
            format!("{head}Via: {via}\r\n\r\n"),
            "response {i}: the origin's head minus hop-by-hop fields, plus Via"
        );
        assert_eq!(got_body, *body, "response {i}");
    }
    let seen = origin.requests();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for (i, ((_, want), (conn, got))) in requests.iter().zip(&seen).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(got),
            String::from_utf8_lossy(want),
            "request {i} as the origin got it"
        );
        assert_eq!(*conn, 0, "request {i} on another upstream connection");
    }
    assert_eq!(origin.accepted(), 1, "one pooled upstream connection");
}

/// A request offering h2c (alone, in a list, in any case) reaches the origin
/// without the offer and gets the origin's HTTP/1.1 answer, never a 101;
/// a WebSocket offer beside it still upgrades; an origin that switches to a
/// protocol nobody offered gets the client a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_offers_never_yield_a_101() {
    const H2C: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
    const WS: &[u8] =
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";
    const PLAIN: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhttp1";
    // Answers as an h2c-capable server would: 101 to an h2c offer.
    let origin = RawHttpOrigin::start(Arc::new(|req: &[u8]| {
        let head = String::from_utf8_lossy(req).to_ascii_lowercase();
        let offers = |p: &str| {
            head.lines().any(|l| {
                l.strip_prefix("upgrade:")
                    .is_some_and(|v| v.split(',').any(|t| t.trim() == p))
            })
        };
        if offers("h2c") {
            H2C.to_vec()
        } else if offers("websocket") {
            WS.to_vec()
        } else {
            PLAIN.to_vec()
        }
    }))
    .await;
    let proxy = Proxy::start_open().await;
    let via = via_of(&proxy);
    let a = origin.addr;
    let settings = "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n";
    // (offer fields as the client sends them, what the origin must get of them)
    let plain_offers = [
        format!("Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n{settings}"),
        format!("connection: http2-settings,UPGRADE\r\nupgrade: H2C\r\n{settings}"),
        format!("Proxy-Connection: Keep-Alive\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n{settings}"),
        // Upgrade without Connection: upgrade is no offer at all.
        "Upgrade: h2c\r\n".to_string(),
    ];
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    for (i, offer) in plain_offers.iter().enumerate() {
        s.write_all(
            format!("GET http://{a}/h2c/{i} HTTP/1.1\r\nHost: {a}\r\n{offer}Accept: */*\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("write");
        let (head, body) = response_bytes(&mut s).await;
        assert_eq!(
            head,
            format!("HTTP/1.1 200 OK\r\nContent-Length: 5\r\nVia: {via}\r\n\r\n"),
            "offer {i}"
        );
        assert_eq!(body, b"http1");
    }
    let seen = origin.requests();
    for (i, (conn, got)) in seen.iter().enumerate() {
        assert_eq!(
            String::from_utf8_lossy(got),
            format!("GET /h2c/{i} HTTP/1.1\r\nHost: {a}\r\nAccept: */*\r\nVia: {via}\r\n\r\n"),
        );
        assert_eq!(*conn, 0);
    }
    assert_eq!(origin.accepted(), 1);

    // h2c beside websocket: the WebSocket upgrade goes through alone.
    let mut ws = TcpStream::connect(proxy.addr).await.expect("connect");
    ws.write_all(
        format!(
            "GET http://{a}/chat HTTP/1.1\r\nHost: {a}\r\nConnection: keep-alive, Upgrade, HTTP2-Settings\r\nUpgrade: h2c, websocket\r\n{settings}Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (status, head, _) = read_response(&mut ws).await;
    assert_eq!(status, 101, "{head}");
    assert_eq!(
        head,
        format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nVia: {via}\r\n\r\n")
    );
    echoes(&mut ws, b"frame", b"frame").await;
    let seen = origin.requests();
    let (_, got) = seen.last().expect("the upgrade request");
    assert_eq!(
        String::from_utf8_lossy(got),
        format!("GET /chat HTTP/1.1\r\nHost: {a}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nVia: {via}\r\n\r\n")
    );
    drop(ws);

    // curl's own h2c offer (`--http2` on an http:// URL through a proxy).
    if support::have_curl() {
        let url = format!("http://{a}/curl");
        let (code, out, err) =
            support::curl(&["--http2", "-i", "-x", &proxy.proxy_url(), &url]).await;
        assert_eq!(code, 0, "{err}");
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nhttp1"), "{out}");
        let seen = origin.requests();
        let (_, got) = seen.last().expect("curl's request");
        let got = String::from_utf8_lossy(got).to_ascii_lowercase();
        assert!(got.starts_with("get /curl http/1.1\r\n"), "{got}");
        assert!(
            !got.contains("h2c") && !got.contains("http2-settings") && !got.contains("upgrade"),
            "{got}"
        );
    } else {
        support::skip_or_fail("curl is not installed");
    }

    // An origin that switches to h2c unasked: 502, not a 101.
    let rogue = RawHttpOrigin::start(fixed(H2C)).await;
    let r = one(
        proxy.addr,
        &format!(
            "GET http://{r}/ HTTP/1.1\r\nHost: {r}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            r = rogue.addr
        ),
    )
    .await;
    assert_eq!(r.status, 502, "{}", r.head);
    let r = get(proxy.addr, &format!("http://{}/", rogue.addr)).await;
    assert_eq!(r.status, 502, "{}", r.head);
}
