//! Explicit absolute-form HTTP/1.1, forwarded without an HTTP library's
//! state machines: each request head is parsed once (httparse), decided,
//! rewritten only where a forward proxy must (origin form, hop-by-hop
//! fields, `Host`, `Via`; see [`heads`]) and sent on an upstream
//! connection from this module's own pool; the response head is rewritten
//! the same way and its body relayed as it comes, followed only to find
//! where it ends (`classify::h1`). Requests on one client connection are
//! answered in order, one at a time; pipelined ones wait in the buffer.
//!
//! This is the path of ordinary browsing through an explicit proxy. What
//! it does not take ([`heads::screen`]: HTTP/1.0, protocol switches,
//! `Expect`, chunked or long request bodies, installer digests, the
//! parent proxy, Negotiate, anything malformed) goes, from that request
//! on, to the general HTTP server (`explicit::serve_with`) with the
//! unread bytes in front, which answers it as it always has.
pub mod heads;
mod pool;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

pub use pool::{Pool, MAX_IDLE, MAX_IDLE_PER_ORIGIN};

use super::conn::ConnCtx;
use super::explicit;
use super::prefixed::Prefixed;
use super::refuse::{FlowError, ProxyBody};
use super::relay;
use super::upstream;
use super::Shared;
use crate::access_log::Record;
use crate::classify::h1::{self, Body, Following, Progress, Reply};
use crate::decide::{self, Findings, HeadDecision};
use crate::engine::Engine;

/// Room for a read.
const READ: usize = 16 * 1024;
/// Interim (1xx) responses passed on before a final one, at most.
const MAX_INTERIM: usize = 16;

/// Serve an explicit client connection whose first head is in `buf`.
pub async fn serve(shared: Arc<Shared>, mut stream: TcpStream, mut buf: BytesMut, ctx: ConnCtx) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let engine = shared.engine.load_full();
        let limits = &engine.config.limits;
        let max_head = limits.max_request_head_bytes.max(8192);
        let deadline = Instant::now() + limits.header_read_timeout;
        // The next head: whole and taken here, or the general server's.
        let via = shared.via_token();
        let screened = match read_head(&mut stream, &mut buf, deadline, &mut shutdown, |b| {
            heads::screen(b, max_head, limits.max_headers, via)
        })
        .await
        {
            Ok(s) => s,
            Err(()) => return,
        };
        let req = match screened {
            Ok(r) if takes(&engine) && !digested(&engine, &r) => r,
            _ => break,
        };
        // The whole body, before anything is decided.
        // The body may take longer than the head: each read of it gets
        // the upstream idle bound, as a streamed body would.
        let idle = limits.upstream_response_timeout;
        let body = match read_body(&mut stream, &mut buf, &req, idle).await {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(()) => return,
        };
        let message = buf.split_to(req.head_len + body.len);
        let req = heads::Request {
            body_data: body.data,
            ..req
        };
        let keep = Box::pin(exchange(&shared, &engine, &stream, &ctx, req, &message)).await;
        if !keep || *shutdown.borrow() {
            return;
        }
        if buf.is_empty() {
            // An idle keep-alive connection holds no buffer.
            buf = BytesMut::new();
        }
    }
    // From this request on, the general server's.
    let io = TokioIo::new(Prefixed::new(buf.freeze(), stream));
    Box::pin(explicit::serve_with(shared, io, ctx, None)).await;
}

/// Does this path serve the configuration? Not with a parent proxy or
/// Negotiate (a connection-wide login), which the general server handles.
fn takes(engine: &Engine) -> bool {
    engine.config.parent.is_none()
        && engine
            .config
            .auth
            .as_ref()
            .map_or(true, |a| a.negotiate.is_none())
}

/// A GET whose answer is hashed against `[[downloads]] sha256` rules goes
/// through the general server's digesting body.
fn digested(engine: &Engine, req: &heads::Request) -> bool {
    req.method == "GET" && engine.signatures.has_sha256()
}

