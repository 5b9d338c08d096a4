//! `loadgen`: the tunnel side of chatwall's load benchmark (`bench/run.sh`),
//! and the small origins it talks to. Loopback only: every address given
//! must be a loopback address, or the tool refuses to start.
//!
//! ```text
//! cargo run --release --example loadgen -- <subcommand> [options]
//! ```
//!
//! Origins (run them pinned to the load core; each stops by itself after
//! `--max-secs` or `--max-conns`):
//!
//! - `serve-flight --listen ADDR --bytes 3000 [--hold]`: per connection,
//!   read the client's first TLS record (the ClientHello), answer `--bytes`
//!   bytes shaped as one TLS handshake record (a server's first flight),
//!   then close; with `--hold`, keep the connection open until the client
//!   closes it (the origin of idle tunnels).
//! - `serve-bulk --listen ADDR`: per connection, read the ClientHello, then
//!   one 14-byte request record (application-data record header, the byte
//!   count as a big-endian u64, the direction: 0 down, 1 up). Down: send the
//!   bytes as 16 KiB TLS-sized records (one 16,389-byte write each), then
//!   close. Up: read that many bytes, answer the count received (8 bytes),
//!   close (no half-close: Squid ends a tunnel when either side does).
//!
//! Loads (through `--proxy ADDR` with `CONNECT`, or straight to the origin
//! without it). A chatwall in front must let CONNECT reach the origins'
//! ports (`[access] connect_ports`, 443 only by default; the benchmark's
//! `bench/chatwall-bench.toml` opens every port). Each prints one line of
//! `key=value` pairs on stdout:
//!
//! - `setup --target ADDR --concurrency 32 --secs 10`: new tunnels in a
//!   closed loop: connect, `CONNECT`, read the `200`, send a real TLS 1.3
//!   ClientHello with SNI (made by a rustls `ClientConnection`, ALPN h2 and
//!   http/1.1), read the server flight until the server closes. Reports
//!   tunnels/s, latency percentiles and errors, after a short warm-up.
//! - `bulk --target ADDR --bytes N [--direction down|up]`: one tunnel, a
//!   ClientHello, then N bytes in 16 KiB records one way. Reports GB/s
//!   (10^9 bytes of record payload per second).
//! - `idle --target ADDR --count 9000`: open that many tunnels (hello and
//!   server flight exchanged), keep them all open and silent, read the
//!   proxy's resident memory, close them. Reports KiB per tunnel. For
//!   more tunnels than one address pair has ephemeral ports (about 28,000
//!   on Linux), `--also-target ADDR` (repeatable) spreads them over more
//!   origins and `--source-ips N` over source addresses 127.0.0.1 to
//!   127.0.0.N; `--reset-at-end` closes them with a reset, leaving no
//!   TIME_WAIT to hold ports for the next run.
//!
//! With `--cpu-pid PID` (repeatable) `setup` and `bulk` also report the CPU
//! time (utime + stime from `/proc/PID/stat`, summed over the PIDs) that
//! those processes used during the measured window, per tunnel or per GB;
//! `idle` reads `VmRSS` of `/proc/PID/status` of its `--rss-pid`s before and
//! after opening the tunnels.
//!
//! The reference relay (run it pinned to the proxy core, like a proxy):
//!
//! - `bare-relay --listen ADDR`: what a proxy that only relays costs on
//!   this machine; a reference, not a product. Per connection: read one
//!   request head, connect to the loopback address it names (the `CONNECT`
//!   authority, or the absolute-form target's host:port), answer `CONNECT`
//!   with 200 or pass the head on as read, then copy bytes both ways
//!   (`tokio::io::copy_bidirectional`) until both sides close. No policy,
//!   no inspection, no header rewriting; every later request on the
//!   connection goes to the same origin. One thread, like chatwall pinned
//!   to one core.
//!
//! Admin timings of chatwall:
//!
//! - `startup --admin ADDR --runs 10 -- CMD ARGS...`: start CMD, poll
//!   `GET /readyz` on ADDR every millisecond until it answers 200, kill CMD;
//!   reports the median, min and max time from exec to ready.
//! - `reload --admin ADDR --runs 10`: time `POST /-/reload` round trips.
//!
//! Every loop is bounded in count and in time; a stalled exchange fails
//! after `--timeout-secs`.
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Payload bytes of one TLS-sized record (RFC 8446 §5.1: at most 2^14).
const RECORD: usize = 16 * 1024;
/// A TLS record header: type, legacy version, length.
const RECORD_HEADER: usize = 5;
/// Bulk request: a record header and 9 bytes of body.
const BULK_REQUEST: usize = RECORD_HEADER + 9;
/// Largest CONNECT response head accepted.
const MAX_HEAD: usize = 8 * 1024;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "chatwall's tunnel load generator and origins (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Direction {
    /// Origin to client (a download).
    Down,
    /// Client to origin (an upload).
    Up,
}

