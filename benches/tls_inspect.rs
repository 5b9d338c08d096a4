//! What TLS inspection costs a tunnel, on loopback, in one process: one
//! tunnel per iteration: `CONNECT` (wait for `200`), a TLS 1.3 handshake
//! (rustls client, ALPN http/1.1), one `GET` and its 1 KiB answer, close.
//!
//! - `direct`: TLS straight to the origin, no proxy;
//! - `spliced`: through chatwall with `[tls_inspect]` on but the name not
//!   selected: the ClientHello is decided and the tunnel relayed as is;
//! - `decrypted_cached`: the name selected, its leaf in the cache: two
//!   handshakes (upstream, client) and the HTTP follower;
//! - `decrypted_cold`: a new name every tunnel (`N.bench.test`, covered by
//!   the origin's wildcard certificate), so every tunnel mints a leaf (a
//!   P-256 key and a signature).
//!
//! The routes are interleaved in rounds (the order rotating), and the
//! medians of per-round means and ratios are printed first; criterion's
//! estimates follow. `mint/*` times `Minter::leaf` alone, cold and cached.
//!
//! Run: `cargo bench --bench tls_inspect -- --measurement-time 3 --warm-up-time 1`
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

use chatwall::config::Config;
use chatwall::engine::Engine;
use chatwall::server::Server;
use chatwall::tls_inspect::{Authority, Minter};

const WAIT: Duration = Duration::from_secs(10);
const BODY: usize = 1024;
const ROUNDS: usize = 21;
const PER_ROUND: usize = 40;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An HTTPS origin for `*.bench.test` and `other.test`: every request head
/// gets a 1 KiB answer. Returns its address and certificate.
async fn start_origin() -> (SocketAddr, CertificateDer<'static>) {
    let ck = rcgen::generate_simple_self_signed(vec!["other.test".into(), "*.bench.test".into()])
        .expect("cert");
    let cert = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    answer.extend_from_slice(&[b'x'; BODY]);
    let answer: Arc<[u8]> = answer.into();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            // As a server that writes its answer at once (no Nagle delay
            // against the client's delayed ACK).
            let _ = s.set_nodelay(true);
            let (acceptor, answer) = (acceptor.clone(), Arc::clone(&answer));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let mut have = Vec::new();
                loop {
                    let n = match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    have.extend_from_slice(&buf[..n]);
                    while let Some(p) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                        have.drain(..p + 4);
                        if tls.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, cert)
}

struct Proxy {
    addr: SocketAddr,
    ca: CertificateDer<'static>,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

async fn start_proxy(origin_cert: &CertificateDer<'_>) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = chatwall::tls_inspect::ca::generate("bench CA", 30).expect("CA");
    let (ca_pem, ca_key, upstream) = (
        dir.path().join("ca.pem"),
        dir.path().join("ca.key"),
        dir.path().join("origin.pem"),
    );
    std::fs::write(&ca_pem, &ca.cert_pem).expect("write");
    std::fs::write(&ca_key, &ca.key_pem).expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ca_key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    std::fs::write(&upstream, pem(origin_cert)).expect("write");
    let toml = format!(
        "[listen]\nexplicit = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n\n\
         [access]\ndeny_destinations = []\nconnect_ports = [\"1-65535\"]\n\n\
         [log]\naccess = \"off\"\nlevel = \"error\"\n\n\
         [tls_inspect]\nenabled = true\nca_cert = {:?}\nca_key = {:?}\nupstream_extra_ca = {:?}\n\
         clients = [\"127.0.0.0/8\"]\ndecrypt = [\"host:*.bench.test\"]\n",
        ca_pem.display().to_string(),
        ca_key.display().to_string(),
        upstream.display().to_string(),
    );
    let path = dir.path().join("chatwall.toml");
    std::fs::write(&path, toml).expect("write config");
    let config = Config::load(Some(&path)).unwrap_or_else(|e| panic!("config: {e}"));
    let engine = Engine::build(config).unwrap_or_else(|e| panic!("engine: {e:?}"));
    let server = Server::bind(engine).await.expect("bind proxy");
    let addr = server.proxy_addrs()[0].1;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Proxy {
        addr,
        ca: CertificateDer::from(ca.cert_der),
        _stop: stop,
        _dir: dir,
    }
}

fn client(root: &CertificateDer<'_>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone().into_owned()).expect("root");
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    // A fresh handshake every tunnel, as a new browser connection.
    cfg.resumption = rustls::client::Resumption::disabled();
    Arc::new(cfg)
}

#[derive(Clone, Copy)]
enum Route {
    Direct,
    Proxy(SocketAddr),
}

/// One tunnel: CONNECT (unless direct), handshake for `sni`, one GET.
async fn one(route: Route, origin: SocketAddr, sni: String, cfg: Arc<rustls::ClientConfig>) {
    let run = async {
        let tcp = match route {
            Route::Direct => TcpStream::connect(origin).await.expect("connect origin"),
            Route::Proxy(proxy) => {
                let mut s = TcpStream::connect(proxy).await.expect("connect proxy");
                s.write_all(
                    format!("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n").as_bytes(),
                )
                .await
                .expect("write CONNECT");
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    assert!(s.read(&mut b).await.expect("read") == 1, "proxy closed");
                    head.push(b[0]);
                }
                assert!(head.starts_with(b"HTTP/1.1 200"), "CONNECT refused");
                s
            }
        };
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(sni.clone()).expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .expect("handshake");
        tls.write_all(format!("GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n").as_bytes())
            .await
            .expect("write GET");
        let mut got = 0;
        let mut buf = vec![0u8; 4096];
        let want = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").len() + BODY;
        while got < want {
            let n = tls.read(&mut buf).await.expect("read answer");
            assert!(n > 0, "closed early");
            got += n;
        }
    };
    tokio::time::timeout(WAIT, run)
        .await
        .expect("tunnel in time");
}