/// Read until `screen` says more than [`heads::INCOMPLETE`] of `buf` (or
/// the client ends inside a head: the general server answers that).
/// `Err` when the connection is over: closed between requests, idle past
/// the deadline, or shutting down while idle.
async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    deadline: Instant,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    screen: impl Fn(&[u8]) -> Result<heads::Request, heads::Elsewhere>,
) -> Result<Result<heads::Request, heads::Elsewhere>, ()> {
    loop {
        if !buf.is_empty() {
            match screen(buf) {
                Err(heads::INCOMPLETE) => {}
                done => return Ok(done),
            }
        }
        let idle = buf.is_empty();
        buf.reserve(READ);
        // `read_buf` (not readiness and `try_read`): a read that leaves
        // room in the buffer tells tokio the socket is drained, which
        // saves a `recvfrom` that would only say EAGAIN.
        let read = tokio::select! {
            r = stream.read_buf(buf) => r,
            _ = tokio::time::sleep_until(deadline) => return Err(()),
            _ = super::shutdown_requested(shutdown), if idle => return Err(()),
        };
        match read {
            Ok(0) if !buf.is_empty() => return Ok(Err(heads::INCOMPLETE)),
            Ok(0) | Err(_) => return Err(()),
            Ok(_) => {}
        }
    }
}

struct ReadBody {
    /// Bytes after the head, as sent.
    len: usize,
    /// Data bytes (chunk framing not counted).
    data: u64,
}

/// Read the request's body into `buf` after its head. `Ok(None)`: the
/// general server takes the request (a chunked body longer than this path
/// holds, or broken framing); `Err`: the client went away or sent nothing
/// for `idle`.
async fn read_body(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    req: &heads::Request,
    idle: Duration,
) -> Result<Option<ReadBody>, ()> {
    loop {
        match heads::body_end(req.body, &buf[req.head_len..]) {
            Ok(Some((len, data))) => return Ok(Some(ReadBody { len, data })),
            Ok(None) => {}
            Err(_) => return Ok(None),
        }
        match read_more(stream, buf, Instant::now() + idle).await {
            Ok(n) if n > 0 => {}
            _ => return Err(()),
        }
    }
}

/// One request and its response. `message` is the client's head and
/// whole body. Returns whether the client connection goes on.
async fn exchange(
    shared: &Arc<Shared>,
    engine: &Arc<Engine>,
    client: &TcpStream,
    ctx: &ConnCtx,
    req: heads::Request,
    message: &[u8],
) -> bool {
    let mut ctx = ctx.clone();
    let mut rec = explicit::new_record(shared, &ctx, &req.method, &req.target);
    let head_request = req.method == "HEAD";
    let decided = admit(shared, engine, &mut ctx, &req, message, &mut rec).await;
    let addrs = match decided {
        Ok(addrs) => addrs,
        Err(Answer::Auth(resp)) => return answer(client, resp, head_request, req.close).await,
        Err(Answer::Refused(e)) => {
            let resp = explicit::refusal(shared, engine, &ctx, e, rec);
            return answer(client, resp, head_request, req.close).await;
        }
    };
    if !shared.access_log.is_off() {
        rec.upstream = Some(format!("{}:{}", req.host, req.port));
    }
    let mut out = req.upstream_head;
    heads::finish(&mut out, req.via_at, shared.via.as_bytes(), false);
    out.extend_from_slice(&message[req.head_len..]);
    let body_up = req.body_data;

    let key = pool::Key::new(&req.host, req.port);
    let retry = retryable(&req.method);
    let outcome = send(shared, engine, &key, &addrs, &out, head_request, retry).await;
    let (up, resp, rbuf) = match outcome {
        Ok(v) => v,
        Err(e) => {
            let resp = explicit::refusal(shared, engine, &ctx, e, rec);
            return answer(client, resp, head_request, req.close).await;
        }
    };
    rec.bytes_up += body_up;
    shared.metrics.bytes_up.inc_by(body_up);
    relay_response(
        shared,
        engine,
        client,
        up,
        key,
        resp,
        rbuf,
        req.close,
        head_request,
        rec,
    )
    .await
}

/// What a request gets instead of going upstream.
enum Answer {
    Auth(http::Response<ProxyBody>),
    Refused(FlowError),
}

