//! TLS inspection of one tunnel (`[tls_inspect]`): a flow whose
//! ClientHello passed and names a selected server, from a listed client.
//!
//! Upstream first: connect and verify the server (the client's SNI and
//! ALPN, the system's roots plus the operator's), then answer the client
//! with a leaf minted for the SNI that mirrors the server certificate's
//! names. The decrypted stream then goes through the same byte-exact HTTP
//! follower as a plain tunnel (`tunnel::http1`): request by request, the
//! host rules, the HTTP rules, domain fronting; what is not HTTP gets the
//! payload signatures.
//!
//! - The server's certificate does not verify: the client gets a page
//!   naming the error over chatwall's certificate (`upstream_cert_errors =
//!   "block"`), or the flow is relayed undecrypted (`"splice"`) and the
//!   client judges the certificate itself.
//! - Any other failed upstream handshake (a client certificate asked for,
//!   old TLS, a reset): the buffered ClientHello is replayed on a fresh
//!   connection and the flow is relayed undecrypted.
//! - A client that offers only protocols other than http/1.1 (h2 alone)
//!   is relayed undecrypted.
//! - A client that refuses chatwall's certificate (a pinned app, a client
//!   without the CA) ends there: nothing was sent upstream but the
//!   handshake.
//!
//! A refused flow from a listed client gets the 403 page over chatwall's
//! certificate (`page_over_tls`), so that a browser shows why.
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{http1, relay_plain, upstream_now, Flow, Upstream};
use crate::classify::server_hello::certificate_server_names;
use crate::config::CertErrors;
use crate::decide::{self, First};
use crate::engine::Engine;
use crate::policy::{Verdict, Who};
use crate::proxy::parent;
use crate::proxy::prefixed::Prefixed;
use crate::proxy::refuse::{self, FlowError};
use crate::proxy::relay::{self, Wire};
use crate::proxy::tls_wire::TlsWire;
use crate::proxy::Shared;
use crate::tls_inspect::interception::{Interception, HTTP1};

/// What inspection needs of a tunnel's ClientHello.
#[derive(Debug)]
pub struct TlsFlow {
    pub sni: String,
    /// The client's ALPN offers.
    pub alpn: Vec<String>,
    /// The flow passed and `[tls_inspect]` selects it.
    pub decrypt: bool,
    /// The flow was refused and gets the page over chatwall's certificate.
    pub page: bool,
    /// Tenant restrictions apply (a listed client, a vendor's sign-in
    /// host): refused rather than relayed undecrypted.
    pub required: bool,
    /// Decrypted: the DNS names the server's certificate covers.
    pub cover: Vec<String>,
}

impl TlsFlow {
    /// `None` when the flow is neither decrypted nor paged. `sni` is the
    /// hello's server name (or the CONNECT's when it names none),
    /// `connect` the CONNECT's name.
    pub fn of(
        engine: &Engine,
        who: &Who,
        sni: &str,
        connect: Option<&str>,
        alpn: &[String],
        dst: SocketAddr,
        result: &Result<First, FlowError>,
    ) -> Option<Box<TlsFlow>> {
        // Only what speaks HTTP/1.1 inside: ALPN offers it, or no ALPN on
        // port 443. (IMAPS, SMTPS and other protocols whose server speaks
        // first stay spliced.)
        let http = if alpn.is_empty() {
            dst.port() == 443
        } else {
            alpn.iter().any(|p| p.as_bytes() == HTTP1)
        };
        // Tenant restrictions cannot be skipped by what the hello says: a
        // sign-in host in the SNI or the CONNECT, from a listed client,
        // is decrypted under the SNI that names it, or refused.
        let tenant = |name: &str| {
            crate::classify::host::normalize_host(name)
                .is_some_and(|n| decide::tenant_host(engine, &n))
        };
        let required = matches!(result, Ok(First::Tls))
            && decide::inspected_client(engine, who)
            && (tenant(sni) || connect.is_some_and(tenant));
        let same_server = connect.map_or(true, |c| {
            c.parse::<std::net::IpAddr>().is_ok()
                || crate::classify::host::normalize_host(c)
                    == crate::classify::host::normalize_host(sni)
        });
        let decrypt = http
            && (!required || same_server)
            && matches!(result, Ok(First::Tls))
            && (decide::decrypt(engine, who, sni, Some(dst.ip())) || (required && tenant(sni)));
        let page = matches!(result, Err(FlowError::Blocked(_)))
            && decide::block_page_over_tls(engine, who, sni);
        (decrypt || page || required).then(|| {
            Box::new(TlsFlow {
                sni: sni.to_string(),
                alpn: alpn.to_vec(),
                decrypt,
                page,
                required,
                cover: Vec::new(),
            })
        })
    }

