//! End-to-end benchmarks on loopback: chatwall in the same process as its
//! clients and origins, each measurement beside a direct baseline taken in
//! the same run (the approach of hudsucker's `benches/proxy.rs`).
//!
//! Everything runs on one current-thread tokio runtime, so a figure is the
//! whole CPU path of one exchange (client, proxy and origin) on one core,
//! without scheduling noise between threads; differences between the
//! benchmarks of a group are what the proxy, or its signatures, add.
//!
//! - `http_get_1KiB`: `GET` of a 1 KiB body from a hyper origin on one
//!   kept-alive hyper client connection, `direct` and `via_chatwall`
//!   (absolute-form request to the explicit listener).
//! - `connect_tls` and `connect_plain`: one short tunnel per iteration:
//!   `CONNECT` (wait for `200`), one client write, read a 3 KiB answer,
//!   close. `connect_tls` writes a 517-byte ClientHello (SNI www.example.org),
//!   so the proxy parses it and decides SNI, ALPN, JA4 and ECH;
//!   `connect_plain` writes an SSH banner, so the proxy runs the payload
//!   signatures on both directions while relaying. The origin is a raw TCP
//!   responder on a port other than 443 that answers the first flight with
//!   3 KiB (a server's first flight). Each runs `direct` (no proxy),
//!   `chatwall_bundled` (the default policy and the bundled signatures) and
//!   `chatwall_minimal` (a signature directory holding one app with the
//!   single host rule `never.invalid`: the same inspection code with
//!   nothing to match). chatwall has no switch that turns inspection off;
//!   `chatwall_bundled / chatwall_minimal` is what the signatures cost a
//!   short tunnel, `chatwall_* / direct` what the proxy costs in all.
//!
//! Before its criterion benchmarks, each tunnel group prints a paired
//! comparison: the three routes interleaved in 41 rounds of 100 tunnels,
//! with the median and quartiles of the per-round ratios
//! `chatwall_bundled / chatwall_minimal` and `chatwall_bundled / direct`.
//! On a shared machine whose speed drifts between benchmarks, those
//! ratios are the figures to compare, not two criterion estimates taken
//! seconds apart.
//!
//! Every proxy listens on 127.0.0.1:0 with `[access] deny_destinations = []`
//! and `connect_ports = ["1-65535"]` (so it may reach the loopback origins
//! on their random ports) and `[log] access = "off"`.
//!
//! Run: `cargo bench --bench proxy -- --measurement-time 3 --warm-up-time 1`
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;

use chatwall::config::Config;
use chatwall::engine::Engine;
use chatwall::server::Server;

#[allow(dead_code)]
#[path = "../fuzz/src/fixtures.rs"]
mod fixtures;

/// Size of the origin's HTTP body.
const BODY_LEN: usize = 1024;
/// Size of the responder's answer to a tunnel's first flight.
const REPLY_LEN: usize = 3 * 1024;
/// Bound on any single wait: a stalled exchange fails the run.
const WAIT: Duration = Duration::from_secs(10);

/// The one app of the `chatwall_minimal` proxy's signature directory.
const MINIMAL_SIGNATURES: &str = r#"id = "nothing"
name = "Nothing"
category = "consumer-im"

[[hosts]]
names = ["never.invalid"]
source = "benches/proxy.rs: a signature set with nothing to match"
"#;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A hyper HTTP/1.1 origin answering every request with `BODY_LEN` bytes.
async fn start_http_origin() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
    let addr = listener.local_addr().expect("origin address");
    let body = Bytes::from(vec![b'x'; BODY_LEN]);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let body = body.clone();
            let service = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    addr
}

