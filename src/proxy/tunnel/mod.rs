//! Tunnels: CONNECT on the explicit listener and every redirected stream of
//! the transparent listeners. The destination alone is decided first (name,
//! address, port); then the client's first bytes are read into a bounded
//! buffer under a deadline and decided (`decide::FirstBytes`) before a
//! single byte reaches the upstream:
//!
//! - a TLS ClientHello (reassembled across reads and records): SNI against
//!   the host rules, ALPN, JA4, ECH;
//! - HTTP/1.x: followed and decided request by request as the bytes pass
//!   (`tunnel::http1`), on the same upstream connection;
//! - anything else: payload signatures; on port 443 `non_tls_on_443` and on
//!   port 80 `non_http_on_80` apply.
//!
//! Whatever passes is relayed byte for byte over one upstream connection:
//! a tunnel is never re-encoded.
//!
//! A client that says nothing is not a reason to fail open, nor to fail
//! closed: server-speaks-first protocols (SMTP, IRC banners) must work. The
//! upstream's bytes flow to the client (inspected against server-side
//! signatures) while the client's first bytes stay under inspection whenever
//! they come. Only where the protocol is known to speak first — a tunnel to
//! port 443 under `non_tls_on_443 = block` — does silence past the deadline
//! refuse the flow.
mod http1;
mod intercept;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::conn::ConnCtx;
use super::prefixed::Prefixed;
use super::refuse::{empty, FlowError, ProxyBody};
use super::relay::{self, End, Inspector, RelayCtx};
use super::Shared;
use super::{parent, upstream};
use crate::access_log::Record;
use crate::classify::host::normalize_host;
use crate::classify::payload::Direction;
use crate::classify::server_hello::{inspect_server_flight, ServerFlight, MAX_SERVER_FLIGHT};
use crate::classify::Detection;
use crate::decide::{self, Cue, Findings, First, FirstBytes, Refusal};
use crate::engine::Engine;
use crate::metrics::ListenerKind;
use crate::policy::Verdict;

/// The upstream of a tunnel: connected already (CONNECT, so that a failure
/// is a 502; generic redirected ports, so a server that speaks first is
/// heard), or connected once the first bytes are decided.
pub enum Upstream<U = TcpStream> {
    Connected(U),
    Lazy(SocketAddr),
}

/// One tunnel being set up.
pub struct Flow {
    pub ctx: ConnCtx,
    pub dst: SocketAddr,
    /// The name the client asked for (CONNECT authority), if any.
    pub host: Option<String>,
    pub allowlisted: bool,
    /// What the destination and the first bytes found (monitor verdicts).
    pub findings: Findings,
    /// Redirected port-80 traffic to a refused address: HTTP gets the 403
    /// page request by request; anything else is reset.
    pub addr_block: Option<Detection>,
    /// The ClientHello named no server: the server's certificate names
    /// are checked, where TLS 1.2 and older show them in clear.
    pub check_cert: bool,
    /// The upstream socket, registered while transparent listeners exist
    /// (a redirect loop is recognised by it).
    pub own: Option<upstream::OwnSocket>,
    /// What TLS inspection needs of the ClientHello (only with
    /// `[tls_inspect]` on and a server name in the hello).
    pub tls: Option<Box<intercept::TlsFlow>>,
    pub rec: Record,
}

