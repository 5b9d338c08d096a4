//! Tunnels: CONNECT on the explicit listener and every redirected stream of
//! the transparent listeners. The destination alone is decided first (name,
//! address, port); then the client's first bytes are read into a bounded
//! buffer under a deadline and decided before a single byte reaches the
//! upstream:
//!
//! - a TLS ClientHello (reassembled across reads and records): SNI against
//!   the host rules, ALPN, JA4, ECH;
//! - an HTTP/1.x request: the tunnel becomes an HTTP connection to the
//!   tunnel's destination, and every request in it is decided on its own;
//! - anything else: payload signatures; on port 443 `non_tls_on_443` and on
//!   port 80 `non_http_on_80` apply.
//!
//! A client that says nothing is not a reason to fail open, nor to fail
//! closed: server-speaks-first protocols (SMTP, IRC banners) must work. The
//! upstream's bytes flow to the client (inspected against server-side
//! signatures) while the client's first bytes stay under inspection whenever
//! they come. Only where the protocol is known to speak first — a tunnel to
//! port 443 under `non_tls_on_443 = block` — does silence past the deadline
//! refuse the flow.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::explicit::{self, apply, decide_name, ConnCtx, FixedDest};
use super::prefixed::Prefixed;
use super::refuse::{empty, FlowError, ProxyBody};
use super::relay::{self, End, Inspector, RelayCtx};
use super::upstream;
use super::Shared;
use crate::access_log::Record;
use crate::classify::host::normalize_host;
use crate::classify::payload::Direction;
use crate::classify::sniff::{sniff, Sniff};
use crate::classify::tls::{inspect_client_hello_with, Hello};
use crate::classify::{Detection, Reason, UNIDENTIFIED};
use crate::engine::Engine;
use crate::metrics::ListenerKind;
use crate::policy::{Verdict, Who};

/// The upstream of a tunnel: connected already (CONNECT, so that a failure
/// is a 502; generic redirected ports, so a server that speaks first is
/// heard), or connected once the first bytes are decided.
pub enum Upstream {
    Connected(TcpStream),
    Lazy(SocketAddr),
}

/// One tunnel being set up.
pub struct Flow {
    pub ctx: ConnCtx,
    pub dst: SocketAddr,
    /// The name the client asked for (CONNECT authority), if any.
    pub host: Option<String>,
    pub allowlisted: bool,
    pub monitor: Option<Verdict>,
    /// Redirected port-80 traffic to a refused address: HTTP gets the 403
    /// page request by request; anything else is reset.
    pub addr_block: Option<Detection>,
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
) -> Result<(TcpStream, Flow), FlowError> {
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

    let mut monitor = None;
    let allowlisted = decide_name(engine, &ctx.client.who(), &host, port, &mut monitor)?;
    // After the name's verdict (an IM name or port keeps its app), before DNS.
    super::target::check_connect_port(&engine.config.connect_ports, port)?;
    let addrs = upstream::resolve_checked(
        shared,
        engine,
        &ctx.client,
        &host,
        port,
        allowlisted,
        &mut monitor,
    )
    .await?;
    let limits = &engine.config.limits;
    let (up, dst) =
        upstream::connect(&addrs, limits.connect_timeout, engine.config.upstream_mark).await?;
    rec.status = 200;
    let flow = Flow {
        ctx,
        dst,
        host: Some(host),
        allowlisted,
        monitor,
        addr_block: None,
        rec: std::mem::take(rec),
    };
    Ok((up, flow))
}

/// The first-bytes verdict of a tunnel.
enum First {
    /// TLS decided and allowed: relay without further inspection.
    Tls,
    /// An HTTP/1.x request: serve it as HTTP to the tunnel's destination.
    Http,
    /// Inspect payload signatures in both directions while relaying.
    Payload,
}

