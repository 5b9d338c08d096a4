//! The circumvention category (issue 14): public DNS-over-HTTPS and
//! DNS-over-TLS resolvers, OpenVPN over TCP, VPN apps and web proxies are
//! named, monitored by default and refused once an administrator sets
//! `[policy.categories] circumvention = "block"`; ordinary DNS on port 53
//! and a resolver on the allow-list pass.
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{self, connect_tunnel, read_response, Proxy, RawOrigin, WAIT};

const OPEN: &str = "[access]\ndeny_destinations = []\n[inspect]\nfirst_bytes_timeout_ms = 1500\n";
const BLOCK: &str = "[policy.categories]\ncircumvention = \"block\"\n";

/// Did the proxy end the tunnel (EOF or reset) instead of relaying?
async fn is_refused(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(WAIT, s.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Wait until the origin has received `n` bytes (bounded).
async fn received(origin: &RawOrigin, n: usize) -> usize {
    for _ in 0..200 {
        if origin.total_received() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    origin.total_received()
}

/// The access-log record of the last flow to `target`.
async fn record_for(proxy: &Proxy, target: &str) -> serde_json::Value {
    let t = target.to_string();
    proxy
        .wait_record(move |r| r["target"].as_str().is_some_and(|x| x.contains(&t)))
        .await
        .unwrap_or_else(|| panic!("no access-log record for {target}: {:?}", proxy.log()))
}

/// A TCP listener on port `port` of some loopback address, when this
/// process may bind it (ports below 1024 need root).
async fn bind_low(port: u16) -> Option<TcpListener> {
    for last in 1..=9u8 {
        let addr = SocketAddr::from(([127, 0, 0, last], port));
        if let Ok(l) = TcpListener::bind(addr).await {
            return Some(l);
        }
    }
    None
}

/// A DNS-over-TCP server (RFC 7766 framing: a 2-byte length before each
/// message) that answers every query with `answer`, once per connection.
fn serve_dns(listener: TcpListener, answer: &'static [u8]) {
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut len = [0u8; 2];
                if s.read_exact(&mut len).await.is_err() {
                    return;
                }
                let mut query = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if s.read_exact(&mut query).await.is_err() {
                    return;
                }
                let mut out = (answer.len() as u16).to_be_bytes().to_vec();
                out.extend_from_slice(answer);
                let _ = s.write_all(&out).await;
            });
        }
    });
}

/// A DNS query for `example.org` A over TCP (RFC 1035 §4.2.2 framing).
fn dns_query() -> Vec<u8> {
    let mut msg = vec![
        0xab, 0xcd, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    for label in ["example", "org"] {
        msg.push(label.len() as u8);
        msg.extend_from_slice(label.as_bytes());
    }
    msg.extend_from_slice(&[0x00, 0x00, 0x01, 0x00, 0x01]);
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&msg);
    framed
}

/// A DNS answer (header only: id, QR, NOERROR): what the server sends back.
const DNS_ANSWER: &[u8] = &[0xab, 0xcd, 0x81, 0x80, 0, 0, 0, 0, 0, 0, 0, 0];