/// `CONNECT host:port` through the HTTP server: decide the destination,
/// connect, answer 200, then inspect the tunnel once hyper hands the
/// connection over. (A CONNECT that is a connection's first request is
/// usually taken by `connect::serve` before the HTTP server sees it.)
pub async fn connect(
    shared: &Arc<Shared>,
    engine: &Arc<Engine>,
    ctx: ConnCtx,
    mut req: Request<Incoming>,
    rec: &mut Record,
) -> Result<Response<ProxyBody>, FlowError> {
    let auth = req
        .uri()
        .authority()
        .cloned()
        .ok_or(FlowError::BadRequest("CONNECT needs host:port"))?;
    let (up, flow) = open(shared, engine, ctx, &auth, rec).await?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    let shared = Arc::clone(shared);
    let engine = Arc::clone(engine);
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        // The explicit listener serves hyper a bare stream, or the stream
        // behind the bytes `connect::serve` already read.
        let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => Some((parts.io.into_inner(), parts.read_buf)),
            Err(upgraded) => match upgraded.downcast::<TokioIo<Prefixed<TcpStream>>>() {
                Ok(parts) => {
                    let (unread, stream) = parts.io.into_inner().into_parts();
                    let initial = if unread.is_empty() {
                        parts.read_buf
                    } else {
                        let mut b = BytesMut::from(&parts.read_buf[..]);
                        b.extend_from_slice(&unread);
                        b.freeze()
                    };
                    Some((stream, initial))
                }
                Err(_) => None,
            },
        };
        match upgraded {
            Some((client, initial)) => {
                run(
                    shared,
                    engine,
                    flow,
                    client,
                    initial,
                    Upstream::Connected(up),
                )
                .await;
            }
            None => tracing::error!("CONNECT upgrade is not a TCP stream"),
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::OK;
    Ok(resp)
}

/// Decide a CONNECT's destination (the name before any lookup, then every
/// address it resolves to) and connect to it. The flow that comes back is
/// ready for `run` once the client has its 200.
pub async fn open(
    shared: &Arc<Shared>,
    engine: &Arc<Engine>,
    ctx: ConnCtx,
    auth: &http::uri::Authority,
    rec: &mut Record,
) -> Result<(TcpStream, Box<Flow>), FlowError> {
    let port = super::target::connect_port(auth)?;
    let raw_host = auth.host().trim_start_matches('[').trim_end_matches(']');
    let host = if raw_host.parse::<std::net::IpAddr>().is_ok() {
        raw_host.to_string()
    } else {
        normalize_host(raw_host).ok_or(FlowError::BadRequest("CONNECT to an invalid host name"))?
    };
    if !shared.access_log.is_off() {
        rec.host = Some(host.clone());
    }
    if !shared.access_log.is_off() {
        rec.target = format!("{}:{port}", auth.host());
    }

    let who = ctx.client.who();
    let mut findings = Findings::default();
    let allowlisted = decide::name(engine, &who, &host, port, &mut findings)?;
    // After the name's verdict (an IM name or port keeps its app), before DNS.
    super::target::check_connect_port(&engine.config.connect_ports, port)?;
    let literal = host.parse::<std::net::IpAddr>().is_ok();
    let (up, dst, own) = match parent::hop(engine, &shared.resolver, &host, port).await {
        parent::Hop::Parent(p) => {
            // The parent resolves names; an address the client named is
            // checked here as it would be without a parent.
            let dst = if literal {
                let addrs = upstream::resolve_checked(
                    shared,
                    engine,
                    &who,
                    &host,
                    port,
                    allowlisted,
                    &mut findings,
                )
                .await?;
                addrs.first().copied().unwrap_or(decide::unresolved(port))
            } else {
                decide::unresolved(port)
            };
            let authority = parent::authority(&host, port);
            let (up, own) = shared.connect_through(engine, p, &authority).await?;
            if !shared.access_log.is_off() {
                rec.upstream = Some(format!("{authority} via {}", p.authority));
            }
            (up, dst, own)
        }
        parent::Hop::Direct => {
            let addrs = upstream::resolve_checked(
                shared,
                engine,
                &who,
                &host,
                port,
                allowlisted,
                &mut findings,
            )
            .await?;
            shared.connect_tunnel_direct(engine, &addrs).await?
        }
    };
    rec.status = 200;
    let flow = Box::new(Flow {
        ctx,
        dst,
        host: Some(host),
        allowlisted,
        findings,
        addr_block: None,
        check_cert: false,
        own,
        tls: None,
        rec: std::mem::take(rec),
    });
    Ok((up, flow))
}

/// Whether a CONNECT refused on its name gets the 200 and then the page
/// over chatwall's certificate (`[tls_inspect] block_page`, a listed
/// client, a name on port 443 that no never list names).
pub fn page_for_connect(engine: &Engine, ctx: &ConnCtx, auth: &http::uri::Authority) -> bool {
    auth.port_u16() == Some(443)
        && auth.host().parse::<std::net::IpAddr>().is_err()
        && decide::block_page_over_tls(engine, &ctx.client.who(), auth.host())
}

