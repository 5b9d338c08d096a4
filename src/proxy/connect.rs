//! The first request of an explicit connection. Most connections to a
//! forward proxy carry one `CONNECT` and then a tunnel; so the first head is
//! read and parsed here (httparse; clients send it in one write), and such a
//! `CONNECT` is decided, connected, answered and relayed in this task
//! without the HTTP server's per-connection state, upgrade hand-over and
//! second task.
//!
//! Everything else goes to the HTTP server (`explicit::serve`) with the
//! bytes already read in front of the stream: other methods, a head over
//! the size limit, anything httparse refuses (hyper answers it), a
//! `CONNECT` whose credentials do not pass (hyper's path answers 407), and a
//! `CONNECT` refused here, whose response hyper writes so that the
//! connection goes on as it would have.
use std::sync::Arc;

use bytes::BytesMut;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::conn::ConnCtx;
use super::explicit;
use super::prefixed::Prefixed;
use super::refuse::FlowError;
use super::relay;
use super::tunnel::{self, Upstream};
use super::Shared;
use crate::auth::AuthOutcome;

/// Room for the first read: a CONNECT head is a few hundred bytes.
const FIRST_READ: usize = 4096;
/// Header fields looked at in a CONNECT head; more go to the HTTP server.
const MAX_FIELDS: usize = 32;

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Serve one explicit client connection until it ends.
///
/// Not an `async fn` (whose future keeps its arguments twice): a tunnel's
/// task is mostly this future. Everything before the relay is boxed, so
/// that an idle tunnel's task holds the relay and nothing of the head, the
/// decision or the connect.
// Written out: an async fn's future keeps its arguments twice.
#[allow(clippy::manual_async_fn)]
pub fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    ctx: ConnCtx,
) -> impl std::future::Future<Output = ()> {
    async move {
        let Some(Established {
            shared,
            engine,
            flow,
            client,
            initial,
            up,
        }) = Box::pin(first_request(shared, stream, ctx)).await
        else {
            return;
        };
        tunnel::run(
            shared,
            engine,
            flow,
            client,
            initial,
            Upstream::Connected(up),
        )
        .await;
    }
}

/// A CONNECT answered 200, its tunnel ready to be inspected and relayed.
struct Established {
    shared: Arc<Shared>,
    engine: Arc<crate::engine::Engine>,
    flow: Box<tunnel::Flow>,
    client: TcpStream,
    initial: bytes::Bytes,
    up: TcpStream,
}