#[derive(clap::Args, Clone)]
struct Via {
    /// The proxy to CONNECT through; without it, straight to the target.
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// The origin (host:port), also the CONNECT authority.
    #[arg(long)]
    target: SocketAddr,
    /// SNI of the ClientHello.
    #[arg(long, default_value = "www.example.org")]
    sni: String,
    /// Bound on one tunnel's exchange.
    #[arg(long, default_value_t = 10.0)]
    timeout_secs: f64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Origin: read a ClientHello, answer a server flight, close (or hold).
    ServeFlight {
        #[arg(long)]
        listen: SocketAddr,
        /// Bytes of the answer (one TLS handshake record on the wire).
        #[arg(long, default_value_t = 3000)]
        bytes: usize,
        /// Keep each connection open until the client closes it.
        #[arg(long)]
        hold: bool,
        /// Stop after this long.
        #[arg(long, default_value_t = 3600.0)]
        max_secs: f64,
        /// Stop after accepting this many connections.
        #[arg(long, default_value_t = 50_000_000)]
        max_conns: u64,
    },
    /// Origin: bulk records one way after a ClientHello and a request.
    ServeBulk {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 3600.0)]
        max_secs: f64,
        #[arg(long, default_value_t = 1_000_000)]
        max_conns: u64,
        /// Largest count a client may ask for.
        #[arg(long, default_value_t = 64 << 30)]
        max_bytes: u64,
    },
    /// Reference: a bare relay with no policy and no inspection.
    BareRelay {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 3600.0)]
        max_secs: f64,
        #[arg(long, default_value_t = 50_000_000)]
        max_conns: u64,
    },
    /// New tunnels in a closed loop: CONNECT, ClientHello, server flight, close.
    Setup {
        #[command(flatten)]
        via: Via,
        /// Tunnels in flight at once.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Measured duration.
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Unmeasured warm-up before it.
        #[arg(long, default_value_t = 0.5)]
        warmup_secs: f64,
        /// Bytes the origin answers (the run fails on fewer).
        #[arg(long, default_value_t = 3000)]
        flight: usize,
        /// Stop after this many tunnels in all.
        #[arg(long, default_value_t = 10_000_000)]
        max_tunnels: u64,
        #[command(flatten)]
        cpu: Cpu,
    },
    /// One tunnel, N bytes of 16 KiB records one way.
    Bulk {
        #[command(flatten)]
        via: Via,
        /// Record payload bytes to move.
        #[arg(long, default_value_t = 2 << 30)]
        bytes: u64,
        #[arg(long, value_enum, default_value_t = Direction::Down)]
        direction: Direction,
        #[command(flatten)]
        cpu: Cpu,
    },
    /// Hold many idle tunnels open and read the proxy's memory.
    Idle {
        #[command(flatten)]
        via: Via,
        /// Tunnels to open and hold.
        #[arg(long, default_value_t = 9000)]
        count: usize,
        /// Tunnels being opened at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Bytes of the origin's flight on each tunnel.
        #[arg(long, default_value_t = 3000)]
        flight: usize,
        /// Wait after the last tunnel is open before reading memory.
        #[arg(long, default_value_t = 1.0)]
        settle_secs: f64,
        /// Processes whose VmRSS is summed (repeatable).
        #[arg(long = "rss-pid")]
        rss_pids: Vec<u32>,
        /// Bound on the whole run.
        #[arg(long, default_value_t = 180.0)]
        max_secs: f64,
        /// More origins (repeatable): the tunnels go to `--target` and
        /// these in turn, so that no origin address takes more
        /// connections than the loopback's ephemeral ports allow.
        #[arg(long = "also-target")]
        also_targets: Vec<SocketAddr>,
        /// Connect from 127.0.0.1 up to 127.0.0.N in turn (each source
        /// address has its own ephemeral ports); 0: let the system pick.
        #[arg(long, default_value_t = 0)]
        source_ips: u8,
        /// Close the held tunnels with a reset (no TIME_WAIT left on
        /// either side to hold ports for the next run).
        #[arg(long)]
        reset_at_end: bool,
    },
    /// Time from exec to `GET /readyz` 200, killing CMD after each run.
    Startup {
        #[arg(long)]
        admin: SocketAddr,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        /// Bound on one start.
        #[arg(long, default_value_t = 10.0)]
        timeout_secs: f64,
        /// The command to start.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Time `POST /-/reload` on a running chatwall.
    Reload {
        #[arg(long)]
        admin: SocketAddr,
        #[arg(long, default_value_t = 10)]
        runs: usize,
        #[arg(long, default_value_t = 10.0)]
        timeout_secs: f64,
    },
}

