//! HTTP front end on hyper: absolute-form requests and CONNECT on the
//! explicit listener, and origin-form requests to a fixed destination for
//! redirected port-80 traffic and HTTP found inside tunnels. Each request is
//! decided on its own, before anything reaches the upstream.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::body::{
    read_prefix, CountedBody, DigestBody, FlowLog, IdleTimeoutBody, LoggedBody, PrefixedBody,
};
use super::conn::ConnCtx;
use super::hop_by_hop;
use super::parent::{self, Hop};
use super::refuse::{self, empty, FlowError, ProxyBody};
use super::upstream::{self, DestGuard, Resolver};
use super::Shared;
use crate::access_log::Record;
use crate::decide::{self, Findings, HeadDecision};
use crate::engine::Engine;

/// The body type sent upstream.
pub type UpstreamBody = CountedBody<PrefixedBody>;

/// The pooled upstream HTTP/1.1 clients: direct, and through the parent
/// proxy (requests in absolute form; pooled per destination, as
/// hyper-util keys its pool by the request's origin).
pub struct UpstreamClient {
    client: Client<Connector, UpstreamBody>,
    via_parent: Client<ParentConnector, UpstreamBody>,
}

impl UpstreamClient {
    pub fn new(
        engine: &Arc<ArcSwap<Engine>>,
        resolver: &Arc<Resolver>,
        guard: &Arc<DestGuard>,
    ) -> Self {
        let cfg = &engine.load().config;
        let connector = Connector {
            engine: Arc::clone(engine),
            resolver: Arc::clone(resolver),
            guard: Arc::clone(guard),
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(cfg.limits.upstream_idle_timeout)
            .pool_max_idle_per_host(super::forward::MAX_IDLE_PER_ORIGIN)
            .set_host(false)
            // Header names go upstream as the client wrote them (the case
            // map travels in the request's extensions); the few this proxy
            // adds (Via, framing) in title case.
            .http1_preserve_header_case(true)
            .http1_title_case_headers(true);
        let via_parent = builder.build(ParentConnector {
            engine: Arc::clone(engine),
            resolver: Arc::clone(resolver),
            guard: Arc::clone(guard),
        });
        let client = builder.build(connector);
        UpstreamClient { client, via_parent }
    }
}

/// Connects pooled connections to the parent proxy (`[upstream] parent`
/// as it is when the connection is made), whatever the request's origin.
#[derive(Clone)]
struct ParentConnector {
    engine: Arc<ArcSwap<Engine>>,
    resolver: Arc<Resolver>,
    guard: Arc<DestGuard>,
}

impl tower_service::Service<Uri> for ParentConnector {
    type Response = parent::Connection;
    type Error = FlowError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, FlowError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let engine = this.engine.load_full();
            let p = engine
                .config
                .parent
                .as_ref()
                .ok_or_else(|| FlowError::Connect("no parent proxy is configured".into()))?;
            let (s, _) = parent::connect(&engine, &this.resolver, &this.guard, p, None).await?;
            Ok(parent::Connection(TokioIo::new(s)))
        })
    }
}

/// Connects pooled upstream connections: resolves through the shared cache
/// (the addresses the request was checked against), refuses denied
/// destinations again, connects under the deadline with the socket mark.
#[derive(Clone)]
struct Connector {
    engine: Arc<ArcSwap<Engine>>,
    resolver: Arc<Resolver>,
    guard: Arc<DestGuard>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = FlowError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, FlowError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), FlowError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let engine = this.engine.load_full();
            let host = uri.host().ok_or(FlowError::BadRequest("no host"))?;
            let port = uri.port_u16().unwrap_or(80);
            let limits = &engine.config.limits;
            let addrs = this
                .resolver
                .resolve(host, port, limits.dns_timeout)
                .await?;
            for a in addrs.iter() {
                if upstream::denied_destination(&this.guard, &engine, *a) {
                    return Err(FlowError::DeniedDestination(a.ip()));
                }
            }
            let (s, _) =
                upstream::connect(&addrs, limits.connect_timeout, engine.config.upstream_mark)
                    .await?;
            Ok(TokioIo::new(s))
        })
    }
}

/// Serve HTTP/1.x on a client connection until it closes.
pub async fn serve<I>(shared: Arc<Shared>, io: I, ctx: ConnCtx)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    serve_with(shared, io, ctx, None).await
}

