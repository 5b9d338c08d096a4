//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `POST /-/reload`,
//! `/proxy.pac` and `/wpad.dat`. Its own listener, its own tiny router.
//!
//! Health, readiness and the PAC file are open to every client that reaches
//! the port (probes and browsers); everything else (`/metrics`, the reload)
//! only to clients in `[admin] allow`, others get 403. With `[admin]
//! reload_token_file`, `POST /-/reload` also needs `Authorization: Bearer
//! <token>`: 401 without it, 403 with another.
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::proxy::refuse::{full, ProxyBody};
use crate::proxy::Shared;
use crate::server::Reloader;

pub async fn run(shared: Arc<Shared>, listener: TcpListener, reloader: Arc<Reloader>) {
    let mut shutdown = shared.shutdown.subscribe();
    loop {
        let (stream, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::proxy::shutdown_requested(&mut shutdown) => break,
        };
        let shared = Arc::clone(&shared);
        let reloader = Arc::clone(&reloader);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = Arc::clone(&shared);
                let reloader = Arc::clone(&reloader);
                async move { Ok::<_, Infallible>(route(&shared, &reloader, peer, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            tracing::trace!(%peer, "admin connection closed");
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// Paths every client that reaches the port may use.
fn open_path(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/proxy.pac" | "/wpad.dat")
}

/// Does `Authorization` carry `Bearer <token>`? Compared in time that does
/// not depend on where the first difference is.
fn bearer_matches(value: &[u8], token: &str) -> bool {
    let (scheme, given) = value.split_at(value.len().min(7));
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return false;
    }
    let token = token.as_bytes();
    given.len() == token.len()
        && given
            .iter()
            .zip(token)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Who may do what: `Some(response)` refuses the request.
fn refuse(
    shared: &Shared,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Option<Response<ProxyBody>> {
    let path = req.uri().path();
    if open_path(path) {
        return None;
    }
    let engine = shared.engine.load();
    let admin = &engine.config.admin;
    if !admin.allow.contains(peer.ip()) {
        shared
            .metrics
            .admin_refusals
            .with_label_values(&["client"])
            .inc();
        // A scraper on the wrong network would repeat this every few
        // seconds: only a refused reload is worth a warning.
        if path == "/-/reload" {
            tracing::warn!(client = %peer, "reload from a client outside admin.allow; refused");
        } else {
            tracing::debug!(client = %peer, path, "admin request from a client outside admin.allow; refused");
        }
        return Some(text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "forbidden: this client is not in admin.allow\n".into(),
        ));
    }
    let token = match (&admin.reload_token, path) {
        (Some(t), "/-/reload") => t,
        _ => return None,
    };
    let refusal = match req.headers().get(header::AUTHORIZATION) {
        None => {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "reload needs Authorization: Bearer <token>\n".into(),
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"chatwall admin\""),
            );
            r
        }
        Some(v) if bearer_matches(v.as_bytes(), token.expose()) => return None,
        Some(_) => text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "forbidden: wrong reload token\n".into(),
        ),
    };
    shared
        .metrics
        .admin_refusals
        .with_label_values(&["token"])
        .inc();
    tracing::warn!(client = %peer, "reload without the right bearer token; refused");
    Some(refusal)
}

async fn route(
    shared: &Arc<Shared>,
    reloader: &Reloader,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    if let Some(refusal) = refuse(shared, peer, &req) {
        return refusal;
    }
    if crate::pac::is_pac_request(req.method(), req.uri().path()) {
        return crate::pac::response(&shared.engine.load().config);
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            // What `signatures update` recorded beside the signature
            // directory: read at each scrape, since the update is another
            // process that may run without a reload.
            let status_file = shared
                .engine
                .load()
                .config
                .signatures_dir
                .as_deref()
                .map(crate::update::status_path);
            let status = match status_file {
                Some(path) => {
                    tokio::task::spawn_blocking(move || crate::update::read_status(&path))
                        .await
                        .ok()
                        .flatten()
                }
                None => None,
            };
            shared.metrics.set_update_status(status.as_ref());
            text(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                shared.metrics.render(),
            )
        }
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n".into()),
        (&Method::GET, "/readyz") => {
            if shared.ready.load(Ordering::Acquire) && !shared.draining.load(Ordering::Acquire) {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                )
            }
        }
        (&Method::POST, "/-/reload") => match reloader.reload(shared) {
            Ok(summary) => text(
                StatusCode::OK,
                "text/plain",
                format!("reloaded: {summary}\n"),
            ),
            Err(e) => text(
                StatusCode::UNPROCESSABLE_ENTITY,
                "text/plain",
                format!("reload refused, old policy kept:\n{e}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
