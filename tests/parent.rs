//! A parent proxy (`[upstream] parent`): chatwall in front of a real Squid
//! that each test starts with a throwaway configuration on a loopback port.
//! HTTP goes to the parent in absolute form, tunnels with one CONNECT each,
//! byte-exact; chatwall's refusals happen before the parent sees anything;
//! a parent that cannot be reached or refuses is a 502 naming it;
//! `parent_bypass` goes direct.
//!
//! Squid's access log (in the test's directory) is what the parent saw.
//! Without Squid the tests that need it print why and pass, unless
//! `CHATWALL_REQUIRE_ALL=1`.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    connect_tunnel, pattern_byte, proxy_request, read_response, rustls_client_hello, skip_or_fail,
    HttpOrigin, Proxy, RawOrigin, WAIT,
};

const SQUID: &str = "/usr/sbin/squid";

/// A Squid started for one test; stopped when dropped.
struct Squid {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: std::process::Child,
}

/// A loopback port nobody listens on (bound, then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Squid {
    /// Start Squid with `extra` configuration lines before its access
    /// rules; `None` (after `skip_or_fail`) where Squid is not installed.
    async fn start(extra: &str) -> Option<Squid> {
        let binary = [SQUID, "/usr/local/sbin/squid"]
            .into_iter()
            .find(|p| Path::new(p).exists());
        let Some(binary) = binary else {
            skip_or_fail("squid is not installed (apt-get install squid)");
            return None;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        // Squid started as root works as its own user (`proxy`), which
        // must write its logs here.
        set_mode(dir.path(), 0o777);
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            "http_port 127.0.0.1:{port}\n\
             pid_filename {d}/squid.pid\n\
             logformat chatwall %ts.%03tu %>a:%>p %un %rm %ru %>Hs %Sh/%<a\n\
             access_log stdio:{d}/access.log chatwall\n\
             cache_log {d}/cache.log\n\
             cache_store_log none\n\
             coredump_dir {d}\n\
             cache deny all\n\
             cache_mem 8 MB\n\
             pinger_enable off\n\
             shutdown_lifetime 0 seconds\n\
             logfile_rotate 0\n\
             max_filedescriptors 4096\n\
             {extra}\n\
             http_access allow localhost\n\
             http_access deny all\n"
        );
        let conf_path = dir.path().join("squid.conf");
        std::fs::write(&conf_path, conf).expect("write squid.conf");
        set_mode(&conf_path, 0o644);
        let child = std::process::Command::new(binary)
            .args(["-N", "-f"])
            .arg(&conf_path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start squid");
        let squid = Squid {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            child,
        };
        let started = Instant::now();
        while !squid
            .cache_log()
            .contains("Accepting HTTP Socket connections")
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "squid did not start:\n{}",
                squid.cache_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Some(squid)
    }

    fn cache_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("cache.log")).unwrap_or_default()
    }

    /// What the parent saw.
    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// Wait until the access log has a line containing every needle.
    async fn wait_logged(&self, needles: &[&str]) -> String {
        let started = Instant::now();
        loop {
            let log = self.access_log();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            assert!(
                started.elapsed() < WAIT,
                "squid's access log has no line with {needles:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Access-log lines (each request or tunnel, once it ended).
    fn lines(&self) -> usize {
        self.access_log().lines().count()
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// A chatwall that reaches loopback origins through `parent`, with `extra`
/// lines in its `[upstream]` section.
async fn proxy_with_parent(parent: SocketAddr, extra: &str) -> Proxy {
    Proxy::start(&format!(
        "[access]\ndeny_destinations = []\n\n[upstream]\nparent = \"{parent}\"\n{extra}\n"
    ))
    .await
}

/// A GET through the proxy: status, head fields, body.
async fn get(proxy: &Proxy, url: &str) -> (u16, http::HeaderMap, Vec<u8>) {
    let req = Request::get(url)
        .header("host", url.split('/').nth(2).unwrap_or_default())
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = proxy_request(proxy.addr, req).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

/// CONNECT through the proxy: the status and, for a refusal, its body.
async fn connect_status(proxy: SocketAddr, authority: &str) -> (u16, String) {
    let mut s = TcpStream::connect(proxy).await.expect("connect proxy");
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s).await;
    (status, String::from_utf8_lossy(&body).to_string())
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, s.read_exact(&mut buf))
        .await
        .expect("in time")
        .expect("read");
    buf
}

#[tokio::test]
async fn http_goes_to_the_parent_in_absolute_form_and_comes_back_whole() {
    let Some(squid) = Squid::start("").await else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let proxy = proxy_with_parent(squid.addr, "").await;
    let n = 300_000;
    let url = format!("http://{}/bytes/{n}", origin.addr);
    for _ in 0..2 {
        let (status, _, body) = get(&proxy, &url).await;
        assert_eq!(status, 200);
        assert_eq!(body.len(), n);
        assert!(body.iter().enumerate().all(|(i, b)| *b == pattern_byte(i)));
    }
    let line = squid.wait_logged(&["GET", &url]).await;
    assert!(line.contains("HIER_DIRECT/127.0.0.1"), "{line}");
    // Both requests came over one pooled connection from chatwall (each
    // from a new client connection): the same source port at the parent.
    let log = squid.access_log();
    let sources: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&url))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(sources.len(), 2, "{log}");
    assert!(
        sources[0].starts_with("127.0.0.1:") && !sources[0].ends_with(":0"),
        "{log}"
    );
    assert_eq!(
        sources[0], sources[1],
        "a pooled connection is reused:\n{log}"
    );
    // The origin saw both proxies in Via: chatwall's, then Squid's.
    let seen = origin.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let via: Vec<&String> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("via"))
        .map(|(_, v)| v)
        .collect();
    let via = via
        .iter()
        .map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    assert!(via.contains("chatwall-"), "{via}");
    assert!(via.to_ascii_lowercase().contains("squid"), "{via}");
    // The access log names the parent.
    let log = proxy.wait_log(2).await;
    let upstream = log[0]["upstream"].as_str().unwrap_or_default().to_string();
    assert!(
        upstream.ends_with(&format!("via {}", squid.addr)),
        "{upstream}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn tunnels_go_through_the_parent_byte_exact_both_ways() {
    let Some(squid) = Squid::start("").await else {
        return;
    };
    // The origin speaks first: its banner may come in the same segment as
    // the parent's 200, and belongs to the tunnel.
    let banner: &'static [u8] = b"220 origin ready\r\n";
    let origin = RawOrigin::start(Some(banner), true).await;
    let proxy = proxy_with_parent(squid.addr, "").await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .unwrap_or_else(|st| panic!("CONNECT got {st}"));
    assert_eq!(read_exactly(&mut s, banner.len()).await, banner);
    let sent: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            w.write_all(&sent).await.expect("write");
            w
        })
    };
    let mut echoed = vec![0u8; sent.len()];
    tokio::time::timeout(WAIT, r.read_exact(&mut echoed))
        .await
        .expect("echo in time")
        .expect("echo");
    assert!(echoed == sent, "the echo differs from what was sent");
    let w = writer.await.expect("writer");
    drop((r, w));
    assert!(
        crate::support::wait_until(|| origin.total_received() == sent.len()).await,
        "the origin got {} of {} bytes",
        origin.total_received(),
        sent.len()
    );
    assert_eq!(origin.connection_bytes(0), sent);
    squid
        .wait_logged(&["CONNECT", &origin.addr.to_string()])
        .await;
    proxy.stop().await;
}