fn bench_handshakes(c: &mut Criterion) {
    let rt = runtime();
    let (origin, origin_cert, proxy) = rt.block_on(async {
        let (origin, cert) = start_origin().await;
        let proxy = start_proxy(&cert).await;
        (origin, cert, proxy)
    });
    let trust_origin = client(&origin_cert);
    let trust_ca = client(&proxy.ca);
    let fresh = AtomicUsize::new(0);
    // (name, route, SNI for this tunnel, client config)
    let route = |i: usize| -> (Route, String, Arc<rustls::ClientConfig>) {
        match i {
            0 => (
                Route::Direct,
                "www.bench.test".into(),
                Arc::clone(&trust_origin),
            ),
            // A name the certificate covers and `decrypt` does not select.
            1 => (
                Route::Proxy(proxy.addr),
                "other.test".into(),
                Arc::clone(&trust_origin),
            ),
            2 => (
                Route::Proxy(proxy.addr),
                "cached.bench.test".into(),
                Arc::clone(&trust_ca),
            ),
            _ => {
                let n = fresh.fetch_add(1, Ordering::Relaxed);
                (
                    Route::Proxy(proxy.addr),
                    format!("n{n}.bench.test"),
                    Arc::clone(&trust_ca),
                )
            }
        }
    };
    let names = ["direct", "spliced", "decrypted_cached", "decrypted_cold"];
    // Paired rounds: per-round means, then medians.
    let mut rounds: Vec<[f64; 4]> = Vec::with_capacity(ROUNDS);
    rt.block_on(async {
        for r in 0..ROUNDS {
            let mut mean = [0.0; 4];
            for k in 0..4 {
                let i = (r + k) % 4;
                let start = Instant::now();
                for _ in 0..PER_ROUND {
                    let (route, sni, cfg) = route(i);
                    one(route, origin, sni, cfg).await;
                }
                mean[i] = start.elapsed().as_secs_f64() * 1e6 / PER_ROUND as f64;
            }
            rounds.push(mean);
        }
    });
    let median = |f: &dyn Fn(&[f64; 4]) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 4], v[v.len() / 2], v[v.len() * 3 / 4])
    };
    let mut line =
        format!("paired over {ROUNDS} rounds of {PER_ROUND} tunnels (µs per tunnel, median):");
    for (i, n) in names.iter().enumerate() {
        line.push_str(&format!(" {n} {:.0}", median(&|m| m[i]).1));
    }
    for (i, n) in names.iter().enumerate().skip(2) {
        let (q1, m, q3) = median(&|r| r[i] / r[1]);
        line.push_str(&format!("; {n}/spliced {m:.2} (IQR {q1:.2}-{q3:.2})"));
    }
    eprintln!("{line}");

    let mut group = c.benchmark_group("tls_tunnel");
    for (i, n) in names.iter().enumerate() {
        group.bench_function(*n, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let (route, sni, cfg) = route(i);
                        one(route, origin, sni, cfg).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

fn bench_mint(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = chatwall::tls_inspect::ca::generate("bench CA", 30).expect("CA");
    let (cert, key) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
    std::fs::write(&cert, &ca.cert_pem).expect("write");
    std::fs::write(&key, &ca.key_pem).expect("write");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let authority = Arc::new(Authority::load(&cert, &key).expect("CA loads"));
    let minter = Minter::new(authority, 1 << 20, Duration::from_secs(3600));
    let names = vec!["www.example.com".to_string(), "example.com".to_string()];
    let mut group = c.benchmark_group("mint");
    let mut n = 0u64;
    group.bench_function("cold", |b| {
        b.iter(|| {
            n += 1;
            let mut fp = [0u8; 32];
            fp[..8].copy_from_slice(&n.to_le_bytes());
            minter.leaf("www.example.com", &names, fp).expect("leaf")
        })
    });
    let _ = minter.leaf("cached.example.com", &names, [7; 32]);
    group.bench_function("cached", |b| {
        b.iter(|| {
            minter
                .leaf("cached.example.com", &names, [7; 32])
                .expect("leaf")
        })
    });
    group.finish();
}

criterion_group!(benches, bench_mint, bench_handshakes);
criterion_main!(benches);
