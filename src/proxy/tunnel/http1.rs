//! HTTP/1.x inside a tunnel (CONNECT, or a redirected port-80 stream):
//! the IO driver around `decide::Requests`. The client's bytes are relayed
//! to the tunnel's one upstream connection as they are; each request head
//! is held only until it is decided, then forwarded byte for byte. The
//! upstream's bytes reach the client as they are, and are only observed
//! (`classify::h1`) to know where each response ends: for the access log's
//! status per request, and so that a refusal page is written between
//! responses, never inside one.
//!
//! A refused request gets the 403 page inside the tunnel once every earlier
//! response is complete, and the tunnel closes; not one byte of the refused
//! request reaches the upstream. Where the page cannot be framed (the
//! responses cannot be followed, or one does not end in time) the tunnel is
//! reset instead. After an upgrade or a CONNECT inside the tunnel the
//! stream is opaque and payload signatures go on; a stream that cannot be
//! followed as HTTP falls to the generic rules (`non_http_on_80` on port
//! 80, payload signatures everywhere).
use std::collections::VecDeque;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use tokio::sync::Notify;

use super::{Flow, Upstream};
use crate::access_log::Record;
use crate::classify::h1::{self, Asked, Following, Progress, Reply};
use crate::classify::payload::Direction;
use crate::classify::Detection;
use crate::decide::{self, Findings, Refusal, ReqCue, RequestInfo, Requests, Step};
use crate::engine::Engine;
use crate::metrics::ListenerKind;
use crate::policy::Verdict;
use crate::proxy::refuse::{self, FlowError};
use crate::proxy::relay::{self, End, Inspector, RelayCtx, Wire};
use crate::proxy::{upstream, Shared};

/// Requests forwarded whose responses have not ended, at most; a client
/// that pipelines more waits until responses come back.
const MAX_PENDING: usize = 64;
/// Header fields of a response head followed (past this, the responses
/// are no longer followed: later refusals reset instead of a page).
const RESPONSE_FIELDS: usize = 128;
/// Room for one read of the client's bytes.
const READ_CHUNK: usize = 16 * 1024;

/// A forwarded request whose final response has not ended yet.
struct Pending {
    asked: Asked,
    /// Its access-log record (with the log on).
    rec: Option<Box<Record>>,
    /// A GET whose response is hashed: its URL.
    download: Option<Box<str>>,
}

#[derive(Default)]
struct ExchangeState {
    pending: VecDeque<Pending>,
    /// The responses can no longer be followed (not HTTP, a protocol
    /// switch, a response nobody asked for): no page can be framed.
    lost: bool,
    /// The upstream ended its side.
    upstream_ended: bool,
    /// What the response to a request that asked to switch protocols
    /// said: switched or not (taken by the request side).
    switch: Option<bool>,
    /// Final responses that ended so far.
    answered: u64,
}

/// What the two directions of one HTTP tunnel share.
#[derive(Default)]
struct Exchange {
    state: Mutex<ExchangeState>,
    /// Signalled whenever a response ends or the responses are lost.
    changed: Notify,
}

impl Exchange {
    fn lock(&self) -> MutexGuard<'_, ExchangeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One tunnel's HTTP: the request side's state.
struct Up<'e> {
    reqs: Requests<'e>,
    /// Client bytes read and not forwarded yet.
    buf: BytesMut,
    /// Findings of the request being decided.
    findings: Findings,
    /// The stream went past HTTP (opaque or not followed).
    left_http: bool,
    /// The head to send instead of the next forwarded one (tenant
    /// restrictions set in it).
    replace: Option<Box<[u8]>>,
}

/// Everything the request side needs besides its state.
struct Ctx<'a> {
    shared: &'a Shared,
    engine: &'a Engine,
    flow: &'a Flow,
    exchange: &'a Exchange,
    cx: &'a RelayCtx<'a>,
}