/// A tunnel to a name: the parent resolves it, chatwall still follows the
/// HTTP inside request by request (on names and rules; no address is
/// known to check).
#[tokio::test]
async fn http_inside_a_tunnel_to_a_name_is_decided_request_by_request() {
    let Some(squid) = Squid::start("").await else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let proxy = proxy_with_parent(squid.addr, "").await;
    let authority = format!("localhost:{}", origin.addr.port());
    let mut s = connect_tunnel(proxy.addr, &authority)
        .await
        .unwrap_or_else(|st| panic!("CONNECT got {st}"));
    s.write_all(format!("GET /first HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, _, body) = read_response(&mut s).await;
    assert_eq!((status, &body[..]), (200, &b"hello from origin\n"[..]));
    s.write_all(b"GET /second HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
        .await
        .expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 403, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("x-chatwall-block: whatsapp"),
        "{head}"
    );
    drop(s);
    let seen = origin.requests();
    assert_eq!(seen.len(), 1, "only the first request went on: {seen:?}");
    assert_eq!(seen[0].uri, "/first");
    squid.wait_logged(&["CONNECT", &authority]).await;
    let log = proxy.wait_log(2).await;
    assert!(
        log.iter().any(|r| r["upstream"]
            .as_str()
            .is_some_and(|u| u == format!("{authority} via {}", squid.addr))),
        "{log:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn refusals_happen_before_the_parent_sees_anything() {
    let Some(squid) = Squid::start("").await else {
        return;
    };
    let origin = RawOrigin::start(None, true).await;
    let proxy = proxy_with_parent(squid.addr, "").await;

    // By name: refused by chatwall, never asked of the parent.
    let (status, _) = connect_status(proxy.addr, "web.whatsapp.com:443").await;
    assert_eq!(status, 403);
    let (status, headers, _) = get(&proxy, "http://web.whatsapp.com/").await;
    assert_eq!(status, 403);
    assert_eq!(
        headers.get("x-chatwall-block").map(|v| v.as_bytes()),
        Some(&b"whatsapp"[..])
    );

    // By address: an IP literal in a signature's CIDRs is still checked
    // (Signal's, from the bundled set).
    let (status, _) = connect_status(proxy.addr, "76.223.92.165:443").await;
    assert_eq!(status, 403);
    let (status, headers, _) = get(&proxy, "http://76.223.92.165/").await;
    assert_eq!(status, 403);
    assert_eq!(
        headers.get("x-chatwall-block").map(|v| v.as_bytes()),
        Some(&b"signal"[..])
    );

    // By ClientHello: the tunnel to the parent is open, but the refused
    // first bytes never reach it.
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .unwrap_or_else(|st| panic!("CONNECT got {st}"));
    s.write_all(&rustls_client_hello("web.whatsapp.com"))
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let end = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
    drop(s);

    // Something that passes, so that the parent's log is known to be
    // written up to here.
    let allowed = RawOrigin::start(None, true).await;
    let mut s = connect_tunnel(proxy.addr, &allowed.addr.to_string())
        .await
        .unwrap_or_else(|st| panic!("CONNECT got {st}"));
    s.write_all(b"hello").await.expect("write");
    assert_eq!(read_exactly(&mut s, 5).await, b"hello");
    drop(s);
    squid
        .wait_logged(&["CONNECT", &allowed.addr.to_string()])
        .await;
    squid
        .wait_logged(&["CONNECT", &origin.addr.to_string()])
        .await;
    let log = squid.access_log();
    assert!(
        !log.contains("whatsapp"),
        "the parent saw an IM name:\n{log}"
    );
    assert!(
        !log.contains("76.223.92.165"),
        "the parent saw an IM address:\n{log}"
    );
    assert_eq!(
        origin.total_received(),
        0,
        "refused bytes reached the origin"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_parent_that_refuses_a_tunnel_is_a_502_naming_it() {
    let denied = free_port();
    let Some(squid) = Squid::start(&format!(
        "acl refused_port port {denied}\nhttp_access deny refused_port"
    ))
    .await
    else {
        return;
    };
    let proxy = proxy_with_parent(squid.addr, "").await;
    let (status, body) = connect_status(proxy.addr, &format!("127.0.0.1:{denied}")).await;
    assert_eq!(status, 502, "{body}");
    let named = format!("parent proxy {} answered 403 Forbidden", squid.addr);
    assert!(body.contains(&named), "{body}");
    let m = proxy
        .metric("chatwall_upstream_errors_total{kind=\"parent\"}")
        .await;
    assert_eq!(m, 1.0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_dead_parent_is_a_502_naming_it() {
    // No Squid needed: nothing listens on the parent's port.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let origin = HttpOrigin::start().await;
    let proxy = proxy_with_parent(dead, "").await;
    let named = format!("parent proxy {dead} refused the connection");

    let (status, _, body) = get(&proxy, &format!("http://{}/", origin.addr)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains(&named), "{body}");

    let (status, body) = connect_status(proxy.addr, &origin.addr.to_string()).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains(&named), "{body}");

    assert!(origin.requests().is_empty(), "nothing went direct");
    let m = proxy
        .metric("chatwall_upstream_errors_total{kind=\"parent\"}")
        .await;
    assert_eq!(m, 2.0);
    let log = proxy.wait_log(2).await;
    assert!(
        log.iter()
            .all(|r| r["error"].as_str().is_some_and(|e| e.contains(&named))),
        "{log:?}"
    );
    proxy.stop().await;
}

/// A scripted parent on a raw socket: for each connection, reads the
/// CONNECT head, then writes its parts with a pause between them and keeps
/// the connection open until the client closes; records each head.
async fn scripted_parent(parts: Vec<&'static [u8]>) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&heads);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (parts, seen) = (parts.clone(), Arc::clone(&seen));
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match s.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                if let Ok(mut h) = seen.lock() {
                    h.push(String::from_utf8_lossy(&head).into_owned());
                }
                for p in parts {
                    if s.write_all(p).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
            });
        }
    });
    (addr, heads)
}

#[tokio::test]
async fn the_parents_answer_is_read_to_its_end_and_no_further() {
    // The answer split across segments, and the origin's first bytes in the
    // same segment as its end: they belong to the tunnel. (`origin.example`
    // resolves nowhere: the name goes to the parent unresolved.)
    let (parent, heads) = scripted_parent(vec![
        b"HTTP/1.1 200 Connection",
        b" established\r\nVia: 1.1 parent\r",
        b"\n\r\n220 banner from the origin\r\n",
    ])
    .await;
    let proxy = proxy_with_parent(parent, "").await;
    let mut s = connect_tunnel(proxy.addr, "origin.example:25")
        .await
        .unwrap_or_else(|st| panic!("CONNECT got {st}"));
    let want = b"220 banner from the origin\r\n";
    assert_eq!(read_exactly(&mut s, want.len()).await, want);
    drop(s);
    let heads = heads.lock().map(|h| h.clone()).unwrap_or_default();
    assert_eq!(
        heads,
        vec!["CONNECT origin.example:25 HTTP/1.1\r\nHost: origin.example:25\r\n\r\n".to_string()]
    );
    proxy.stop().await;

    // What is not an answer, or is too long, is a 502 naming the parent.
    for (parts, says) in [
        (
            vec![&b"SSH-2.0-OpenSSH_9.6\r\n\r\n"[..]],
            "sent an answer that is not HTTP",
        ),
        (
            vec![&b"HTTP/1.1 200 OK\r\n"[..], &[b'X'; 20_000][..]],
            "answer head over",
        ),
        (vec![&b"HTTP/1.1 200 OK\r\n"[..]], "did not answer within"),
    ] {
        let (parent, _) = scripted_parent(parts).await;
        let proxy = Proxy::start(&format!(
            "[limits]\nupstream_response_timeout_ms = 1000\n\n[upstream]\nparent = \"{parent}\"\n"
        ))
        .await;
        let (status, body) = connect_status(proxy.addr, "origin.example:443").await;
        assert_eq!(status, 502, "{body}");
        assert!(body.contains(&format!("parent proxy {parent} ")), "{body}");
        assert!(body.contains(says), "{says}: {body}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn parent_bypass_goes_direct() {
    let Some(squid) = Squid::start("").await else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let raw = RawOrigin::start(None, true).await;
    let proxy = proxy_with_parent(
        squid.addr,
        "parent_bypass = [\"127.0.0.1/32\", \"localhost\"]",
    )
    .await;
    let (status, _, body) = get(&proxy, &format!("http://127.0.0.1:{}/", origin.addr.port())).await;
    assert_eq!((status, &body[..]), (200, &b"hello from origin\n"[..]));
    let (status, _, _) = get(&proxy, &format!("http://localhost:{}/", origin.addr.port())).await;
    assert_eq!(status, 200);
    let mut s = connect_tunnel(proxy.addr, &raw.addr.to_string())
        .await
        .unwrap_or_else(|st| panic!("CONNECT got {st}"));
    s.write_all(b"direct").await.expect("write");
    assert_eq!(read_exactly(&mut s, 6).await, b"direct");
    drop(s);
    assert_eq!(origin.requests().len(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(squid.lines(), 0, "the parent saw:\n{}", squid.access_log());
    proxy.stop().await;
}

#[tokio::test]
async fn credentials_go_to_the_parent() {
    let auth_program = "/usr/lib/squid/basic_fake_auth";
    if !Path::new(auth_program).exists() {
        skip_or_fail("squid's basic_fake_auth program is not installed");
        return;
    }
    let Some(squid) = Squid::start(&format!(
        "auth_param basic program {auth_program}\nacl authed proxy_auth REQUIRED\nhttp_access deny !authed"
    ))
    .await
    else {
        return;
    };
    let origin = HttpOrigin::start().await;
    let raw = RawOrigin::start(None, true).await;

    // Without credentials the parent's 407 (for chatwall, not for the
    // client) is a 502 naming the parent, for HTTP and tunnels alike.
    let proxy = proxy_with_parent(squid.addr, "").await;
    let (status, body) = connect_status(proxy.addr, &raw.addr.to_string()).await;
    assert_eq!(status, 502);
    let named = format!("parent proxy {} answered 407", squid.addr);
    assert!(body.contains(&named), "{body}");
    let (status, _, body) = get(&proxy, &format!("http://{}/", origin.addr)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 502, "{body}");
    assert!(body.contains(&named), "{body}");
    proxy.stop().await;

    let creds: PathBuf = squid.dir.path().join("parent.credentials");
    std::fs::write(&creds, "chatwall-user:s3cret\n").expect("write credentials");
    set_mode(&creds, 0o600);
    let proxy = proxy_with_parent(
        squid.addr,
        &format!(
            "parent_credentials_file = {:?}",
            creds.display().to_string()
        ),
    )
    .await;
    let (status, _, body) = get(&proxy, &format!("http://{}/", origin.addr)).await;
    assert_eq!((status, &body[..]), (200, &b"hello from origin\n"[..]));
    let mut s = connect_tunnel(proxy.addr, &raw.addr.to_string())
        .await
        .unwrap_or_else(|st| panic!("CONNECT got {st}"));
    s.write_all(b"ok").await.expect("write");
    assert_eq!(read_exactly(&mut s, 2).await, b"ok");
    drop(s);
    squid.wait_logged(&["GET", "chatwall-user"]).await;
    squid.wait_logged(&["CONNECT", "chatwall-user"]).await;
    // The parent's credentials are chatwall's, never the origin's business.
    let seen = origin.requests();
    assert!(
        seen[0]
            .headers
            .iter()
            .all(|(k, _)| !k.eq_ignore_ascii_case("proxy-authorization")),
        "{seen:?}"
    );
    proxy.stop().await;
}

/// Every tunnel is its own CONNECT to the one parent address: many short
/// connections in a row must not run out of anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tunnels_in_a_row_through_the_parent() {
    const TUNNELS: usize = 10_000;
    const WORKERS: usize = 8;
    let Some(squid) = Squid::start("").await else {
        return;
    };
    let origin = RawOrigin::start(None, true).await;
    let proxy = proxy_with_parent(squid.addr, "").await;
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..WORKERS {
        let (proxy, target) = (proxy.addr, origin.addr.to_string());
        workers.push(tokio::spawn(async move {
            for i in (w..TUNNELS).step_by(WORKERS) {
                let mut s = connect_tunnel(proxy, &target)
                    .await
                    .unwrap_or_else(|st| panic!("tunnel {i}: CONNECT got {st}"));
                let msg = format!("tunnel {i:05}");
                s.write_all(msg.as_bytes()).await.expect("write");
                let got = read_exactly(&mut s, msg.len()).await;
                assert_eq!(got, msg.as_bytes(), "tunnel {i}");
            }
        }));
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(240), w)
            .await
            .expect("tunnels in time")
            .expect("worker");
    }
    eprintln!(
        "{TUNNELS} tunnels through the parent in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        proxy
            .metric("chatwall_upstream_errors_total{kind=\"parent\"}")
            .await,
        0.0
    );
    // One CONNECT each reached the parent (logged as each tunnel ends).
    let logged = crate::support::wait_until(|| squid.lines() == TUNNELS).await;
    assert!(logged, "the parent logged {} tunnels", squid.lines());
    proxy.stop().await;
}