/// Whose CPU time to read over the measured window.
#[derive(clap::Args, Clone)]
struct Cpu {
    /// Processes whose utime+stime are summed (repeatable).
    #[arg(long = "cpu-pid")]
    pids: Vec<u32>,
    /// Clock ticks per second of /proc/PID/stat (`getconf CLK_TCK`).
    #[arg(long, default_value_t = 100)]
    clk_tck: u64,
}

impl Cpu {
    /// CPU seconds used so far, or None without PIDs.
    fn now(&self) -> io::Result<Option<f64>> {
        if self.pids.is_empty() {
            return Ok(None);
        }
        let mut ticks = 0;
        for &pid in &self.pids {
            ticks += cpu_ticks(pid)?;
        }
        Ok(Some(ticks as f64 / self.clk_tck.max(1) as f64))
    }
}

/// utime + stime of a process (all its threads, live and ended), in ticks.
fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime field 14, stime field 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("bad /proc stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> io::Result<u64> {
        f.get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other("bad /proc stat field"))
    };
    Ok(num(11)? + num(12)?)
}

/// VmRSS of a process in KiB.
fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no VmRSS for pid {pid}")))
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.0, 86_400.0))
}

/// Loopback only: the benchmark never sends traffic anywhere else.
fn loopback(addrs: &[SocketAddr]) -> io::Result<()> {
    match addrs.iter().find(|a| !a.ip().is_loopback()) {
        Some(a) => Err(io::Error::other(format!(
            "{a} is not a loopback address; loadgen only talks to loopback"
        ))),
        None => Ok(()),
    }
}

/// The reference relay: accept until the time or count bound.
async fn bare_relay(listen: SocketAddr, max_secs: f64, max_conns: u64) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let deadline = tokio::time::Instant::now() + secs(max_secs);
    for _ in 0..max_conns {
        let (client, _) = match tokio::time::timeout_at(deadline, listener.accept()).await {
            Err(_) => break,
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                eprintln!("bare-relay: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(e) = relay_one(client).await {
                if e.kind() != io::ErrorKind::ConnectionReset {
                    eprintln!("bare-relay: {e}");
                }
            }
        });
    }
    Ok(())
}