/// Relay one tunnel whose first bytes are HTTP/1.x; writes the records of
/// its requests as their responses end, and the tunnel's own record.
pub async fn run<C: Wire, U: Wire>(
    shared: Arc<Shared>,
    engine: Arc<Engine>,
    mut flow: Flow,
    client: C,
    buf: BytesMut,
    upstream: Upstream<U>,
) {
    let logged = !shared.access_log.is_off();
    let who = flow.ctx.client.who();
    let cx = RelayCtx::new(&shared, &engine, who.clone());
    cx.up
        .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let exchange = Exchange::default();
    let mut reqs = Requests::new(&engine, who, flow.dst, Some(shared.via_token()), logged);
    if let Some(tls) = flow.tls.as_mut().filter(|t| t.decrypt) {
        reqs.covered_by(std::mem::take(&mut tls.cover));
        reqs.set_tenant_fields();
    }
    let mut up_state = Up {
        reqs,
        buf,
        findings: Findings::default(),
        left_http: false,
        replace: None,
    };

    if logged && flow.rec.upstream.is_none() {
        flow.rec.upstream = Some(flow.dst.to_string());
    }
    let ctx = Ctx {
        shared: &shared,
        engine: &engine,
        flow: &flow,
        exchange: &exchange,
        cx: &cx,
    };
    // The first request is decided before an upstream is needed: a
    // redirected port-80 flow connects only for a request that passes.
    let mut failed = None;
    // The first request's head comes within the header deadline, as a
    // client's first request to the proxy would.
    let header_deadline = engine.config.limits.header_read_timeout;
    let first = tokio::time::timeout(header_deadline, next_step(&ctx, &client, &mut up_state))
        .await
        .unwrap_or(Err(End::Idle));
    let end = match first {
        Err(End::Idle) => {
            client.reset();
            if let Upstream::Connected(up) = &upstream {
                up.reset();
            }
            End::Idle
        }
        Err(end) => {
            // The client left before a whole request.
            if let Upstream::Connected(up) = &upstream {
                up.shutdown_write();
            }
            end
        }
        Ok(Step::Refuse { refusal, request }) => {
            if let Upstream::Connected(up) = &upstream {
                up.reset();
            }
            refuse(&ctx, &client, refusal, request).await
        }
        Ok(first) => {
            let refused = match first {
                Step::Lost(why) => lost_refusal(&ctx, &mut up_state, why),
                _ => None,
            };
            match refused {
                Some(d) => {
                    // Not followable from its first request, and refused
                    // by the generic rules or its address: no upstream.
                    client.reset();
                    if let Upstream::Connected(up) = &upstream {
                        up.reset();
                    }
                    End::Blocked(d)
                }
                None => match connect(&ctx, upstream).await {
                    Err(e) => {
                        if let Step::Forward {
                            request: Some(request),
                            ..
                        } = first
                        {
                            // Nothing is pending: the client gets a page
                            // naming the failure, as explicit HTTP would.
                            let mut rec = request_record(&shared, &flow, &request);
                            rec.status = e.status().as_u16();
                            shared.record_refusal(flow.ctx.listener, &engine, &e, &mut rec);
                            shared.access_log.write(rec);
                            let page = refuse::page_bytes(&e, &engine.signatures);
                            let _ = client.write_all(&page).await;
                            client.shutdown_write();
                        } else {
                            client.reset();
                        }
                        failed = Some(e.to_string());
                        End::Closed
                    }
                    Ok((up, _own)) => {
                        // The first request is owed its answer before the
                        // upstream can say anything: a server that closes
                        // at once is seen answering nothing.
                        let first = match first {
                            Step::Forward {
                                len,
                                request: Some(request),
                            } => {
                                let _ = admit_request(&ctx, &mut up_state, request).await;
                                Step::Forward { len, request: None }
                            }
                            other => other,
                        };
                        let up_half = requests_up(&ctx, &client, &up, &mut up_state, first);
                        let down_half = responses_down(&ctx, &up, &client);
                        tokio::pin!(up_half, down_half);
                        relay::run_pair(&cx, &client, &up, up_half, down_half).await
                    }
                },
            }
        }
    };
    flow.rec.error = failed;
    cx.finish(&mut flow.rec);

    // Requests whose responses never ended are logged with what is known.
    let unfinished: Vec<Pending> = exchange.lock().pending.drain(..).collect();
    for p in unfinished {
        if let Some(mut rec) = p.rec {
            rec.error = Some("the tunnel ended before the response did".into());
            shared.access_log.write(*rec);
        }
    }

    // The tunnel's own record: always for CONNECT; for redirected port 80
    // only where the stream left HTTP (its requests have their records).
    let verdict = match &end {
        End::Blocked(d) => Verdict::Block(*d),
        _ => {
            let relay_monitor = cx.monitor.lock().unwrap_or_else(|e| e.into_inner()).take();
            let up_monitor = up_state.findings.monitor.take();
            flow.findings
                .monitor
                .or(up_monitor)
                .or(relay_monitor)
                .unwrap_or(Verdict::Allow)
        }
    };
    match end {
        End::Idle => flow.rec.error = Some("idle timeout".into()),
        End::Error(e) => flow.rec.error = Some(e.to_string()),
        End::Blocked(_) | End::Refused | End::Closed => {}
    }
    if flow.ctx.listener != ListenerKind::TransparentHttp
        || up_state.left_http
        || verdict.is_block()
    {
        shared.record_verdict(flow.ctx.listener, &engine, &verdict, &mut flow.rec);
        shared.access_log.write(flow.rec);
    }
}

