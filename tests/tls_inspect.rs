//! TLS inspection (`[tls_inspect]`) end to end on loopback: a local CA
//! made for the test, an HTTPS origin whose certificate the proxy trusts
//! through `upstream_extra_ca`, rustls, curl and openssl clients through the
//! proxy. What passes is checked byte for byte at both ends (the origin
//! records the plaintext it read), with the origin's connections counted.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

use crate::support::{self, connect_tunnel, Proxy};

const WAIT: Duration = Duration::from_secs(10);

/// The origin's answer to every request head: odd spacing and case that a
/// re-encoding proxy would change.
const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 12\r\nX-Odd:   spaced  \r\nx-lower: v\r\n\r\nhello inside";

/// An HTTPS origin that records the plaintext of every connection and
/// answers each request head (no bodies) with `RESPONSE`.
struct PlainOrigin {
    addr: std::net::SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    accepted: Arc<AtomicUsize>,
    cert: CertificateDer<'static>,
    cert_pem: PathBuf,
    _dir: tempfile::TempDir,
}

impl PlainOrigin {
    async fn start(names: &[&str]) -> PlainOrigin {
        let (cfg, cert) = support::tls_server_config(names);
        PlainOrigin::start_with(cfg, cert).await
    }

    /// With a server configuration of the test's own.
    async fn start_with(
        cfg: Arc<rustls::ServerConfig>,
        cert: CertificateDer<'static>,
    ) -> PlainOrigin {
        let dir = tempfile::tempdir().expect("tempdir");
        let cert_pem = dir.path().join("origin.pem");
        std::fs::write(&cert_pem, pem(&cert)).expect("write pem");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let (rec, acc) = (Arc::clone(&received), Arc::clone(&accepted));
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                acc.fetch_add(1, Ordering::SeqCst);
                let (acceptor, rec) = (acceptor.clone(), Arc::clone(&rec));
                tokio::spawn(async move {
                    let Ok(Ok(mut tls)) = tokio::time::timeout(WAIT, acceptor.accept(s)).await
                    else {
                        return;
                    };
                    let i = {
                        let mut r = rec.lock().expect("lock");
                        r.push(Vec::new());
                        r.len() - 1
                    };
                    let mut pending = Vec::new();
                    let mut buf = [0u8; 4096];
                    for _ in 0..10_000 {
                        let n = match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        rec.lock().expect("lock")[i].extend_from_slice(&buf[..n]);
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            if tls.write_all(RESPONSE).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        PlainOrigin {
            addr,
            received,
            accepted,
            cert,
            cert_pem,
            _dir: dir,
        }
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.received.lock().expect("lock").clone()
    }
}

fn pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// A CA made for the test: `ca.pem`, `ca.key` (0600) in `dir`.
fn make_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let ca = chatwall::tls_inspect::ca::generate("chatwall test CA", 30).expect("CA");
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    std::fs::write(&cert, &ca.cert_pem).expect("write");
    std::fs::write(&key, &ca.key_pem).expect("write");
    set_mode(&key, 0o600);
    (cert, key)
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `[tls_inspect]` with a fresh CA, trusting `origin` upstream; `extra`
/// lines go into the section.
fn inspect_toml(dir: &Path, upstream_ca: &Path, extra: &str) -> (String, PathBuf) {
    let (cert, key) = make_ca(dir);
    let toml = format!(
        "{}\n[tls_inspect]\nenabled = true\nca_cert = {:?}\nca_key = {:?}\nupstream_extra_ca = {:?}\n{}\n",
        support::OPEN,
        cert.display().to_string(),
        key.display().to_string(),
        upstream_ca.display().to_string(),
        extra
    );
    (toml, cert)
}

/// A proxy that decrypts `localhost` for loopback clients and trusts
/// `origin` upstream; the CA's PEM, and the directory that holds both.
async fn localhost_inspected(origin: &PlainOrigin) -> (Proxy, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (toml, ca) = inspect_toml(
        dir.path(),
        &origin.cert_pem,
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:localhost\"]",
    );
    (Proxy::start(&toml).await, ca, dir)
}

fn client_config(roots_pem: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(roots_pem).expect("pem") {
        roots.add(c.expect("cert")).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// CONNECT through the proxy, then TLS for `sni` with `cfg`.
async fn tls_through(
    proxy: &Proxy,
    authority: &str,
    sni: &str,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = connect_tunnel(proxy.addr, authority)
        .await
        .map_err(|s| std::io::Error::other(format!("CONNECT answered {s}")))?;
    let name = ServerName::try_from(sni.to_string()).expect("name");
    tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// Read until the peer closes or goes quiet; the bytes.
async fn read_all<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..10_000 {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    out
}

fn head_of(bytes: &[u8]) -> String {
    let end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(bytes.len(), |p| p + 4);
    String::from_utf8_lossy(&bytes[..end]).to_string()
}

#[tokio::test]
async fn a_selected_flow_is_decrypted_and_passes_byte_exact() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    let (proxy, ca, _dir) = localhost_inspected(&origin).await;
    let authority = format!("localhost:{}", origin.addr.port());
    // Only chatwall's CA is trusted: the handshake shows the leaf was
    // minted under it for the SNI.
    let mut tls = tls_through(
        &proxy,
        &authority,
        "localhost",
        client_config(&ca, &[b"http/1.1"]),
    )
    .await
    .expect("handshake with a minted leaf");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let requests: &[u8] = b"GET /a HTTP/1.1\r\nHOST: localhost\r\nx-CaSe:  kept \r\n\r\nGET /b?q=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    tls.write_all(requests).await.expect("write");
    let got = read_all(&mut tls).await;
    let mut want = RESPONSE.to_vec();
    want.extend_from_slice(RESPONSE);
    support::assert_same_bytes("client received", &got, &want);
    support::assert_same_bytes(
        "origin received",
        origin
            .received()
            .first()
            .map(Vec::as_slice)
            .unwrap_or_default(),
        requests,
    );
    assert_eq!(
        origin.accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );
    let recs = proxy.wait_log(3).await;
    let inspected: Vec<_> = recs.iter().filter(|r| r["tls"] == "inspected").collect();
    assert!(
        inspected.len() >= 2,
        "per-request records say inspected: {recs:?}"
    );
    assert!(recs.iter().any(|r| r["target"] == "/b?q=1"), "{recs:?}");
    assert_eq!(
        proxy
            .metric("chatwall_tls_inspect_total{outcome=\"inspected\"}")
            .await,
        1.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_im_request_inside_https_gets_the_page_and_nothing_reaches_the_origin() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    let (proxy, ca, _dir) = localhost_inspected(&origin).await;
    let authority = format!("localhost:{}", origin.addr.port());
    let mut tls = tls_through(
        &proxy,
        &authority,
        "localhost",
        client_config(&ca, &[b"http/1.1"]),
    )
    .await
    .expect("handshake");
    // XMPP over WebSocket (RFC 7395) on a host that is no IM name.
    let first: &[u8] = b"GET /ok HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let im: &[u8] = b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: xmpp\r\n\r\n";
    tls.write_all(first).await.expect("write");
    tls.write_all(im).await.expect("write");
    let got = read_all(&mut tls).await;
    assert!(
        got.starts_with(RESPONSE),
        "the first answer passes: {}",
        support::escape(&got)
    );
    let page = &got[RESPONSE.len().min(got.len())..];
    let head = head_of(page);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-chatwall-block: xmpp"),
        "{head}"
    );
    support::assert_same_bytes(
        "origin received",
        origin
            .received()
            .first()
            .map(Vec::as_slice)
            .unwrap_or_default(),
        first,
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_host_the_certificate_does_not_cover_is_refused_as_fronting() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    let (proxy, ca, _dir) = localhost_inspected(&origin).await;
    let authority = format!("localhost:{}", origin.addr.port());
    let mut tls = tls_through(
        &proxy,
        &authority,
        "localhost",
        client_config(&ca, &[b"http/1.1"]),
    )
    .await
    .expect("handshake");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: hidden.example.net\r\n\r\n")
        .await
        .expect("write");
    let got = read_all(&mut tls).await;
    let head = head_of(&got);
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let recs = proxy.wait_log(1).await;
    assert!(
        recs.iter().any(|r| r["reason"] == "fronting"),
        "the log names fronting: {recs:?}"
    );
    assert!(
        origin.received().iter().all(Vec::is_empty),
        "nothing of the request reached the origin"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn xmpp_wrapped_in_tls_is_refused_on_its_payload() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    let (proxy, ca, _dir) = localhost_inspected(&origin).await;
    let authority = format!("localhost:{}", origin.addr.port());
    // A client that offers HTTP/1.1 (only such flows are decrypted on
    // ports other than 443), then speaks XMPP.
    let mut tls = tls_through(
        &proxy,
        &authority,
        "localhost",
        client_config(&ca, &[b"http/1.1"]),
    )
    .await
    .expect("handshake");
    // RFC 6120 §4.2: the initiating entity's stream header.
    tls.write_all(b"<?xml version='1.0'?><stream:stream to='example.com' version='1.0' xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>")
        .await
        .expect("write");
    let _ = read_all(&mut tls).await;
    let recs = proxy.wait_log(1).await;
    assert!(
        recs.iter()
            .any(|r| r["verdict"] == "block" && r["app"] == "xmpp"),
        "{recs:?}"
    );
    assert!(
        origin.received().iter().all(Vec::is_empty),
        "nothing reached the origin: {:?}",
        origin.received()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_untrusted_upstream_gets_a_page_naming_the_error() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    let other = PlainOrigin::start(&["elsewhere.test"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The proxy trusts another certificate only: the origin's is unknown.
    let (toml, ca) = inspect_toml(
        dir.path(),
        &other.cert_pem,
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:localhost\"]",
    );
    let proxy = Proxy::start(&toml).await;
    let authority = format!("localhost:{}", origin.addr.port());
    let mut tls = tls_through(
        &proxy,
        &authority,
        "localhost",
        client_config(&ca, &[b"http/1.1"]),
    )
    .await
    .expect("handshake with chatwall's certificate");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let got = read_all(&mut tls).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    // Both test certificates carry rcgen's one issuer name: the proxy
    // finds the other as issuer and its signature fails.
    assert!(
        text.contains("certificate is not trusted: its signature does not verify"),
        "the page names the error: {text}"
    );
    assert!(
        origin.received().iter().all(Vec::is_empty),
        "no request reached the origin"
    );
    assert_eq!(
        proxy
            .metric("chatwall_tls_inspect_total{outcome=\"upstream_cert_error_page\"}")
            .await,
        1.0
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_upstream_certificate_for_another_name_gets_a_page_naming_the_error() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (toml, ca) = inspect_toml(
        dir.path(),
        &origin.cert_pem,
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:*.localhost\"]",
    );
    let proxy = Proxy::start(&toml).await;
    // The tunnel reaches the origin, whose certificate names `localhost`
    // only; the client asks for another name.
    let authority = format!("localhost:{}", origin.addr.port());
    let mut tls = tls_through(
        &proxy,
        &authority,
        "chat.localhost",
        client_config(&ca, &[b"http/1.1"]),
    )
    .await
    .expect("handshake with chatwall's certificate");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: chat.localhost\r\n\r\n")
        .await
        .expect("write");
    let text = String::from_utf8_lossy(&read_all(&mut tls).await).to_string();
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(text.contains("it does not name this server"), "{text}");
    let recs = proxy.wait_log(1).await;
    assert!(recs.iter().any(|r| r["tls"] == "page"), "{recs:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn never_listed_and_unselected_hosts_are_spliced_with_the_origins_certificate() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    for section in [
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:localhost\"]\nnever = [\"host:localhost\"]",
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:*.example.com\"]",
        "clients = [\"10.0.0.0/8\"]\ndecrypt = [\"host:localhost\"]",
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (toml, ca) = inspect_toml(dir.path(), &origin.cert_pem, section);
        let proxy = Proxy::start(&toml).await;
        let authority = format!("localhost:{}", origin.addr.port());
        let accepted_before = origin.accepted.load(Ordering::SeqCst);
        // A client that trusts only chatwall's CA cannot complete it...
        let refused = tls_through(
            &proxy,
            &authority,
            "localhost",
            client_config(&ca, &[b"http/1.1"]),
        )
        .await;
        assert!(refused.is_err(), "{section}: not decrypted");
        // ...one that trusts only the origin's certificate can.
        let mut tls = tls_through(
            &proxy,
            &authority,
            "localhost",
            client_config(&origin.cert_pem, &[b"http/1.1"]),
        )
        .await
        .unwrap_or_else(|e| panic!("{section}: spliced: {e}"));
        let peer = tls.get_ref().1.peer_certificates().expect("certs")[0].clone();
        assert_eq!(peer, origin.cert, "{section}: the origin's own certificate");
        let request: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
        tls.write_all(request).await.expect("write");
        let got = read_all(&mut tls).await;
        support::assert_same_bytes(section, &got, RESPONSE);
        let seen = origin.received();
        support::assert_same_bytes(
            section,
            seen.last().map(Vec::as_slice).unwrap_or_default(),
            request,
        );
        // One upstream connection per tunnel: the refused attempt's and
        // this one's.
        assert_eq!(
            origin.accepted.load(Ordering::SeqCst) - accepted_before,
            2,
            "{section}"
        );
        assert_eq!(
            proxy
                .metric("chatwall_tls_inspect_total{outcome=\"inspected\"}")
                .await,
            0.0
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_refused_name_gets_the_page_over_tls_for_listed_clients_only() {
    // An IM server name in the SNI of a tunnel opened by address.
    let origin = PlainOrigin::start(&["localhost"]).await;
    for (clients, page) in [("127.0.0.0/8", true), ("10.0.0.0/8", false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (toml, ca) = inspect_toml(
            dir.path(),
            &origin.cert_pem,
            &format!("clients = [\"{clients}\"]\ndecrypt = [\"host:localhost\"]"),
        );
        let proxy = Proxy::start(&toml).await;
        let authority = format!("127.0.0.1:{}", origin.addr.port());
        let result = tls_through(
            &proxy,
            &authority,
            "web.whatsapp.com",
            client_config(&ca, &[b"h2", b"http/1.1"]),
        )
        .await;
        if page {
            let mut tls = result.expect("handshake with chatwall's certificate");
            tls.write_all(b"GET / HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
                .await
                .expect("write");
            let got = read_all(&mut tls).await;
            let head = head_of(&got);
            assert!(head.starts_with("HTTP/1.1 403"), "{head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("x-chatwall-block: whatsapp"),
                "{head}"
            );
            assert_eq!(
                proxy
                    .metric("chatwall_tls_inspect_total{outcome=\"block_page\"}")
                    .await,
                1.0
            );
        } else {
            assert!(result.is_err(), "an unlisted client is reset, as before");
        }
        // CONNECT connected, but nothing went over it: no TLS session.
        assert!(
            origin.received().is_empty(),
            "no handshake reached the origin"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn concurrent_handshakes_for_one_new_name_mint_once() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (toml, ca) = inspect_toml(
        dir.path(),
        &origin.cert_pem,
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:localhost\"]",
    );
    let proxy = Arc::new(Proxy::start(&toml).await);
    let cfg = client_config(&ca, &[b"http/1.1"]);
    let authority = format!("localhost:{}", origin.addr.port());
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (proxy, cfg, authority) = (Arc::clone(&proxy), Arc::clone(&cfg), authority.clone());
        tasks.push(tokio::spawn(async move {
            let mut tls = tls_through(&proxy, &authority, "localhost", cfg).await?;
            tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .await?;
            Ok::<_, std::io::Error>(read_all(&mut tls).await)
        }));
    }
    for t in tasks {
        let got = t.await.expect("join").expect("handshake");
        support::assert_same_bytes("each client", &got, RESPONSE);
    }
    assert_eq!(
        proxy
            .metric("chatwall_tls_cert_cache_total{result=\"miss\"}")
            .await,
        1.0,
        "one leaf minted"
    );
    assert_eq!(
        proxy
            .metric("chatwall_tls_cert_cache_total{result=\"hit\"}")
            .await,
        99.0
    );
    assert_eq!(proxy.metric("chatwall_tls_cert_cache_entries").await, 1.0);
}

#[tokio::test]
async fn curl_and_openssl_see_chatwalls_leaf_and_the_origins_bytes() {
    if !support::have_curl() {
        support::skip_or_fail("curl is not installed");
        return;
    }
    let origin = PlainOrigin::start(&["localhost"]).await;
    let (proxy, ca, _dir) = localhost_inspected(&origin).await;
    let url = format!("https://localhost:{}/x", origin.addr.port());
    let ca_arg = ca.display().to_string();
    let (code, body, err) = support::curl(&[
        "--proxy",
        &proxy.proxy_url(),
        "--cacert",
        &ca_arg,
        "--http1.1",
        &url,
    ])
    .await;
    assert_eq!(code, 0, "curl through the inspected flow: {err}");
    assert_eq!(body, b"hello inside");

    // A client pinned to the origin's key refuses chatwall's leaf (curl
    // exit 90); with the host on the never list it passes.
    let pin = spki_pin(&origin.cert);
    let pinned = [
        "--proxy",
        &proxy.proxy_url(),
        "--cacert",
        &ca_arg,
        "--pinnedpubkey",
        &pin,
        &url,
    ];
    let (code, _, err) = support::curl(&pinned).await;
    assert_eq!(code, 90, "pinned key mismatch: {err}");
    proxy.stop().await;

    let dir2 = tempfile::tempdir().expect("tempdir");
    let (toml, _) = inspect_toml(
        dir2.path(),
        &origin.cert_pem,
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:localhost\"]\nnever = [\"host:localhost\"]",
    );
    let proxy = Proxy::start(&toml).await;
    let origin_ca = origin.cert_pem.display().to_string();
    let (code, body, err) = support::curl(&[
        "--proxy",
        &proxy.proxy_url(),
        "--cacert",
        &origin_ca,
        "--pinnedpubkey",
        &pin,
        &url,
    ])
    .await;
    assert_eq!(code, 0, "the pinned client passes on the never list: {err}");
    assert_eq!(body, b"hello inside");
    proxy.stop().await;

    // openssl s_client: the chain verifies against chatwall's CA, the leaf
    // names the SNI and ALPN is the origin's choice.
    let dir3 = tempfile::tempdir().expect("tempdir");
    let (toml, ca) = inspect_toml(
        dir3.path(),
        &origin.cert_pem,
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:localhost\"]",
    );
    let proxy = Proxy::start(&toml).await;
    let args = vec![
        "s_client".to_string(),
        "-proxy".into(),
        proxy.addr.to_string(),
        "-connect".into(),
        format!("localhost:{}", origin.addr.port()),
        "-servername".into(),
        "localhost".into(),
        "-CAfile".into(),
        ca.display().to_string(),
        "-alpn".into(),
        "h2,http/1.1".into(),
        "-verify_return_error".into(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .expect("join");
    match out {
        Ok(out) => {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
            assert!(text.contains("ALPN protocol: http/1.1"), "{text}");
            assert!(text.contains("chatwall test CA"), "issuer: {text}");
        }
        Err(e) => support::skip_or_fail(&format!("openssl: {e}")),
    }
    proxy.stop().await;
}

/// curl's `--pinnedpubkey sha256//BASE64` for a certificate.
fn spki_pin(cert: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).expect("x509");
    let spki = parsed.tbs_certificate.subject_pki.raw;
    format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(spki))
    )
}

#[tokio::test]
async fn a_loose_ca_key_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_ca(dir.path());
    set_mode(&key, 0o644);
    let config = dir.path().join("chatwall.toml");
    std::fs::write(
        &config,
        format!(
            "[tls_inspect]\nenabled = true\nca_cert = {:?}\nca_key = {:?}\nclients = [\"10.0.0.0/8\"]\ndecrypt = [\"host:example.com\"]\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    )
    .expect("write");
    let cfg = chatwall::config::Config::load(Some(&config)).expect("config parses");
    let err = chatwall::engine::Engine::build(cfg).expect_err("a loose key is refused");
    let text = err.join("\n");
    assert!(text.contains("ca.key"), "{text}");
}

#[tokio::test]
async fn a_connect_refused_on_its_name_gets_the_page_over_tls_for_listed_clients() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    for (clients, page) in [("127.0.0.0/8", true), ("10.0.0.0/8", false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (toml, ca) = inspect_toml(
            dir.path(),
            &origin.cert_pem,
            &format!("clients = [\"{clients}\"]\ndecrypt = [\"host:localhost\"]"),
        );
        let proxy = Proxy::start(&toml).await;
        // Refused on the name, before any lookup: no network is needed.
        let result = tls_through(
            &proxy,
            "web.whatsapp.com:443",
            "web.whatsapp.com",
            client_config(&ca, &[b"h2", b"http/1.1"]),
        )
        .await;
        if page {
            let mut tls = result.expect("200, then chatwall's certificate for the name");
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
            tls.write_all(b"GET /favicon.ico HTTP/1.1\r\nHost: web.whatsapp.com\r\n\r\n")
                .await
                .expect("write");
            let got = read_all(&mut tls).await;
            let head = head_of(&got);
            assert!(head.starts_with("HTTP/1.1 403"), "{head}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("x-chatwall-block: whatsapp"),
                "{head}"
            );
            let recs = proxy.wait_log(1).await;
            assert!(
                recs.iter().any(|r| r["tls"] == "page"
                    && r["verdict"] == "block"
                    && r["app"] == "whatsapp"),
                "{recs:?}"
            );
        } else {
            let e = result.expect_err("refused");
            assert!(e.to_string().contains("CONNECT answered 403"), "{e}");
        }
        proxy.stop().await;
    }
}

#[tokio::test]
async fn tenant_restrictions_are_set_on_sign_in_requests_and_nowhere_else() {
    // The origin answers as the vendors' sign-in hosts; the tunnels go to
    // it by address, the ClientHello names the vendor.
    let origin =
        PlainOrigin::start(&["login.microsoftonline.com", "app.slack.com", "localhost"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut toml, ca) = inspect_toml(
        dir.path(),
        &origin.cert_pem,
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"builtin:tenant\", \"host:localhost\"]",
    );
    toml.push_str(
        "[tenant_restrictions]\nmicrosoft_tenants = [\"contoso.com\", \"fabrikam.onmicrosoft.com\"]\nmicrosoft_context = \"456ff232-35l2-5h23-b3b3-3236w0826f3d\"\nslack_requester = \"E0123\"\nslack_allowed = [\"E0123\", \"T0456\"]\n\n[policy]\napps = { slack = \"allow\" }\n",
    );
    let proxy = Proxy::start(&toml).await;
    let authority = format!("127.0.0.1:{}", origin.addr.port());
    let cases: [(&str, &[u8], &[u8]); 3] = [
        (
            "login.microsoftonline.com",
            b"GET /common/oauth2/authorize?x=1 HTTP/1.1\r\nHost: login.microsoftonline.com\r\nrestrict-access-to-tenants: evil.example\r\nX-Other:  kept \r\n\r\n",
            b"GET /common/oauth2/authorize?x=1 HTTP/1.1\r\nHost: login.microsoftonline.com\r\nX-Other:  kept \r\nRestrict-Access-To-Tenants: contoso.com,fabrikam.onmicrosoft.com\r\nRestrict-Access-Context: 456ff232-35l2-5h23-b3b3-3236w0826f3d\r\n\r\n",
        ),
        (
            "app.slack.com",
            b"GET /signin HTTP/1.1\r\nHost: app.slack.com\r\n\r\n",
            b"GET /signin HTTP/1.1\r\nHost: app.slack.com\r\nX-Slack-Allowed-Workspaces-Requester: E0123\r\nX-Slack-Allowed-Workspaces: E0123,T0456\r\n\r\n",
        ),
        (
            "localhost",
            b"GET / HTTP/1.1\r\nHost: localhost\r\nRestrict-Access-To-Tenants: as-sent\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: localhost\r\nRestrict-Access-To-Tenants: as-sent\r\n\r\n",
        ),
    ];
    for (i, (sni, sent, want)) in cases.iter().enumerate() {
        let mut tls = tls_through(&proxy, &authority, sni, client_config(&ca, &[b"http/1.1"]))
            .await
            .unwrap_or_else(|e| panic!("{sni}: {e}"));
        tls.write_all(sent).await.expect("write");
        let got = read_all(&mut tls).await;
        support::assert_same_bytes(sni, &got, RESPONSE);
        let seen = origin.received();
        support::assert_same_bytes(
            sni,
            seen.get(i).map(Vec::as_slice).unwrap_or_default(),
            want,
        );
    }
    assert_eq!(
        origin.accepted.load(Ordering::SeqCst),
        3,
        "one upstream connection each"
    );
    assert_eq!(
        proxy
            .metric("chatwall_tenant_headers_total{vendor=\"microsoft\"}")
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric("chatwall_tenant_headers_total{vendor=\"slack\"}")
            .await,
        1.0
    );
    proxy.stop().await;
}

#[test]
fn classify_host_says_decrypt_for_a_selected_client_and_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = make_ca(dir.path());
    let config = dir.path().join("chatwall.toml");
    std::fs::write(
        &config,
        format!(
            "[tls_inspect]\nenabled = true\nca_cert = {:?}\nca_key = {:?}\nupstream_extra_ca = {:?}\nclients = [\"10.1.0.0/16\"]\ndecrypt = [\"host:*.example.com\"]\nnever = [\"host:bank.example.com\"]\n",
            cert.display().to_string(),
            key.display().to_string(),
            cert.display().to_string(),
        ),
    )
    .expect("write");
    let run = |name: &str, client: &str| -> String {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chatwall"))
            .args(["classify", "host", name, "-c"])
            .arg(&config)
            .args(["--client", client])
            .output()
            .expect("chatwall runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let out = run("www.example.com", "10.1.2.3");
    assert!(out.starts_with("decrypt www.example.com:443"), "{out}");
    let out = run("www.example.com", "192.0.2.1");
    assert!(out.starts_with("allow www.example.com:443"), "{out}");
    assert!(out.contains("tls: not decrypted"), "{out}");
    let out = run("bank.example.com", "10.1.2.3");
    assert!(
        out.starts_with("allow bank.example.com:443"),
        "never list: {out}"
    );
    let out = run("web.whatsapp.com", "10.1.2.3");
    assert!(out.starts_with("block web.whatsapp.com:443"), "{out}");
    assert!(out.contains("page over chatwall's certificate"), "{out}");
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[tokio::test]
async fn an_expired_upstream_certificate_gets_a_page_naming_the_error() {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let cert = params.self_signed(&key).expect("cert");
    let der = cert.der().clone();
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![der.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("config");
    let origin = PlainOrigin::start_with(Arc::new(cfg), der).await;
    let (proxy, ca, _dir) = localhost_inspected(&origin).await;
    let authority = format!("localhost:{}", origin.addr.port());
    let mut tls = tls_through(
        &proxy,
        &authority,
        "localhost",
        client_config(&ca, &[b"http/1.1"]),
    )
    .await
    .expect("handshake with chatwall's certificate");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let text = String::from_utf8_lossy(&read_all(&mut tls).await).to_string();
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(text.contains("it has expired"), "{text}");
    assert!(
        origin.received().iter().all(Vec::is_empty),
        "no request reached the origin"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_server_asking_for_a_client_certificate_is_spliced() {
    // The origin wants a client certificate its own CA signed; the client
    // has one, chatwall does not.
    let client_key = rcgen::KeyPair::generate().expect("key");
    let client_cert = rcgen::CertificateParams::new(vec!["client.test".to_string()])
        .expect("params")
        .self_signed(&client_key)
        .expect("cert");
    let mut client_roots = rustls::RootCertStore::empty();
    client_roots.add(client_cert.der().clone()).expect("root");
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(client_roots),
        provider(),
    )
    .build()
    .expect("verifier");
    let server_key = rcgen::KeyPair::generate().expect("key");
    let server_cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&server_key)
        .expect("cert");
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .expect("config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let origin = PlainOrigin::start_with(Arc::new(cfg), server_cert.der().clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (toml, _ca) = inspect_toml(
        dir.path(),
        &origin.cert_pem,
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:localhost\"]",
    );
    let proxy = Proxy::start(&toml).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(origin.cert.clone()).expect("root");
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![client_cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(client_key.serialize_der().into()),
        )
        .expect("client auth");
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let authority = format!("localhost:{}", origin.addr.port());
    let mut tls = tls_through(&proxy, &authority, "localhost", Arc::new(client))
        .await
        .expect("the client's own handshake with the origin");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let got = read_all(&mut tls).await;
    support::assert_same_bytes("client received", &got, RESPONSE);
    assert_eq!(
        proxy
            .metric("chatwall_tls_inspect_total{outcome=\"spliced_upstream_error\"}")
            .await,
        1.0
    );
    proxy.stop().await;
}

/// A decrypted flow, its first request sent.
async fn decrypted_flow(proxy: &Proxy, origin: &PlainOrigin, ca: &Path) -> TlsStream<TcpStream> {
    let authority = format!("localhost:{}", origin.addr.port());
    tls_through(
        proxy,
        &authority,
        "localhost",
        client_config(ca, &[b"http/1.1"]),
    )
    .await
    .expect("handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_record_inside_a_decrypted_flow_ends_it_and_stalls_nobody() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    let (proxy, ca, _dir) = localhost_inspected(&origin).await;
    let mut bad = Vec::new();
    for _ in 0..3 {
        let mut tls = decrypted_flow(&proxy, &origin, &ca).await;
        tls.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        tls.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(200)).await;
        // An application-data record that does not decrypt.
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x20];
        record.extend_from_slice(&[0xAA; 32]);
        tls.get_mut().0.write_all(&record).await.expect("write raw");
        bad.push(tls);
    }
    for mut tls in bad {
        let ended = tokio::time::timeout(WAIT, async {
            let mut b = [0u8; 64];
            loop {
                match tls.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the flow with the bad record ends");
    }
    // Everyone else is served as before.
    let probe = tokio::time::timeout(WAIT, async {
        let mut tls = decrypted_flow(&proxy, &origin, &ca).await;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        read_all(&mut tls).await
    })
    .await
    .expect("the proxy still answers");
    support::assert_same_bytes("probe", &probe, RESPONSE);
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_line_that_cannot_be_followed_ends_a_decrypted_flow() {
    let origin = PlainOrigin::start(&["localhost"]).await;
    let (proxy, ca, _dir) = localhost_inspected(&origin).await;
    let mut tls = decrypted_flow(&proxy, &origin, &ca).await;
    tls.write_all(
        b"GET / HTTP/1.2\r\nHost: localhost\r\n\r\nGET /x HTTP/1.1\r\nHost: other.example\r\n\r\n",
    )
    .await
    .expect("write");
    let _ = read_all(&mut tls).await;
    assert!(
        origin.received().iter().all(Vec::is_empty),
        "decrypted but not followable: nothing relayed, {:?}",
        origin.received()
    );
    let recs = proxy.wait_log(1).await;
    assert!(
        recs.iter()
            .any(|r| r["verdict"] == "block" && r["reason"] == "non_http"),
        "{recs:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn tenant_restrictions_are_not_skipped_by_the_hello() {
    let origin = PlainOrigin::start(&["login.microsoftonline.com", "localhost"]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut toml, ca) = inspect_toml(
        dir.path(),
        &origin.cert_pem,
        "clients = [\"127.0.0.0/8\"]\ndecrypt = [\"builtin:tenant\"]",
    );
    toml.push_str(
        "[tenant_restrictions]\nmicrosoft_tenants = [\"contoso.com\"]\nmicrosoft_context = \"ctx\"\n",
    );
    let proxy = Proxy::start(&toml).await;
    // HTTP/2 only: cannot be decrypted here, so refused, not relayed.
    let authority = format!("127.0.0.1:{}", origin.addr.port());
    let refused = tls_through(
        &proxy,
        &authority,
        "login.microsoftonline.com",
        client_config(&origin.cert_pem, &[b"h2"]),
    )
    .await;
    assert!(refused.is_err(), "an h2-only sign-in flow is refused");
    assert!(
        origin.received().iter().all(Vec::is_empty),
        "{:?}",
        origin.received()
    );
    assert_eq!(
        proxy
            .metric("chatwall_tls_inspect_total{outcome=\"refused_undecrypted\"}")
            .await,
        1.0
    );
    // The sign-in host by its own name, over HTTP/1.1, gets the fields.
    let mut tls = tls_through(
        &proxy,
        &authority,
        "login.microsoftonline.com",
        client_config(&ca, &[b"http/1.1"]),
    )
    .await
    .expect("decrypted");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: login.microsoftonline.com\r\n\r\n")
        .await
        .expect("write");
    let _ = read_all(&mut tls).await;
    let seen = origin.received();
    let text =
        String::from_utf8_lossy(seen.last().map(Vec::as_slice).unwrap_or_default()).to_string();
    assert!(
        text.contains("Restrict-Access-To-Tenants: contoso.com"),
        "{text}"
    );
    proxy.stop().await;
}