/// A raw TCP origin: per connection, read `first_flight` bytes, answer
/// `REPLY_LEN` bytes, then read until the client closes.
async fn start_responder(first_flight: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind responder");
    let addr = listener.local_addr().expect("responder address");
    let reply = Bytes::from(fixtures::XorShift(0xfeed_f00d).bytes(REPLY_LEN));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut flight = vec![0u8; first_flight];
                if stream.read_exact(&mut flight).await.is_err() {
                    return;
                }
                if stream.write_all(&reply).await.is_err() {
                    return;
                }
                let mut rest = [0u8; 1024];
                while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

/// A chatwall in this process; stops when dropped.
struct Proxy {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// Start a proxy with the bundled signatures, or with the signature
/// directory `signatures` when given.
async fn start_proxy(signatures: Option<&str>) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut toml = String::from(
        "[listen]\nexplicit = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n\n\
         [access]\ndeny_destinations = []\nconnect_ports = [\"1-65535\"]\n\n\
         [log]\naccess = \"off\"\nlevel = \"error\"\n",
    );
    if let Some(app) = signatures {
        let sigs = dir.path().join("signatures");
        std::fs::create_dir(&sigs).expect("signature directory");
        std::fs::write(sigs.join("nothing.toml"), app).expect("write signature file");
        toml.push_str(&format!("\n[signatures]\ndir = {:?}\n", path_str(&sigs)));
    }
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
        _stop: stop,
        _dir: dir,
    }
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("temporary paths are UTF-8").to_owned()
}

/// A kept-alive HTTP/1.1 client connection to `addr`.
async fn http_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP handshake");
    tokio::spawn(conn);
    sender
}

/// `GET uri` on `sender`; the body must be `BODY_LEN` bytes.
async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    uri: &str,
    host: &str,
) {
    sender.ready().await.expect("connection ready");
    let request = Request::get(uri)
        .header(hyper::header::HOST, host)
        .body(Empty::new())
        .expect("request");
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("response in time")
        .expect("response");
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body.len(), BODY_LEN);
}

fn bench_http(c: &mut Criterion) {
    let rt = runtime();
    let (origin, proxy) =
        rt.block_on(async { (start_http_origin().await, start_proxy(None).await) });
    let host = origin.to_string();
    let absolute = format!("http://{origin}/1k");
    let mut group = c.benchmark_group("http_get_1KiB");
    group.throughput(Throughput::Elements(1));
    for (name, connect_to, uri) in [
        ("direct", origin, "/1k"),
        ("via_chatwall", proxy.addr, absolute.as_str()),
    ] {
        let mut sender = rt.block_on(http_client(connect_to));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        get(&mut sender, uri, &host).await;
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
    drop(proxy);
}

/// Where a tunnel goes: straight to the origin, or through a proxy.
#[derive(Clone, Copy)]
enum Route {
    Direct,
    Proxy(SocketAddr),
}

/// One short tunnel: (CONNECT,) write `first`, read `REPLY_LEN`, close.
async fn tunnel(route: Route, origin: SocketAddr, connect: &[u8], first: &[u8]) {
    let target = match route {
        Route::Direct => origin,
        Route::Proxy(proxy) => proxy,
    };
    let mut stream = TcpStream::connect(target).await.expect("connect");
    let _ = stream.set_nodelay(true);
    if let Route::Proxy(_) = route {
        stream.write_all(connect).await.expect("write CONNECT");
        read_connect_reply(&mut stream).await;
    }
    stream.write_all(first).await.expect("write first flight");
    let mut reply = [0u8; REPLY_LEN];
    tokio::time::timeout(WAIT, stream.read_exact(&mut reply))
        .await
        .expect("reply in time")
        .expect("the tunnel was not refused");
}

/// Read the proxy's answer to CONNECT, which must be `200`. Nothing follows
/// it until the client writes, so reading whole segments cannot over-read.
async fn read_connect_reply(stream: &mut TcpStream) {
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("CONNECT answer in time")
            .expect("read CONNECT answer");
        assert!(n > 0, "proxy closed during CONNECT");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
}

fn bench_tunnels(c: &mut Criterion) {
    let rt = runtime();
    let first_flights = [
        (
            "connect_tls",
            fixtures::browser_hello("www.example.org", false),
        ),
        ("connect_plain", fixtures::ssh_banner()),
    ];
    let (bundled, minimal) = rt.block_on(async {
        (
            start_proxy(None).await,
            start_proxy(Some(MINIMAL_SIGNATURES)).await,
        )
    });
    let routes = [
        ("direct", Route::Direct),
        ("chatwall_bundled", Route::Proxy(bundled.addr)),
        ("chatwall_minimal", Route::Proxy(minimal.addr)),
    ];
    for (group_name, first) in &first_flights {
        let origin = rt.block_on(start_responder(first.len()));
        let connect = format!("CONNECT {origin} HTTP/1.1\r\nHost: {origin}\r\n\r\n").into_bytes();
        let one = |route| tunnel(route, origin, &connect, first);
        let paired = rt.block_on(paired_rounds(&routes, one));
        eprintln!("{group_name}/{}B: {paired}", first.len());
        let mut group = c.benchmark_group(*group_name);
        group.throughput(Throughput::Elements(1));
        for (name, route) in routes {
            group.bench_function(BenchmarkId::new(format!("{}B", first.len()), name), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            one(route).await;
                        }
                        start.elapsed()
                    })
                })
            });
        }
        group.finish();
    }
}

