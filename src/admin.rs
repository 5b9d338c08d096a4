//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `POST /-/reload`,
//! `/proxy.pac` and `/wpad.dat`. Its own listener, its own tiny router.
use std::convert::Infallible;
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
                async move { Ok::<_, Infallible>(route(&shared, &reloader, req).await) }
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

async fn route(
    shared: &Arc<Shared>,
    reloader: &Reloader,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
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
        (&Method::GET, "/proxy.pac") | (&Method::GET, "/wpad.dat") => {
            let engine = shared.engine.load();
            text(
                StatusCode::OK,
                "application/x-ns-proxy-autoconfig",
                crate::pac::render(&engine.config),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}
