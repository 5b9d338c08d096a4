//! Test support: an in-process chatwall on loopback ports, real origins
//! (plain HTTP via hyper, HTTPS via tokio-rustls with a generated
//! certificate, raw TCP that records every byte it receives), and small
//! clients. No mocks of the network.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use chatwall::config::Config;
use chatwall::engine::Engine;
use chatwall::proxy::Shared;
use chatwall::server::Server;

/// Bound on any single wait in the tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    pub log_path: PathBuf,
    pub config_path: PathBuf,
    pub dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// `[listen]` and `[log]` for a test proxy; append any other sections.
pub fn base_toml(log: &std::path::Path) -> String {
    format!(
        "[listen]\nexplicit = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n\n[log]\naccess = {:?}\nformat = \"json\"\nlevel = \"warn\"\n\n",
        log.display().to_string()
    )
}

/// Sections that let a test proxy reach loopback origins, on any port.
pub const OPEN: &str = "[access]\ndeny_destinations = []\nconnect_ports = [\"1-65535\"]\n";

/// `connect_ports` of test proxies: loopback origins listen on random
/// ports, which the default (443 only) refuses to CONNECT to.
pub const CONNECT_ANY_PORT: &str = "connect_ports = [\"1-65535\"]\n";

/// `extra` sections for a test proxy, with every port open to CONNECT
/// unless `extra` sets `connect_ports` itself (a test of the default
/// writes `connect_ports = [443]`): added to its `[access]` section, or as
/// one of its own.
pub fn with_connect_ports(extra: &str) -> String {
    if extra.contains("connect_ports") {
        return extra.to_string();
    }
    let mut out = String::with_capacity(extra.len() + 64);
    let mut added = false;
    for line in extra.split_inclusive('\n') {
        out.push_str(line);
        if !added && line.trim() == "[access]" {
            if !line.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(CONNECT_ANY_PORT);
            added = true;
        }
    }
    if !added {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("\n[access]\n");
        out.push_str(CONNECT_ANY_PORT);
    }
    out
}

impl Proxy {
    /// A proxy that may reach loopback origins, with the bundled set.
    pub async fn start_open() -> Proxy {
        Proxy::start(OPEN).await
    }

    /// A proxy with `extra` TOML sections after the base ones (and every
    /// port open to CONNECT unless `extra` says otherwise, see
    /// [`with_connect_ports`]).
    pub async fn start(extra: &str) -> Proxy {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("access.log");
        let config_path = dir.path().join("chatwall.toml");
        std::fs::write(
            &config_path,
            format!("{}{}", base_toml(&log_path), with_connect_ports(extra)),
        )
        .expect("write config");
        Proxy::start_file(dir, config_path, log_path).await
    }

    /// A proxy from a whole configuration file written by the test (which
    /// must put the explicit and admin listeners on 127.0.0.1:0).
    pub async fn start_file(
        dir: tempfile::TempDir,
        config_path: PathBuf,
        log_path: PathBuf,
    ) -> Proxy {
        if let Ok(filter) = std::env::var("CHATWALL_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
        let cfg = Config::load(Some(&config_path)).unwrap_or_else(|e| panic!("config: {e}"));
        let engine = Engine::build(cfg).unwrap_or_else(|e| panic!("engine: {e:?}"));
        let server = Server::bind(engine).await.expect("bind");
        let addr = server.proxy_addrs()[0].1;
        let admin = server.admin_addr().expect("admin listener");
        let shared = server.shared();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        Proxy {
            addr,
            admin,
            shared,
            log_path,
            config_path,
            dir,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stop and wait for the drain to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(WAIT, t).await;
        }
    }

    /// The access-log records written so far (JSON lines).
    pub fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Wait until the access log has at least `n` records.
    pub async fn wait_log(&self, n: usize) -> Vec<serde_json::Value> {
        for _ in 0..200 {
            let l = self.log();
            if l.len() >= n {
                return l;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.log()
    }

    /// `GET path` on the admin listener: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        raw_http(
            self.admin,
            &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
        )
        .await
    }

    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        raw_http(self.admin, &format!("POST {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")).await
    }

    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    /// The value of one sample of the metrics text (0 when absent).
    pub async fn metric(&self, name_and_labels: &str) -> f64 {
        metric_value(&self.metrics().await, name_and_labels)
    }

    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub fn metric_value(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name_and_labels).then(|| v.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

/// Send raw bytes, read until close: (status, body).
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let out = raw_exchange(addr, request.as_bytes()).await;
    parse_response(&out)
}

pub fn parse_response(out: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Write `bytes`, read everything until the peer closes (bounded).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    out
}

/// Read one HTTP/1.1 response head (and a Content-Length body) from a
/// stream, without reading past it: bytes that follow (a pipelined
/// response, a tunnel's first bytes) stay in the socket.
pub async fn read_response(s: &mut TcpStream) -> (u16, String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut byte))
            .await
            .expect("response in time")
            .expect("read");
        assert!(
            n > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
        assert!(buf.len() < 64 * 1024, "response head too large");
    }
    let head = String::from_utf8_lossy(&buf).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    tokio::time::timeout(WAIT, s.read_exact(&mut body))
        .await
        .expect("body in time")
        .expect("body");
    (status, head, body)
}

