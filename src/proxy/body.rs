//! Body adapters: replay bytes read for inspection in front of the rest of a
//! body, and count the bytes of a body as it streams (the access-log record
//! is written when the body ends or is dropped).
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::Shared;
use crate::access_log::Record;

/// `prefix` then the rest of `inner` (a trailers frame that came while the
/// prefix was read is kept and sent after it).
pub struct PrefixedBody {
    prefix: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
    inner: Option<Incoming>,
}

impl PrefixedBody {
    pub fn new(prefix: Bytes, trailers: Option<http::HeaderMap>, inner: Option<Incoming>) -> Self {
        PrefixedBody {
            prefix: (!prefix.is_empty()).then_some(prefix),
            trailers,
            inner,
        }
    }
}

impl Body for PrefixedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(p) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        if let Some(t) = self.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(t))));
        }
        match self.inner.as_mut() {
            Some(inner) => Pin::new(inner).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none()
            && self.trailers.is_none()
            && self.inner.as_ref().map_or(true, |b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let inner = self
            .inner
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_else(|| SizeHint::with_exact(0));
        let mut h = SizeHint::new();
        if let Some(u) = inner.upper() {
            h.set_upper(u.saturating_add(extra));
        }
        h.set_lower(inner.lower().saturating_add(extra));
        h
    }
}

/// Read up to `window` bytes of a body (or all of it if shorter) under a
/// deadline, for the body rules. Returns the bytes, any trailers, and the
/// rest of the body (`None` when it ended).
pub async fn read_prefix(
    mut body: Incoming,
    window: usize,
    deadline: Duration,
) -> Result<(Bytes, Option<http::HeaderMap>, Option<Incoming>), hyper::Error> {
    use http_body_util::BodyExt;
    let mut buf = BytesMut::new();
    let fut = async {
        while buf.len() < window {
            match body.frame().await {
                None => return Ok((None, true)),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(d) => buf.extend_from_slice(&d),
                    Err(frame) => return Ok((frame.into_trailers().ok(), true)),
                },
            }
        }
        Ok((None, false))
    };
    let (trailers, ended) = match tokio::time::timeout(deadline, fut).await {
        Ok(r) => r?,
        // A slow body: decide on what came; the rest streams on.
        Err(_) => (None, false),
    };
    Ok((buf.freeze(), trailers, (!ended).then_some(body)))
}

/// Counts the bytes of a body into the record and metrics; writes the record
/// once, when the body ends or is dropped.
pub struct LoggedBody<B> {
    inner: B,
    log: Option<FlowLog>,
    upstream_to_client: bool,
}

/// The record of one flow, written on drop.
pub struct FlowLog {
    pub shared: Arc<Shared>,
    pub record: Record,
    /// Request body bytes counted as the upstream consumed them.
    pub up: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        let mut rec = std::mem::take(&mut self.record);
        if let Some(up) = &self.up {
            let n = up.load(std::sync::atomic::Ordering::Relaxed);
            rec.bytes_up += n;
            self.shared.metrics.bytes_up.inc_by(n);
        }
        self.shared.access_log.write(rec);
    }
}

impl<B> LoggedBody<B> {
    pub fn new(inner: B, log: FlowLog, upstream_to_client: bool) -> Self {
        LoggedBody {
            inner,
            log: Some(log),
            upstream_to_client,
        }
    }
}