/// Inspect and relay one tunnel; writes its access-log record at the end.
pub async fn run(
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    mut flow: Flow,
    client: TcpStream,
    initial: Bytes,
    upstream: Upstream,
) {
    let started = Instant::now();
    let logged = !shared.access_log.is_off();
    let result = first_bytes(&engine, &mut flow, &client, initial, &upstream, logged).await;
    shared
        .metrics
        .inspection_duration
        .observe(started.elapsed().as_secs_f64());
    let (first, buf) = match result {
        Ok(x) => x,
        Err(e) => {
            refuse_tunnel(&shared, &engine, flow, &client, &upstream, e);
            return;
        }
    };

    if let (Some(d), false) = (flow.addr_block, matches!(first, First::Http)) {
        refuse_tunnel(
            &shared,
            &engine,
            flow,
            &client,
            &upstream,
            FlowError::Blocked(d),
        );
        return;
    }

    if let First::Http = first {
        // Every request in it is decided like an explicit one and logged on
        // its own; a CONNECT tunnel also logs the CONNECT.
        if flow.ctx.listener == ListenerKind::Explicit {
            let mut rec = flow.rec;
            rec.method = "CONNECT".into();
            shared.access_log.write(rec);
        }
        let ctx = ConnCtx {
            fixed: Some(FixedDest { addr: flow.dst }),
            ..flow.ctx.clone()
        };
        drop(upstream);
        serve_http(shared, Prefixed::new(buf.freeze(), client), ctx).await;
        return;
    }

    let up = match upstream {
        Upstream::Connected(s) => s,
        Upstream::Lazy(addr) => {
            let limits = &engine.config.limits;
            match upstream::connect(&[addr], limits.connect_timeout, engine.config.upstream_mark)
                .await
            {
                Ok((s, _)) => s,
                Err(e) => {
                    shared.metrics.upstream_error(e.kind());
                    flow.rec.error = Some(e.to_string());
                    let verdict = flow.monitor.unwrap_or(Verdict::Allow);
                    shared.record_verdict(flow.ctx.listener, &engine, &verdict, &mut flow.rec);
                    relay::reset(&client);
                    shared.access_log.write(flow.rec);
                    return;
                }
            }
        }
    };
    if !shared.access_log.is_off() {
        // Connected to flow.dst: the CONNECT's checked address, or the
        // redirected stream's original destination.
        flow.rec.upstream = Some(flow.dst.to_string());
    }

    let cx = RelayCtx::new(&shared, &engine, flow.ctx.client.who());
    let window = engine.config.inspect_bytes;
    // The first bytes were read here; the relay forwards them.
    cx.up
        .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let inspect = matches!(first, First::Payload) && !flow.allowlisted;
    let (c2s, s2c) = match first {
        First::Payload if inspect => (
            Some(Inspector::new(Direction::Client, &buf, window)),
            (engine.signatures.payload().reach(Direction::Server) > 0)
                .then(|| Inspector::new(Direction::Server, &[], window)),
        ),
        _ => {
            // Allowed TLS, or an allow-listed destination (never refused on
            // its payload): hand the first bytes on, then relay as is.
            if let Err(e) = relay::write_all(&up, &buf).await {
                flow.rec.error = Some(e.to_string());
            }
            (None, None)
        }
    };
    // Idle tunnels hold no copy of their first bytes.
    drop(buf);
    let end = relay::relay(&cx, &client, &up, c2s, s2c).await;
    cx.finish(&mut flow.rec);
    // One verdict per tunnel: a payload block, else the first monitor
    // finding (destination, first bytes, then payload), else allow.
    let relay_monitor = cx.monitor.lock().unwrap_or_else(|e| e.into_inner()).take();
    let verdict = match &end {
        End::Blocked(d) => Verdict::Block(*d),
        _ => flow.monitor.or(relay_monitor).unwrap_or(Verdict::Allow),
    };
    shared.record_verdict(flow.ctx.listener, &engine, &verdict, &mut flow.rec);
    match end {
        End::Blocked(d) => {
            tracing::debug!(client = %flow.ctx.client.addr, app = engine.signatures.app_id(d.app), "tunnel reset on payload");
        }
        End::Idle => flow.rec.error = Some("idle timeout".into()),
        End::Error(e) => flow.rec.error = Some(e.to_string()),
        End::Closed => {}
    }
    shared.access_log.write(flow.rec);
}