/// Serve HTTP/1.x; `first`, when given, is the response to the first
/// request, already decided and logged (a CONNECT refused before the HTTP
/// server saw the connection).
pub async fn serve_with<I>(
    shared: Arc<Shared>,
    io: I,
    ctx: ConnCtx,
    first: Option<Response<ProxyBody>>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let limits = shared.engine.load().config.limits.clone();
    let svc_shared = Arc::clone(&shared);
    let addr = ctx.client.addr;
    // A lock only on connections that have a decided first response.
    let first = first.map(|r| std::sync::Mutex::new(Some(r)));
    let negotiated = Negotiated::default();
    let svc = hyper::service::service_fn(move |req| {
        let shared = Arc::clone(&svc_shared);
        let ctx = ctx.clone();
        let negotiated = Arc::clone(&negotiated);
        let decided = first.as_ref().and_then(|f| {
            f.lock()
                .map(|mut f| f.take())
                .unwrap_or_else(|e| e.into_inner().take())
        });
        async move {
            Ok::<_, Infallible>(match decided {
                Some(resp) => resp,
                None => handle(shared, ctx, req, &negotiated).await,
            })
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_request_head_bytes.max(8192))
        .max_headers(limits.max_headers)
        .keep_alive(true)
        .half_close(false)
        // Responses reach the client with the origin's header names as
        // written, and without a Date the origin did not send; refusals
        // carry their own (refuse.rs).
        .preserve_header_case(true)
        .title_case_headers(true)
        .auto_date_header(false);
    let conn = builder.serve_connection(io, svc).with_upgrades();
    let mut shutdown = shared.shutdown.subscribe();
    tokio::pin!(conn);
    tokio::select! {
        r = &mut conn => {
            if let Err(e) = r {
                tracing::debug!(client = %addr, error = %e, "client connection ended");
            }
        }
        _ = super::shutdown_requested(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(limits.shutdown_grace, conn).await;
        }
    }
}

/// A request's access-log record, before any decision. With the log off
/// only what decisions read is kept (no clock, no formatting).
pub fn new_record(
    shared: &Shared,
    ctx: &ConnCtx,
    method: &str,
    target: &dyn std::fmt::Display,
) -> Record {
    if shared.access_log.is_off() {
        return Record {
            listener: ctx.listener.as_str(),
            verdict: "allow",
            ..Record::default()
        };
    }
    Record {
        start: Some(SystemTime::now()),
        client: ctx.client.addr.to_string(),
        listener: ctx.listener.as_str(),
        method: method.to_string(),
        target: target.to_string(),
        verdict: "allow",
        ..Record::default()
    }
}

/// The user a connection authenticated with `Negotiate`: the scheme
/// authenticates the connection (RFC 4559 §4), and browsers send no
/// credentials on its later requests.
type Negotiated = Arc<std::sync::Mutex<Option<Arc<str>>>>;

async fn handle(
    shared: Arc<Shared>,
    mut ctx: ConnCtx,
    req: Request<Incoming>,
    negotiated: &Negotiated,
) -> Response<ProxyBody> {
    let engine = shared.engine.load_full();
    if let Some(pac) = crate::pac::origin_form(&engine.config, &req) {
        return pac; // the PAC file, before credentials (see pac.rs)
    }
    let mut rec = new_record(&shared, &ctx, req.method().as_str(), req.uri());
    if let Some(auth) = &engine.config.auth {
        let header = req
            .headers()
            .get(header::PROXY_AUTHORIZATION)
            .map(|v| v.as_bytes());
        let pinned = match (header, &auth.negotiate) {
            (None, Some(_)) => negotiated.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            _ => None,
        };
        let (outcome, groups) = match pinned {
            Some(user) => {
                let groups = shared.groups_of(&engine, &user).await;
                (crate::auth::AuthOutcome::User(user), groups)
            }
            None => shared.authenticate(&engine, auth, header).await,
        };
        if auth.negotiate.is_some() && header.is_some_and(|h| crate::negotiate::parse(h).is_some())
        {
            // A new handshake replaces (or, failed, drops) the connection's user.
            let user = match &outcome {
                crate::auth::AuthOutcome::User(u) => Some(Arc::clone(u)),
                _ => None,
            };
            *negotiated.lock().unwrap_or_else(|e| e.into_inner()) = user;
        }
        match outcome {
            crate::auth::AuthOutcome::User(u) => {
                rec.user = Some(u.to_string());
                rec.groups.clone_from(&groups);
                ctx.client.user = Some(u);
                ctx.client.groups = groups;
            }
            outcome => return auth_refusal(&shared, &ctx, auth, outcome, rec),
        }
    }
    let result = if req.method() == Method::CONNECT {
        super::tunnel::connect(&shared, &engine, ctx.clone(), req, &mut rec).await
    } else {
        forward(&shared, &engine, &ctx, req, &mut rec).await
    };
    match result {
        Ok(resp) => resp,
        Err(e) => refusal(&shared, &engine, &ctx, e, rec),
    }
}

/// Count, log and render a 407 for missing or wrong credentials.
pub fn auth_refusal(
    shared: &Shared,
    ctx: &ConnCtx,
    auth: &crate::config::Auth,
    outcome: crate::auth::AuthOutcome,
    mut rec: Record,
) -> Response<ProxyBody> {
    shared.metrics.auth_failures.inc();
    if outcome == crate::auth::AuthOutcome::Wrong {
        tracing::warn!(client = %ctx.client.addr, "proxy authentication failed");
    }
    let resp = refuse::proxy_auth_required(auth);
    rec.status = resp.status().as_u16();
    rec.verdict = "block";
    rec.reason = Some("auth");
    shared.access_log.write(rec);
    resp
}

/// Count, log and render a refusal or failure.
pub fn refusal(
    shared: &Arc<Shared>,
    engine: &Engine,
    ctx: &ConnCtx,
    e: FlowError,
    mut rec: Record,
) -> Response<ProxyBody> {
    shared.record_refusal(ctx.listener, engine, &e, &mut rec);
    let resp = refuse::respond(&e, &engine.signatures);
    rec.status = resp.status().as_u16();
    tracing::debug!(client = %ctx.client.addr, status = rec.status, error = %e, "request refused");
    shared.access_log.write(rec);
    resp
}

async fn forward(
    shared: &Arc<Shared>,
    engine: &Arc<Engine>,
    ctx: &ConnCtx,
    req: Request<Incoming>,
    rec: &mut Record,
) -> Result<Response<ProxyBody>, FlowError> {
    let (mut parts, body) = req.into_parts();
    let who = ctx.client.who();
    validate_framing(&parts)?;
    if came_through_us(&parts.headers, shared.via_token()) {
        // A transparent gateway whose exemption for chatwall's own traffic
        // is missing sends our requests back to us.
        return Err(FlowError::LoopDetected);
    }

    // Where to: the absolute URI.
    match parts.uri.scheme_str() {
        Some("http") => {}
        Some(_) => {
            return Err(FlowError::BadRequest(
                "only http:// URLs are fetched; use CONNECT for others",
            ))
        }
        None => {
            return Err(FlowError::BadRequest(
                "not a proxy request (origin-form target)",
            ))
        }
    }
    let host = parts
        .uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or(FlowError::BadRequest("no host in the request target"))?
        .to_string();
    let port = super::target::http_port(&parts.uri)?;
    if !shared.access_log.is_off() {
        rec.host = Some(host.clone());
    }

    let mut findings = Findings::default();
    let allowlisted = decide::name(engine, &who, &host, port, &mut findings)?;
    // Answers to GETs are hashed when digests are listed; a URL whose body
    // matched one is refused before its next request goes.
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let get = parts.method == http::Method::GET;
    let download = decide::download(engine, &who, get, &host, target, &mut findings)?;

    // Request rules: downloads, then HTTP head rules, then body rules.
    let mut body_prefix = (Bytes::new(), None, Some(body));
    if !allowlisted {
        let has_body = !body_prefix
            .2
            .as_ref()
            .is_some_and(http_body::Body::is_end_stream);
        let head = decide::request_rules(engine, &who, &host, &parts, has_body, &mut findings)?;
        if let (HeadDecision::NeedBody { window }, Some(b)) = (head, body_prefix.2.take()) {
            body_prefix = read_prefix(b, window, engine.config.first_bytes_timeout)
                .await
                .map_err(|_| FlowError::BadRequest("request body aborted"))?;
            decide::request_body(engine, &who, &parts, &body_prefix.0, &mut findings)?;
        }
    }

    // Names: every address must pass the CIDR rules and denied ranges;
    // through the parent, which resolves names, only an address the
    // client named (see `proxy::parent`).
    let hop = parent::hop(engine, &shared.resolver, &host, port).await;
    let literal = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .is_ok();
    if matches!(hop, Hop::Direct) || literal {
        upstream::resolve_checked(
            shared,
            engine,
            &who,
            &host,
            port,
            allowlisted,
            &mut findings,
        )
        .await?;
    }

    let verdict = findings.verdict();
    shared.record_verdict(ctx.listener, engine, &verdict, rec);

    // Build the upstream request: only the rewrites a forward proxy must
    // make (hop-by-hop fields, an h2c offer, Host from the target, Via).
    let upgrade = hop_by_hop::strip_request(&mut parts.headers);
    let offered: Vec<HeaderValue> = if upgrade {
        parts
            .headers
            .get_all(header::UPGRADE)
            .iter()
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let client_upgrade = upgrade.then(|| {
        // Take the client's upgrade handle before the request is consumed.
        let mut tmp = Request::new(());
        std::mem::swap(tmp.extensions_mut(), &mut parts.extensions);
        let on = hyper::upgrade::on(&mut tmp);
        std::mem::swap(tmp.extensions_mut(), &mut parts.extensions);
        on
    });
    let authority_host = parts.uri.authority().map(|a| a.as_str().to_string());
    if let Some(h) = authority_host.and_then(|h| HeaderValue::from_str(&h).ok()) {
        parts.headers.insert(header::HOST, h);
    }
    append_via(&mut parts.headers, &shared.via);
    if let Hop::Parent(p) = hop {
        // The client's own Proxy-Authorization went with the hop-by-hop
        // fields; the parent gets chatwall's.
        if let Some(v) = p
            .authorization
            .as_ref()
            .and_then(|a| HeaderValue::from_str(a.expose()).ok())
        {
            parts.headers.insert(header::PROXY_AUTHORIZATION, v);
        }
    }
    parts.version = Version::HTTP_11;
    let up_bytes = Arc::new(AtomicU64::new(0));
    let (prefix, trailers, rest) = body_prefix;
    let up_body = CountedBody::new(
        PrefixedBody::new(prefix, trailers, rest),
        Arc::clone(&up_bytes),
    );
    let upstream_req = Request::from_parts(parts, up_body);
    if !shared.access_log.is_off() {
        rec.upstream = Some(match hop {
            Hop::Direct => format!("{host}:{port}"),
            Hop::Parent(p) => format!("{host}:{port} via {}", p.authority),
        });
    }

    let timeout = engine.config.limits.upstream_response_timeout;
    let sent = match hop {
        Hop::Direct => shared.http.client.request(upstream_req),
        Hop::Parent(_) => shared.http.via_parent.request(upstream_req),
    };
    let mut resp = match tokio::time::timeout(timeout, sent).await {
        Err(_) => return Err(FlowError::UpstreamTimeout),
        Ok(Err(e)) => return Err(map_client_error(e)),
        Ok(Ok(r)) => r,
    };
    if let (Hop::Parent(p), StatusCode::PROXY_AUTHENTICATION_REQUIRED) = (hop, resp.status()) {
        // The parent wants chatwall's credentials, not the client's (whose
        // Proxy-Authorization is for chatwall and never passed on).
        return Err(FlowError::Parent {
            parent: p.authority.clone(),
            why: format!(
                "answered 407 {}",
                resp.status().canonical_reason().unwrap_or_default()
            ),
        });
    }

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Only to a protocol the client offered and this proxy passed on
        // (never h2c): anything else would leave the client's connection
        // in a protocol nobody inspects.
        let Some(client_on) =
            client_upgrade.filter(|_| hop_by_hop::switches_to_offered(&offered, resp.headers()))
        else {
            return Err(FlowError::UpstreamProtocol(
                "101 Switching Protocols to a protocol the request did not offer".into(),
            ));
        };
        let upstream_on = hyper::upgrade::on(&mut resp);
        let shared2 = Arc::clone(shared);
        let engine2 = Arc::clone(engine);
        let mut rec2 = std::mem::take(rec);
        rec2.status = 101;
        // The relay outlives the HTTP server's part of the connection:
        // it keeps the connection's slot under the caps.
        let slot = ctx.slot.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match tokio::try_join!(client_on, upstream_on) {
                Ok((c, u)) => {
                    super::relay::relay_upgraded(
                        &shared2,
                        &engine2,
                        TokioIo::new(c),
                        TokioIo::new(u),
                        &mut rec2,
                    )
                    .await;
                }
                Err(e) => rec2.error = Some(format!("upgrade failed: {e}")),
            }
            shared2.access_log.write(rec2);
        });
        let (mut rparts, _) = resp.into_parts();
        hop_by_hop::strip_response(&mut rparts.headers, true);
        append_via(&mut rparts.headers, &shared.via);
        return Ok(Response::from_parts(rparts, empty()));
    }

    let (mut rparts, rbody) = resp.into_parts();
    hop_by_hop::strip_response(&mut rparts.headers, false);
    hop_by_hop::drop_length_beside_coding(&mut rparts.headers);
    append_via(&mut rparts.headers, &shared.via);
    rec.status = rparts.status.as_u16();
    let log = FlowLog {
        shared: Arc::clone(shared),
        record: std::mem::take(rec),
        up: Some(up_bytes),
    };
    let idle = engine.config.limits.upstream_response_timeout;
    let body = match download {
        Some(url) if rparts.status == StatusCode::OK => {
            let hashed = DigestBody::new(rbody, Arc::clone(engine), Arc::clone(shared), who, url);
            IdleTimeoutBody::new(LoggedBody::new(hashed, log, true), idle).boxed()
        }
        _ => IdleTimeoutBody::new(LoggedBody::new(rbody, log, true), idle).boxed(),
    };
    Ok(Response::from_parts(rparts, body))
}

