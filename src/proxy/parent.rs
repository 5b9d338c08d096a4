//! Upstream connections through a parent proxy (`[upstream] parent`).
//!
//! chatwall decides every flow as it does without a parent (names, ports,
//! ClientHello, payload, HTTP rules) before anything reaches the parent;
//! only the connection changes:
//!
//! - tunnels (CONNECT, and redirected streams) open with one
//!   `CONNECT host:port` to the parent each; a 2xx answer hands the
//!   connection to the tunnel, byte-exact as a direct one, and anything
//!   else is a [`FlowError::Parent`] naming the parent and its answer;
//! - explicit HTTP goes to the parent in absolute form over pooled
//!   connections (`explicit::UpstreamClient`, with [`Connection`]).
//!
//! Addresses: the parent resolves the names it is given, so chatwall does
//! not look them up (a network behind a gateway often cannot). The CIDR
//! rules and denied destinations still apply where chatwall knows the
//! address: IP-literal targets and redirected streams (whose CONNECT to the
//! parent names the original destination address). A name is resolved only
//! to see whether `parent_bypass` sends it direct, when that list has CIDR
//! prefixes; a name that goes direct is resolved and checked as always.
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::client::legacy::connect::{Connected, Connection as HyperConnection};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::refuse::FlowError;
use super::relay;
use super::upstream::{self, OwnSocket, OwnSockets, Resolver};
use crate::config::Parent;
use crate::engine::Engine;

/// Bound on the parent's answer to a CONNECT (status line and fields).
pub const MAX_ANSWER_HEAD: usize = 16 * 1024;
/// Bytes looked at in one step of reading it (most answers are one short
/// segment).
const ANSWER_READ: usize = 4096;
/// Header fields parsed in that answer.
const MAX_ANSWER_FIELDS: usize = 64;

/// How a destination is reached.
#[derive(Debug, Clone, Copy)]
pub enum Hop<'a> {
    Direct,
    Parent(&'a Parent),
}

/// The hop for a name or IP literal the client asked for:
/// direct without a parent or for `parent_bypass`, else the parent. A name
/// is looked up only where `parent_bypass` has CIDR prefixes (and goes
/// direct only when every address it resolves to is in them); a failed
/// lookup leaves it to the parent.
pub async fn hop<'e>(engine: &'e Engine, resolver: &Resolver, host: &str, port: u16) -> Hop<'e> {
    let Some(parent) = &engine.config.parent else {
        return Hop::Direct;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return hop_for_addr(engine, ip);
    }
    let Some(name) = crate::classify::host::normalize_host(bare) else {
        // Not a name chatwall can match: the parent answers for it.
        return Hop::Parent(parent);
    };
    if parent.bypasses_name(&name) {
        return Hop::Direct;
    }
    if !parent.bypass_nets.is_empty() {
        let dns = engine.config.limits.dns_timeout;
        if let Ok(addrs) = resolver.resolve(&name, port, dns).await {
            if addrs.iter().all(|a| parent.bypasses_addr(a.ip())) {
                return Hop::Direct;
            }
        }
    }
    Hop::Parent(parent)
}

/// The hop for a destination known only by its address (a redirected
/// stream's original destination).
pub fn hop_for_addr(engine: &Engine, ip: IpAddr) -> Hop<'_> {
    match &engine.config.parent {
        Some(p) if !p.bypasses_addr(ip) => Hop::Parent(p),
        _ => Hop::Direct,
    }
}

/// `host:port` for a request line: IPv6 literals in brackets.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A parent failure, naming the parent.
fn failure(parent: &Parent, why: impl Into<String>) -> FlowError {
    FlowError::Parent {
        parent: parent.authority.clone(),
        why: why.into(),
    }
}

/// Connect to the parent under the DNS and connect deadlines, with the
/// socket mark; registered in `own` while it is given.
pub async fn connect(
    engine: &Engine,
    resolver: &Resolver,
    guard: &upstream::DestGuard,
    parent: &Parent,
    own: Option<&Arc<OwnSockets>>,
) -> Result<(TcpStream, Option<OwnSocket>), FlowError> {
    let limits = &engine.config.limits;
    let addrs = resolver
        .resolve(&parent.host, parent.port, limits.dns_timeout)
        .await
        .map_err(|e| match e {
            FlowError::Dns(m) => failure(parent, format!("cannot be resolved: {m}")),
            other => failure(parent, other.to_string()),
        })?;
    // The parent is the administrator's choice (it may well be on this
    // host, in a denied range); only chatwall's own listeners are out.
    if addrs.iter().any(|a| guard.is_self(*a)) {
        return Err(failure(parent, "is one of chatwall's own listeners"));
    }
    let (s, _, own) = upstream::connect_registered(
        &addrs,
        limits.connect_timeout,
        engine.config.upstream_mark,
        own,
    )
    .await
    .map_err(|e| match e {
        FlowError::ConnectRefused(_) => failure(parent, "refused the connection"),
        FlowError::ConnectTimeout(_) => failure(parent, "did not accept the connection in time"),
        FlowError::Connect(m) => failure(parent, format!("cannot be reached: {m}")),
        other => failure(parent, other.to_string()),
    })?;
    Ok((s, own))
}