impl<B> Body for LoggedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    let down = self.upstream_to_client;
                    if let Some(log) = self.log.as_mut() {
                        if down {
                            log.record.bytes_down += n;
                            log.shared.metrics.bytes_down.inc_by(n);
                        } else {
                            log.record.bytes_up += n;
                            log.shared.metrics.bytes_up.inc_by(n);
                        }
                    }
                }
            }
            Poll::Ready(None) => {
                self.log.take();
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(log) = self.log.as_mut() {
                    log.record
                        .error
                        .get_or_insert_with(|| "body aborted".into());
                }
                self.log.take();
            }
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts request body bytes into a shared counter (the request body is
/// consumed by the upstream connection, not by us).
pub struct CountedBody<B> {
    inner: B,
    counter: Arc<std::sync::atomic::AtomicU64>,
}

impl<B> CountedBody<B> {
    pub fn new(inner: B, counter: Arc<std::sync::atomic::AtomicU64>) -> Self {
        CountedBody { inner, counter }
    }
}

impl<B> Body for CountedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll {
            if let Some(d) = frame.data_ref() {
                self.counter
                    .fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Ends a body with an error when no frame arrives for `idle` (an upstream
/// that stalls mid-response must not hold the client forever).
///
/// The timer exists only once the body has had to wait: a small response
/// that arrives with its head never registers one, and a frame that
/// arrives marks the timer stale instead of re-arming it each time.
pub struct IdleTimeoutBody<B> {
    inner: B,
    idle: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A frame came since the timer was (re)armed.
    progressed: bool,
}

impl<B> IdleTimeoutBody<B> {
    pub fn new(inner: B, idle: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            idle,
            sleep: None,
            progressed: false,
        }
    }
}

/// The error of a body that stalled.
#[derive(Debug)]
pub struct BodyStalled;

impl std::fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("upstream stalled mid-body")
    }
}

impl std::error::Error for BodyStalled {}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(r) => {
                self.progressed = true;
                Poll::Ready(r.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let this = &mut *self;
                if this.progressed || this.sleep.is_none() {
                    let deadline = tokio::time::Instant::now() + this.idle;
                    match &mut this.sleep {
                        Some(sleep) => sleep.as_mut().reset(deadline),
                        None => this.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    this.progressed = false;
                }
                match this.sleep.as_mut().map(|s| s.as_mut().poll(cx)) {
                    Some(Poll::Ready(())) => Poll::Ready(Some(Err(Box::new(BodyStalled)))),
                    _ => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body hashed as it passes against `[[downloads]] sha256`
/// rules (the explicit path's counterpart of the tunnel follower's
/// `digest_response`): its last `decide::DIGEST_HOLD_BACK` bytes are held until
/// it ends; a digest the policy refuses ends it with an error instead (the
/// client's connection is cut, the file incomplete) and the URL is
/// refused on its next request.
pub struct DigestBody<B> {
    inner: B,
    engine: Arc<crate::engine::Engine>,
    shared: Arc<Shared>,
    who: crate::policy::Who,
    url: Box<str>,
    /// `None` once the body is too long to hold (then it just passes).
    hasher: Option<sha2::Sha256>,
    hashed: u64,
    held: std::collections::VecDeque<Bytes>,
    held_len: usize,
    trailers: Option<http::HeaderMap>,
    ended: bool,
}

impl<B> DigestBody<B> {
    pub fn new(
        inner: B,
        engine: Arc<crate::engine::Engine>,
        shared: Arc<Shared>,
        who: crate::policy::Who,
        url: Box<str>,
    ) -> Self {
        use sha2::Digest as _;
        DigestBody {
            inner,
            engine,
            shared,
            who,
            url,
            hasher: Some(sha2::Sha256::new()),
            hashed: 0,
            held: std::collections::VecDeque::new(),
            held_len: 0,
            trailers: None,
            ended: false,
        }
    }

    /// The next bytes that may go: what is older than the hold-back (all
    /// of it once the digest is known or no longer taken).
    fn release(&mut self) -> Option<Bytes> {
        let keep = if self.ended || self.hasher.is_none() {
            0
        } else {
            crate::decide::DIGEST_HOLD_BACK
        };
        let free = self.held_len.checked_sub(keep).filter(|&f| f > 0)?;
        let front = self.held.front_mut()?;
        let chunk = if front.len() <= free {
            self.held.pop_front()?
        } else {
            front.split_to(free)
        };
        self.held_len -= chunk.len();
        Some(chunk)
    }

    /// The body ended: its digest decides. `Err`: refused.
    fn decide(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        use sha2::Digest as _;
        let Some(hasher) = self.hasher.take() else {
            return Ok(());
        };
        let digest: [u8; 32] = hasher.finalize().into();
        let mut findings = crate::decide::Findings::default();
        if let Err(crate::decide::Refusal::Blocked(d)) = crate::decide::download_digest(
            &self.engine,
            &self.who,
            &self.url,
            &digest,
            &mut findings,
        ) {
            let app = self.engine.signatures.app_id(d.app);
            self.shared
                .metrics
                .blocked_total
                .with_label_values(&[app, d.reason.as_str()])
                .inc();
            tracing::debug!(url = %self.url, app, "download cut off on its digest");
            // The request's own line says the body was aborted; this one
            // says why (counted once, in chatwall_blocked_total above).
            if !self.shared.access_log.is_off() {
                let mut rec = Record {
                    start: Some(std::time::SystemTime::now()),
                    counted: true,
                    client: self.who.ip.to_string(),
                    user: self.who.user.as_deref().map(str::to_string),
                    listener: crate::metrics::ListenerKind::Explicit.as_str(),
                    method: "GET".into(),
                    target: self.url.to_string(),
                    status: 200,
                    error: Some("cut off: the body's SHA-256 matches a listed download".into()),
                    ..Record::default()
                };
                self.shared.record_verdict(
                    crate::metrics::ListenerKind::Explicit,
                    &self.engine,
                    &crate::policy::Verdict::Block(d),
                    &mut rec,
                );
                self.shared.access_log.write(rec);
            }
            self.held.clear();
            self.held_len = 0;
            return Err(
                format!("cut off: the body's SHA-256 matches a listed download of {app}").into(),
            );
        }
        Ok(())
    }
}

impl<B> Body for DigestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        use sha2::Digest as _;
        let this = &mut *self;
        // Bounded: each turn takes a frame from the inner body or returns.
        loop {
            if let Some(chunk) = this.release() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if this.ended {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.hashed += data.len() as u64;
                        if this.hashed > crate::decide::DIGEST_MAX {
                            this.hasher = None;
                        }
                        if let Some(h) = this.hasher.as_mut() {
                            h.update(&data);
                        }
                        this.held_len += data.len();
                        this.held.push_back(data);
                    }
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            this.trailers = Some(t);
                        }
                    }
                },
                Poll::Ready(None) => {
                    if let Err(e) = this.decide() {
                        this.ended = true;
                        return Poll::Ready(Some(Err(e)));
                    }
                    this.ended = true;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.held.is_empty() && self.trailers.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::sync::mpsc;

    /// A body fed frame by frame from a channel.
    struct Fed(mpsc::Receiver<Bytes>);

    impl Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    #[tokio::test]
    async fn steady_frames_outlast_the_idle_time_and_silence_does_not() {
        let idle = Duration::from_millis(300);
        // Six frames 60 ms apart: 360 ms in all, more than `idle`.
        let (tx, rx) = mpsc::channel(1);
        tokio::spawn(async move {
            for i in 0..6u8 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                if tx.send(Bytes::from(vec![i])).await.is_err() {
                    return;
                }
            }
        });
        let body = IdleTimeoutBody::new(Fed(rx), idle);
        let got = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .expect("bounded")
            .expect("no stall");
        assert_eq!(got.to_bytes().as_ref(), &[0, 1, 2, 3, 4, 5]);

        // One frame, then nothing: the body ends in an error after `idle`.
        let (tx, rx) = mpsc::channel(1);
        tx.send(Bytes::from_static(b"x")).await.expect("send");
        let started = std::time::Instant::now();
        let mut body = IdleTimeoutBody::new(Fed(rx), idle);
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"x")));
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("bounded");
        let err = end.expect("an end").expect_err("a stall");
        assert!(err.to_string().contains("stalled"), "{err}");
        assert!(started.elapsed() >= idle);
        drop(tx);
    }
}