/// One connection of the reference relay.
async fn relay_one(mut client: TcpStream) -> io::Result<()> {
    client.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() >= MAX_HEAD || client.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    };
    let line = String::from_utf8_lossy(&buf[..buf.iter().position(|&b| b == b'\r').unwrap_or(0)])
        .into_owned();
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let connect = method == "CONNECT";
    let authority = if connect {
        target
    } else {
        let rest = target.strip_prefix("http://").unwrap_or(target);
        rest.split('/').next().unwrap_or(rest)
    };
    let addr: SocketAddr = authority
        .parse()
        .or_else(|_| format!("{authority}:80").parse())
        .map_err(|_| io::Error::other(format!("not an address: {authority}")))?;
    loopback(&[addr])?;
    let mut upstream = TcpStream::connect(addr).await?;
    upstream.set_nodelay(true)?;
    if connect {
        client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await?;
        upstream.write_all(&buf[head_len..]).await?;
    } else {
        upstream.write_all(&buf).await?;
    }
    drop(buf);
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// A real TLS 1.3 ClientHello with this SNI, as a rustls client writes it.
fn client_hello(sni: &str) -> io::Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(io::Error::other)?;
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(io::Error::other)?;
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out)
}

/// A TLS record header for `len` payload bytes of content type `ty`.
fn record_header(ty: u8, len: usize) -> [u8; RECORD_HEADER] {
    let l = (len as u16).to_be_bytes();
    [ty, 0x03, 0x03, l[0], l[1]]
}

/// Read one TLS record (the ClientHello) from a fresh connection; a client
/// that does not start with a handshake record gets its first read eaten.
async fn read_hello(s: &mut TcpStream) -> io::Result<()> {
    let mut head = [0u8; RECORD_HEADER];
    s.read_exact(&mut head).await?;
    if head[0] == 0x16 {
        let len = u16::from_be_bytes([head[3], head[4]]) as usize;
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await?;
    }
    Ok(())
}

/// Open a tunnel to `via.target`: through the proxy with CONNECT (the
/// `200` head read and dropped), or straight to the target.
async fn open(via: &Via) -> io::Result<TcpStream> {
    open_to(via, via.target, None).await
}

/// Connect from `source` (any port), or from wherever the system picks.
async fn connect_from(to: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(ip) = source else {
        return TcpStream::connect(to).await;
    };
    let sock = match ip {
        IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.bind(SocketAddr::new(ip, 0))?;
    sock.connect(to).await
}

/// Open a tunnel to `target` (through `via.proxy` with CONNECT, or
/// straight), from `source` if given.
async fn open_to(via: &Via, target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(proxy) = via.proxy else {
        let s = connect_from(target, source).await?;
        s.set_nodelay(true)?;
        return Ok(s);
    };
    let mut s = connect_from(proxy, source).await?;
    s.set_nodelay(true)?;
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    // The origin speaks only after the hello, so nothing follows the head.
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "proxy closed before answering CONNECT",
            ));
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let line = String::from_utf8_lossy(&head[..end]);
            let status = line.split_whitespace().nth(1).unwrap_or("");
            if status != "200" {
                let first = line.lines().next().unwrap_or("").to_string();
                return Err(io::Error::other(format!("CONNECT refused: {first}")));
            }
            if end + 4 != head.len() {
                return Err(io::Error::other(
                    "bytes after the CONNECT response before the hello",
                ));
            }
            return Ok(s);
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::other("CONNECT response head too long"));
        }
    }
}

/// Read until the peer closes; returns the byte count.
async fn drain(s: &mut TcpStream, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        let n = s.read(buf).await?;
        if n == 0 {
            return Ok(total);
        }
        total += n as u64;
    }
}

/// One short tunnel: open, hello, read the flight until the server closes.
async fn one_tunnel(via: &Via, hello: &[u8], flight: usize) -> io::Result<()> {
    let mut s = open(via).await?;
    s.write_all(hello).await?;
    let mut buf = [0u8; 4096];
    let got = drain(&mut s, &mut buf).await?;
    if got < flight as u64 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("flight cut short: {got} of {flight} bytes"),
        ));
    }
    Ok(())
}