/// What an origin saw.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

/// A plain HTTP/1.1 origin (hyper). Paths: `/bytes/N` N bytes of a fixed
/// pattern (streamed, chunked); `/echo` echoes the body; anything else
/// `hello from origin`.
pub struct HttpOrigin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

/// The byte at position `i` of `/bytes/N` bodies.
pub fn pattern_byte(i: usize) -> u8 {
    (i % 251) as u8
}

impl HttpOrigin {
    pub async fn start() -> HttpOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let seen = Arc::clone(&seen2);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        origin_handle(Arc::clone(&seen), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        HttpOrigin { addr, seen }
    }

    pub fn requests(&self) -> Vec<Seen> {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

type OriginBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn origin_handle(
    seen: Arc<Mutex<Vec<Seen>>>,
    req: Request<Incoming>,
) -> Result<Response<OriginBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let collected = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if let Ok(mut s) = seen.lock() {
        s.push(Seen {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body_len: collected.len(),
        });
    }
    let path = parts.uri.path().to_string();
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        let body = PatternBody {
            pos: 0,
            n,
            chunk: 64 * 1024,
        };
        return Ok(Response::new(BodyExt::boxed(body)));
    }
    if path == "/echo" {
        return Ok(Response::new(Full::new(collected).boxed()));
    }
    let mut r = Response::new(Full::new(Bytes::from_static(b"hello from origin\n")).boxed());
    r.headers_mut()
        .insert("x-origin", "1".parse().expect("static header"));
    Ok(r)
}

/// `n` pattern bytes in chunks, produced lazily (constant memory).
struct PatternBody {
    pos: usize,
    n: usize,
    chunk: usize,
}

impl http_body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.pos >= self.n {
            return std::task::Poll::Ready(None);
        }
        let len = self.chunk.min(self.n - self.pos);
        let start = self.pos;
        let data: Vec<u8> = (start..start + len).map(pattern_byte).collect();
        self.pos += len;
        std::task::Poll::Ready(Some(Ok(Frame::data(Bytes::from(data)))))
    }
}