/// Rounds of the paired comparison, and tunnels per route in each.
const ROUNDS: usize = 41;
const PER_ROUND: usize = 100;

/// Times the routes interleaved: in each of `ROUNDS` rounds, `PER_ROUND`
/// tunnels on each route back to back (the order rotating from round to
/// round). On a shared machine whose speed drifts over seconds, criterion's
/// one-benchmark-after-the-other figures can differ by more than the
/// effect looked for; the ratio of two routes within one round does not
/// drift, so the median of those ratios is the figure to compare.
async fn paired_rounds<F, Fut>(routes: &[(&'static str, Route); 3], one: F) -> Paired
where
    F: Fn(Route) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut rounds: Vec<[f64; 3]> = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let mut mean = [0.0; 3];
        for k in 0..routes.len() {
            let i = (round + k) % routes.len();
            let start = Instant::now();
            for _ in 0..PER_ROUND {
                one(routes[i].1).await;
            }
            mean[i] = start.elapsed().as_secs_f64() * 1e6 / PER_ROUND as f64;
        }
        rounds.push(mean);
    }
    let spread =
        |f: &dyn Fn(&[f64; 3]) -> f64| quartiles(&mut rounds.iter().map(f).collect::<Vec<_>>());
    Paired {
        micros: [0, 1, 2].map(|i| spread(&|m| m[i])[1]),
        bundled_over_minimal: spread(&|m| m[1] / m[2]),
        bundled_over_direct: spread(&|m| m[1] / m[0]),
    }
}

/// Medians (µs per tunnel) and quartiles of per-round ratios.
struct Paired {
    /// direct, chatwall_bundled, chatwall_minimal.
    micros: [f64; 3],
    bundled_over_minimal: [f64; 3],
    bundled_over_direct: [f64; 3],
}

impl std::fmt::Display for Paired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [direct, bundled, minimal] = self.micros;
        let [q1, m, q3] = self.bundled_over_minimal;
        let [d1, d, d3] = self.bundled_over_direct;
        write!(
            f,
            "paired over {ROUNDS} rounds of {PER_ROUND}: direct {direct:.1} µs, \
             chatwall_bundled {bundled:.1} µs, chatwall_minimal {minimal:.1} µs; \
             bundled/minimal {m:.3} (IQR {q1:.3}-{q3:.3}), \
             bundled/direct {d:.2} (IQR {d1:.2}-{d3:.2})"
        )
    }
}

/// First quartile, median and third quartile of `values`.
fn quartiles(values: &mut [f64]) -> [f64; 3] {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    [at(0.25), at(0.5), at(0.75)]
}

criterion_group!(benches, bench_http, bench_tunnels);
criterion_main!(benches);