impl From<FlowError> for Answer {
    fn from(e: FlowError) -> Self {
        Answer::Refused(e)
    }
}

impl From<decide::Refusal> for Answer {
    fn from(r: decide::Refusal) -> Self {
        Answer::Refused(r.into())
    }
}

/// Credentials, then every decision on the request, as the general
/// server's `forward` makes them: names and port, downloads, head and body
/// rules, then the addresses. Returns the addresses to connect to.
async fn admit(
    shared: &Arc<Shared>,
    engine: &Arc<Engine>,
    ctx: &mut ConnCtx,
    req: &heads::Request,
    message: &[u8],
    rec: &mut Record,
) -> Result<Arc<[std::net::SocketAddr]>, Answer> {
    if let Some(auth) = &engine.config.auth {
        let (outcome, groups) = shared
            .authenticate(engine, auth, req.proxy_authorization.as_deref())
            .await;
        match outcome {
            crate::auth::AuthOutcome::User(u) => {
                rec.user = Some(u.to_string());
                rec.groups.clone_from(&groups);
                ctx.client.user = Some(u);
                ctx.client.groups = groups;
            }
            outcome => {
                let rec = std::mem::take(rec);
                return Err(Answer::Auth(explicit::auth_refusal(
                    shared, ctx, auth, outcome, rec,
                )));
            }
        }
    }
    if req.looped {
        return Err(FlowError::LoopDetected.into());
    }
    let who = ctx.client.who();
    if !shared.access_log.is_off() {
        rec.host = Some(req.host.clone());
    }
    let mut findings = Findings::default();
    let host = &req.host;
    let allowlisted = decide::name(engine, &who, host, req.port, &mut findings)?;
    if !allowlisted {
        // The head again, for the rules that read it (the borrow of the
        // first parse ended with `screen`).
        let mut fields = [httparse::EMPTY_HEADER; heads::MAX_FIELDS];
        let mut view = httparse::Request::new(&mut fields);
        if view.parse(message).is_err() {
            return Err(FlowError::BadRequest("unparsable request head").into());
        }
        let has_body = req.body != Body::None;
        let head = decide::request_rules(engine, &who, host, &view, has_body, &mut findings)?;
        if let HeadDecision::NeedBody { window } = head {
            let (prefix, _) = h1::body_prefix(req.body, &message[req.head_len..], window)
                .map_err(FlowError::BadRequest)?;
            decide::request_body(engine, &who, &view, &prefix, &mut findings)?;
        }
    }
    let addrs = upstream::resolve_checked(
        shared,
        engine,
        &who,
        host,
        req.port,
        allowlisted,
        &mut findings,
    )
    .await?;
    let verdict = findings.verdict();
    shared.record_verdict(ctx.listener, engine, &verdict, rec);
    Ok(addrs)
}

/// How long a client may leave a response unread before the connection
/// is dropped (it holds an upstream connection meanwhile).
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Write to the client, bounded by [`CLIENT_WRITE_TIMEOUT`].
async fn write_client(client: &TcpStream, bytes: &[u8]) -> io::Result<()> {
    tokio::time::timeout(CLIENT_WRITE_TIMEOUT, relay::write_all(client, bytes))
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Methods a request may be sent again with when a pooled connection
/// turns out closed before any answer (RFC 9110 §9.2.2).
fn retryable(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "PUT" | "DELETE" | "TRACE")
}

/// Write the proxy's own response; whether the connection goes on.
async fn answer(
    client: &TcpStream,
    resp: http::Response<ProxyBody>,
    head_request: bool,
    close: bool,
) -> bool {
    let (parts, body) = resp.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
        return false;
    };
    let mut parts = parts;
    let closing = close
        || parts
            .headers
            .get(http::header::CONNECTION)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    if closing {
        // Said, not only done (RFC 9112 §9.6).
        parts.headers.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    let bytes = heads::own_response(&parts, &body, head_request);
    write_client(client, &bytes).await.is_ok() && !closing
}