    fn offers_http1(&self) -> bool {
        self.alpn.iter().any(|p| p.as_bytes() == HTTP1)
    }
}

/// One minted leaf, whatever the client asks.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// Notes whether the server asked for a client certificate (TLS 1.3 shows
/// a refused one only after the handshake); offers none.
#[derive(Debug, Default)]
struct AskedForCertificate(std::sync::atomic::AtomicBool);

impl ResolvesClientCert for AskedForCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        None
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// How an inspected flow went, for `chatwall_tls_inspect_total`.
fn count(shared: &Shared, outcome: &'static str) {
    shared.metrics.tls_inspect(outcome);
}

/// Decrypt and follow one tunnel (its ClientHello is in `hello`).
pub(super) async fn run(
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    mut flow: Flow,
    client: TcpStream,
    hello: BytesMut,
    upstream: Upstream,
) {
    let (Some(tls), Some(info)) = (engine.tls.clone(), flow.tls.take()) else {
        // Not reachable: decryption is decided only with both present.
        if let Some(up) = upstream_now(&shared, &engine, &mut flow, &client, upstream).await {
            relay_plain(
                &shared,
                &engine,
                Box::new(flow),
                &client,
                &up,
                First::Tls,
                hello,
            )
            .await;
        }
        return;
    };
    let Some(up) = upstream_now(&shared, &engine, &mut flow, &client, upstream).await else {
        return;
    };
    let required = info.required;
    if !info.alpn.is_empty() && !info.offers_http1() {
        if info.required {
            flow.tls = Some(info);
            refuse_undecrypted(&shared, &engine, flow, &client, &Upstream::Connected(up));
            return;
        }
        count(&shared, "spliced_alpn");
        flow.rec.tls = Some("spliced");
        relay_plain(
            &shared,
            &engine,
            Box::new(flow),
            &client,
            &up,
            First::Tls,
            hello,
        )
        .await;
        return;
    }
    let t = &engine.config.tls_inspect;
    // A server that asks for a client certificate wants the client's own:
    // chatwall has none to give, so such a flow is relayed undecrypted.
    let asked = Arc::new(AskedForCertificate::default());
    let mut cfg = if info.offers_http1() {
        (*tls.upstream_http1).clone()
    } else {
        (*tls.upstream_plain).clone()
    };
    cfg.client_auth_cert_resolver = Arc::clone(&asked) as Arc<dyn ResolvesClientCert>;
    let connector = TlsConnector::from(Arc::new(cfg));
    let Ok(name) = ServerName::try_from(info.sni.clone()) else {
        if required {
            refuse_undecrypted(&shared, &engine, flow, &client, &Upstream::Connected(up));
            return;
        }
        count(&shared, "spliced_upstream_error");
        flow.rec.tls = Some("spliced");
        relay_plain(
            &shared,
            &engine,
            Box::new(flow),
            &client,
            &up,
            First::Tls,
            hello,
        )
        .await;
        return;
    };
    let handshake = tokio::time::timeout(t.handshake_timeout, connector.connect(name, up)).await;
    let up_tls = match handshake {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let cert_error = certificate_error(&e);
            tracing::debug!(client = %flow.ctx.client.addr, sni = %info.sni, error = %e, "upstream TLS handshake");
            match cert_error {
                Some(why) if t.upstream_cert_errors == CertErrors::Block => {
                    shared.metrics.upstream_error("certificate");
                    flow.tls = Some(info);
                    let page = FlowError::UpstreamCertificate(why);
                    page_over_tls(shared, engine, flow, client, hello, page).await;
                }
                Some(why) => {
                    count(&shared, "spliced_cert_error");
                    flow.rec.error =
                        Some(format!("server certificate: {why}; relayed undecrypted"));
                    splice_fresh(shared, engine, flow, client, hello, required).await;
                }
                None => {
                    count(&shared, "spliced_upstream_error");
                    flow.rec.error = Some(format!("upstream TLS: {e}; relayed undecrypted"));
                    splice_fresh(shared, engine, flow, client, hello, required).await;
                }
            }
            return;
        }
        Err(_) => {
            count(&shared, "spliced_upstream_error");
            flow.rec.error = Some("upstream TLS handshake timed out; relayed undecrypted".into());
            splice_fresh(shared, engine, flow, client, hello, required).await;
            return;
        }
    };

    if asked.0.load(std::sync::atomic::Ordering::Relaxed) {
        count(&shared, "spliced_upstream_error");
        flow.rec.error =
            Some("the server asks for a client certificate; relayed undecrypted".into());
        let (tcp, _) = up_tls.into_inner();
        relay::reset(&tcp);
        splice_fresh(shared, engine, flow, client, hello, required).await;
        return;
    }
    let (leaf, chosen) = {
        let session = up_tls.get_ref().1;
        (
            session
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.as_ref().to_vec())
                .unwrap_or_default(),
            session.alpn_protocol().map(<[u8]>::to_vec),
        )
    };
    let names = certificate_server_names(&leaf).unwrap_or_default();
    let fingerprint: [u8; 32] = Sha256::digest(&leaf).into();
    let key = match mint(&shared, &tls, &info.sni, names.clone(), fingerprint).await {
        Ok(k) => k,
        Err(e) => {
            tracing::warn!(sni = %info.sni, error = %e, "minting a certificate");
            flow.rec.error = Some(format!("minting a certificate: {e}"));
            finish_refused(&shared, &engine, flow, None);
            return;
        }
    };
    let client = match accept(&tls, t.handshake_timeout, key, chosen, client, hello).await {
        Ok(c) => c,
        Err(e) => {
            // A pinned app, or a client without the CA.
            count(&shared, "client_refused");
            flow.rec.tls = Some("client-refused");
            flow.rec.error = Some(format!("the client refused chatwall's certificate: {e}"));
            let (tcp, _) = up_tls.into_inner();
            relay::reset(&tcp);
            finish_refused(&shared, &engine, flow, None);
            return;
        }
    };
    count(&shared, "inspected");
    let (tcp, session) = up_tls.into_inner();
    let up = TlsWire::new(tcp, session);
    flow.rec.tls = Some("inspected");
    flow.tls = Some(Box::new(TlsFlow {
        cover: names,
        ..*info
    }));
    http1::run(
        shared,
        engine,
        flow,
        client,
        BytesMut::new(),
        Upstream::Connected(up),
    )
    .await;
}