/// One tunnel held open: open, hello, read the whole flight, keep it.
async fn idle_tunnel(
    via: &Via,
    target: SocketAddr,
    source: Option<IpAddr>,
    hello: &[u8],
    flight: usize,
) -> io::Result<TcpStream> {
    let mut s = open_to(via, target, source).await?;
    s.write_all(hello).await?;
    let mut buf = vec![0u8; flight.max(1)];
    s.read_exact(&mut buf[..flight]).await?;
    Ok(s)
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

async fn serve_flight(
    listen: SocketAddr,
    bytes: usize,
    hold: bool,
    max_secs: f64,
    max_conns: u64,
) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let payload = bytes.saturating_sub(RECORD_HEADER).min(u16::MAX as usize);
    let mut flight = record_header(0x16, payload).to_vec();
    flight.resize(RECORD_HEADER + payload, 0x42);
    let flight: Arc<[u8]> = flight.into();
    let stop = tokio::time::Instant::now() + secs(max_secs);
    let mut accepted = 0u64;
    while accepted < max_conns {
        let (mut s, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("serve-flight: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = tokio::time::sleep_until(stop) => break,
        };
        accepted += 1;
        let flight = Arc::clone(&flight);
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let exchange = async {
                read_hello(&mut s).await?;
                s.write_all(&flight).await?;
                if hold {
                    let mut buf = [0u8; 512];
                    drain(&mut s, &mut buf).await?;
                }
                io::Result::Ok(())
            };
            let limit = if hold {
                stop
            } else {
                tokio::time::Instant::now() + Duration::from_secs(30)
            };
            let _ = tokio::time::timeout_at(limit, exchange).await;
        });
    }
    Ok(())
}

async fn serve_bulk(
    listen: SocketAddr,
    max_secs: f64,
    max_conns: u64,
    max_bytes: u64,
) -> io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let stop = tokio::time::Instant::now() + secs(max_secs);
    let mut accepted = 0u64;
    while accepted < max_conns {
        let (mut s, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("serve-bulk: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = tokio::time::sleep_until(stop) => break,
        };
        accepted += 1;
        tokio::spawn(async move {
            let _ = s.set_nodelay(true);
            let exchange = async {
                read_hello(&mut s).await?;
                let mut req = [0u8; BULK_REQUEST];
                s.read_exact(&mut req).await?;
                let mut n = [0u8; 8];
                n.copy_from_slice(&req[RECORD_HEADER..RECORD_HEADER + 8]);
                let n = u64::from_be_bytes(n).min(max_bytes);
                if req[BULK_REQUEST - 1] == 0 {
                    send_records(&mut s, n).await?;
                    s.shutdown().await?;
                } else {
                    // No half-close: Squid ends a tunnel when either side
                    // does, so the count is read, not waited for as EOF.
                    let got = read_count(&mut s, wire_bytes(n)).await?;
                    s.write_all(&got.to_be_bytes()).await?;
                    s.shutdown().await?;
                }
                io::Result::Ok(())
            };
            if let Err(e) = tokio::time::timeout_at(stop, exchange)
                .await
                .unwrap_or(Ok(()))
            {
                eprintln!("serve-bulk: {e}");
            }
        });
    }
    Ok(())
}

/// Write `n` payload bytes as application-data records of at most 16 KiB,
/// one write per record.
async fn send_records(s: &mut TcpStream, n: u64) -> io::Result<()> {
    let mut rec = record_header(0x17, RECORD).to_vec();
    rec.resize(RECORD_HEADER + RECORD, 0x5a);
    let full = n / RECORD as u64;
    for _ in 0..full {
        s.write_all(&rec).await?;
    }
    let rest = (n % RECORD as u64) as usize;
    if rest > 0 {
        rec[..RECORD_HEADER].copy_from_slice(&record_header(0x17, rest));
        s.write_all(&rec[..RECORD_HEADER + rest]).await?;
    }
    Ok(())
}

/// Read `n` bytes (or up to EOF) and drop them; returns the count read.
async fn read_count(s: &mut TcpStream, n: u64) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < n {
        let want = (n - got).min(buf.len() as u64) as usize;
        let r = s.read(&mut buf[..want]).await?;
        if r == 0 {
            break;
        }
        got += r as u64;
    }
    Ok(got)
}

/// Record bytes on the wire for `n` payload bytes.
fn wire_bytes(n: u64) -> u64 {
    n + RECORD_HEADER as u64 * n.div_ceil(RECORD as u64)
}