/// HTTP inside a tunnel. Boxed: a tunnel can carry HTTP whose requests may
/// open tunnels, and the boxed future's declared `Send` ends that cycle.
fn serve_http(
    shared: Arc<Shared>,
    io: Prefixed<TcpStream>,
    ctx: ConnCtx,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(explicit::serve(shared, TokioIo::new(io), ctx))
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

/// Read and decide the client's first bytes.
async fn first_bytes(
    engine: &Engine,
    flow: &mut Flow,
    client: &TcpStream,
    initial: Bytes,
    upstream: &Upstream,
    logged: bool,
) -> Result<(First, BytesMut), FlowError> {
    // JA4 only for rules that match on it, or a log that records it.
    let want_ja4 = logged || engine.signatures.has_ja4_rules();
    let cfg = &engine.config;
    let window = cfg.inspect_bytes;
    let deadline = tokio::time::Instant::now() + cfg.first_bytes_timeout;
    let port = flow.dst.port();
    let who = flow.ctx.client.who();
    let who = &who;
    let mut buf = BytesMut::from(&initial[..]);
    loop {
        match sniff(&buf) {
            Sniff::NeedMore => {}
            Sniff::Tls => match inspect_client_hello_with(&buf, want_ja4) {
                Hello::NeedMore { .. } => {}
                Hello::Complete(hello) => {
                    if logged {
                        flow.rec.sni = hello.sni.clone();
                        flow.rec.ja4 = Some(hello.ja4.clone());
                        flow.rec.alpn = (!hello.alpn.is_empty()).then(|| hello.alpn.join(","));
                    }
                    tracing::trace!(sni = ?hello.sni, ja4 = %hello.ja4, "ClientHello");
                    decide_hello(engine, who, flow, &hello)?;
                    if port == 80 {
                        non_http(engine, who, flow, &buf)?;
                    }
                    return Ok((First::Tls, buf));
                }
                Hello::NotTls => return other_protocol(engine, who, flow, buf),
            },
            Sniff::Http => {
                if port == 443 {
                    non_tls(engine, who, flow, &buf)?;
                }
                return Ok((First::Http, buf));
            }
            Sniff::Other => return other_protocol(engine, who, flow, buf),
        }
        if buf.len() >= window {
            if matches!(sniff(&buf), Sniff::Tls) {
                // A ClientHello that does not fit the window (spread over
                // tiny records, say) is an evasion, not a hello: whatever
                // the port, the TLS checks could not run.
                non_tls(engine, who, flow, &buf)?;
            }
            return other_protocol(engine, who, flow, buf);
        }
        let server_first = async {
            match upstream {
                Upstream::Connected(s) => s.readable().await,
                Upstream::Lazy(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            r = client.readable() => match r.and_then(|()| {
                // Room for the whole window in one read (a ClientHello
                // is one segment), allocated only once bytes are there.
                buf.reserve(window.saturating_sub(buf.len()));
                client.try_read_buf(&mut buf)
            }) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Ok(0) | Err(_) if buf.is_empty() => {
                    return Err(FlowError::BadRequest("client closed before sending anything"));
                }
                Ok(0) | Err(_) => {
                    // Ended mid-way: decide on what came.
                    return other_protocol(engine, who, flow, buf);
                }
                Ok(_) => {}
            },
            _ = server_first, if buf.is_empty() => {
                // The server speaks first (SMTP, IRC, POP3...). TLS and HTTP
                // servers never do.
                if port == 443 {
                    non_tls(engine, who, flow, &buf)?;
                }
                return Ok((First::Payload, buf));
            }
            _ = tokio::time::sleep_until(deadline) => {
                if port == 443 {
                    // TLS clients speak first: silence (or a hello that never
                    // completes) is not TLS.
                    non_tls(engine, who, flow, &buf)?;
                }
                if !buf.is_empty() && matches!(sniff(&buf), Sniff::Tls) {
                    // A ClientHello that started but never completed: the
                    // TLS checks could not run, whatever the port.
                    non_tls(engine, who, flow, &buf)?;
                    return other_protocol(engine, who, flow, buf);
                }
                return Ok((First::Payload, buf));
            }
        }
    }
}

/// SNI, ALPN, JA4 and ECH of an allowed destination's ClientHello.
fn decide_hello(
    engine: &Engine,
    who: &Who,
    flow: &mut Flow,
    hello: &crate::classify::tls::ClientHello,
) -> Result<(), FlowError> {
    for d in engine.hello_evidence(hello) {
        apply(engine.policy.decide_for(who, d), &mut flow.monitor)?;
    }
    Ok(())
}

/// A payload detection of the bytes so far, decided by the app's policy.
fn payload_verdict(engine: &Engine, who: &Who, buf: &[u8]) -> (Option<Detection>, Verdict) {
    let outcome = engine.signatures.payload().classify(Direction::Client, buf);
    let d = engine.signatures.payload_detection(outcome);
    (d, engine.policy.decide_for(who, d))
}

/// Not TLS on port 443: a payload match names the app; the knob decides.
fn non_tls(engine: &Engine, who: &Who, flow: &mut Flow, buf: &[u8]) -> Result<(), FlowError> {
    generic(engine, who, flow, buf, Reason::NonTls)
}

/// Not HTTP on port 80.
fn non_http(engine: &Engine, who: &Who, flow: &mut Flow, buf: &[u8]) -> Result<(), FlowError> {
    generic(engine, who, flow, buf, Reason::NonHttp)
}

fn generic(
    engine: &Engine,
    who: &Who,
    flow: &mut Flow,
    buf: &[u8],
    reason: Reason,
) -> Result<(), FlowError> {
    if flow.allowlisted {
        return Ok(());
    }
    // The knob decides; a payload signature only names the app. An app
    // whose own policy is stricter than the knob is still refused.
    let (found, app_verdict) = payload_verdict(engine, who, buf);
    let d = Detection {
        app: found.map_or(UNIDENTIFIED, |d| d.app),
        rule: found.and_then(|d| d.rule),
        reason,
        offset: found.and_then(|d| d.offset),
    };
    let knob = engine.policy.decide_for(who, Some(d));
    if knob.is_block() {
        return apply(knob, &mut flow.monitor);
    }
    apply(app_verdict, &mut flow.monitor)?;
    apply(knob, &mut flow.monitor)
}

/// Neither TLS nor HTTP.
fn other_protocol(
    engine: &Engine,
    who: &Who,
    flow: &mut Flow,
    buf: BytesMut,
) -> Result<(First, BytesMut), FlowError> {
    match flow.dst.port() {
        443 => non_tls(engine, who, flow, &buf)?,
        80 => non_http(engine, who, flow, &buf)?,
        _ => {}
    }
    Ok((First::Payload, buf))
}

/// A tunnel set up by a transparent listener.
pub fn new_flow(ctx: ConnCtx, dst: SocketAddr, listener: ListenerKind) -> Flow {
    let client = ctx.client.addr.to_string();
    Flow {
        ctx,
        dst,
        host: None,
        allowlisted: false,
        monitor: None,
        addr_block: None,
        rec: Record {
            start: Some(SystemTime::now()),
            client,
            listener: listener.as_str(),
            method: "TUNNEL".into(),
            target: dst.to_string(),
            verdict: "allow",
            ..Record::default()
        },
    }
}