/// A CONNECT refused on its name, already answered 200: the refusal page
/// over chatwall's certificate for the name (`page_for_connect`).
#[allow(clippy::too_many_arguments)]
pub async fn refuse_with_page(
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    ctx: ConnCtx,
    auth: &http::uri::Authority,
    rec: Record,
    client: TcpStream,
    read: BytesMut,
    d: Detection,
) {
    let host = normalize_host(auth.host()).unwrap_or_else(|| auth.host().to_string());
    let mut flow = Flow {
        ctx,
        dst: SocketAddr::from(([0, 0, 0, 0], 443)),
        host: Some(host.clone()),
        allowlisted: false,
        findings: Findings::default(),
        addr_block: None,
        check_cert: false,
        own: None,
        tls: Some(Box::new(intercept::TlsFlow {
            sni: host,
            // Whatever the browser offers, the page is HTTP/1.1.
            alpn: vec!["http/1.1".into()],
            decrypt: false,
            page: true,
            required: false,
            cover: Vec::new(),
        })),
        rec,
    };
    flow.rec.status = 200;
    intercept::page_over_tls(shared, engine, flow, client, read, FlowError::Blocked(d)).await;
}

/// Inspect and relay one tunnel; writes its access-log record at the end.
///
/// Not an `async fn`, nor are the functions of the relay stage: an async
/// fn's future keeps its arguments twice (as taken, and as the body's
/// bindings), and an idle tunnel's task is mostly this future. The flow
/// comes boxed: the relay stage keeps only what it needs of it (see
/// `Kept`).
// Written out: an async fn's future keeps its arguments twice.
#[allow(clippy::manual_async_fn)]
pub fn run(
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    mut flow: Box<Flow>,
    client: TcpStream,
    initial: Bytes,
    upstream: Upstream,
) -> impl std::future::Future<Output = ()> {
    async move {
        let started = Instant::now();
        let logged = !shared.access_log.is_off();
        let (result, buf) =
            first_bytes(&engine, &mut flow, &client, initial, &upstream, logged).await;
        shared
            .metrics
            .inspection_duration
            .observe(started.elapsed().as_secs_f64());
        let first = match result {
            Ok(x) => x,
            Err(FlowError::Blocked(d)) if flow.tls.as_ref().is_some_and(|t| t.page) => {
                // A listed client's browser gets a page it can show.
                if let Upstream::Connected(up) = &upstream {
                    relay::reset(up);
                }
                let page = FlowError::Blocked(d);
                Box::pin(intercept::page_over_tls(
                    shared, engine, *flow, client, buf, page,
                ))
                .await;
                return;
            }
            Err(e) => {
                refuse_tunnel(&shared, &engine, *flow, &client, &upstream, e);
                return;
            }
        };
        if first == First::Tls && flow.tls.as_ref().is_some_and(|t| t.required && !t.decrypt) {
            // Tenant restrictions apply to this flow and it cannot be
            // decrypted (HTTP/1.1 not offered, or the hello names another
            // server than the CONNECT): refused, never relayed without them.
            intercept::refuse_undecrypted(&shared, &engine, *flow, &client, &upstream);
            return;
        }
        if first == First::Tls && flow.tls.as_ref().is_some_and(|t| t.decrypt) {
            // Boxed: only decrypted flows carry the TLS sessions.
            Box::pin(intercept::run(shared, engine, *flow, client, buf, upstream)).await;
            return;
        }

        if let (Some(d), false) = (flow.addr_block, first == First::Http) {
            refuse_tunnel(
                &shared,
                &engine,
                *flow,
                &client,
                &upstream,
                FlowError::Blocked(d),
            );
            return;
        }

        if first == First::Http {
            // Boxed: its state (buffers, the request follower, the exchange)
            // exists only for tunnels that carry HTTP, not in every tunnel's
            // task.
            Box::pin(http1::run(shared, engine, *flow, client, buf, upstream)).await;
            return;
        }

        // Boxed: connecting (directly or through the parent) is over before
        // the relay, whose task an idle tunnel keeps.
        let Some(up) = Box::pin(upstream_now(&shared, &engine, &mut flow, &client, upstream)).await
        else {
            return;
        };
        relay_plain(&shared, &engine, flow, &client, &up, first, buf).await;
    }
}