/// What refuses a stream that cannot be followed as HTTP: a redirected
/// port-80 flow to a refused address (its requests would each have been
/// refused), then the generic rules (`non_http_on_80` on port 80).
fn lost_refusal(ctx: &Ctx<'_>, st: &mut Up<'_>, why: &'static str) -> Option<Detection> {
    let flow = ctx.flow;
    if let Some(d) = flow.addr_block {
        return Some(d);
    }
    tracing::debug!(client = %flow.ctx.client.addr, why, "HTTP in a tunnel not followed further");
    let who = flow.ctx.client.who();
    // Inside a decrypted flow (HTTP/1.1 was offered or implied) a stream
    // that is not HTTP, or stops being followable, is what port 80's rule
    // is for (`non_http_on_80`): relaying it on would be decrypted but not
    // inspected. Payload signatures name the app.
    let port = if decrypted(flow) { 80 } else { flow.dst.port() };
    match decide::generic_for_port(
        ctx.engine,
        &who,
        port,
        flow.allowlisted,
        &st.buf,
        &mut st.findings,
    ) {
        Err(Refusal::Blocked(d)) => Some(d),
        _ => None,
    }
}

/// A decrypted flow (TLS inspection)?
fn decrypted(flow: &Flow) -> bool {
    flow.tls.as_ref().is_some_and(|t| t.decrypt)
}

/// The upstream connection: the CONNECT's, or the original destination's,
/// connected now.
async fn connect<U: Wire>(
    ctx: &Ctx<'_>,
    upstream: Upstream<U>,
) -> Result<(U, Option<upstream::OwnSocket>), FlowError> {
    let (shared, engine, flow) = (ctx.shared, ctx.engine, ctx.flow);
    match upstream {
        Upstream::Connected(s) => Ok((s, None)),
        Upstream::Lazy(addr) => {
            shared.connect_tunnel_upstream(engine, &[addr])
            .await
            .and_then(|(s, _, own)| {
                let s = U::from_connected(s).ok_or(FlowError::UpstreamReset(
                    "no plain connection for this tunnel".into(),
                ))?;
                Ok((s, own))
            })
            .inspect_err(|e| {
                    shared.metrics.upstream_error(e.kind());
                    tracing::debug!(client = %flow.ctx.client.addr, error = %e, "upstream of an HTTP tunnel");
                })
        }
    }
}

/// A request's access-log record (an empty one, for counting, with the log
/// off).
fn request_record(shared: &Shared, flow: &Flow, req: &RequestInfo) -> Record {
    if shared.access_log.is_off() {
        return Record {
            listener: flow.ctx.listener.as_str(),
            verdict: "allow",
            ..Record::default()
        };
    }
    Record {
        start: Some(std::time::SystemTime::now()),
        client: flow.ctx.client.addr.to_string(),
        user: flow.ctx.client.user.as_deref().map(str::to_string),
        listener: flow.ctx.listener.as_str(),
        method: req.method.clone(),
        target: req.target.clone(),
        host: Some(req.host.clone()),
        upstream: Some(
            flow.rec
                .upstream
                .clone()
                .unwrap_or_else(|| flow.dst.to_string()),
        ),
        verdict: "allow",
        tls: flow.rec.tls,
        sni: flow.rec.sni.clone(),
        alpn: flow.rec.alpn.clone(),
        groups: flow.ctx.client.groups.clone(),
        ..Record::default()
    }
}