#[allow(clippy::too_many_arguments)]
async fn setup(
    via: Via,
    concurrency: usize,
    secs_measured: f64,
    warmup: f64,
    flight: usize,
    max_tunnels: u64,
    cpu: Cpu,
) -> io::Result<()> {
    let hello: Arc<[u8]> = client_hello(&via.sni)?.into();
    let start = Instant::now();
    let measure_from = start + secs(warmup);
    let end = measure_from + secs(secs_measured);
    let per_worker = max_tunnels / concurrency.max(1) as u64 + 1;
    let timeout = secs(via.timeout_secs);
    let via = Arc::new(via);
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let via = Arc::clone(&via);
        let hello = Arc::clone(&hello);
        workers.spawn(async move {
            // (latencies of measured tunnels in µs, errors in the window, first error)
            let mut lat: Vec<u32> = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            let mut done = 0u64;
            while done < per_worker && Instant::now() < end {
                let t0 = Instant::now();
                let r = tokio::time::timeout(timeout, one_tunnel(&via, &hello, flight)).await;
                let t1 = Instant::now();
                done += 1;
                let r = r.unwrap_or_else(|_| {
                    Err(io::Error::new(io::ErrorKind::TimedOut, "tunnel timed out"))
                });
                let measured = t1 >= measure_from && t1 < end;
                match r {
                    Ok(()) if measured => {
                        lat.push((t1 - t0).as_micros().min(u32::MAX as u128) as u32)
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if measured {
                            errors += 1;
                        }
                        first_error.get_or_insert_with(|| e.to_string());
                        // No hot loop on a refusing proxy.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
            (lat, errors, first_error)
        });
    }
    // CPU at the window's edges, from a task of its own.
    let cpu_task = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let a = cpu.now()?;
        tokio::time::sleep_until(end.into()).await;
        let b = cpu.now()?;
        io::Result::Ok(a.zip(b).map(|(a, b)| b - a))
    });
    let mut lat = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(r) = workers.join_next().await {
        let (l, e, f) = r.map_err(io::Error::other)?;
        lat.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let cpu_s = cpu_task.await.map_err(io::Error::other)??;
    lat.sort_unstable();
    let n = lat.len() as u64;
    let rate = n as f64 / secs_measured.max(1e-9);
    let cpu_us = cpu_s.filter(|_| n > 0).map(|c| c * 1e6 / n as f64);
    println!(
        "tunnels={n} secs={secs_measured:.2} rate={rate:.1} p50_us={} p90_us={} p99_us={} max_us={} errors={errors} cpu_s={} cpu_us_per_tunnel={}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.90),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or(0),
        fmt_opt(cpu_s, 3),
        fmt_opt(cpu_us, 1),
    );
    if let Some(e) = first_error {
        eprintln!("setup: first error: {e}");
    }
    if n == 0 {
        return Err(io::Error::other(
            "no tunnel completed in the measured window",
        ));
    }
    Ok(())
}

async fn bulk(via: Via, bytes: u64, direction: Direction, cpu: Cpu) -> io::Result<()> {
    let hello = client_hello(&via.sni)?;
    // A generous bound: 2 GiB at 50 MB/s.
    let limit = secs(via.timeout_secs) + Duration::from_secs_f64(bytes as f64 / 50e6);
    let run = async {
        let mut s = open(&via).await?;
        s.write_all(&hello).await?;
        let mut req = record_header(0x17, 9).to_vec();
        req.extend_from_slice(&bytes.to_be_bytes());
        req.push(u8::from(direction == Direction::Up));
        let c0 = cpu.now()?;
        let t0 = Instant::now();
        s.write_all(&req).await?;
        let moved = match direction {
            Direction::Down => {
                let mut buf = vec![0u8; 256 * 1024];
                drain(&mut s, &mut buf).await?
            }
            Direction::Up => {
                send_records(&mut s, bytes).await?;
                let mut got = [0u8; 8];
                s.read_exact(&mut got).await?;
                u64::from_be_bytes(got)
            }
        };
        let dt = t0.elapsed().as_secs_f64();
        let c1 = cpu.now()?;
        io::Result::Ok((moved, dt, c0.zip(c1).map(|(a, b)| b - a)))
    };
    let (moved, dt, cpu_s) = tokio::time::timeout(limit, run)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "bulk transfer timed out"))??;
    if moved != wire_bytes(bytes) {
        return Err(io::Error::other(format!(
            "moved {moved} bytes, expected {}",
            wire_bytes(bytes)
        )));
    }
    let gb = bytes as f64 / 1e9;
    println!(
        "bytes={bytes} direction={} secs={dt:.3} gbps={:.3} cpu_s={} cpu_s_per_gb={}",
        if direction == Direction::Up {
            "up"
        } else {
            "down"
        },
        gb / dt.max(1e-9),
        fmt_opt(cpu_s, 3),
        fmt_opt(cpu_s.map(|c| c / gb), 3),
    );
    Ok(())
}