/// Send the request on a pooled connection, or a new one, and read the
/// response head. A pooled connection that the origin closed before
/// answering gets the request again on a new one, once, if it is safe
/// to repeat.
async fn send(
    shared: &Shared,
    engine: &Engine,
    key: &pool::Key,
    addrs: &[std::net::SocketAddr],
    request: &[u8],
    head_request: bool,
    retry: bool,
) -> Result<(TcpStream, heads::Response, BytesMut), FlowError> {
    let limits = &engine.config.limits;
    if let Some(mut up) = shared.pool.take(key) {
        match round_trip(
            &mut up,
            request,
            limits.upstream_response_timeout,
            head_request,
        )
        .await
        {
            Ok((resp, rbuf)) => return Ok((up, resp, rbuf)),
            Err(Trip::Unanswered(_)) if retry => {}
            Err(Trip::Unanswered(e) | Trip::Failed(e)) => return Err(e),
        }
    }
    for a in addrs {
        if upstream::denied_destination(&shared.guard, engine, *a) {
            return Err(FlowError::DeniedDestination(a.ip()));
        }
    }
    let (mut up, _) =
        upstream::connect(addrs, limits.connect_timeout, engine.config.upstream_mark).await?;
    match round_trip(
        &mut up,
        request,
        limits.upstream_response_timeout,
        head_request,
    )
    .await
    {
        Ok((resp, rbuf)) => Ok((up, resp, rbuf)),
        Err(Trip::Unanswered(e) | Trip::Failed(e)) => Err(e),
    }
}

enum Trip {
    /// Nothing came back before the connection ended.
    Unanswered(FlowError),
    Failed(FlowError),
}

