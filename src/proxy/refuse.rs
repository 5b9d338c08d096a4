//! Errors of a flow and the one place they become HTTP responses: the 403
//! page of a refusal, 400 for malformed requests, 502/504 for upstream
//! failures, 407 for missing credentials. Tunnels that are already open are
//! refused by reset instead (see `relay::reset`).
use std::fmt;
use std::io;
use std::net::IpAddr;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

use crate::classify::Detection;
use crate::decide::Refusal;
use crate::signatures::SignatureSet;

pub type ProxyBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Whose side a failure is on.
#[derive(Debug)]
pub enum FlowError {
    /// Refused by policy.
    Blocked(Detection),
    /// A destination the access rules never reach (loopback, link-local,
    /// the proxy itself...).
    DeniedDestination(IpAddr),
    /// A CONNECT to a port `[access] connect_ports` does not list.
    PortNotAllowed(u16),
    /// The client sent something malformed.
    BadRequest(&'static str),
    /// Name resolution failed.
    Dns(String),
    ConnectRefused(String),
    ConnectTimeout(String),
    Connect(String),
    /// The upstream reset or closed the connection before a full response.
    UpstreamReset(String),
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// The upstream's response was not valid HTTP.
    UpstreamProtocol(String),
    /// The request already passed through this proxy (a forwarding loop).
    LoopDetected,
    /// The upstream's TLS certificate did not verify (a decrypted flow).
    UpstreamCertificate(String),
    /// The parent proxy (`[upstream] parent`, named here) could not be
    /// reached, or refused the tunnel: `why` says which.
    Parent {
        parent: String,
        why: String,
    },
}

impl FlowError {
    /// The fixed label for logs and `chatwall_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            FlowError::Blocked(_) => "blocked",
            FlowError::DeniedDestination(_) => "denied_destination",
            FlowError::PortNotAllowed(_) => "port_not_allowed",
            FlowError::BadRequest(_) => "bad_request",
            FlowError::Dns(_) => "dns",
            FlowError::ConnectRefused(_) => "connect_refused",
            FlowError::ConnectTimeout(_) => "connect_timeout",
            FlowError::Connect(_) => "connect",
            FlowError::UpstreamReset(_) => "reset",
            FlowError::UpstreamTimeout => "timeout",
            FlowError::UpstreamProtocol(_) => "protocol",
            FlowError::LoopDetected => "loop",
            FlowError::UpstreamCertificate(_) => "certificate",
            FlowError::Parent { .. } => "parent",
        }
    }

    pub fn is_upstream(&self) -> bool {
        !matches!(
            self,
            FlowError::Blocked(_)
                | FlowError::BadRequest(_)
                | FlowError::DeniedDestination(_)
                | FlowError::PortNotAllowed(_)
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            FlowError::Blocked(_)
            | FlowError::DeniedDestination(_)
            | FlowError::PortNotAllowed(_) => StatusCode::FORBIDDEN,
            FlowError::BadRequest(_) => StatusCode::BAD_REQUEST,
            FlowError::ConnectTimeout(_) | FlowError::UpstreamTimeout => {
                StatusCode::GATEWAY_TIMEOUT
            }
            FlowError::LoopDetected => StatusCode::LOOP_DETECTED,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Map a connect error.
    pub fn from_connect(target: &str, e: io::Error) -> FlowError {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => FlowError::ConnectRefused(target.to_string()),
            io::ErrorKind::TimedOut => FlowError::ConnectTimeout(target.to_string()),
            _ => FlowError::Connect(format!("{target}: {e}")),
        }
    }
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowError::Blocked(_) => write!(f, "refused by policy"),
            FlowError::DeniedDestination(ip) => {
                write!(f, "destination {ip} is not reachable through this proxy")
            }
            FlowError::PortNotAllowed(port) => {
                write!(f, "CONNECT to port {port} is not allowed by this proxy")
            }
            FlowError::BadRequest(why) => write!(f, "bad request: {why}"),
            FlowError::Dns(e) => write!(f, "DNS lookup failed: {e}"),
            FlowError::ConnectRefused(t) => write!(f, "connection refused by upstream {t}"),
            FlowError::ConnectTimeout(t) => write!(f, "connection to upstream {t} timed out"),
            FlowError::Connect(e) => write!(f, "cannot connect to upstream: {e}"),
            FlowError::UpstreamReset(e) => write!(f, "upstream closed the connection: {e}"),
            FlowError::UpstreamTimeout => write!(f, "upstream did not answer in time"),
            FlowError::UpstreamProtocol(e) => write!(f, "invalid response from upstream: {e}"),
            FlowError::LoopDetected => write!(
                f,
                "forwarding loop: the request already came through this proxy"
            ),
            FlowError::UpstreamCertificate(e) => {
                write!(f, "the server's certificate is not trusted: {e}")
            }
            FlowError::Parent { parent, why } => write!(f, "parent proxy {parent} {why}"),
        }
    }
}