/// What `idle` does besides its counts.
struct IdleSpread {
    also_targets: Vec<SocketAddr>,
    source_ips: u8,
    reset_at_end: bool,
}

#[allow(clippy::too_many_arguments)]
async fn idle(
    via: Via,
    count: usize,
    concurrency: usize,
    flight: usize,
    settle: f64,
    rss_pids: Vec<u32>,
    max_secs: f64,
    spread: IdleSpread,
) -> io::Result<()> {
    let mut targets = vec![via.target];
    targets.extend(&spread.also_targets);
    let hello: Arc<[u8]> = client_hello(&via.sni)?.into();
    let rss = |pids: &[u32]| -> io::Result<u64> { pids.iter().map(|&p| rss_kib(p)).sum() };
    let before = rss(&rss_pids)?;
    let deadline = tokio::time::Instant::now() + secs(max_secs);
    let timeout = secs(via.timeout_secs);
    let via = Arc::new(via);
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for i in 0..count {
        let permit = Arc::clone(&sem)
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (via, hello) = (Arc::clone(&via), Arc::clone(&hello));
        let target = targets[i % targets.len()];
        let source = (spread.source_ips > 0).then(|| {
            IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                1 + (i % spread.source_ips as usize) as u8,
            ))
        });
        set.spawn(async move {
            let r =
                tokio::time::timeout(timeout, idle_tunnel(&via, target, source, &hello, flight))
                    .await;
            drop(permit);
            r.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "tunnel timed out")))
        });
        if tokio::time::Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle: deadline passed while opening",
            ));
        }
    }
    let mut held = Vec::with_capacity(count);
    let mut errors = 0usize;
    let mut first_error = None;
    while let Some(r) = tokio::time::timeout_at(deadline, set.join_next())
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "idle: deadline passed while opening",
            )
        })?
    {
        match r.map_err(io::Error::other)? {
            Ok(s) => held.push(s),
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(secs(settle)).await;
    let after = rss(&rss_pids)?;
    let n = held.len();
    let per = (after as f64 - before as f64) / n.max(1) as f64;
    println!(
        "tunnels={n} errors={errors} open_secs={open_secs:.2} rss_before_kib={before} rss_after_kib={after} delta_kib={} kib_per_tunnel={per:.2}",
        after as i64 - before as i64
    );
    if let Some(e) = first_error {
        eprintln!("idle: first error: {e}");
    }
    if spread.reset_at_end {
        for s in &held {
            let _ = s.set_zero_linger();
        }
    }
    drop(held);
    if n == 0 {
        return Err(io::Error::other("no tunnel could be opened"));
    }
    Ok(())
}

/// One HTTP/1.1 exchange with `Connection: close`; returns the status code.
async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> io::Result<u16> {
    let mut s = TcpStream::connect(admin).await?;
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 || resp.len() > 1 << 20 {
            break;
        }
        resp.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&resp);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other("no HTTP status in the admin answer"))
}