/// The name of a certificate verification error, if that is what failed.
fn certificate_error(e: &io::Error) -> Option<String> {
    let inner = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    use rustls::CertificateError as C;
    let why = match inner {
        rustls::Error::InvalidCertificate(c) => match c {
            C::Expired | C::ExpiredContext { .. } => "it has expired".to_string(),
            C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".to_string(),
            C::UnknownIssuer => "it is signed by an unknown issuer".to_string(),
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "it does not name this server".to_string()
            }
            C::Revoked => "it is revoked".to_string(),
            C::BadSignature => "its signature does not verify".to_string(),
            other => format!("{other:?}"),
        },
        _ => return None,
    };
    Some(why)
}

/// A leaf for the SNI from the cache or freshly minted (off the runtime's
/// threads: concurrent misses for one name wait for one minting).
async fn mint(
    shared: &Shared,
    tls: &Arc<Interception>,
    sni: &str,
    names: Vec<String>,
    fingerprint: [u8; 32],
) -> Result<Arc<CertifiedKey>, String> {
    let (tls, sni) = (Arc::clone(tls), sni.to_string());
    let minted = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        let r = tls.minter.leaf(&sni, &names, fingerprint);
        (r, started.elapsed(), tls.minter.len())
    })
    .await
    .map_err(|e| e.to_string())?;
    let (result, took, entries) = minted;
    let (key, cached) = result?;
    shared.metrics.tls_cert(cached.as_str(), took, entries);
    Ok(key)
}