/// Read more client bytes into the buffer. `Ok(0)`: the client ended its
/// side.
async fn read_client<C: Wire>(ctx: &Ctx<'_>, client: &C, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        client.readable().await?;
        buf.reserve(READ_CHUNK);
        match client.try_read_buf(buf) {
            Ok(n) => {
                if n > 0 {
                    ctx.cx.touch();
                    ctx.cx.up.fetch_add(n as u64, Ordering::Relaxed);
                }
                return Ok(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Read until the requests say what to do with the front of the buffer.
/// `Err(End::Closed)`: the client ended its side cleanly.
async fn next_step<C: Wire>(ctx: &Ctx<'_>, client: &C, st: &mut Up<'_>) -> Result<Step, End> {
    let hold = ctx.engine.config.first_bytes_timeout;
    let mut cue = ReqCue::Bytes;
    loop {
        match st.reqs.step(&st.buf, cue, &mut st.findings) {
            Step::NeedMore if st.reqs.awaiting_switch() => {
                // Nothing more of the client's passes until the server
                // says whether it switched protocols.
                let outcome = switch_outcome(ctx).await;
                st.reqs.switched(outcome);
                cue = ReqCue::Bytes;
                continue;
            }
            Step::NeedMore if cue == ReqCue::Ended => return Err(End::Closed),
            Step::NeedMore => {}
            step => return Ok(step),
        }
        let read = if st.reqs.holding() {
            // A decided head waits for its body's start, not forever.
            match tokio::time::timeout(hold, read_client(ctx, client, &mut st.buf)).await {
                Ok(r) => r,
                Err(_) => {
                    cue = ReqCue::Deadline;
                    continue;
                }
            }
        } else {
            read_client(ctx, client, &mut st.buf).await
        };
        cue = match read {
            Ok(0) => ReqCue::Ended,
            Ok(_) => ReqCue::Bytes,
            Err(e) if st.buf.is_empty() => return Err(End::Error(e)),
            // The rest of what the client sent is still decided.
            Err(_) => ReqCue::Ended,
        };
    }
}

/// Wait for the response to a request that asked to switch protocols:
/// `Some(switched)`, or `None` when the responses cannot be read, the
/// upstream ended, or no answer came in time.
async fn switch_outcome(ctx: &Ctx<'_>) -> Option<bool> {
    let bound = ctx.engine.config.limits.upstream_response_timeout;
    tokio::time::timeout(bound, async {
        loop {
            let notified = ctx.exchange.changed.notified();
            {
                let mut ex = ctx.exchange.lock();
                if let Some(switched) = ex.switch.take() {
                    return Some(switched);
                }
                if ex.lost || ex.upstream_ended {
                    return None;
                }
            }
            notified.await;
        }
    })
    .await
    .unwrap_or(None)
}

/// The client's side of an HTTP tunnel: act on each step.
async fn requests_up<C: Wire, U: Wire>(
    ctx: &Ctx<'_>,
    client: &C,
    up: &U,
    st: &mut Up<'_>,
    first: Step,
) -> End {
    let mut step = first;
    loop {
        match step {
            Step::NeedMore => {}
            Step::Forward { len, request } => {
                if let Some(request) = request {
                    if let Err(end) = admit_request(ctx, st, request).await {
                        return end;
                    }
                } else if !ctx.shared.access_log.is_off() {
                    let mut ex = ctx.exchange.lock();
                    if let Some(rec) = ex.pending.back_mut().and_then(|p| p.rec.as_mut()) {
                        rec.bytes_up += len as u64;
                    }
                }
                let chunk = st.buf.split_to(len.min(st.buf.len()));
                let sent = match st.replace.take() {
                    Some(head) => up.write_all(&head).await,
                    None => up.write_all(&chunk).await,
                };
                if let Err(e) = sent {
                    return End::Error(e);
                }
            }
            Step::Refuse { refusal, request } => {
                return refuse(ctx, client, refusal, request).await
            }
            Step::Reset { refusal, request } => {
                // Its head went upstream already: no page between
                // responses; reset, before any of its body went.
                let e = FlowError::from(refusal);
                let mut rec = request_record(ctx.shared, ctx.flow, &request);
                ctx.shared
                    .record_refusal(ctx.flow.ctx.listener, ctx.engine, &e, &mut rec);
                rec.error
                    .get_or_insert_with(|| "reset: refused on its body after its head went".into());
                ctx.shared.access_log.write(rec);
                return match refusal {
                    Refusal::Blocked(d) => End::Blocked(d),
                    _ => End::Error(io::Error::other("request refused inside the tunnel")),
                };
            }
            Step::Opaque | Step::Lost(_) => {
                st.left_http = true;
                if let Step::Lost(why) = step {
                    if let Some(d) = lost_refusal(ctx, st, why) {
                        return End::Blocked(d);
                    }
                }
                // Opaque from here: payload signatures on what follows.
                let inspector = (!ctx.flow.allowlisted).then(|| {
                    Inspector::new(Direction::Client, &st.buf, ctx.engine.config.inspect_bytes)
                });
                if inspector.is_none() {
                    if let Err(e) = up.write_all(&st.buf).await {
                        return End::Error(e);
                    }
                }
                st.buf = BytesMut::new();
                return relay::pump(ctx.cx, client, up, inspector, &ctx.cx.up).await;
            }
        }
        step = match next_step(ctx, client, st).await {
            Ok(s) => s,
            Err(End::Closed) => {
                up.shutdown_write();
                return End::Closed;
            }
            Err(end) => return end,
        };
    }
}

/// A decided request about to be forwarded: count and log its verdict and
/// queue it for its response. Waits while too many responses are owed.
async fn admit_request(
    ctx: &Ctx<'_>,
    st: &mut Up<'_>,
    mut request: Box<RequestInfo>,
) -> Result<(), End> {
    st.replace = request.head.take();
    if let Some(vendor) = request.tenant {
        ctx.shared.metrics.tenant_headers(vendor);
    }
    let verdict = std::mem::take(&mut st.findings).verdict();
    let mut rec = request_record(ctx.shared, ctx.flow, &request);
    ctx.shared
        .record_verdict(ctx.flow.ctx.listener, ctx.engine, &verdict, &mut rec);
    let logged = !ctx.shared.access_log.is_off();
    let bound = ctx.engine.config.limits.upstream_response_timeout;
    let wait = async {
        loop {
            let notified = ctx.exchange.changed.notified();
            {
                let mut ex = ctx.exchange.lock();
                if ex.lost || ex.upstream_ended {
                    // Nothing follows the responses any more: log now.
                    drop(ex);
                    if logged {
                        ctx.shared.access_log.write(rec);
                    }
                    return;
                }
                if ex.pending.len() < MAX_PENDING {
                    ex.pending.push_back(Pending {
                        asked: request.asked,
                        rec: logged.then(|| Box::new(rec)),
                        download: request.download.clone(),
                    });
                    return;
                }
            }
            notified.await;
        }
    };
    tokio::time::timeout(bound, wait).await.map_err(|_| {
        End::Error(io::Error::new(
            io::ErrorKind::TimedOut,
            "responses owed for too long",
        ))
    })
}

/// Refuse the request at the front of the client's bytes: once every
/// earlier response has reached the client, the page, then the end of the
/// tunnel. Where no page can be framed, a reset.
async fn refuse<C: Wire>(
    ctx: &Ctx<'_>,
    client: &C,
    refusal: Refusal,
    request: Box<RequestInfo>,
) -> End {
    let e = FlowError::from(refusal);
    let mut rec = request_record(ctx.shared, ctx.flow, &request);
    ctx.shared
        .record_refusal(ctx.flow.ctx.listener, ctx.engine, &e, &mut rec);
    rec.upstream = None;
    tracing::debug!(client = %ctx.flow.ctx.client.addr, error = %e, "request refused inside a tunnel");

    let bound = ctx.engine.config.limits.upstream_response_timeout;
    let framed = tokio::time::timeout(bound, async {
        loop {
            let notified = ctx.exchange.changed.notified();
            {
                let ex = ctx.exchange.lock();
                if ex.pending.is_empty() && !ex.lost {
                    return true;
                }
                if ex.lost || ex.upstream_ended {
                    return false;
                }
            }
            notified.await;
        }
    })
    .await
    .unwrap_or(false);

    let end = if framed {
        let page = refuse::page_bytes(&e, &ctx.engine.signatures);
        rec.status = e.status().as_u16();
        match client.write_all(&page).await {
            Ok(()) => {
                client.shutdown_write();
                End::Refused
            }
            Err(err) => End::Error(err),
        }
    } else {
        rec.error
            .get_or_insert_with(|| "reset: no response boundary for a page".into());
        match refusal {
            Refusal::Blocked(d) => End::Blocked(d),
            _ => End::Error(io::Error::other("request refused inside the tunnel")),
        }
    };
    ctx.shared.access_log.write(rec);
    end
}

/// Where the response side stands.
enum Resp {
    /// At the start of a response head; the bytes of a head split across
    /// reads.
    Head(Vec<u8>),
    /// Inside a body.
    Body(Following),
    /// Not followed any more.
    Off,
}

/// The upstream's side of an HTTP tunnel: relayed as it comes, observed to
/// find where responses end. Once the responses cannot be followed (or
/// switch protocols) this is a plain relay.
async fn responses_down<C: Wire, U: Wire>(ctx: &Ctx<'_>, up: &U, client: &C) -> End {
    let mut resp = Resp::Head(Vec::new());
    let max_head = ctx.engine.config.limits.max_request_head_bytes.max(8192) * 2;
    let digests = ctx.engine.signatures.has_sha256();
    loop {
        if matches!(resp, Resp::Off) {
            return relay::pump(ctx.cx, up, client, None, &ctx.cx.down).await;
        }
        if digests && matches!(&resp, Resp::Head(p) if p.is_empty()) {
            let url = ctx
                .exchange
                .lock()
                .pending
                .front()
                .and_then(|p| p.download.clone());
            if let Some(url) = url {
                // Boxed: only responses to GETs, with digests listed.
                if let Err(end) =
                    Box::pin(digest_response(ctx, up, client, &mut resp, max_head, &url)).await
                {
                    return end;
                }
                continue;
            }
        }
        if let Err(e) = up.readable().await {
            return End::Error(e);
        }
        let mut buf = relay::take_buf();
        let n = match up.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                relay::give_buf(buf);
                continue;
            }
            Err(e) => {
                relay::give_buf(buf);
                if bad_gateway(ctx, client, &resp, &e.to_string()).await {
                    ended(ctx, &mut resp);
                    return End::Closed;
                }
                ended(ctx, &mut resp);
                return End::Error(e);
            }
        };
        if n == 0 {
            relay::give_buf(buf);
            if matches!(resp, Resp::Body(Following::UntilClose)) && !up.ended_cleanly() {
                // A body delimited by the close, ended without close_notify:
                // it may be cut short, and the client must not take it as
                // whole (a reset, not an orderly end).
                ended(ctx, &mut resp);
                return End::Error(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server ended a close-delimited body without close_notify",
                ));
            }
            bad_gateway(ctx, client, &resp, "closed").await;
            ended(ctx, &mut resp);
            client.shutdown_write();
            return End::Closed;
        }
        ctx.cx.touch();
        ctx.cx.down.fetch_add(n as u64, Ordering::Relaxed);
        let written = client.write_all(&buf[..n]).await;
        // Observed once the client has the bytes: a response counts as
        // ended only when all of it reached the client.
        observe(ctx, &mut resp, &buf[..n], max_head);
        relay::give_buf(buf);
        if let Err(e) = written {
            return End::Error(e);
        }
    }
}

/// One response to a GET while `[[downloads]] sha256` rules are loaded,
/// from its first byte: the head passes; a `200` body is hashed as it
/// passes with its last `decide::DIGEST_HOLD_BACK` bytes held until it ends; a digest
/// that matches (and that the policy refuses) cuts the response off and
/// resets the tunnel, and the URL is refused before any byte on the next
/// request. Anything else goes on as `responses_down` would.
async fn digest_response<C: Wire, U: Wire>(
    ctx: &Ctx<'_>,
    up: &U,
    client: &C,
    resp: &mut Resp,
    max_head: usize,
    url: &str,
) -> Result<(), End> {
    use sha2::Digest as _;
    let mut data: Vec<u8> = Vec::new();
    // The head.
    let (head_len, status, reply) = loop {
        match read_more(ctx, up, &mut data).await {
            Ok(0) | Err(_) => {
                // Ended or failed before a head: as responses_down does.
                if !data.is_empty() {
                    hand_back(ctx, client, std::mem::take(&mut data), resp, max_head).await?;
                }
                bad_gateway(ctx, client, resp, "closed").await;
                ended(ctx, resp);
                client.shutdown_write();
                return Err(End::Closed);
            }
            Ok(_) => {}
        }
        let mut headers = [httparse::EMPTY_HEADER; RESPONSE_FIELDS];
        let mut r = httparse::Response::new(&mut headers);
        match r.parse(&data) {
            Ok(httparse::Status::Complete(n)) => {
                let asked = ctx.exchange.lock().pending.front().map(|p| p.asked);
                let reply = asked.map(|a| h1::response_body(a, &r));
                break (n, r.code.unwrap_or(0), reply);
            }
            Ok(httparse::Status::Partial) if data.len() <= max_head => continue,
            _ => return hand_back(ctx, client, data, resp, max_head).await,
        }
    };
    let body = match (status, reply) {
        (200, Some(Ok(Reply::Final(body)))) => body,
        _ => return hand_back(ctx, client, data, resp, max_head).await,
    };
    let Some(mut following) = Following::new(body) else {
        return hand_back(ctx, client, data, resp, max_head).await;
    };
    // The head passes; the response's record gets its status.
    let mut body_raw = data.split_off(head_len);
    client.write_all(&data).await.map_err(End::Error)?;
    if let Some(rec) = ctx
        .exchange
        .lock()
        .pending
        .front_mut()
        .and_then(|p| p.rec.as_mut())
    {
        rec.status = status;
    }
    let mut hasher = sha2::Sha256::new();
    let mut hashed: u64 = 0;
    let mut fed = 0;
    let end = loop {
        let progress = following.advance(&body_raw[fed..], &mut |d| {
            hasher.update(d);
            hashed += d.len() as u64;
        });
        match progress {
            Ok(Progress::Ended(k)) => break fed + k,
            Ok(Progress::More) => {}
            Err(_) => {
                // Not followable: no digest; pass it on, responses lost.
                client.write_all(&body_raw).await.map_err(End::Error)?;
                let mut ex = ctx.exchange.lock();
                ex.lost = true;
                drop(ex);
                *resp = Resp::Off;
                ctx.exchange.changed.notify_waiters();
                return Ok(());
            }
        }
        fed = body_raw.len();
        if hashed > decide::DIGEST_MAX {
            // Too long to hold to its end: it passes, followed as usual.
            client.write_all(&body_raw).await.map_err(End::Error)?;
            add_body_bytes(ctx, body_raw.len());
            *resp = Resp::Body(following);
            return Ok(());
        }
        if body_raw.len() > decide::DIGEST_HOLD_BACK {
            let cut = body_raw.len() - decide::DIGEST_HOLD_BACK;
            client
                .write_all(&body_raw[..cut])
                .await
                .map_err(End::Error)?;
            add_body_bytes(ctx, cut);
            body_raw.drain(..cut);
            fed = body_raw.len();
        }
        match read_more(ctx, up, &mut body_raw).await {
            Ok(0) if matches!(following, Following::UntilClose) => break body_raw.len(),
            Ok(0) | Err(_) => {
                // Cut short by the server: what was held goes on, as the
                // client would have seen it without chatwall.
                client.write_all(&body_raw).await.map_err(End::Error)?;
                ended(ctx, resp);
                client.shutdown_write();
                return Err(End::Closed);
            }
            Ok(_) => {}
        }
    };
    let digest: [u8; 32] = hasher.finalize().into();
    let mut findings = Findings::default();
    let refused = decide::download_digest(ctx.engine, &ctx.cx.who, url, &digest, &mut findings);
    if let Err(Refusal::Blocked(d)) = refused {
        let rec = {
            let mut ex = ctx.exchange.lock();
            ex.lost = true;
            ex.pending.pop_front().and_then(|p| p.rec)
        };
        ctx.exchange.changed.notify_waiters();
        let app = ctx.engine.signatures.app_id(d.app);
        ctx.shared
            .metrics
            .blocked_total
            .with_label_values(&[app, d.reason.as_str()])
            .inc();
        if let Some(mut rec) = rec {
            ctx.shared.record_verdict(
                ctx.flow.ctx.listener,
                ctx.engine,
                &Verdict::Block(d),
                &mut rec,
            );
            rec.error = Some("cut off: the body's SHA-256 matches a listed download".into());
            ctx.shared.access_log.write(*rec);
        }
        tracing::debug!(client = %ctx.flow.ctx.client.addr, url, "download cut off on its digest");
        return Err(End::Blocked(d));
    }
    if let Some(m) = findings.monitor {
        let mut ex = ctx.exchange.lock();
        if let Some(rec) = ex.pending.front_mut().and_then(|p| p.rec.as_mut()) {
            ctx.shared
                .record_verdict(ctx.flow.ctx.listener, ctx.engine, &m, rec);
        }
    }
    // It passes: the held bytes, then the response has ended.
    client
        .write_all(&body_raw[..end])
        .await
        .map_err(End::Error)?;
    add_body_bytes(ctx, end);
    {
        let mut ex = ctx.exchange.lock();
        ex.answered += 1;
        if let Some(rec) = ex.pending.pop_front().and_then(|p| p.rec) {
            ctx.shared.access_log.write(*rec);
        }
    }
    ctx.exchange.changed.notify_waiters();
    *resp = Resp::Head(Vec::new());
    let rest = body_raw.split_off(end);
    if !rest.is_empty() {
        hand_back(ctx, client, rest, resp, max_head).await?;
    }
    Ok(())
}

/// Read the upstream's next bytes onto `data`.
async fn read_more<U: Wire>(ctx: &Ctx<'_>, up: &U, data: &mut Vec<u8>) -> io::Result<usize> {
    let mut buf = relay::take_buf();
    let n = loop {
        if let Err(e) = up.readable().await {
            break Err(e);
        }
        match up.try_read(&mut buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => break other,
        }
    };
    if let Ok(k) = n {
        data.extend_from_slice(&buf[..k]);
        if k > 0 {
            ctx.cx.touch();
            ctx.cx.down.fetch_add(k as u64, Ordering::Relaxed);
        }
    }
    relay::give_buf(buf);
    n
}

/// Pass bytes read on as `responses_down` would (write, then observe).
async fn hand_back<C: Wire>(
    ctx: &Ctx<'_>,
    client: &C,
    data: Vec<u8>,
    resp: &mut Resp,
    max_head: usize,
) -> Result<(), End> {
    let written = client.write_all(&data).await;
    observe(ctx, resp, &data, max_head);
    written.map_err(End::Error)
}

/// Body bytes of the front response, for its record.
fn add_body_bytes(ctx: &Ctx<'_>, n: usize) {
    let mut ex = ctx.exchange.lock();
    if let Some(rec) = ex.pending.front_mut().and_then(|p| p.rec.as_mut()) {
        rec.bytes_down += n as u64;
    }
}

/// The upstream ended (or failed) at a response boundary while a request
/// waits for its answer. A redirected port-80 client talks to chatwall as
/// to an intercepting proxy: it gets a 502 naming the cause, as explicit
/// HTTP would. (Inside a CONNECT the client addressed the origin, and the
/// tunnel just closes.) Returns whether the page was written.
async fn bad_gateway<C: Wire>(ctx: &Ctx<'_>, client: &C, resp: &Resp, why: &str) -> bool {
    if ctx.flow.ctx.listener != ListenerKind::TransparentHttp {
        return false;
    }
    let rec = {
        let mut ex = ctx.exchange.lock();
        // Only for a connection's first request: a server that closes a
        // kept-alive connection as the next request comes is a race the
        // client retries on a plain close, not a failure to report.
        match (resp, ex.pending.is_empty(), ex.answered) {
            (Resp::Head(partial), false, 0) if partial.is_empty() => ex.pending.pop_front(),
            _ => return false,
        }
    };
    let e = FlowError::UpstreamReset(format!("{why} before responding"));
    ctx.shared.metrics.upstream_error(e.kind());
    if let Some(mut rec) = rec.and_then(|p| p.rec) {
        rec.status = e.status().as_u16();
        rec.error = Some(e.to_string());
        ctx.shared.access_log.write(*rec);
    }
    let page = refuse::page_bytes(&e, &ctx.engine.signatures);
    client.write_all(&page).await.is_ok()
}

/// The upstream ended its side: a body until close ends here.
fn ended(ctx: &Ctx<'_>, resp: &mut Resp) {
    let mut ex = ctx.exchange.lock();
    if let Resp::Body(Following::UntilClose) = resp {
        if let Some(p) = ex.pending.pop_front() {
            if let Some(rec) = p.rec {
                ctx.shared.access_log.write(*rec);
            }
        }
    }
    ex.upstream_ended = true;
    drop(ex);
    *resp = Resp::Off;
    ctx.exchange.changed.notify_waiters();
}

/// Follow the responses through `data`, just relayed to the client.
fn observe(ctx: &Ctx<'_>, resp: &mut Resp, mut data: &[u8], max_head: usize) {
    let mut changed = false;
    while !data.is_empty() {
        match resp {
            Resp::Off => break,
            Resp::Body(body) => {
                let mut body_bytes = 0u64;
                let progress = body.advance(data, &mut |d| body_bytes += d.len() as u64);
                let mut ex = ctx.exchange.lock();
                if let Some(rec) = ex.pending.front_mut().and_then(|p| p.rec.as_mut()) {
                    rec.bytes_down += body_bytes;
                }
                match progress {
                    Ok(Progress::More) => break,
                    Ok(Progress::Ended(k)) => {
                        ex.answered += 1;
                        if let Some(rec) = ex.pending.pop_front().and_then(|p| p.rec) {
                            ctx.shared.access_log.write(*rec);
                        }
                        changed = true;
                        data = &data[k..];
                        *resp = Resp::Head(Vec::new());
                    }
                    Err(_) => {
                        ex.lost = true;
                        changed = true;
                        *resp = Resp::Off;
                    }
                }
            }
            Resp::Head(partial) => {
                let before = partial.len();
                if before > 0 {
                    partial.extend_from_slice(&data[..data.len().min(max_head)]);
                    // A head that comes in pieces is parsed again only when
                    // its end may be there, or every KiB: linear cost.
                    let fresh = &partial[before.saturating_sub(3)..];
                    let may_end = fresh.windows(2).any(|w| w == b"\n\n")
                        || fresh.windows(3).any(|w| w == b"\n\r\n");
                    if !may_end
                        && before / 1024 == partial.len() / 1024
                        && partial.len() <= max_head
                    {
                        break;
                    }
                }
                let mut headers = [httparse::EMPTY_HEADER; RESPONSE_FIELDS];
                let mut r = httparse::Response::new(&mut headers);
                let parsed = if before == 0 {
                    r.parse(data)
                } else {
                    r.parse(partial)
                };
                let mut guard = ctx.exchange.lock();
                let ex = &mut *guard;
                let head_len = match parsed {
                    Ok(httparse::Status::Complete(n)) => n,
                    Ok(httparse::Status::Partial) if before + data.len() <= max_head => {
                        if before == 0 {
                            partial.extend_from_slice(data);
                        }
                        break;
                    }
                    _ => {
                        // Not a response we can follow.
                        ex.lost = true;
                        changed = true;
                        *resp = Resp::Off;
                        break;
                    }
                };
                let Some(front) = ex.pending.front_mut() else {
                    // A response nobody (that we know of) asked for.
                    ex.lost = true;
                    changed = true;
                    *resp = Resp::Off;
                    break;
                };
                let status = r.code.unwrap_or(0);
                let reply = h1::response_body(front.asked, &r);
                let consumed = head_len - before;
                data = &data[consumed..];
                match reply {
                    Ok(Reply::Interim) => {
                        *resp = Resp::Head(Vec::new());
                    }
                    Ok(Reply::Switch) => {
                        if let Some(mut rec) = ex.pending.pop_front().and_then(|p| p.rec) {
                            rec.status = status;
                            ctx.shared.access_log.write(*rec);
                        }
                        // What follows is not HTTP: the request side may
                        // go opaque.
                        ex.switch = Some(true);
                        ex.lost = true;
                        changed = true;
                        *resp = Resp::Off;
                    }
                    Ok(Reply::Final(body)) => {
                        if front.asked.upgrade || front.asked.connect {
                            // Not switched: HTTP goes on both ways.
                            ex.switch = Some(false);
                            changed = true;
                        }
                        if let Some(rec) = front.rec.as_mut() {
                            rec.status = status;
                        }
                        match Following::new(body) {
                            Some(f) => *resp = Resp::Body(f),
                            None => {
                                ex.answered += 1;
                                if let Some(rec) = ex.pending.pop_front().and_then(|p| p.rec) {
                                    ctx.shared.access_log.write(*rec);
                                }
                                changed = true;
                                *resp = Resp::Head(Vec::new());
                            }
                        }
                    }
                    Err(_) => {
                        ex.lost = true;
                        changed = true;
                        *resp = Resp::Off;
                    }
                }
            }
        }
    }
    if changed {
        ctx.exchange.changed.notify_waiters();
    }
}