fn summary_ms(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    let med = if ms.is_empty() {
        0.0
    } else if ms.len() % 2 == 1 {
        ms[ms.len() / 2]
    } else {
        (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
    };
    format!(
        "runs={} median_ms={med:.2} min_ms={:.2} max_ms={:.2}",
        ms.len(),
        ms.first().copied().unwrap_or(0.0),
        ms.last().copied().unwrap_or(0.0)
    )
}

async fn startup(admin: SocketAddr, runs: usize, timeout: f64, cmd: Vec<String>) -> io::Result<()> {
    let (prog, args) = cmd
        .split_first()
        .ok_or_else(|| io::Error::other("no command"))?;
    if admin_request(admin, "GET", "/readyz").await.is_ok() {
        return Err(io::Error::other(format!(
            "something already answers on {admin}"
        )));
    }
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let mut child = tokio::process::Command::new(prog)
            .args(args)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let ready = loop {
            if let Ok(200) = admin_request(admin, "GET", "/readyz").await {
                break Some(t0.elapsed());
            }
            if t0.elapsed() > secs(timeout) {
                break None;
            }
            if let Some(status) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{prog} exited with {status} before it was ready"
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        child.kill().await?;
        let ready =
            ready.ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "not ready in time"))?;
        ms.push(ready.as_secs_f64() * 1e3);
    }
    println!("{}", summary_ms(ms));
    Ok(())
}

async fn reload(admin: SocketAddr, runs: usize, timeout: f64) -> io::Result<()> {
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t0 = Instant::now();
        let status = tokio::time::timeout(secs(timeout), admin_request(admin, "POST", "/-/reload"))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "reload timed out"))??;
        if status != 200 {
            return Err(io::Error::other(format!("reload answered {status}")));
        }
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    println!("{}", summary_ms(ms));
    Ok(())
}

fn via_addrs(via: &Via) -> Vec<SocketAddr> {
    let mut v = vec![via.target];
    v.extend(via.proxy);
    v
}

async fn dispatch(cmd: Cmd) -> io::Result<()> {
    match cmd {
        Cmd::ServeFlight {
            listen,
            bytes,
            hold,
            max_secs,
            max_conns,
        } => {
            loopback(&[listen])?;
            serve_flight(listen, bytes, hold, max_secs, max_conns).await
        }
        Cmd::ServeBulk {
            listen,
            max_secs,
            max_conns,
            max_bytes,
        } => {
            loopback(&[listen])?;
            serve_bulk(listen, max_secs, max_conns, max_bytes).await
        }
        Cmd::BareRelay {
            listen,
            max_secs,
            max_conns,
        } => {
            loopback(&[listen])?;
            bare_relay(listen, max_secs, max_conns).await
        }
        Cmd::Setup {
            via,
            concurrency,
            secs,
            warmup_secs,
            flight,
            max_tunnels,
            cpu,
        } => {
            loopback(&via_addrs(&via))?;
            setup(
                via,
                concurrency,
                secs,
                warmup_secs,
                flight,
                max_tunnels,
                cpu,
            )
            .await
        }
        Cmd::Bulk {
            via,
            bytes,
            direction,
            cpu,
        } => {
            loopback(&via_addrs(&via))?;
            bulk(via, bytes, direction, cpu).await
        }
        Cmd::Idle {
            via,
            count,
            concurrency,
            flight,
            settle_secs,
            rss_pids,
            max_secs,
            also_targets,
            source_ips,
            reset_at_end,
        } => {
            loopback(&via_addrs(&via))?;
            loopback(&also_targets)?;
            idle(
                via,
                count,
                concurrency,
                flight,
                settle_secs,
                rss_pids,
                max_secs,
                IdleSpread {
                    also_targets,
                    source_ips,
                    reset_at_end,
                },
            )
            .await
        }
        Cmd::Startup {
            admin,
            runs,
            timeout_secs,
            cmd,
        } => {
            loopback(&[admin])?;
            startup(admin, runs, timeout_secs, cmd).await
        }
        Cmd::Reload {
            admin,
            runs,
            timeout_secs,
        } => {
            loopback(&[admin])?;
            reload(admin, runs, timeout_secs).await
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(dispatch(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