/// The client's handshake with a minted leaf, its ClientHello replayed
/// from `hello`; ALPN as the upstream chose.
async fn accept(
    tls: &Interception,
    timeout: std::time::Duration,
    key: Arc<CertifiedKey>,
    alpn: Option<Vec<u8>>,
    client: TcpStream,
    hello: BytesMut,
) -> io::Result<TlsWire> {
    let mut cfg = ServerConfig::builder_with_provider(Arc::clone(&tls.provider))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(key)));
    cfg.alpn_protocols = alpn.into_iter().collect();
    // One configuration per connection: nothing a later handshake could
    // resume, so no session cache and no tickets.
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    let acceptor = TlsAcceptor::from(Arc::new(cfg));
    let stream = tokio::time::timeout(
        timeout,
        acceptor.accept(Prefixed::new(hello.freeze(), client)),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
    let (io, mut session) = stream.into_inner();
    let (unread, tcp) = io.into_parts();
    if !unread.is_empty() {
        // Bytes the client sent with its hello (none, for a client that
        // waits for the server): they belong to the session.
        session.read_tls(&mut &unread[..])?;
        session
            .process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
    Ok(TlsWire::new(tcp, session))
}

/// A flow under tenant restrictions that cannot be decrypted: reset and
/// logged, never relayed without its fields.
pub(super) fn refuse_undecrypted(
    shared: &Shared,
    engine: &Engine,
    mut flow: Flow,
    client: &TcpStream,
    upstream: &Upstream,
) {
    count(shared, "refused_undecrypted");
    flow.rec.tls = Some("refused");
    flow.rec
        .error
        .get_or_insert_with(|| "tenant restrictions apply and the flow cannot be decrypted".into());
    relay::reset(client);
    if let Upstream::Connected(up) = upstream {
        relay::reset(up);
    }
    finish_refused(shared, engine, flow, None);
}

/// Relay the flow undecrypted on a fresh upstream connection, its
/// ClientHello replayed: the client talks to the server itself. Not for a
/// flow under tenant restrictions: that one is refused.
async fn splice_fresh(
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    mut flow: Flow,
    client: TcpStream,
    hello: BytesMut,
    required: bool,
) {
    if required {
        let dst = flow.dst;
        refuse_undecrypted(&shared, &engine, flow, &client, &Upstream::Lazy(dst));
        return;
    }
    flow.rec.tls = Some("spliced");
    let dst = flow.dst;
    // A tunnel to a name through the parent proxy has no address of its
    // own: the same CONNECT to the parent again.
    if let (true, Some(host)) = (dst.ip().is_unspecified(), flow.host.clone()) {
        if let parent::Hop::Parent(p) =
            parent::hop(&engine, &shared.resolver, &host, dst.port()).await
        {
            let authority = parent::authority(&host, dst.port());
            match shared.connect_through(&engine, p, &authority).await {
                Ok((up, own)) => {
                    flow.own = own;
                    relay_plain(
                        &shared,
                        &engine,
                        Box::new(flow),
                        &client,
                        &up,
                        First::Tls,
                        hello,
                    )
                    .await;
                }
                Err(e) => {
                    shared.metrics.upstream_error(e.kind());
                    flow.rec.error = Some(e.to_string());
                    relay::reset(&client);
                    finish_refused(&shared, &engine, flow, None);
                }
            }
            return;
        }
    }
    let Some(up) = upstream_now(&shared, &engine, &mut flow, &client, Upstream::Lazy(dst)).await
    else {
        return;
    };
    relay_plain(
        &shared,
        &engine,
        Box::new(flow),
        &client,
        &up,
        First::Tls,
        hello,
    )
    .await;
}

/// Answer a listed client with the page for `err` over chatwall's
/// certificate for its SNI: the handshake, one request read (bounded), the
/// page, close. A client that refuses the certificate just ends.
pub(super) async fn page_over_tls(
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    mut flow: Flow,
    client: TcpStream,
    hello: BytesMut,
    err: FlowError,
) {
    let verdict = match &err {
        FlowError::Blocked(d) => Some(Verdict::Block(*d)),
        _ => None,
    };
    let (Some(tls), Some(info)) = (engine.tls.clone(), flow.tls.take()) else {
        relay::reset(&client);
        finish_refused(&shared, &engine, flow, verdict);
        return;
    };
    let t = &engine.config.tls_inspect;
    flow.rec.tls = Some("page");
    let key = match mint(&shared, &tls, &info.sni, Vec::new(), [0; 32]).await {
        Ok(k) => k,
        Err(e) => {
            flow.rec.error = Some(format!("minting a certificate: {e}"));
            relay::reset(&client);
            finish_refused(&shared, &engine, flow, verdict);
            return;
        }
    };
    let alpn = info.offers_http1().then(|| HTTP1.to_vec());
    let wire = match accept(&tls, t.handshake_timeout, key, alpn, client, hello).await {
        Ok(w) => w,
        Err(e) => {
            count(&shared, "client_refused");
            flow.rec.error = Some(format!("the client refused chatwall's certificate: {e}"));
            finish_refused(&shared, &engine, flow, verdict);
            return;
        }
    };
    count(
        &shared,
        if verdict.is_some() {
            "block_page"
        } else {
            "upstream_cert_error_page"
        },
    );
    // The request is read so that the client sees an answer to it, not a
    // close before it was sent; whatever it is, the page answers it.
    let limit = engine.config.limits.max_request_head_bytes;
    let deadline = engine.config.limits.header_read_timeout;
    let _ = tokio::time::timeout(deadline, read_head(&wire, limit)).await;
    let page = refuse::page_bytes(&err, &engine.signatures);
    flow.rec.status = err.status().as_u16();
    let written = tokio::time::timeout(deadline, wire.write_all(&page)).await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => flow.rec.error = Some(e.to_string()),
        Err(_) => flow.rec.error = Some("the client did not take the page in time".into()),
    }
    wire.shutdown_write();
    // Input the client sent past its request head is read and dropped for
    // a moment: closing with it unread would be a reset, which can discard
    // the page before the client reads it.
    let _ = tokio::time::timeout(Duration::from_secs(2), drain(&wire)).await;
    if verdict.is_none() {
        flow.rec.error = Some(err.to_string());
    }
    finish_refused(&shared, &engine, flow, verdict);
}

