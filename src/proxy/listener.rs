//! Accept loops: client access control, connection caps, one span per
//! connection, backoff on accept errors (EMFILE must not end the loop), and
//! shutdown.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::conn::ClientInfo;
use super::conn::ConnCtx;
use super::refuse::raw_response;
use super::{transparent, Shared};
use crate::metrics::ListenerKind;

/// Longest pause of the accept loop after repeated errors.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Run one listener until shutdown.
pub async fn run(shared: Arc<Shared>, listener: TcpListener, kind: ListenerKind) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::proxy::shutdown_requested(&mut shutdown) => break,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                let shared = Arc::clone(&shared);
                let span =
                    tracing::debug_span!("conn", client.addr = %peer, listener = kind.as_str());
                // Boxed: the connection's future is a few KiB, and the
                // runtime moves a task's future by value several times
                // (spawn, and each stage change); a box moves as a pointer.
                tokio::spawn(Box::pin(handle(shared, stream, peer, kind)).instrument(span));
            }
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: existing connections keep flowing;
                // try again after a pause.
                tracing::warn!(error = %e, listener = kind.as_str(), "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// One accepted connection. Not an `async fn`, whose future keeps its
/// arguments twice: a tunnel's task is this future.
// Written out: an async fn's future keeps its arguments twice.
#[allow(clippy::manual_async_fn)]
fn handle(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    peer: SocketAddr,
    kind: ListenerKind,
) -> impl std::future::Future<Output = ()> {
    async move {
        let engine = shared.engine.load();
        if !engine.config.allow_clients.contains(peer.ip()) {
            shared.metrics.refused_clients.inc();
            tracing::warn!(client = %peer, "client not in access.allow_clients; refused");
            if kind == ListenerKind::Explicit {
                let _ = stream
                    .write_all(&raw_response(
                        StatusCode::FORBIDDEN,
                        "client address not allowed\n",
                    ))
                    .await;
            }
            return;
        }
        drop(engine);
        let slot = match shared.admit(peer.ip(), kind) {
            Ok(g) => g,
            Err(limit) => {
                shared
                    .metrics
                    .limit_refusals
                    .with_label_values(&[limit])
                    .inc();
                tracing::warn!(client = %peer, limit, "connection cap reached; refused");
                if kind == ListenerKind::Explicit {
                    let _ = stream
                        .write_all(&raw_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "too many connections\n",
                        ))
                        .await;
                }
                return;
            }
        };
        shared.metrics.listener(kind).connections_total.inc();
        let _ = stream.set_nodelay(true);
        let ctx = ConnCtx {
            client: ClientInfo {
                addr: peer,
                user: None,
                groups: None,
            },
            listener: kind,
            slot: Some(Arc::new(slot)),
        };
        match kind {
            ListenerKind::Explicit => super::connect::serve(shared, stream, ctx).await,
            _ => transparent::handle(shared, stream, ctx).await,
        }
    }
}