/// The tunnel's upstream: connected already, or now. `None`: it could not
/// be reached; the client was reset and the flow logged.
async fn upstream_now(
    shared: &Shared,
    engine: &Engine,
    flow: &mut Flow,
    client: &TcpStream,
    upstream: Upstream,
) -> Option<TcpStream> {
    match upstream {
        Upstream::Connected(s) => Some(s),
        Upstream::Lazy(addr) => match shared.connect_tunnel_upstream(engine, &[addr]).await {
            Ok((s, _, own)) => {
                flow.own = own;
                Some(s)
            }
            Err(e) => {
                shared.metrics.upstream_error(e.kind());
                flow.rec.error = Some(e.to_string());
                let verdict = flow.findings.verdict();
                shared.record_verdict(flow.ctx.listener, engine, &verdict, &mut flow.rec);
                relay::reset(client);
                shared.access_log.write(std::mem::take(&mut flow.rec));
                None
            }
        },
    }
}

/// What a relayed tunnel keeps of its flow until it ends: the client's
/// context (its slot under the caps), the upstream socket's registration,
/// the monitor verdict found before the relay, and the access-log record
/// only when there is a log (else the one fact the metrics need of it).
/// The rest of the flow is freed before the relay starts.
struct Kept {
    ctx: ConnCtx,
    /// Held for what its drop does: the upstream socket leaves the set.
    _own: Option<upstream::OwnSocket>,
    monitor: Option<Verdict>,
    rec: Option<Box<Record>>,
    counted: bool,
}

impl Kept {
    fn new(shared: &Shared, flow: Box<Flow>) -> Kept {
        let Flow {
            ctx,
            dst,
            findings,
            own,
            mut rec,
            ..
        } = *flow;
        let logged = !shared.access_log.is_off();
        if logged && rec.upstream.is_none() {
            // Connected to dst: the CONNECT's checked address, or the
            // redirected stream's original destination (through the
            // parent, `open` says so).
            rec.upstream = Some(dst.to_string());
        }
        Kept {
            ctx,
            _own: own,
            monitor: findings.monitor,
            counted: rec.counted,
            rec: logged.then(|| Box::new(rec)),
        }
    }

    /// The record to finish and write: the flow's, or (no log) a blank one
    /// that counts as the flow's did.
    fn record(&mut self) -> Record {
        match self.rec.take() {
            Some(rec) => *rec,
            None => Record {
                counted: self.counted,
                ..Record::default()
            },
        }
    }
}