/// Read and drop what the client sends until it ends (bounded by the
/// caller's deadline).
async fn drain(wire: &TlsWire) {
    let mut buf = [0u8; 4096];
    loop {
        if wire.readable().await.is_err() {
            return;
        }
        match wire.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Read until the end of a request head (or `limit` bytes, or the end).
async fn read_head(wire: &TlsWire, limit: usize) {
    let mut buf = BytesMut::new();
    while buf.len() < limit {
        if wire.readable().await.is_err() {
            return;
        }
        match wire.try_read_buf(&mut buf) {
            Ok(0) => return,
            Ok(_) => {
                if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n")
                {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Log and count a flow that ends here.
fn finish_refused(shared: &Shared, engine: &Engine, mut flow: Flow, verdict: Option<Verdict>) {
    let verdict = verdict.unwrap_or_else(|| flow.findings.verdict());
    shared.record_verdict(flow.ctx.listener, engine, &verdict, &mut flow.rec);
    shared.access_log.write(flow.rec);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine with inspection on for 127.0.0.0/8, `decrypt` as given,
    /// and Microsoft tenant restrictions.
    fn engine(decrypt: &str) -> (Engine, tempfile::TempDir) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = crate::tls_inspect::ca::generate("test CA", 2).expect("CA");
        let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        std::fs::write(&cert, &ca.cert_pem).expect("write");
        std::fs::write(&key, &ca.key_pem).expect("write");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let config = dir.path().join("chatwall.toml");
        std::fs::write(
            &config,
            format!(
                "[tls_inspect]\nenabled = true\nca_cert = {:?}\nca_key = {:?}\nupstream_extra_ca = {:?}\nclients = [\"127.0.0.0/8\"]\ndecrypt = [{decrypt}]\n\n[tenant_restrictions]\nmicrosoft_tenants = [\"contoso.com\"]\nmicrosoft_context = \"ctx\"\n",
                cert.display().to_string(),
                key.display().to_string(),
                cert.display().to_string(),
            ),
        )
        .expect("write");
        let cfg = crate::config::Config::load(Some(&config)).expect("config");
        (Engine::build(cfg).expect("engine"), dir)
    }

    fn flow(
        engine: &Engine,
        client: &str,
        sni: &str,
        connect: Option<&str>,
        alpn: &[&str],
        port: u16,
    ) -> Option<Box<TlsFlow>> {
        let who = Who::ip(client.parse().expect("ip"));
        let alpn: Vec<String> = alpn.iter().map(|s| s.to_string()).collect();
        let dst = SocketAddr::from(([192, 0, 2, 1], port));
        TlsFlow::of(engine, &who, sni, connect, &alpn, dst, &Ok(First::Tls))
    }

    #[test]
    fn which_flows_are_decrypted() {
        let (e, _dir) = engine("\"host:*.example.com\"");
        let f = flow(
            &e,
            "127.0.0.1",
            "www.example.com",
            None,
            &["h2", "http/1.1"],
            443,
        );
        assert!(f.is_some_and(|f| f.decrypt && !f.required));
        // Not listed, not selected, or not HTTP/1.1: not decrypted.
        assert!(flow(&e, "10.0.0.1", "www.example.com", None, &["http/1.1"], 443).is_none());
        assert!(flow(&e, "127.0.0.1", "www.example.org", None, &["http/1.1"], 443).is_none());
        assert!(flow(&e, "127.0.0.1", "www.example.com", None, &["h2"], 443).is_none());
        assert!(flow(&e, "127.0.0.1", "imap.example.com", None, &[], 993).is_none());
        assert!(flow(&e, "127.0.0.1", "www.example.com", None, &[], 443).is_some());
    }

    #[test]
    fn tenant_hosts_are_decrypted_or_refused() {
        let (e, _dir) = engine("\"builtin:tenant\"");
        let name = "login.microsoftonline.com";
        let f = flow(&e, "127.0.0.1", name, Some(name), &["http/1.1"], 443).expect("flow");
        assert!(f.decrypt && f.required);
        // HTTP/2 only: required, cannot be decrypted (refused by the caller).
        let f = flow(&e, "127.0.0.1", name, Some(name), &["h2"], 443).expect("flow");
        assert!(f.required && !f.decrypt);
        // A CONNECT to the sign-in host whose hello names another server.
        let f = flow(&e, "127.0.0.1", "localhost", Some(name), &["http/1.1"], 443).expect("flow");
        assert!(f.required && !f.decrypt);
        // Not a listed client: nothing applies.
        assert!(flow(&e, "10.0.0.1", name, Some(name), &["http/1.1"], 443).is_none());
    }

    #[test]
    fn certificate_errors_are_named() {
        let e = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(
            certificate_error(&e).as_deref(),
            Some("it is signed by an unknown issuer")
        );
        let other = io::Error::new(io::ErrorKind::InvalidData, rustls::Error::DecryptError);
        assert_eq!(certificate_error(&other), None);
        let plain = io::Error::other("reset");
        assert_eq!(certificate_error(&plain), None);
    }
}