/// OpenVPN's first packet over TCP without control-channel wrapping: the
/// 2-byte length 14, P_CONTROL_HARD_RESET_CLIENT_V2 with key id 0 (0x38),
/// a session id, an empty ack array and message packet id 0.
fn openvpn_hard_reset() -> Vec<u8> {
    let mut p = vec![0x00, 0x0e, 0x38];
    p.extend_from_slice(&[0x5e, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77]);
    p.push(0x00);
    p.extend_from_slice(&[0x00, 0x00, 0x00, 0x00]);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_resolver_is_monitored_by_default_and_refused_when_circumvention_blocks() {
    let hello = support::rustls_client_hello("dns.google");

    // Default: monitored, relayed, logged and counted under its own app.
    let origin = RawOrigin::start(None, false).await;
    let proxy = Proxy::start(OPEN).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&hello).await.expect("write hello");
    assert_eq!(received(&origin, hello.len()).await, hello.len());
    drop(s);
    let r = record_for(&proxy, &origin.addr.to_string()).await;
    assert_eq!(r["verdict"], "monitor", "{r}");
    assert_eq!(r["app"], "public-dns-resolvers", "{r}");
    assert_eq!(r["reason"], "sni", "{r}");
    assert_eq!(
        proxy
            .metric("chatwall_detections_total{action=\"monitor\",app=\"public-dns-resolvers\"}")
            .await,
        1.0
    );
    proxy.stop().await;

    // circumvention = "block": reset before the upstream sees a byte.
    let origin = RawOrigin::start(None, false).await;
    let proxy = Proxy::start(&format!("{OPEN}{BLOCK}")).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&hello).await.expect("write hello");
    assert!(is_refused(&mut s).await, "a DoH ClientHello was relayed");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(origin.total_received(), 0);
    let r = record_for(&proxy, &origin.addr.to_string()).await;
    assert_eq!(r["verdict"], "block", "{r}");
    assert_eq!(r["app"], "public-dns-resolvers", "{r}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_on_853_is_refused_before_any_lookup_and_ordinary_dns_on_53_passes() {
    let proxy = Proxy::start(&format!("{OPEN}{BLOCK}")).await;

    // A name that cannot resolve: a 403 naming the port proves the refusal
    // came before any lookup (a lookup would have given a 502).
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(b"CONNECT resolver.invalid:853 HTTP/1.1\r\nHost: resolver.invalid:853\r\n\r\n")
        .await
        .expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 403);
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("x-chatwall-block: public-dns-resolvers"),
        "{head}"
    );
    let r = record_for(&proxy, "resolver.invalid:853").await;
    assert_eq!(r["reason"], "port", "{r}");

    // Ordinary DNS over TCP on 53 through the same proxy: relayed both ways.
    match bind_low(53).await {
        Some(listener) => {
            let addr = listener.local_addr().expect("addr");
            serve_dns(listener, DNS_ANSWER);
            let mut s = connect_tunnel(proxy.addr, &addr.to_string())
                .await
                .expect("CONNECT to a resolver on 53");
            s.write_all(&dns_query()).await.expect("query");
            let answer = support::read_n(&mut s, DNS_ANSWER.len() + 2).await;
            assert_eq!(&answer[2..], DNS_ANSWER, "the answer came back whole");
            drop(s);
            let r = record_for(&proxy, &addr.to_string()).await;
            assert_eq!(r["verdict"], "allow", "{r}");
        }
        None => {
            // Without root: nothing listens on 53, so the proxy answers 502
            // (the upstream refused), never a policy 403.
            let target = "127.0.0.1:53";
            assert_eq!(connect_tunnel(proxy.addr, target).await.err(), Some(502));
            let r = record_for(&proxy, target).await;
            assert_ne!(r["verdict"], "block", "{r}");
        }
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resolver_on_the_allow_list_passes_when_circumvention_blocks() {
    let allow = "[[policy.allow]]\nhosts = [\"dns.google\"]\ncidrs = [\"127.0.0.0/8\"]\n";
    let proxy = Proxy::start(&format!("{OPEN}{BLOCK}{allow}")).await;

    // DoH by name: the allow-listed SNI passes.
    let origin = RawOrigin::start(None, false).await;
    let hello = support::rustls_client_hello("dns.google");
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&hello).await.expect("write hello");
    assert_eq!(received(&origin, hello.len()).await, hello.len());
    drop(s);

    // Another public resolver is still refused.
    let origin = RawOrigin::start(None, false).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&support::rustls_client_hello("cloudflare-dns.com"))
        .await
        .expect("write hello");
    assert!(is_refused(&mut s).await);
    assert_eq!(origin.total_received(), 0);

    // DoT to an allow-listed address on 853 passes the port rule.
    match bind_low(853).await {
        Some(listener) => {
            let addr = listener.local_addr().expect("addr");
            let accepted = tokio::spawn(async move {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).await.expect("read");
                buf
            });
            let mut s = connect_tunnel(proxy.addr, &addr.to_string())
                .await
                .expect("CONNECT to an allow-listed resolver on 853");
            s.write_all(b"\x16\x03\x01\x00\x00").await.expect("write");
            let got = tokio::time::timeout(WAIT, accepted)
                .await
                .expect("in time")
                .expect("task");
            assert_eq!(&got, b"\x16\x03\x01\x00\x00");
        }
        None => {
            let target = "127.0.0.1:853";
            assert_eq!(connect_tunnel(proxy.addr, target).await.err(), Some(502));
        }
    }
    // The same port to an address not on the allow-list is refused.
    assert_eq!(
        connect_tunnel(proxy.addr, "resolver.invalid:853")
            .await
            .err(),
        Some(403)
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openvpn_over_tcp_is_named_on_any_port() {
    let packet = openvpn_hard_reset();

    let origin = RawOrigin::start(None, false).await;
    let proxy = Proxy::start(OPEN).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&packet).await.expect("write");
    assert_eq!(received(&origin, packet.len()).await, packet.len());
    drop(s);
    let r = record_for(&proxy, &origin.addr.to_string()).await;
    assert_eq!(r["verdict"], "monitor", "{r}");
    assert_eq!(r["app"], "openvpn", "{r}");
    assert_eq!(r["reason"], "payload", "{r}");
    proxy.stop().await;

    let origin = RawOrigin::start(None, false).await;
    let proxy = Proxy::start(&format!("{OPEN}{BLOCK}")).await;
    let mut s = connect_tunnel(proxy.addr, &origin.addr.to_string())
        .await
        .expect("CONNECT");
    s.write_all(&packet).await.expect("write");
    assert!(is_refused(&mut s).await, "OpenVPN was relayed");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(origin.total_received(), 0);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpn_apps_and_web_proxies_are_refused_by_name_when_circumvention_blocks() {
    let proxy = Proxy::start(&format!("{OPEN}{BLOCK}")).await;
    for (host, app) in [
        ("www.nordvpn.com", "nordvpn"),
        ("bridges.torproject.org", "tor"),
        ("www.croxyproxy.com", "web-proxies"),
        ("psiphon.ca", "psiphon"),
    ] {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.write_all(format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let (status, head, _) = read_response(&mut s).await;
        assert_eq!(status, 403, "{host}");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains(&format!("x-chatwall-block: {app}")),
            "{host}: {head}"
        );
    }
    proxy.stop().await;
}