/// Refuse ambiguity hyper's parser lets through. hyper already rejects
/// Transfer-Encoding not ending in chunked, Transfer-Encoding on HTTP/1.0,
/// differing or invalid Content-Length values, obs-fold and bad chunk sizes,
/// and it drops Content-Length when Transfer-Encoding is present and closes
/// that connection after the response (RFC 9112 §6.3). What is left: more
/// than one Host field (RFC 9110 §7.2).
fn validate_framing(parts: &http::request::Parts) -> Result<(), FlowError> {
    if parts.headers.get_all(header::HOST).iter().count() > 1 {
        return Err(FlowError::BadRequest("more than one Host field"));
    }
    Ok(())
}

/// Does a `Via` field already name this instance?
fn came_through_us(headers: &HeaderMap, ours: &[u8]) -> bool {
    headers
        .get_all(header::VIA)
        .iter()
        .any(|v| v.as_bytes().windows(ours.len().max(1)).any(|w| w == ours))
}

fn append_via(headers: &mut HeaderMap, via: &HeaderValue) {
    headers.append(header::VIA, via.clone());
}

fn map_client_error(e: hyper_util::client::legacy::Error) -> FlowError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = src {
        if let Some(f) = s.downcast_ref::<FlowError>() {
            return match f {
                FlowError::Blocked(d) => FlowError::Blocked(*d),
                FlowError::DeniedDestination(ip) => FlowError::DeniedDestination(*ip),
                FlowError::Dns(m) => FlowError::Dns(m.clone()),
                FlowError::ConnectRefused(m) => FlowError::ConnectRefused(m.clone()),
                FlowError::ConnectTimeout(m) => FlowError::ConnectTimeout(m.clone()),
                FlowError::Parent { parent, why } => FlowError::Parent {
                    parent: parent.clone(),
                    why: why.clone(),
                },
                other => FlowError::Connect(other.to_string()),
            };
        }
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
                return FlowError::UpstreamProtocol(h.to_string());
            }
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return FlowError::UpstreamReset(h.to_string());
            }
            if h.is_timeout() {
                return FlowError::UpstreamTimeout;
            }
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return FlowError::UpstreamReset(io.to_string());
        }
        src = s.source();
    }
    if e.is_connect() {
        FlowError::Connect(e.to_string())
    } else {
        FlowError::UpstreamReset(e.to_string())
    }
}