/// Relay a tunnel that is not followed as HTTP: its first bytes (already
/// read and decided) go first, then both directions as they come, under
/// payload signatures where they apply. The sockets are lent; of the flow
/// only `Kept` stays.
// Written out: an async fn's future keeps its arguments twice.
#[allow(clippy::manual_async_fn)]
fn relay_plain<'a>(
    shared: &'a Shared,
    engine: &'a Engine,
    flow: Box<Flow>,
    client: &'a TcpStream,
    up: &'a TcpStream,
    first: First,
    buf: BytesMut,
) -> impl std::future::Future<Output = ()> + 'a {
    async move {
        let cx = RelayCtx::new(shared, engine, flow.ctx.client.who());
        let window = engine.config.inspect_bytes;
        // The first bytes were read here; the relay forwards them.
        cx.up
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let inspect = matches!(first, First::Payload) && !flow.allowlisted;
        let check_cert = first == First::Tls && flow.check_cert;
        let mut kept = Kept::new(shared, flow);
        let mut write_error = None;
        let (c2s, s2c) = match first {
            First::Payload if inspect => (
                Some(Inspector::new(Direction::Client, &buf, window)),
                (engine.signatures.payload().reach(Direction::Server) > 0)
                    .then(|| Inspector::new(Direction::Server, &[], window)),
            ),
            _ => {
                // Allowed TLS, or an allow-listed destination (never refused on
                // its payload): hand the first bytes on, then relay as is.
                if let Err(e) = relay::write_all(up, &buf).await {
                    write_error = Some(e.to_string());
                }
                (None, None)
            }
        };
        // Idle tunnels hold no copy of their first bytes.
        drop(buf);
        let end = if check_cert {
            // Boxed: only tunnels without an SNI pay for the held flight.
            Box::pin(relay_checking_certificate(&cx, client, up)).await
        } else {
            relay::relay(&cx, client, up, c2s, s2c).await
        };
        let mut rec = kept.record();
        if write_error.is_some() {
            rec.error = write_error;
        }
        cx.finish(&mut rec);
        // One verdict per tunnel: a payload block, else the first monitor
        // finding (destination, first bytes, then payload), else allow.
        let relay_monitor = cx.monitor.lock().unwrap_or_else(|e| e.into_inner()).take();
        let verdict = match &end {
            End::Blocked(d) => Verdict::Block(*d),
            _ => kept.monitor.or(relay_monitor).unwrap_or(Verdict::Allow),
        };
        shared.record_verdict(kept.ctx.listener, engine, &verdict, &mut rec);
        match end {
            End::Blocked(d) => {
                tracing::debug!(client = %kept.ctx.client.addr, app = engine.signatures.app_id(d.app), "tunnel reset on payload");
            }
            End::Idle => rec.error = Some("idle timeout".into()),
            End::Error(e) => rec.error = Some(e.to_string()),
            End::Closed | End::Refused => {}
        }
        shared.access_log.write(rec);
        // The upstream's registration and the client's slot go with the tunnel.
        drop(kept);
    }
}

/// Relay a TLS tunnel whose server's certificate names are decided first.
async fn relay_checking_certificate(cx: &RelayCtx<'_>, client: &TcpStream, up: &TcpStream) -> End {
    let up_half = relay::pump(cx, client, up, None, &cx.up);
    let down_half = async {
        match server_certificate(cx, up, client).await {
            Ok(()) => relay::pump(cx, up, client, None, &cx.down).await,
            Err(end) => end,
        }
    };
    tokio::pin!(up_half, down_half);
    relay::run_pair(cx, client, up, up_half, down_half).await
}