/// Read and decide the connection's first request. `Some`: a CONNECT
/// taken here and answered 200; `None`: the connection was served (by the
/// HTTP server, or refused) and is over.
async fn first_request(
    shared: Arc<Shared>,
    stream: TcpStream,
    mut ctx: ConnCtx,
) -> Option<Established> {
    let (header_timeout, max_head, max_fields) = {
        let limits = &shared.engine.load().config.limits;
        (
            limits.header_read_timeout,
            // What the HTTP server buffers at most (explicit::serve_with).
            limits.max_request_head_bytes.max(8192),
            limits.max_headers,
        )
    };
    let deadline = tokio::time::Instant::now() + header_timeout;
    let mut shutdown = shared.shutdown.subscribe();
    let mut buf = BytesMut::new();
    // Read until the first head is whole (one read, for nearly every
    // client), malformed, or at the size limit; a client that has not got
    // that far by the header deadline is closed, as the HTTP server would.
    // The HTTP server's own deadline starts once the head is here, so a
    // client that drips its first head gets one deadline, not two.
    let mut scanned = 0;
    loop {
        tokio::select! {
            r = stream.readable() => if r.is_err() { return None },
            _ = tokio::time::sleep_until(deadline) => return None,
            _ = super::shutdown_requested(&mut shutdown) => return None,
        }
        buf.reserve(FIRST_READ);
        match relay::try_read_buf_draining(&stream, &mut buf) {
            Ok(0) => return None,
            Ok(_) => {
                // Parse on the first read (bytes that are not HTTP get
                // their 400 at once) and when a blank line has come; in
                // between, only the new bytes are scanned, so a client that
                // sends a byte at a time costs linear work.
                let first = scanned == 0;
                let ended = blank_line(&buf, scanned);
                scanned = buf.len();
                if (first || ended) && head_read(&buf) || buf.len() >= max_head {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
    }
    drop(shutdown);
    // The policy in force now, not when the connection opened.
    let engine = shared.engine.load_full();

    let Some(head) = connect_head(&buf, max_head, max_fields) else {
        // Absolute-form HTTP and everything else (which it hands on).
        Box::pin(super::forward::serve(shared, stream, buf, ctx)).await;
        return None;
    };
    let Ok(authority) = head.target.parse::<http::uri::Authority>() else {
        // Not authority-form: the HTTP server's answer is the one to give.
        http(shared, stream, buf, ctx, None).await;
        return None;
    };
    let mut rec = explicit::new_record(&shared, &ctx, "CONNECT", &head.target);
    if let Some(auth) = &engine.config.auth {
        // Boxed, as `open` below: an idle tunnel's task is as large as its
        // largest stage, and these stages are over once it relays.
        let (outcome, groups) =
            Box::pin(shared.authenticate(&engine, auth, head.proxy_authorization.as_deref())).await;
        match outcome {
            AuthOutcome::User(u) => {
                if !shared.access_log.is_off() {
                    rec.user = Some(u.to_string());
                }
                rec.groups.clone_from(&groups);
                ctx.client.user = Some(u);
                ctx.client.groups = groups;
            }
            outcome => {
                // Answered and counted here, once (a wrong password costs
                // one hash, not two); hyper writes the 407 and the
                // connection goes on.
                let resp = explicit::auth_refusal(&shared, &ctx, auth, outcome, rec);
                http(shared, stream, buf, ctx, Some(resp)).await;
                return None;
            }
        }
    }
    let head_len = head.len;
    // Neither the head (credentials included) nor its bytes stay with a
    // tunnel.
    drop(head);
    let head_bytes = buf.split_to(head_len);
    let opened = Box::pin(tunnel::open(
        &shared,
        &engine,
        ctx.clone(),
        &authority,
        &mut rec,
    ))
    .await;
    match opened {
        Ok((up, flow)) => {
            // The head's bytes share the first read's buffer: an idle
            // tunnel must not keep it.
            drop(head_bytes);
            if let Err(e) = relay::write_all(&stream, ESTABLISHED).await {
                tracing::debug!(client = %ctx.client.addr, error = %e, "client gone before the 200");
                let mut rec = flow.rec;
                rec.error = Some(e.to_string());
                shared.record_verdict(ctx.listener, &engine, &flow.findings.verdict(), &mut rec);
                shared.access_log.write(rec);
                return None;
            }
            Some(Established {
                shared,
                engine,
                flow,
                client: stream,
                initial: buf.freeze(),
                up,
            })
        }
        Err(FlowError::Blocked(d)) if tunnel::page_for_connect(&engine, &ctx, &authority) => {
            // A listed client's browser shows a page, not a failed tunnel:
            // the CONNECT is answered, and the refusal comes over TLS.
            drop(head_bytes);
            if relay::write_all(&stream, ESTABLISHED).await.is_ok() {
                // Boxed: tunnels' tasks do not carry this path's state.
                Box::pin(tunnel::refuse_with_page(
                    shared, engine, ctx, &authority, rec, stream, buf, d,
                ))
                .await;
            }
            None
        }
        Err(e) => {
            let resp = explicit::refusal(&shared, &engine, &ctx, e, rec);
            // hyper parses the CONNECT again and answers it with `resp`.
            let mut all = head_bytes;
            all.unsplit(buf);
            http(shared, stream, all, ctx, Some(resp)).await;
            None
        }
    }
}

/// Hand the connection to the HTTP server, the bytes read so far first.
/// Boxed: the HTTP server's state (and the request in flight) lives only in
/// connections that use it, not in every tunnel's task, which holds the
/// larger of its two paths.
async fn http(
    shared: Arc<Shared>,
    stream: TcpStream,
    read: BytesMut,
    ctx: ConnCtx,
    first: Option<http::Response<super::refuse::ProxyBody>>,
) {
    let io = TokioIo::new(Prefixed::new(read.freeze(), stream));
    Box::pin(explicit::serve_with(shared, io, ctx, first)).await;
}

/// A CONNECT head that came whole.
struct ConnectHead {
    /// Length of the head, up to and including the blank line.
    len: usize,
    target: String,
    proxy_authorization: Option<Vec<u8>>,
}

/// Do the bytes from `from` on (with the line end before them) hold the
/// blank line that ends a head?
fn blank_line(buf: &[u8], from: usize) -> bool {
    let tail = &buf[from.saturating_sub(2)..];
    tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
}

/// Has the first head been read as far as it needs to be: whole, or
/// malformed (the HTTP server answers that at once)?
fn head_read(buf: &[u8]) -> bool {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    match httparse::Request::new(&mut fields).parse(buf) {
        Ok(httparse::Status::Complete(_)) => true,
        Ok(httparse::Status::Partial) => false,
        // More fields than looked at here: whole once the blank line is in.
        Err(httparse::Error::TooManyHeaders) => blank_line(buf, 0),
        Err(_) => true,
    }
}

/// Longest request target the HTTP server takes (hyper answers 414 above).
const MAX_TARGET: usize = u16::MAX as usize - 1;

/// `Some` for a whole `CONNECT ... HTTP/1.1` head within the size and field
/// limits with no body framing; `None` for anything the HTTP server should
/// see (and answer, where it is out of bounds).
fn connect_head(buf: &[u8], max_head: usize, max_fields: usize) -> Option<ConnectHead> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    if req.method != Some("CONNECT")
        || req.version != Some(1)
        || len > max_head
        || req.headers.len() > max_fields
        || !req.path.is_some_and(|p| p.len() <= MAX_TARGET)
    {
        return None;
    }
    let mut proxy_authorization = None;
    let mut hosts = 0;
    for f in req.headers.iter() {
        if f.name.eq_ignore_ascii_case("content-length")
            || f.name.eq_ignore_ascii_case("transfer-encoding")
        {
            // A CONNECT with a body is odd enough for the full parser.
            return None;
        }
        if f.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        }
        if f.name.eq_ignore_ascii_case("proxy-authorization") {
            if proxy_authorization.is_some() {
                return None;
            }
            proxy_authorization = Some(f.value.to_vec());
        }
    }
    if hosts > 1 {
        return None;
    }
    Some(ConnectHead {
        len,
        target: req.path?.to_string(),
        proxy_authorization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_connect_head_is_taken() {
        let h = connect_head(
            b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n\x16\x03\x01",
            8192,
            100,
        )
        .expect("CONNECT");
        assert_eq!(h.target, "example.org:443");
        assert_eq!(h.len, 59);
        assert!(h.proxy_authorization.is_none());
    }

    #[test]
    fn everything_else_goes_to_the_http_server() {
        for head in [
            &b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n"[..],
            b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n",
            b"CONNECT example.org:443 HTTP/1.0\r\n\r\n",
            b"CONNECT example.org:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"CONNECT example.org:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"CONNECT example.org:443 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"CONNECT  example.org:443 HTTP/1.1\r\n\r\n",
            b"CONNECT example.org:443 HTTP/1.1\r\nBad Field: x\r\n\r\n",
            b"\x16\x03\x01\x00\x05hello",
        ] {
            assert!(
                connect_head(head, 8192, 100).is_none(),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        // Over the head limit.
        assert!(connect_head(b"CONNECT example.org:443 HTTP/1.1\r\n\r\n", 16, 100).is_none());
        // More fields than the configured limit: the HTTP server answers 431.
        let two = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\nX-A: b\r\n\r\n";
        assert!(connect_head(two, 8192, 1).is_none());
        assert!(connect_head(two, 8192, 2).is_some());
    }

    #[test]
    fn the_first_head_is_read_until_whole_or_malformed() {
        assert!(!head_read(b"CONNECT a.example:443 HTTP/1.1\r\nHost: a"));
        assert!(!head_read(b"GET http://a.example/ HTTP/1.1\r\nX-Slow: "));
        assert!(!head_read(b"CONN"));
        assert!(head_read(b"CONNECT a.example:443 HTTP/1.1\r\n\r\n"));
        assert!(head_read(
            b"GET http://a.example/ HTTP/1.1\nHost: a.example\n\n"
        ));
        // Not HTTP at all (a ClientHello sent to the proxy port): at once.
        assert!(head_read(b"\x16\x03\x01\x00\xc8\x01\x00"));
        // More fields than the fast path looks at.
        let mut many = b"GET http://a.example/ HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend_from_slice(format!("X-F{i}: v\r\n").as_bytes());
        }
        assert!(!head_read(&many));
        many.extend_from_slice(b"\r\n");
        assert!(head_read(&many));
        assert!(!blank_line(&many[..many.len() - 2], 0));
        // A blank line split across reads is seen from the later one.
        assert!(blank_line(&many, many.len() - 1));
    }

    #[test]
    fn credentials_are_read_once() {
        let h = connect_head(
            b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\n\r\n",
            8192,
            100,
        )
        .expect("CONNECT");
        assert_eq!(h.proxy_authorization.as_deref(), Some(&b"Basic eDp5"[..]));
        assert!(connect_head(
            b"CONNECT a.example:443 HTTP/1.1\r\nProxy-Authorization: Basic eDp5\r\nProxy-Authorization: Basic eDp6\r\n\r\n",
            8192,
            100,
        )
        .is_none());
    }
}
