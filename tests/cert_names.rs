//! Server certificate names: a TLS 1.2 client that names no server (no SNI:
//! it connects by address) is decided on the names of the certificate the
//! server sends in clear, before that certificate reaches the client. Real
//! rustls clients and servers through a real CONNECT tunnel; bytes compared
//! at both ends where the flow passes.
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{
    assert_same_bytes, connect_tunnel, read_n, Proxy, Script, ScriptOrigin, Tee, WAIT,
};

/// A TLS server restricted to `versions`, with a certificate for `names`.
fn server(
    names: &[&str],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> (
    Arc<rustls::ServerConfig>,
    rustls::pki_types::CertificateDer<'static>,
) {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("cert");
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    (Arc::new(cfg), cert)
}

fn client(cert: rustls::pki_types::CertificateDer<'static>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// CONNECT to the origin by address, then a TLS handshake naming `name`
/// (an address: rustls then sends no SNI).
async fn handshake(
    proxy: &Proxy,
    origin: SocketAddr,
    cert: rustls::pki_types::CertificateDer<'static>,
    name: &str,
) -> (
    std::io::Result<tokio_rustls::client::TlsStream<Tee<tokio::net::TcpStream>>>,
    crate::support::TeeLog,
) {
    let s = connect_tunnel(proxy.addr, &origin.to_string())
        .await
        .unwrap_or_else(|st| panic!("CONNECT {origin} got {st}"));
    let (tee, log) = Tee::new(s);
    let name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let tls = tokio::time::timeout(WAIT, client(cert).connect(name, tee))
        .await
        .expect("the handshake ends in time");
    (tls, log)
}

const TLS12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_server_with_an_im_certificate_is_refused_before_the_client_sees_it() {
    let (cfg, cert) = server(&["web.whatsapp.com", "127.0.0.1"], TLS12);
    let origin = ScriptOrigin::start_tls(Script::Echo, cfg).await;
    let proxy = Proxy::start_open().await;
    let (tls, client_log) = handshake(&proxy, origin.addr, cert.clone(), "127.0.0.1").await;
    assert!(tls.is_err(), "the handshake must not complete");
    // The origin sent its flight; not a byte of its certificate reached
    // the client.
    let der = cert.as_ref();
    let got = client_log.read_bytes();
    assert!(
        !got.windows(der.len().min(64))
            .any(|w| w == &der[..der.len().min(64)]),
        "the certificate reached the client ({} bytes read)",
        got.len()
    );
    let rec = proxy
        .wait_record(|r| r["method"] == "CONNECT")
        .await
        .expect("a CONNECT record");
    assert_eq!(rec["verdict"], "block", "{rec}");
    assert_eq!(rec["app"], "whatsapp", "{rec}");
    assert_eq!(rec["reason"], "cert", "{rec}");
    assert_eq!(
        proxy
            .metric("chatwall_blocked_total{app=\"whatsapp\",reason=\"cert\"}")
            .await,
        1.0
    );
    assert_eq!(origin.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ordinary_tls12_server_passes_byte_exact_with_its_certificate_checked() {
    let (cfg, cert) = server(&["www.example.org", "127.0.0.1"], TLS12);
    let origin = ScriptOrigin::start_tls(Script::Echo, cfg).await;
    let proxy = Proxy::start_open().await;
    let (tls, client_log) = handshake(&proxy, origin.addr, cert, "127.0.0.1").await;
    let mut tls = tls.expect("the handshake completes");
    tls.write_all(b"ping over tls 1.2").await.expect("write");
    tls.flush().await.expect("flush");
    assert_eq!(read_n(&mut tls, 17).await, b"ping over tls 1.2");
    let _ = tls.shutdown().await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
    origin.wait_closed(1).await;
    assert_eq!(origin.accepted(), 1, "{}", origin.describe());
    assert_same_bytes(
        "TCP bytes at the origin vs what the client wrote",
        &origin.received(0),
        &client_log.written_bytes(),
    );
    assert_same_bytes(
        "TCP bytes the client read vs what the origin wrote",
        &client_log.read_bytes(),
        &origin.sent(0),
    );
    let rec = proxy
        .wait_record(|r| r["method"] == "CONNECT")
        .await
        .expect("a CONNECT record");
    assert_eq!(rec["verdict"], "allow", "{rec}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_sni_or_tls13_the_certificate_is_not_what_decides() {
    // An SNI names the server: the SNI decides, and a certificate that
    // also lists an IM name (shared certificates do) does not refuse it.
    let (cfg, cert) = server(&["www.example.org", "web.whatsapp.com"], TLS12);
    let origin = ScriptOrigin::start_tls(Script::Echo, cfg).await;
    let proxy = Proxy::start_open().await;
    let (tls, _) = handshake(&proxy, origin.addr, cert, "www.example.org").await;
    let mut tls = tls.expect("an SNI'd handshake completes");
    tls.write_all(b"x").await.expect("write");
    tls.flush().await.expect("flush");
    assert_eq!(read_n(&mut tls, 1).await, b"x");

    // TLS 1.3 encrypts the certificate: nothing to see, the flow passes.
    let (cfg, cert) = server(&["web.whatsapp.com", "127.0.0.1"], TLS13);
    let origin = ScriptOrigin::start_tls(Script::Echo, cfg).await;
    let (tls, _) = handshake(&proxy, origin.addr, cert, "127.0.0.1").await;
    let mut tls = tls.expect("a TLS 1.3 handshake completes");
    tls.write_all(b"y").await.expect("write");
    tls.flush().await.expect("flush");
    assert_eq!(read_n(&mut tls, 1).await, b"y");
}