/// Hold the server's first bytes until its certificate's names are known
/// (TLS 1.2 and older send the Certificate message in clear; TLS 1.3 and
/// resumed sessions show nothing), decide them, then hand them on. Bounded
/// by the parser's limit and the first-bytes deadline; whatever cannot be
/// read passes as it came.
async fn server_certificate(
    cx: &RelayCtx<'_>,
    up: &TcpStream,
    client: &TcpStream,
) -> Result<(), End> {
    let engine = cx.engine;
    let deadline = tokio::time::Instant::now() + engine.config.first_bytes_timeout;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match inspect_server_flight(&buf) {
            ServerFlight::NeedMore if buf.len() < MAX_SERVER_FLIGHT => {}
            ServerFlight::Names(names) => {
                let mut findings = Findings::default();
                let decided = decide::server_certificate(engine, &cx.who, &names, &mut findings);
                if let Err(Refusal::Blocked(d)) = decided {
                    return Err(End::Blocked(d));
                }
                if let Some(m) = findings.monitor {
                    cx.monitor
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert(m);
                }
                break;
            }
            _ => break,
        }
        let read = tokio::time::timeout_at(deadline, async {
            loop {
                up.readable().await?;
                buf.reserve(relay::COPY_BUF);
                match relay::try_read_buf_draining(up, &mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        })
        .await;
        match read {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => {
                cx.touch();
                cx.down
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(Err(e)) => return Err(End::Error(e)),
        }
    }
    relay::write_all(client, &buf).await.map_err(End::Error)
}

/// Reset a tunnel refused on its first bytes; nothing reached the upstream.
fn refuse_tunnel(
    shared: &Shared,
    engine: &Engine,
    mut flow: Flow,
    client: &TcpStream,
    upstream: &Upstream,
    e: FlowError,
) {
    match &e {
        FlowError::Blocked(d) => {
            shared.record_verdict(
                flow.ctx.listener,
                engine,
                &Verdict::Block(*d),
                &mut flow.rec,
            );
        }
        other => flow.rec.error = Some(other.to_string()),
    }
    relay::reset(client);
    if let Upstream::Connected(up) = upstream {
        relay::reset(up);
    }
    tracing::debug!(client = %flow.ctx.client.addr, error = %e, "tunnel refused");
    shared.access_log.write(flow.rec);
}

/// Read and decide the client's first bytes: an IO driver around
/// `decide::FirstBytes`, which says what each cue means.
async fn first_bytes(
    engine: &Engine,
    flow: &mut Flow,
    client: &TcpStream,
    initial: Bytes,
    upstream: &Upstream,
    logged: bool,
) -> (Result<First, FlowError>, BytesMut) {
    // JA4 only for rules that match on it, or a log that records it.
    let want_ja4 = logged || engine.signatures.has_ja4_rules();
    let window = engine.config.inspect_bytes;
    let deadline = tokio::time::Instant::now() + engine.config.first_bytes_timeout;
    let who = flow.ctx.client.who();
    let mut check = FirstBytes::new(engine, who, flow.dst.port(), flow.allowlisted, want_ja4);
    let mut buf = BytesMut::from(&initial[..]);
    let mut cue = Cue::Bytes;
    let result = loop {
        match check.step(&buf, cue, &mut flow.findings) {
            Err(r) => break Err(FlowError::from(r)),
            Ok(Some(first)) => break Ok(first),
            Ok(None) => {}
        }
        let server_first = async {
            match upstream {
                Upstream::Connected(s) => s.readable().await,
                Upstream::Lazy(_) => std::future::pending().await,
            }
        };
        cue = tokio::select! {
            r = client.readable() => match r.and_then(|()| {
                // Room for the whole window in one read (a ClientHello
                // is one segment), allocated only once bytes are there.
                buf.reserve(window.saturating_sub(buf.len()));
                relay::try_read_buf_draining(client, &mut buf)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Cue::Bytes,
                Ok(0) | Err(_) => Cue::ClientEnded,
                Ok(_) => Cue::Bytes,
            },
            _ = server_first, if buf.is_empty() => Cue::UpstreamFirst,
            _ = tokio::time::sleep_until(deadline) => Cue::Deadline,
        };
    };
    if let Some(hello) = check.hello {
        flow.check_cert = hello.sni.is_none() && !flow.allowlisted;
        if engine.config.tls_inspect.enabled {
            // Without an SNI the CONNECT's name stands for it.
            if let Some(name) = hello.sni.as_deref().or(flow.host.as_deref()) {
                let who = flow.ctx.client.who();
                flow.tls = intercept::TlsFlow::of(
                    engine,
                    &who,
                    name,
                    flow.host.as_deref(),
                    &hello.alpn,
                    flow.dst,
                    &result,
                );
            }
        }
        if logged {
            flow.rec.sni = hello.sni.clone();
            flow.rec.ja4 = Some(hello.ja4.clone());
            flow.rec.alpn = (!hello.alpn.is_empty()).then(|| hello.alpn.join(","));
        }
        tracing::trace!(sni = ?hello.sni, ja4 = %hello.ja4, "ClientHello");
    }
    (result, buf)
}

/// A tunnel set up by a transparent listener.
pub fn new_flow(ctx: ConnCtx, dst: SocketAddr, listener: ListenerKind) -> Box<Flow> {
    let client = ctx.client.addr.to_string();
    Box::new(Flow {
        ctx,
        dst,
        host: None,
        allowlisted: false,
        findings: Findings::default(),
        addr_block: None,
        check_cert: false,
        own: None,
        tls: None,
        rec: Record {
            start: Some(SystemTime::now()),
            client,
            listener: listener.as_str(),
            method: "TUNNEL".into(),
            target: dst.to_string(),
            verdict: "allow",
            ..Record::default()
        },
    })
}