/// Write `request` and read up to the end of the first response head
/// (interim responses are returned like final ones).
async fn round_trip(
    up: &mut TcpStream,
    request: &[u8],
    timeout: Duration,
    head_request: bool,
) -> Result<(heads::Response, BytesMut), Trip> {
    if let Err(e) = relay::write_all(up, request).await {
        return Err(Trip::Unanswered(FlowError::UpstreamReset(e.to_string())));
    }
    let mut rbuf = BytesMut::with_capacity(READ);
    let deadline = Instant::now() + timeout;
    loop {
        match read_more(up, &mut rbuf, deadline).await {
            Ok(0) if rbuf.is_empty() => {
                return Err(Trip::Unanswered(FlowError::UpstreamReset(
                    "the origin closed the connection without answering".into(),
                )))
            }
            Ok(0) => {
                return Err(Trip::Failed(FlowError::UpstreamReset(
                    "the origin closed the connection inside a response head".into(),
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(Trip::Failed(FlowError::UpstreamTimeout))
            }
            Err(e) if rbuf.is_empty() => {
                return Err(Trip::Unanswered(FlowError::UpstreamReset(e.to_string())))
            }
            Err(e) => return Err(Trip::Failed(FlowError::UpstreamReset(e.to_string()))),
        }
        match heads::response(&rbuf, head_request) {
            Ok(Some(resp)) if resp.head_len > MAX_RESPONSE_HEAD => {
                return Err(Trip::Failed(FlowError::UpstreamProtocol(
                    "response head over 64 KiB".into(),
                )))
            }
            Ok(Some(resp)) => return Ok((resp, rbuf)),
            Ok(None) if rbuf.len() <= MAX_RESPONSE_HEAD => {}
            Ok(None) => {
                return Err(Trip::Failed(FlowError::UpstreamProtocol(
                    "response head over 64 KiB".into(),
                )))
            }
            Err(why) => return Err(Trip::Failed(FlowError::UpstreamProtocol(why))),
        }
    }
}

/// The longest response head read.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Read what is there into `buf`, waiting until `deadline`.
async fn read_more(s: &mut TcpStream, buf: &mut BytesMut, deadline: Instant) -> io::Result<usize> {
    buf.reserve(READ);
    tokio::time::timeout_at(deadline, s.read_buf(buf))
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

/// Pass the response on: interim ones, then the final head and its body
/// as it comes. The upstream connection goes back to the pool when the
/// body ended where its framing says and nothing followed it. Returns
/// whether the client connection goes on.
#[allow(clippy::too_many_arguments)]
async fn relay_response(
    shared: &Shared,
    engine: &Engine,
    client: &TcpStream,
    mut up: TcpStream,
    key: pool::Key,
    mut resp: heads::Response,
    mut rbuf: BytesMut,
    client_close: bool,
    head_request: bool,
    mut rec: Record,
) -> bool {
    let idle = engine.config.limits.upstream_response_timeout;
    let via = shared.via.as_bytes();
    let mut interim = 0;
    // Interim answers (103 Early Hints, 100 Continue) go on as they come.
    while resp.reply == Reply::Interim {
        interim += 1;
        let mut head = std::mem::take(&mut resp.client_head);
        heads::finish(&mut head, resp.via_at, via, false);
        let _ = rbuf.split_to(resp.head_len);
        if interim > MAX_INTERIM || write_client(client, &head).await.is_err() {
            rec.error = Some("too many interim responses, or the client went away".into());
            shared.access_log.write(rec);
            return false;
        }
        let deadline = Instant::now() + idle;
        resp = loop {
            match heads::response(&rbuf, head_request) {
                Ok(Some(r)) if r.head_len <= MAX_RESPONSE_HEAD => break r,
                Ok(None) if rbuf.len() <= MAX_RESPONSE_HEAD => {}
                _ => {
                    rec.error = Some("malformed response after an interim one".into());
                    shared.access_log.write(rec);
                    return false;
                }
            }
            match read_more(&mut up, &mut rbuf, deadline).await {
                Ok(n) if n > 0 => {}
                _ => {
                    rec.error = Some("the origin ended after an interim response".into());
                    shared.access_log.write(rec);
                    return false;
                }
            }
        };
    }
    let Reply::Final(body) = resp.reply else {
        return false;
    };
    rec.status = resp.status;
    let until_close = body == Body::UntilClose;
    let close = client_close || until_close;
    let mut out = std::mem::take(&mut resp.client_head);
    heads::finish(&mut out, resp.via_at, via, close);
    // The body bytes that came with the head go in the same write.
    out.reserve(rbuf.len().saturating_sub(resp.head_len));
    let _ = rbuf.split_to(resp.head_len);

    let mut following = Following::new(body);
    let mut down = 0u64;
    let mut clean = true;
    // Follow what came with the head, then read on until the body ends.
    loop {
        let taken = match following.as_mut() {
            None => 0,
            Some(f) => match f.advance(&rbuf, &mut |d| down += d.len() as u64) {
                Ok(Progress::More) => rbuf.len(),
                Ok(Progress::Ended(n)) => {
                    following = None;
                    n
                }
                Err(why) => {
                    rec.error = Some(format!("response body framing: {why}"));
                    clean = false;
                    out.extend_from_slice(&rbuf);
                    let _ = write_client(client, &out).await;
                    break;
                }
            },
        };
        out.extend_from_slice(&rbuf[..taken]);
        let _ = rbuf.split_to(taken);
        if following.is_none() {
            // The body ended: the upstream connection is free again (if
            // nothing followed the body) and the exchange is logged before
            // its last bytes go, so that the log has it before the client
            // can send anything else.
            rec.bytes_down += down;
            shared.metrics.bytes_down.inc_by(down);
            if resp.reusable && rbuf.is_empty() {
                let ttl = engine.config.limits.upstream_idle_timeout;
                shared.pool.put(key, up, ttl);
            }
            shared.access_log.write(rec);
            return write_client(client, &out).await.is_ok() && !close;
        }
        if write_client(client, &out).await.is_err() {
            rec.error = Some("the client went away".into());
            clean = false;
            break;
        }
        out.clear();
        rbuf.clear();
        match read_more(&mut up, &mut rbuf, Instant::now() + idle).await {
            Ok(0) if until_close => break,
            Ok(0) => {
                rec.error = Some("the origin closed the connection inside a body".into());
                clean = false;
                break;
            }
            Ok(_) => {}
            Err(e) => {
                rec.error = Some(format!("reading the body: {e}"));
                clean = false;
                break;
            }
        }
    }
    // Ended by the close (or cut short): neither connection goes on.
    rec.bytes_down += down;
    shared.metrics.bytes_down.inc_by(down);
    shared.access_log.write(rec);
    clean && !close
}
