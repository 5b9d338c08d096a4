//! Transparent listeners: connections REDIRECTed by iptables or nftables.
//! The original destination is recovered, checked like a CONNECT to an
//! address (denied ranges, chatwall's own listeners, CIDR and port rules),
//! then the stream goes through the same first-bytes inspection as a
//! tunnel: HTTP is followed and decided request by request and relayed
//! byte for byte to the original address, TLS is decided on its
//! ClientHello, anything else on payload signatures.
use std::sync::Arc;

use tokio::net::TcpStream;

use super::conn::ConnCtx;
use super::origdst::original_dst;
use super::refuse::FlowError;
use super::tunnel::{self, Upstream};
use super::Shared;
use crate::decide;
use crate::metrics::ListenerKind;

/// Serve one redirected connection until it ends. Not an `async fn`
/// (whose future keeps its arguments twice): a tunnel's task is mostly
/// this future, and it holds the flow boxed.
// Written out: an async fn's future keeps its arguments twice.
#[allow(clippy::manual_async_fn)]
pub fn handle(
    shared: Arc<Shared>,
    client: TcpStream,
    ctx: ConnCtx,
) -> impl std::future::Future<Output = ()> {
    async move {
        let engine = shared.engine.load_full();
        let dst = match original_dst(&client) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(client = %ctx.client.addr, error = %e, "no original destination (is the REDIRECT rule in place?)");
                let record = crate::access_log::Record {
                    start: Some(std::time::SystemTime::now()),
                    client: ctx.client.addr.to_string(),
                    listener: ctx.listener.as_str(),
                    method: "TUNNEL".into(),
                    verdict: "block",
                    reason: Some("destination"),
                    error: Some(format!("no original destination: {e}")),
                    ..Default::default()
                };
                shared.access_log.write(record);
                return;
            }
        };
        let listener = ctx.listener;
        let mut flow = tunnel::new_flow(ctx, dst, listener);
        // A connection addressed to a chatwall listener itself (a loop, or a
        // client connecting straight to the transparent port) is refused.
        let is_self = shared.guard.is_self(dst) || client.local_addr().ok() == Some(dst);
        let peer = flow.ctx.client.addr;
        if shared.guard.is_local(peer.ip()) && shared.own_sockets.contains(peer) {
            // One of chatwall's own upstream connections, redirected back:
            // the REDIRECT rule lacks its exemption (mark or owner match).
            tracing::warn!(client = %peer, %dst, "forwarding loop: an upstream connection of chatwall's was redirected back to it (exempt its traffic from the REDIRECT rule)");
            flow.rec.verdict = "block";
            flow.rec.error = Some(FlowError::LoopDetected.to_string());
            shared
                .metrics
                .upstream_error(FlowError::LoopDetected.kind());
            super::relay::reset(&client);
            shared.access_log.write(flow.rec);
            return;
        }
        let checked = {
            let who = flow.ctx.client.who();
            decide::destination(&engine, &who, dst, is_self, &mut flow.findings)
                .map(|allowlisted| flow.allowlisted = allowlisted)
                .map_err(FlowError::from)
        };
        let checked = match checked {
            // Port 80: the 403 page, request by request (tunnel::run).
            Err(FlowError::Blocked(d)) if listener == ListenerKind::TransparentHttp => {
                flow.addr_block = Some(d);
                Ok(())
            }
            other => other,
        };
        if let Err(e) = checked {
            if let FlowError::Blocked(d) = &e {
                shared.record_verdict(
                    listener,
                    &engine,
                    &crate::policy::Verdict::Block(*d),
                    &mut flow.rec,
                );
            } else {
                flow.rec.verdict = "block";
                flow.rec.reason = Some("destination");
                flow.rec.error = Some(e.to_string());
                shared.metrics.listener(listener).requests_block.inc();
            }
            super::relay::reset(&client);
            shared.access_log.write(flow.rec);
            return;
        }
        let upstream = match listener {
            // HTTP and TLS clients speak first: connect once they have.
            ListenerKind::TransparentHttp | ListenerKind::TransparentTls => Upstream::Lazy(dst),
            _ => match shared.connect_tunnel_upstream(&engine, &[dst]).await {
                Ok((s, _, own)) => {
                    flow.own = own;
                    Upstream::Connected(s)
                }
                Err(e) => {
                    shared.metrics.upstream_error(e.kind());
                    flow.rec.error = Some(e.to_string());
                    super::relay::reset(&client);
                    shared.access_log.write(flow.rec);
                    return;
                }
            },
        };
        tunnel::run(shared, engine, flow, client, bytes::Bytes::new(), upstream).await;
    }
}