/// Open a tunnel to `authority` (`host:port`) through the parent: one
/// connection, one `CONNECT`, its answer read. A 2xx answer returns the
/// connection with nothing of the tunnel read (bytes the parent sends after
/// its answer belong to the tunnel); anything else is a parent failure.
pub async fn open_tunnel(
    engine: &Engine,
    resolver: &Resolver,
    guard: &upstream::DestGuard,
    parent: &Parent,
    authority: &str,
    own: Option<&Arc<OwnSockets>>,
) -> Result<(TcpStream, Option<OwnSocket>), FlowError> {
    let (mut s, own) = connect(engine, resolver, guard, parent, own).await?;
    let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(a) = &parent.authorization {
        head.push_str("Proxy-Authorization: ");
        head.push_str(a.expose());
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    relay::write_all(&s, head.as_bytes())
        .await
        .map_err(|e| failure(parent, format!("closed the connection: {e}")))?;
    drop(head);
    let within = engine.config.limits.upstream_response_timeout;
    let (status, reason) = answer(&mut s, within)
        .await
        .map_err(|why| failure(parent, why))?;
    if (200..300).contains(&status) {
        settle_readiness(&s);
        Ok((s, own))
    } else {
        relay::reset(&s);
        Err(failure(
            parent,
            format!("answered {status} {reason}").trim_end(),
        ))
    }
}

/// Read the parent's answer head, and not a byte more: what is queued
/// behind it is peeked, and only the head is taken off the socket.
async fn answer(s: &mut TcpStream, within: Duration) -> Result<(u16, String), String> {
    let read = async {
        let mut head: Vec<u8> = Vec::new();
        let mut peeked = vec![0u8; ANSWER_READ];
        loop {
            let room = (MAX_ANSWER_HEAD - head.len()).min(ANSWER_READ);
            let n = s
                .peek(&mut peeked[..room])
                .await
                .map_err(|e| format!("closed the connection: {e}"))?;
            if n == 0 {
                return Err("closed the connection without answering".to_string());
            }
            let before = head.len();
            head.extend_from_slice(&peeked[..n]);
            // A blank line may straddle the previous read.
            let end = head_end(&head, before.saturating_sub(3));
            let take = end.map_or(n, |e| e - before);
            s.read_exact(&mut peeked[..take])
                .await
                .map_err(|e| format!("closed the connection: {e}"))?;
            if let Some(e) = end {
                head.truncate(e);
                return Ok(head);
            }
            if head.len() >= MAX_ANSWER_HEAD {
                return Err(format!("sent an answer head over {MAX_ANSWER_HEAD} bytes"));
            }
        }
    };
    let head = tokio::time::timeout(within, read)
        .await
        .map_err(|_| format!("did not answer within {} s", within.as_secs()))??;
    parse_answer(&head)
}

/// Reading the answer leaves the socket marked readable in tokio even
/// when nothing of the tunnel has come yet; the tunnel would take that for
/// a server speaking first. Clear the mark unless bytes are waiting.
fn settle_readiness(s: &TcpStream) {
    let mut one = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    let _ = s.try_io(tokio::io::Interest::READABLE, || {
        socket2::SockRef::from(s).peek(&mut one)
    });
}

/// Where the head in `buf` ends (after its blank line), looking from `from`.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let tail = buf.get(from..)?;
    tail.iter().enumerate().find_map(|(i, &b)| {
        if b != b'\n' {
            return None;
        }
        let at = from + i;
        let before = &buf[..at];
        (before.ends_with(b"\n") || before.ends_with(b"\n\r")).then_some(at + 1)
    })
}

/// The status code and reason of an answer head.
fn parse_answer(head: &[u8]) -> Result<(u16, String), String> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_ANSWER_FIELDS];
    let mut resp = httparse::Response::new(&mut fields);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        // The status line is what matters; a long answer is still one.
        Err(httparse::Error::TooManyHeaders) if resp.code.is_some() => {}
        _ => return Err("sent an answer that is not HTTP".to_string()),
    }
    let code = resp.code.ok_or("sent an answer without a status")?;
    let reason: String = resp
        .reason
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    Ok((code, reason))
}

/// A pooled HTTP connection to the parent: hyper-util writes requests on
/// it in absolute form (`Connected::proxy`).
pub struct Connection(pub TokioIo<TcpStream>);

impl HyperConnection for Connection {
    fn connected(&self) -> Connected {
        Connected::new().proxy(true)
    }
}

impl hyper::rt::Read for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_head_ends_at_its_blank_line() {
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\n\r\nabc", 0), Some(19));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\n\nabc", 0), Some(17));
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\nVia: x\r\n", 0), None);
        assert_eq!(head_end(b"HTTP/1.1 200 OK\r\n\r", 0), None);
        // Straddling reads: the search starts a little before the new bytes.
        let all = b"HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(head_end(all, all.len() - 4), Some(all.len()));
    }

    #[test]
    fn the_status_and_reason_are_read() {
        assert_eq!(
            parse_answer(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Ok((200, "Connection established".to_string()))
        );
        assert_eq!(
            parse_answer(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n"),
            Ok((407, "Proxy Authentication Required".to_string()))
        );
        assert!(parse_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn authorities_bracket_ipv6() {
        assert_eq!(authority("example.org", 443), "example.org:443");
        assert_eq!(authority("192.0.2.1", 80), "192.0.2.1:80");
        assert_eq!(authority("2001:db8::1", 443), "[2001:db8::1]:443");
    }
}