impl std::error::Error for FlowError {}

impl From<Refusal> for FlowError {
    fn from(r: Refusal) -> FlowError {
        match r {
            Refusal::Blocked(d) => FlowError::Blocked(d),
            Refusal::DeniedDestination(ip) => FlowError::DeniedDestination(ip),
            Refusal::ClosedBeforeSending => {
                FlowError::BadRequest("client closed before sending anything")
            }
            Refusal::Loop => FlowError::LoopDetected,
            Refusal::Malformed(why) => FlowError::BadRequest(why),
        }
    }
}

pub fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> ProxyBody {
    full(Bytes::new())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `Date` for a response this proxy makes (RFC 9110 §6.6.1): the HTTP
/// server adds none, so that forwarded responses carry only the origin's.
fn date_now() -> HeaderValue {
    HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
        .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"))
}

/// The page for a flow error: its status, HTML body and what
/// `X-Chatwall-Block` names (the app, `port` or `destination`), if any.
fn page(err: &FlowError, set: &SignatureSet) -> (StatusCode, String, Option<String>) {
    let status = err.status();
    match err {
        FlowError::Blocked(d) => {
            let id = set.app_id(d.app).to_string();
            let name = set
                .app(d.app)
                .map(|a| a.name.clone())
                .unwrap_or_else(|| id.clone());
            let rule = d
                .rule
                .and_then(|r| set.rule(r))
                .map(|r| r.text.clone())
                .unwrap_or_default();
            let body = format!(
                "<!doctype html>\n<html><head><title>Blocked: {name}</title></head>\n<body>\n<h1>Access refused</h1>\n<p>This connection was identified as <b>{name}</b> ({id}) and is not allowed by the network's instant-messaging policy.</p>\n<p>Reason: {reason} {rule}</p>\n<p>chatwall</p>\n</body></html>\n",
                name = escape(&name),
                id = escape(&id),
                reason = d.reason.as_str(),
                rule = escape(&rule),
            );
            (status, body, Some(id))
        }
        FlowError::PortNotAllowed(port) => (
            status,
            format!(
                "<!doctype html>\n<html><head><title>Port {port} not allowed</title></head>\n<body>\n<h1>Access refused</h1>\n<p>CONNECT to port {port} is not allowed by this proxy. Ask the network's administrators to add it to <code>connect_ports</code> if it is needed.</p>\n<p>chatwall</p>\n</body></html>\n",
            ),
            Some("port".to_string()),
        ),
        other => {
            let body = format!(
                "<!doctype html>\n<html><head><title>{code}</title></head>\n<body>\n<h1>{code}</h1>\n<p>{msg}</p>\n<p>chatwall</p>\n</body></html>\n",
                code = status,
                msg = escape(&other.to_string()),
            );
            let app = matches!(other, FlowError::DeniedDestination(_)).then(|| "destination".into());
            (status, body, app)
        }
    }
}

/// The response for a flow error. Malformed requests also ask the client
/// to close (after one the connection's framing cannot be trusted).
pub fn respond(err: &FlowError, set: &SignatureSet) -> Response<ProxyBody> {
    let (status, body, app) = page(err, set);
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::DATE, date_now());
    if let Some(app) = app.and_then(|a| HeaderValue::from_str(&a).ok()) {
        h.insert("x-chatwall-block", app);
    }
    if matches!(err, FlowError::BadRequest(_)) {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The same page as raw HTTP/1.1 bytes, for a refusal written inside a
/// tunnel (where no HTTP server frames responses), closing the connection.
pub fn page_bytes(err: &FlowError, set: &SignatureSet) -> Vec<u8> {
    let (status, body, app) = page(err, set);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/html; charset=utf-8\r\nCache-Control: no-store\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
    );
    if let Some(app) = app.filter(|a| HeaderValue::from_str(a).is_ok()) {
        out.push_str("X-Chatwall-Block: ");
        out.push_str(&app);
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    out.push_str(&body);
    out.into_bytes()
}

/// 407 asking for credentials: `Negotiate` (single sign-on, first: the
/// scheme a browser should prefer) and/or Basic.
pub fn proxy_auth_required(auth: &crate::config::Auth) -> Response<ProxyBody> {
    let mut resp = Response::new(full("proxy authentication required\n"));
    *resp.status_mut() = StatusCode::PROXY_AUTHENTICATION_REQUIRED;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    h.insert(header::DATE, date_now());
    if auth.negotiate.is_some() {
        h.append(
            header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Negotiate"),
        );
    }
    if auth.basic {
        let realm = &auth.realm;
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
        {
            h.append(header::PROXY_AUTHENTICATE, v);
        }
    }
    resp
}

/// A raw HTTP/1.1 response for paths that do not go through hyper's server
/// (client refused before HTTP parsing, connection caps).
pub fn raw_response(status: StatusCode, message: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        message.len(),
        message
    )
    .into_bytes()
}