/// A raw TCP origin that records every byte it receives per connection and
/// optionally greets first (server-speaks-first protocols) and echoes.
pub struct RawOrigin {
    pub addr: SocketAddr,
    pub received: Arc<Mutex<Vec<Vec<u8>>>>,
    pub accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl RawOrigin {
    pub async fn start(banner: Option<&'static [u8]>, echo: bool) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind raw origin");
        let addr = listener.local_addr().expect("addr");
        let received = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (rx2, acc2) = (Arc::clone(&received), Arc::clone(&accepted));
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    break;
                };
                acc2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let idx = {
                    let mut r = rx2.lock().expect("lock");
                    r.push(Vec::new());
                    r.len() - 1
                };
                let rx = Arc::clone(&rx2);
                tokio::spawn(async move {
                    if let Some(b) = banner {
                        let _ = s.write_all(b).await;
                    }
                    let mut buf = [0u8; 16384];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if let Ok(mut r) = rx.lock() {
                                    r[idx].extend_from_slice(&buf[..n]);
                                }
                                if echo && s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        RawOrigin {
            addr,
            received,
            accepted,
        }
    }

    /// All bytes received on all connections.
    pub fn total_received(&self) -> usize {
        self.received
            .lock()
            .map(|r| r.iter().map(Vec::len).sum())
            .unwrap_or(0)
    }

    pub fn connection_bytes(&self, i: usize) -> Vec<u8> {
        self.received
            .lock()
            .ok()
            .and_then(|r| r.get(i).cloned())
            .unwrap_or_default()
    }
}

/// A certificate for `names`, and the rustls server config using it.
pub fn tls_server_config(
    names: &[&str],
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
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(cfg), cert)
}

/// An HTTPS origin (tokio-rustls + hyper) answering `hello over tls`.
pub struct TlsOrigin {
    pub addr: SocketAddr,
    pub cert: rustls::pki_types::CertificateDer<'static>,
    pub cert_pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsOrigin {
    pub async fn start(names: &[&str]) -> TlsOrigin {
        let (cfg, cert) = tls_server_config(names);
        let dir = tempfile::tempdir().expect("tempdir");
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64_lines(&cert)
        );
        let cert_pem_path = dir.path().join("origin.pem");
        std::fs::write(&cert_pem_path, pem).expect("write pem");
        let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tls origin");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    break;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let path = req.uri().path().to_string();
                        let body = if let Some(n) = path
                            .strip_prefix("/bytes/")
                            .and_then(|n| n.parse::<usize>().ok())
                        {
                            Bytes::from((0..n).map(pattern_byte).collect::<Vec<u8>>())
                        } else {
                            Bytes::from_static(b"hello over tls\n")
                        };
                        Ok::<_, Infallible>(Response::new(Full::new(body)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsOrigin {
            addr,
            cert,
            cert_pem_path,
            _dir: dir,
        }
    }

    /// A rustls client config trusting this origin.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }
}

fn base64_lines(der: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in der.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s.as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8_lossy(c).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Open a CONNECT tunnel through the proxy; returns the stream after `200`.
pub async fn connect_tunnel(proxy: SocketAddr, authority: &str) -> Result<TcpStream, u16> {
    let mut s = TcpStream::connect(proxy).await.expect("connect proxy");
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let (status, _, _) = read_response(&mut s).await;
    if status == 200 {
        Ok(s)
    } else {
        Err(status)
    }
}

/// A hyper client that sends absolute-form requests to the proxy.
pub async fn proxy_request(proxy: SocketAddr, req: Request<Full<Bytes>>) -> Response<Incoming> {
    let stream = TcpStream::connect(proxy).await.expect("connect proxy");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    tokio::time::timeout(WAIT, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response")
}

pub fn executor() -> TokioExecutor {
    TokioExecutor::new()
}

/// Is `curl` on this machine?
pub fn have_curl() -> bool {
    std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_ok()
}

/// Run curl with args; (exit code, stdout bytes, stderr).
pub async fn curl(args: &[&str]) -> (i32, Vec<u8>, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-s", "-S", "--max-time", "20"])
            .args(&args)
            .output()
    })
    .await
    .expect("join")
    .expect("curl runs");
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Fail when an environment variable says so, else print why and skip.
pub fn skip_or_fail(why: &str) {
    if std::env::var("CHATWALL_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("required test cannot run: {why}");
    }
    eprintln!("SKIPPED: {why}");
}

// ---------------------------------------------------------------------------
// Byte-exact relaying: a recording origin that answers from a script, a
// recording layer for either end of a TLS session, and client helpers that
// read what came without interpreting it.
// ---------------------------------------------------------------------------

/// How long a reader waits for the next byte before it stops and reports
/// what it has (a relay that swallowed bytes must not cost the whole WAIT).
pub const QUIET: Duration = Duration::from_secs(3);

/// The bytes one end of a stream read and wrote, as they passed.
#[derive(Clone, Default, Debug)]
pub struct TeeLog {
    pub read: Arc<Mutex<Vec<u8>>>,
    pub written: Arc<Mutex<Vec<u8>>>,
}

impl TeeLog {
    pub fn read_bytes(&self) -> Vec<u8> {
        self.read.lock().map(|b| b.clone()).unwrap_or_default()
    }

    pub fn written_bytes(&self) -> Vec<u8> {
        self.written.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

/// A stream that records every byte read from and written to `inner`: put
/// it under rustls to see the TCP bytes of a TLS session.
pub struct Tee<S> {
    inner: S,
    log: TeeLog,
}

impl<S> Tee<S> {
    pub fn new(inner: S) -> (Tee<S>, TeeLog) {
        let log = TeeLog::default();
        (
            Tee {
                inner,
                log: log.clone(),
            },
            log,
        )
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Tee<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = &r {
            if let Ok(mut log) = self.log.read.lock() {
                log.extend_from_slice(&buf.filled()[before..]);
            }
        }
        r
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Tee<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            if let Ok(mut log) = self.log.written.lock() {
                log.extend_from_slice(&buf[..*n]);
            }
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a `ScriptOrigin` does with the bytes of each connection.
#[derive(Clone, Debug)]
pub enum Script {
    /// Record, never answer.
    Silent,
    /// Write every byte back as it comes.
    Echo,
    /// Answer HTTP/1.x requests from a list (see `HttpScript`).
    Http(HttpScript),
}

/// An HTTP/1.x answering script. Requests are framed as they come (head,
/// then a Content-Length or chunked body, chunk extensions and trailers
/// included; no body otherwise), pipelined or in pieces; the i-th complete
/// request of a connection gets `responses[i]` written verbatim (the last
/// one repeats; none: no answer). A request with an `Upgrade` header, or a
/// CONNECT, gets its answer and then the connection echoes raw bytes; so do
/// bytes that are not an HTTP request head.
#[derive(Clone, Debug, Default)]
pub struct HttpScript {
    pub responses: Vec<Vec<u8>>,
    /// Write `HTTP/1.1 100 Continue\r\n\r\n` once a head with
    /// `Expect: 100-continue` is in and its body is not.
    pub continue_100: bool,
    /// Close the connection after answering this many requests.
    pub close_after: Option<usize>,
}

impl Script {
    /// Answer every request with the next of `responses`.
    pub fn http(responses: Vec<Vec<u8>>) -> Script {
        Script::Http(HttpScript {
            responses,
            ..HttpScript::default()
        })
    }

    /// Answer the upgrade request with `response` (a 101, and whatever
    /// frames should follow it at once), then echo raw bytes.
    pub fn websocket(response: Vec<u8>) -> Script {
        Script::http(vec![response])
    }
}

/// The interim answer of `HttpScript::continue_100`.
pub const CONTINUE_100: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A TCP origin (optionally TLS) that counts connections, records every TCP
/// byte it receives and sends per connection, and answers from a `Script`.
pub struct ScriptOrigin {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<TeeLog>>>,
    closed: Arc<std::sync::atomic::AtomicUsize>,
    requests: Arc<std::sync::atomic::AtomicUsize>,
}

impl ScriptOrigin {
    /// On 127.0.0.1, an ephemeral port.
    pub async fn start(script: Script) -> ScriptOrigin {
        ScriptOrigin::start_at("127.0.0.1:0".parse().expect("addr"), script, None)
            .await
            .expect("bind script origin")
    }

    /// TLS with `cfg` on 127.0.0.1; the script runs on the plaintext, the
    /// records are the TCP bytes.
    pub async fn start_tls(script: Script, cfg: Arc<rustls::ServerConfig>) -> ScriptOrigin {
        ScriptOrigin::start_at("127.0.0.1:0".parse().expect("addr"), script, Some(cfg))
            .await
            .expect("bind script origin")
    }

    /// On a given address (a privileged port needs root: the error says so).
    pub async fn start_at(
        addr: SocketAddr,
        script: Script,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<ScriptOrigin> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let conns: Arc<Mutex<Vec<TeeLog>>> = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (conns2, closed2, requests2) = (
            Arc::clone(&conns),
            Arc::clone(&closed),
            Arc::clone(&requests),
        );
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    break;
                };
                let _ = s.set_nodelay(true);
                let (tee, log) = Tee::new(s);
                if let Ok(mut c) = conns2.lock() {
                    c.push(log);
                }
                let (script, closed, requests, acceptor) = (
                    script.clone(),
                    Arc::clone(&closed2),
                    Arc::clone(&requests2),
                    acceptor.clone(),
                );
                tokio::spawn(async move {
                    match acceptor {
                        None => run_script(tee, &script, &requests).await,
                        Some(a) => {
                            if let Ok(Ok(tls)) = tokio::time::timeout(WAIT, a.accept(tee)).await {
                                run_script(tls, &script, &requests).await;
                            }
                        }
                    }
                    closed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                });
            }
        });
        Ok(ScriptOrigin {
            addr,
            conns,
            closed,
            requests,
        })
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Connections whose script has ended (peer closed, or the script did).
    pub fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Complete HTTP requests framed so far, all connections.
    pub fn requests(&self) -> usize {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// TCP bytes received on connection `i` (empty if there is none).
    pub fn received(&self, i: usize) -> Vec<u8> {
        self.log(i).map(|l| l.read_bytes()).unwrap_or_default()
    }

    /// TCP bytes sent on connection `i`.
    pub fn sent(&self, i: usize) -> Vec<u8> {
        self.log(i).map(|l| l.written_bytes()).unwrap_or_default()
    }

    /// Bytes received on all connections.
    pub fn total_received(&self) -> usize {
        (0..self.accepted()).map(|i| self.received(i).len()).sum()
    }

    fn log(&self, i: usize) -> Option<TeeLog> {
        self.conns.lock().ok().and_then(|c| c.get(i).cloned())
    }

    /// Wait (bounded) until `n` connections have ended; whether they did.
    pub async fn wait_closed(&self, n: usize) -> bool {
        wait_until(|| self.closed() >= n).await
    }

    /// Wait (bounded) until connection `i` has received `n` bytes; what it has.
    pub async fn wait_received(&self, i: usize, n: usize) -> Vec<u8> {
        wait_until(|| self.received(i).len() >= n).await;
        self.received(i)
    }

    /// Every connection's received bytes, escaped: for failure messages.
    pub fn describe(&self) -> String {
        (0..self.accepted())
            .map(|i| format!("connection {i} received {:?}", escape(&self.received(i))))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Poll `cond` every 10 ms for at most WAIT; whether it came true.
pub async fn wait_until(cond: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Where one request ends in `buf` (which starts with it): `Ok(None)` needs
/// more bytes, `Err(())` is not an HTTP request head. Also whether it asks
/// for 100-continue, and whether the bytes after it are opaque (Upgrade,
/// CONNECT).
struct Framed {
    total: Option<usize>,
    expect_continue: bool,
    opaque_after: bool,
}

fn frame_request(buf: &[u8]) -> Result<Option<Framed>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(()),
    };
    let value = |name: &str| {
        req.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let expect_continue = value("expect").iter().any(|v| v.trim() == "100-continue");
    let opaque_after = req.method == Some("CONNECT") || !value("upgrade").is_empty();
    let chunked = value("transfer-encoding")
        .iter()
        .any(|v| v.contains("chunked"));
    let body = &buf[head_len..];
    let body_len = if chunked {
        chunked_len(body)
    } else {
        let n = value("content-length")
            .first()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        (body.len() >= n).then_some(n)
    };
    Ok(Some(Framed {
        total: body_len.map(|b| head_len + b),
        expect_continue,
        opaque_after,
    }))
}

/// The length of a complete chunked body at the start of `b` (extensions
/// and trailers included), or `None` if it is not all there yet.
fn chunked_len(b: &[u8]) -> Option<usize> {
    let line = |from: usize| {
        b.get(from..)?
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| from + p)
    };
    let mut pos = 0;
    loop {
        let end = line(pos)?;
        let text = String::from_utf8_lossy(&b[pos..end]);
        let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16).ok()?;
        pos = end + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let end = line(pos)?;
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

async fn run_script<S>(mut s: S, script: &Script, requests: &std::sync::atomic::AtomicUsize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut tmp = vec![0u8; 65536];
    let mut buf: Vec<u8> = Vec::new();
    let mut answered = 0usize;
    let mut continued = false;
    let mut echo = matches!(script, Script::Echo);
    loop {
        // Answer what is complete.
        if let (Script::Http(h), false) = (script, echo) {
            loop {
                match frame_request(&buf) {
                    Err(()) => {
                        echo = true;
                        break;
                    }
                    Ok(None) => break,
                    Ok(Some(f)) => match f.total {
                        None => {
                            if f.expect_continue && h.continue_100 && !continued {
                                continued = true;
                                if s.write_all(CONTINUE_100).await.is_err() {
                                    return;
                                }
                            }
                            break;
                        }
                        Some(total) => {
                            buf.drain(..total);
                            continued = false;
                            requests.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            let resp = h
                                .responses
                                .get(answered)
                                .or(h.responses.last())
                                .cloned()
                                .unwrap_or_default();
                            answered += 1;
                            if s.write_all(&resp).await.is_err() {
                                return;
                            }
                            let _ = s.flush().await;
                            if h.close_after.is_some_and(|n| answered >= n) {
                                let _ = s.shutdown().await;
                                return;
                            }
                            if f.opaque_after {
                                echo = true;
                                break;
                            }
                        }
                    },
                }
            }
        }
        if echo && !buf.is_empty() {
            if s.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
        let n = match s.read(&mut tmp).await {
            Ok(0) | Err(_) => {
                let _ = s.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        match script {
            Script::Silent => {}
            _ => buf.extend_from_slice(&tmp[..n]),
        }
    }
}

/// Bytes as an escaped string, for failure messages.
pub fn escape(b: &[u8]) -> String {
    b.escape_ascii().to_string()
}

/// Assert two byte strings are equal; on failure, show both escaped and
/// where they first differ.
#[track_caller]
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: bytes differ at offset {at} (got {} bytes, want {})\n  got:  {}\n  want: {}",
        got.len(),
        want.len(),
        escape(got),
        escape(want)
    );
}

/// How a read of a whole stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Eof,
    Reset,
    /// Nothing came for `QUIET`, or the whole WAIT passed.
    Timeout,
}

/// Read until `n` bytes are in, the stream ends, or nothing comes for
/// `QUIET`; whatever came (never more than `n`).
pub async fn read_n<S: tokio::io::AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut have = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while have < n {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(QUIET.min(left), s.read(&mut out[have..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => have += k,
        }
    }
    out.truncate(have);
    out
}

/// Read until the stream ends (EOF or reset) or nothing comes for `QUIET`.
pub async fn read_to_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> (Vec<u8>, Ending) {
    let mut out = Vec::new();
    let mut tmp = [0u8; 16384];
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(QUIET.min(left), s.read(&mut tmp)).await {
            Ok(Ok(0)) => return (out, Ending::Eof),
            Ok(Err(_)) => return (out, Ending::Reset),
            Err(_) => return (out, Ending::Timeout),
            Ok(Ok(k)) => out.extend_from_slice(&tmp[..k]),
        }
    }
}

/// Write `data` `step` bytes per write, `pause` apart.
pub async fn write_dribbled<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    data: &[u8],
    step: usize,
    pause: Duration,
) {
    for chunk in data.chunks(step.max(1)) {
        if s.write_all(chunk).await.is_err() {
            return;
        }
        let _ = s.flush().await;
        tokio::time::sleep(pause).await;
    }
}

/// The first TLS records a rustls client writes for `sni`: a real
/// ClientHello, for raw sockets that must pass a TLS listener's checks.
pub fn rustls_client_hello(sni: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("server name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write hello");
    }
    out
}

/// A header's first value in a response or request head (any case).
pub fn head_field(head: &[u8], name: &str) -> Option<String> {
    String::from_utf8_lossy(head).lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

impl Proxy {
    /// Wait (bounded) for an access-log record that `pred` accepts.
    pub async fn wait_record(
        &self,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(r) = self.log().into_iter().find(&pred) {
                return Some(r);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Read until `n` bytes are in, the stream ends, or `limit` has passed;
/// whatever came (never more than `n`). For answers that may or may not
/// come, as a client that waits a while and then goes on.
pub async fn read_n_within<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    n: usize,
    limit: Duration,
) -> Vec<u8> {
    let mut out = vec![0u8; n];
    let mut have = 0;
    let deadline = tokio::time::Instant::now() + limit;
    while have < n {
        match tokio::time::timeout_at(deadline, s.read(&mut out[have..])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(k)) => have += k,
        }
    }
    out.truncate(have);
    out
}
