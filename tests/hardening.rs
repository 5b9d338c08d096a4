//! Limits and faults: idle and slowloris clients, connection caps, upstreams
//! that refuse, reset, stall, lie or close early, clients that reset
//! mid-upload, reload under load, drain on SIGTERM. Every loop is bounded.
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{self, read_response, HttpOrigin, Proxy, WAIT};

fn fd_limit() -> usize {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

async fn ordinary_get(proxy: SocketAddr, origin: SocketAddr) -> u16 {
    let req =
        format!("GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n");
    support::raw_http(proxy, &req).await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_clients_do_not_starve_an_ordinary_request() {
    if fd_limit() < 5000 {
        support::skip_or_fail("the open-files limit is below 5000 (ulimit -n)");
        return;
    }
    let origin = HttpOrigin::start().await;
    let proxy = Proxy::start(
        "[access]\ndeny_destinations = []\n[limits]\nmax_connections_per_client = 5000\n",
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(proxy.addr).await.expect("connect"));
    }
    let started = Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(1),
        ordinary_get(proxy.addr, origin.addr),
    )
    .await
    .expect("an ordinary request must be served within a second");
    assert_eq!(status, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        proxy
            .metric("chatwall_connections_active{listener=\"explicit\"}")
            .await
            >= 2000.0
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_clients_are_closed_by_the_head_deadline() {
    let origin = HttpOrigin::start().await;
    let proxy = Proxy::start("[access]\ndeny_destinations = []\n[limits]\nheader_read_timeout_ms = 1500\nmax_connections_per_client = 2000\n").await;
    let closed = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..500 {
        let closed = Arc::clone(&closed);
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let _ = s
                .write_all(b"GET http://example.com/ HTTP/1.1\r\nX-Slow: ")
                .await;
            // Drip a byte every 400 ms, at most 30 times (12 s).
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_millis(400)).await;
                if s.write_all(b"a").await.is_err() {
                    break;
                }
                let mut b = [0u8; 512];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_millis(1), s.read(&mut b)).await
                {
                    if n == 0 || b[..n].starts_with(b"HTTP/1.1 408") {
                        break;
                    }
                }
            }
            let mut rest = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
            if matches!(r, Ok(Ok(_)) | Ok(Err(_))) {
                closed.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    // Meanwhile ordinary requests are served.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(ordinary_get(proxy.addr, origin.addr).await, 200);
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }
    assert_eq!(
        closed.load(Ordering::SeqCst),
        500,
        "every slowloris client must be closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_new_connections_quickly_and_keep_existing_ones() {
    let origin = HttpOrigin::start().await;
    let proxy = Proxy::start(
        "[access]\ndeny_destinations = []\n[limits]\nmax_connections_per_client = 3\n",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        s.write_all(
            format!("GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\n\r\n", origin.addr).as_bytes(),
        )
        .await
        .expect("write");
        assert_eq!(read_response(&mut s).await.0, 200);
        held.push(s);
    }
    let started = Instant::now();
    let out = support::raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\n\r\n").await;
    assert_eq!(
        support::parse_response(&out).0,
        503,
        "{}",
        String::from_utf8_lossy(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // The held connections still work.
    let s = &mut held[0];
    s.write_all(
        format!(
            "GET http://{0}/again HTTP/1.1\r\nHost: {0}\r\n\r\n",
            origin.addr
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    assert_eq!(read_response(s).await.0, 200);
    assert_eq!(
        proxy
            .metric("chatwall_limit_refusals_total{limit=\"per_client\"}")
            .await,
        1.0
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        ordinary_get(proxy.addr, origin.addr).await,
        200,
        "slots are released"
    );
}

/// An upstream that does one scripted thing per connection.
async fn scripted_origin(script: &'static [u8], then: Then) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
                let _ = s.write_all(script).await;
                match then {
                    Then::Close => {}
                    Then::Reset => {
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    }
                    Then::Stall => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    addr
}

#[derive(Clone, Copy)]
enum Then {
    Close,
    Reset,
    Stall,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_upstreams_get_502_or_504_and_never_a_hang() {
    let proxy = Proxy::start(
        "[access]\ndeny_destinations = []\n[limits]\nupstream_response_timeout_ms = 800\n",
    )
    .await;
    let cases: Vec<(&str, SocketAddr, u16)> = vec![
        (
            "closes without answering",
            scripted_origin(b"", Then::Close).await,
            502,
        ),
        (
            "resets without answering",
            scripted_origin(b"", Then::Reset).await,
            502,
        ),
        (
            "never answers",
            scripted_origin(b"", Then::Stall).await,
            504,
        ),
        (
            "invalid status line",
            scripted_origin(b"HTTP/1.1 abc\r\n\r\n", Then::Close).await,
            502,
        ),
        (
            "not HTTP at all",
            scripted_origin(b"SSH-2.0-OpenSSH\r\n", Then::Close).await,
            502,
        ),
        (
            "bad header",
            scripted_origin(b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", Then::Close).await,
            502,
        ),
        (
            "bad content-length",
            scripted_origin(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", Then::Close).await,
            502,
        ),
    ];
    for (name, addr, want) in cases {
        let req =
            format!("GET http://{addr}/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let started = Instant::now();
        let (status, body) = tokio::time::timeout(WAIT, support::raw_http(proxy.addr, &req))
            .await
            .unwrap_or_else(|_| panic!("{name}: hang"));
        assert_eq!(status, want, "{name}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name}: too slow"
        );
    }
    // Mid-body failures: the client sees the body end early, not a hang.
    for (name, then) in [
        ("reset mid-body", Then::Reset),
        ("stall mid-body", Then::Stall),
        ("close mid-body", Then::Close),
    ] {
        let addr = scripted_origin(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789",
            then,
        )
        .await;
        let req =
            format!("GET http://{addr}/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let out = tokio::time::timeout(WAIT, support::raw_exchange(proxy.addr, req.as_bytes()))
            .await
            .unwrap_or_else(|_| panic!("{name}: hang"));
        let (status, body) = support::parse_response(&out);
        assert_eq!(status, 200, "{name}");
        assert!(
            body.len() < 1000,
            "{name}: a truncated body must not look complete"
        );
    }
    assert!(
        proxy
            .metric("chatwall_upstream_errors_total{kind=\"timeout\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resetting_mid_upload_harms_nobody_else() {
    let origin = HttpOrigin::start().await;
    let proxy = Proxy::start_open().await;
    let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
    s.write_all(
        format!(
            "POST http://{0}/echo HTTP/1.1\r\nHost: {0}\r\nContent-Length: 1000000\r\n\r\n",
            origin.addr
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    s.write_all(&[b'x'; 10_000]).await.expect("write");
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ordinary_get(proxy.addr, origin.addr).await, 200);
    assert!(origin
        .requests()
        .iter()
        .all(|r| r.uri != "/echo" || r.body_len < 1_000_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_link_local_destinations_are_never_reached() {
    let proxy = Proxy::start("").await;
    for target in [
        "169.254.169.254:80",
        "[fe80::1]:80",
        "0.0.0.0:80",
        "[::]:80",
        "127.0.0.1:22",
    ] {
        assert_eq!(
            support::connect_tunnel(proxy.addr, target).await.err(),
            Some(403),
            "{target}"
        );
    }
    let (status, _) = support::raw_http(proxy.addr, "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status, 403);
}

/// A chatwall process started from the built binary, for signal tests.
struct Process {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn spawn_process(extra: &str) -> Process {
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, admin) = (free_port(), free_port());
    let cfg = dir.path().join("chatwall.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listen]\nexplicit = [\"{proxy}\"]\nadmin = \"{admin}\"\n{}[access]\ndeny_destinations = []\nconnect_ports = [\"1-65535\"]\n{extra}",
            // The caller may bring its own [log] section.
            if extra.contains("[log]") { "" } else { "[log]\naccess = \"off\"\nlevel = \"warn\"\n" }
        ),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_chatwall"))
        .args(["run", "-c"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chatwall");
    let p = Process {
        child,
        proxy,
        admin,
        _dir: dir,
    };
    for _ in 0..400 {
        if TcpStream::connect(admin).await.is_ok()
            && support::raw_http(
                admin,
                "GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await
            .0 == 200
        {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("chatwall did not become ready");
}

fn signal(p: &Process, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_during_load_loses_no_request() {
    let origin = HttpOrigin::start().await;
    let p = spawn_process("").await;
    let ok = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (ok, proxy, o) = (Arc::clone(&ok), p.proxy, origin.addr);
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(proxy).await.expect("connect");
            for i in 0..150 {
                s.write_all(format!("GET http://{o}/{i} HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes())
                    .await
                    .expect("write");
                let (status, _, _) = read_response(&mut s).await;
                assert_eq!(status, 200);
                ok.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        signal(&p, "-HUP");
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("in time")
            .expect("no failed request");
    }
    assert_eq!(ok.load(Ordering::SeqCst), 600);
    let metrics = support::raw_http(
        p.admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .1;
    assert!(
        support::metric_value(&metrics, "chatwall_reloads_total{result=\"ok\"}") >= 1.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_large_download_finish_and_goes_unready_first() {
    let origin = HttpOrigin::start().await;
    let mut p = spawn_process("[limits]\nshutdown_grace_ms = 10000\n").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let size = 32 * 1024 * 1024;
    s.write_all(
        format!(
            "GET http://{0}/bytes/{size} HTTP/1.1\r\nHost: {0}\r\n\r\n",
            origin.addr
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    // Read a little, then ask the process to stop.
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).await.expect("read");
    assert!(n > 0);
    signal(&p, "-TERM");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ready = match TcpStream::connect(p.admin).await {
        Ok(_) => {
            support::raw_http(
                p.admin,
                "GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await
            .0
        }
        Err(_) => 0,
    };
    assert!(
        ready == 503 || ready == 0,
        "readyz must go unready while draining, got {ready}"
    );
    // New connections are no longer accepted.
    match TcpStream::connect(p.proxy).await {
        Err(_) => {}
        Ok(mut c) => {
            let _ = c.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            let mut b = Vec::new();
            let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut b)).await;
            assert!(
                !b.starts_with(b"HTTP/1.1 200"),
                "a new connection was served while draining"
            );
        }
    }
    // The download finishes, slowly read.
    let mut total = n;
    let mut tail = buf[..n].to_vec();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
        match tokio::time::timeout(WAIT, s.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(k)) => {
                total += k;
                tail.extend_from_slice(&buf[..k]);
                let keep = tail.len().saturating_sub(16);
                tail.drain(..keep);
                if tail.ends_with(b"\r\n0\r\n\r\n") {
                    break;
                }
            }
            _ => break,
        }
    }
    // Chunked: the payload plus chunk framing, ending with the last chunk.
    assert!(total >= size, "got {total} of {size}");
    assert!(
        tail.ends_with(b"\r\n0\r\n\r\n"),
        "the download did not complete"
    );
    drop(s);
    // The process exits once the download is done.
    let mut exited = false;
    for _ in 0..200 {
        if let Ok(Some(_)) = p.child.try_wait() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(exited, "chatwall did not exit after draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_reopens_the_access_log_for_logrotate() {
    let origin = HttpOrigin::start().await;
    let logs = tempfile::tempdir().expect("tempdir");
    let log = logs.path().join("access.log");
    let p = spawn_process(&format!(
        "[log]\naccess = {:?}\nformat = \"squid\"\nlevel = \"warn\"\n",
        log.display().to_string()
    ))
    .await;
    assert_eq!(ordinary_get(p.proxy, origin.addr).await, 200);
    // logrotate: move the file away, then signal.
    let rotated = logs.path().join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rename");
    signal(&p, "-USR1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ordinary_get(p.proxy, origin.addr).await, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let old = std::fs::read_to_string(&rotated).expect("rotated log");
    let new = std::fs::read_to_string(&log).expect("a new log file after SIGUSR1");
    assert_eq!(old.lines().count(), 1, "{old}");
    assert_eq!(new.lines().count(), 1, "{new}");
    assert!(new.contains("TCP_MISS/200"), "{new}");
}
