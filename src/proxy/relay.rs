//! Bidirectional relay between a client and an upstream socket: byte
//! counts, half-close (one direction keeps flowing after the other ends),
//! an idle timeout for the whole tunnel, optional payload inspection of the
//! first bytes of each direction, and reset on refusal.
//!
//! Buffers are taken from a small per-thread pool only once a socket is
//! readable and given back before the next wait, so an idle tunnel holds no
//! copy buffer.
use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Shared;
use crate::access_log::Record;
use crate::classify::payload::{Direction, Outcome};
use crate::classify::Detection;
use crate::engine::Engine;
use crate::policy::{Verdict, Who};

/// Size of one copy buffer.
pub const COPY_BUF: usize = 16 * 1024;
/// Buffers kept per worker thread.
const POOL_MAX: usize = 32;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn take_buf() -> Box<[u8]> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0u8; COPY_BUF].into_boxed_slice())
}

pub(super) fn give_buf(b: Box<[u8]>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both directions closed normally.
    Closed,
    /// A payload signature (or the generic rules) refused the flow.
    Blocked(Detection),
    /// A request inside the tunnel was refused and its page written to the
    /// client, whose side is closing in order; the upstream is reset.
    Refused,
    /// No byte moved for the idle timeout.
    Idle,
    /// A socket error (a reset by either side is normal).
    Error(io::Error),
}

/// First-bytes inspection of one direction.
pub struct Inspector {
    dir: Direction,
    buf: Vec<u8>,
    forwarded: usize,
    window: usize,
}

impl Inspector {
    pub fn new(dir: Direction, initial: &[u8], window: usize) -> Inspector {
        Inspector {
            dir,
            buf: initial.to_vec(),
            forwarded: 0,
            window,
        }
    }

    /// The bytes not yet forwarded.
    fn held(&self) -> &[u8] {
        &self.buf[self.forwarded..]
    }
}

/// Everything a relay needs to decide on payload matches.
pub struct RelayCtx<'a> {
    pub shared: &'a Shared,
    pub engine: &'a Engine,
    pub who: Who,
    pub idle: Duration,
    /// How long held bytes (a possible signature split across reads) wait
    /// for the rest before they are forwarded and inspection goes on.
    pub hold_timeout: Duration,
    pub monitor: Mutex<Option<Verdict>>,
    pub up: AtomicU64,
    pub down: AtomicU64,
    started: Instant,
    last: AtomicU64,
}

impl<'a> RelayCtx<'a> {
    pub fn new(shared: &'a Shared, engine: &'a Engine, who: Who) -> Self {
        RelayCtx {
            shared,
            engine,
            who,
            idle: engine.config.limits.tunnel_idle_timeout,
            hold_timeout: engine.config.first_bytes_timeout,
            monitor: Mutex::new(None),
            up: AtomicU64::new(0),
            down: AtomicU64::new(0),
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    pub(super) fn touch(&self) {
        self.last
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    /// Decide on a payload finding; `Some` ends the flow.
    fn decide(&self, outcome: Outcome) -> Option<Detection> {
        let d = self.engine.signatures.payload_detection(outcome)?;
        match self.engine.policy.decide_for(&self.who, Some(d)) {
            Verdict::Block(d) => Some(d),
            m @ Verdict::Monitor(_) => {
                let mut slot = self.monitor.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(m);
                None
            }
            Verdict::Allow => None,
        }
    }

    /// Fold the relay's counts into the record and the metrics.
    pub fn finish(&self, rec: &mut Record) {
        let up = self.up.load(Ordering::Relaxed);
        let down = self.down.load(Ordering::Relaxed);
        rec.bytes_up += up;
        rec.bytes_down += down;
        self.shared.metrics.bytes_up.inc_by(up);
        self.shared.metrics.bytes_down.inc_by(down);
    }
}

/// One side of a tunnel as the relay drives it: both directions use it
/// through a shared reference, one reading while the other writes. A TCP
/// socket, or a TLS session over one (`proxy::tls_wire`) for decrypted
/// flows. `readable` then `try_read` keeps an idle side free of buffers.
pub trait Wire: Sync {
    /// Wait until `try_read` may have something (or an end) to report.
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// Read what is there; `WouldBlock` when nothing is, `Ok(0)` at the end.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// `try_read` into the spare capacity of `buf`.
    fn try_read_buf(&self, buf: &mut bytes::BytesMut) -> io::Result<usize>;
    /// Write all of `data`.
    fn write_all(&self, data: &[u8]) -> impl std::future::Future<Output = io::Result<()>> + Send;
    /// End this direction in order (FIN; close_notify first over TLS).
    fn shutdown_write(&self);
    /// Abort with a reset once dropped.
    fn reset(&self);
    /// After `try_read` said the end: whether the peer ended in order
    /// (over TLS, with close_notify). A message delimited by the close
    /// that ends otherwise may be cut short.
    fn ended_cleanly(&self) -> bool {
        true
    }
    /// The socket itself, where bytes may move by splice(2).
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
    /// A tunnel's upstream connected only once its first request passed
    /// (redirected port 80): a plain socket, as this side's type.
    fn from_connected(s: TcpStream) -> Option<Self>
    where
        Self: Sized,
    {
        drop(s);
        None
    }
}

impl Wire for TcpStream {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let room = buf.len();
        read_draining(self, room, || TcpStream::try_read(self, buf))
    }
    fn try_read_buf(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        try_read_buf_draining(self, buf)
    }
    fn write_all(&self, data: &[u8]) -> impl std::future::Future<Output = io::Result<()>> + Send {
        write_all(self, data)
    }
    fn shutdown_write(&self) {
        shutdown_write(self)
    }
    fn reset(&self) {
        reset(self)
    }
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
    fn from_connected(s: TcpStream) -> Option<Self> {
        Some(s)
    }
}

/// `try_read_buf` that, like tokio's own `poll_read`, takes a read that
/// leaves room in the buffer as proof that the socket is drained: the next
/// read waits for readiness instead of costing a `recvfrom` that says
/// EAGAIN (one per tunnel direction and per request otherwise).
pub fn try_read_buf_draining<B: bytes::BufMut>(s: &TcpStream, buf: &mut B) -> io::Result<usize> {
    // What `try_read_buf` reads into.
    let room = buf.chunk_mut().len();
    read_draining(s, room, || s.try_read_buf(buf))
}

/// Run `read` (a read into `room` bytes) under `try_io`, so that a short
/// read clears the readiness it was made under, and only that: an event
/// that came after it keeps the socket ready (tokio compares the ticks).
fn read_draining(
    s: &TcpStream,
    room: usize,
    read: impl FnOnce() -> io::Result<usize>,
) -> io::Result<usize> {
    let mut got = None;
    let r = s.try_io(tokio::io::Interest::READABLE, || {
        let n = read()?;
        got = Some(n);
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match got {
        Some(n) => Ok(n),
        None => r,
    }
}

/// Write all of `data` to a socket shared by reference.
pub async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Close the write side (FIN) so the peer sees the end of this direction.
pub(super) fn shutdown_write(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write);
}

/// Abort a connection with a reset (SO_LINGER 0, then the caller drops it).
pub fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// One direction: copy `src` to `dst`, inspecting the first bytes while an
/// inspector is present.
///
/// An idle tunnel holds two of these futures, waiting to read: so it is
/// not an `async fn` (whose future keeps its arguments twice), and the
/// stages that only some directions reach for a while (inspection, the
/// wait for the rest of held bytes, splicing) are boxed, so that the
/// future is as large as a read and a write, not as its largest stage.
// Written out: an async fn's future keeps its arguments twice.
#[allow(clippy::manual_async_fn)]
pub(super) fn pump<'a, S: Wire, D: Wire>(
    cx: &'a RelayCtx<'a>,
    src: &'a S,
    dst: &'a D,
    mut insp: Option<Inspector>,
    counter: &'a AtomicU64,
) -> impl std::future::Future<Output = End> + 'a {
    async move {
        // Bytes handed in before the relay started (peeked first bytes).
        if let Some(i) = insp.as_mut() {
            match Box::pin(inspect_step(cx, i, dst)).await {
                Err(end) => return end,
                Ok(true) => insp = None,
                Ok(false) => {}
            }
        }
        loop {
            let held = insp.as_ref().is_some_and(|i| !i.held().is_empty());
            if held {
                match Box::pin(tokio::time::timeout(cx.hold_timeout, src.readable())).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return End::Error(e),
                    Err(_) => {
                        // The rest of a possible signature did not come: pass the
                        // held bytes on and keep inspecting what follows.
                        if let Some(i) = insp.as_mut() {
                            let from = i.forwarded;
                            i.forwarded = i.buf.len();
                            if let Err(e) = dst.write_all(&i.buf[from..]).await {
                                return End::Error(e);
                            }
                        }
                        continue;
                    }
                }
            } else if let Err(e) = src.readable().await {
                return End::Error(e);
            }
            let mut buf = take_buf();
            let n = match src.try_read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    give_buf(buf);
                    continue;
                }
                Err(e) => {
                    give_buf(buf);
                    return End::Error(e);
                }
            };
            if n == 0 {
                give_buf(buf);
                if let Some(i) = insp.take() {
                    // The stream ended: nothing can complete a partial match.
                    if let Err(e) = dst.write_all(i.held()).await {
                        return End::Error(e);
                    }
                }
                dst.shutdown_write();
                return End::Closed;
            }
            cx.touch();
            counter.fetch_add(n as u64, Ordering::Relaxed);
            let result = match insp.as_mut() {
                Some(i) => {
                    i.buf.extend_from_slice(&buf[..n]);
                    give_buf(buf);
                    match Box::pin(inspect_step(cx, i, dst)).await {
                        Err(end) => Some(end),
                        Ok(finished) => {
                            if finished {
                                insp = None;
                            }
                            None
                        }
                    }
                }
                None => {
                    let r = dst.write_all(&buf[..n]).await.err().map(End::Error);
                    give_buf(buf);
                    if r.is_none() && n == COPY_BUF {
                        // A full buffer: bulk data. Move the rest of this
                        // direction through a pipe in the kernel (splice), when
                        // the platform has it.
                        if let (Some(src), Some(dst)) = (src.tcp(), dst.tcp()) {
                            if let Some(end) = Box::pin(splice::pump(cx, src, dst, counter)).await {
                                return end;
                            }
                        }
                    }
                    r
                }
            };
            if let Some(end) = result {
                return end;
            }
        }
    }
}

/// Zero-copy relay of one direction through a pipe (Linux splice(2)), once
/// inspection of that direction is over and bulk data flows. The pipe
/// exists only for such directions, so idle and interactive tunnels hold no
/// pipe descriptors.
#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::sync::atomic::{AtomicU64, Ordering};

    use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use super::{shutdown_write, End, RelayCtx};

    /// Pipe capacity asked for (the default is 64 KiB; unprivileged
    /// processes may raise it up to /proc/sys/fs/pipe-max-size, 1 MiB).
    const PIPE_SIZE: usize = 256 * 1024;

    /// `None`: splice is not available here (no pipe); the caller goes on
    /// copying through buffers. `Some(end)`: the direction ended.
    pub async fn pump(
        cx: &RelayCtx<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        counter: &AtomicU64,
    ) -> Option<End> {
        let (pipe_r, pipe_w) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC).ok()?;
        let capacity = fcntl_setpipe_size(&pipe_w, PIPE_SIZE).unwrap_or(64 * 1024);
        let flags = SpliceFlags::NONBLOCK | SpliceFlags::MOVE;
        loop {
            // Socket to pipe. The pipe is always empty here, so EAGAIN can
            // only be the socket's, which try_io turns into a fresh wait. A
            // splice that did not fill the pipe drained the socket: its
            // readiness goes with it (`read_draining`), so the next round
            // waits instead of costing a splice that says EAGAIN.
            let n = loop {
                if let Err(e) = src.readable().await {
                    return Some(End::Error(e));
                }
                match super::read_draining(src, capacity, || {
                    splice(src, None, &pipe_w, None, capacity, flags).map_err(io::Error::from)
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Some(End::Error(e)),
                }
            };
            if n == 0 {
                shutdown_write(dst);
                return Some(End::Closed);
            }
            cx.touch();
            counter.fetch_add(n as u64, Ordering::Relaxed);
            // Pipe to socket, all of it.
            let mut left = n;
            while left > 0 {
                if let Err(e) = dst.writable().await {
                    return Some(End::Error(e));
                }
                match dst.try_io(Interest::WRITABLE, || {
                    splice(&pipe_r, None, dst, None, left, flags).map_err(io::Error::from)
                }) {
                    Ok(0) => return Some(End::Error(io::ErrorKind::WriteZero.into())),
                    Ok(k) => left -= k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Some(End::Error(e)),
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod splice {
    use std::sync::atomic::AtomicU64;

    use tokio::net::TcpStream;

    use super::{End, RelayCtx};

    pub async fn pump(
        _: &RelayCtx<'_>,
        _: &TcpStream,
        _: &TcpStream,
        _: &AtomicU64,
    ) -> Option<End> {
        None
    }
}

/// Classify the inspector's buffer and forward what may pass. `Ok(true)`:
/// inspection of this direction is over (everything forwarded, and the
/// window is full, nothing can match any more, or a monitored or allowed
/// app matched).
async fn inspect_step<D: Wire>(cx: &RelayCtx<'_>, i: &mut Inspector, dst: &D) -> Result<bool, End> {
    let scan_len = i.buf.len().min(i.window);
    let outcome = cx
        .engine
        .signatures
        .payload()
        .classify(i.dir, &i.buf[..scan_len]);
    let (upto, finished) = match outcome {
        Outcome::Match { .. } => {
            if let Some(d) = cx.decide(outcome) {
                return Err(End::Blocked(d));
            }
            (i.buf.len(), true)
        }
        Outcome::Pending { forward_upto } if scan_len < i.window => {
            (forward_upto.max(i.forwarded), false)
        }
        _ => (i.buf.len(), true),
    };
    if upto > i.forwarded {
        let from = i.forwarded;
        i.forwarded = upto;
        if let Err(e) = dst.write_all(&i.buf[from..upto]).await {
            return Err(End::Error(e));
        }
    }
    Ok(finished)
}

/// Relay both directions until both end, one is refused, or the tunnel is
/// idle. On refusal both sockets are reset.
// Written out: an async fn's future keeps its arguments twice.
#[allow(clippy::manual_async_fn)]
pub fn relay<'a>(
    cx: &'a RelayCtx<'a>,
    client: &'a TcpStream,
    upstream: &'a TcpStream,
    c2s: Option<Inspector>,
    s2c: Option<Inspector>,
) -> impl std::future::Future<Output = End> + 'a {
    async move {
        // The directions are made and pinned here, and lent: run_pair's
        // future holds two references, not a second copy of them (an idle
        // tunnel's task is mostly these). Made inside this future, not
        // before it: what it captures it keeps.
        let up = pump(cx, client, upstream, c2s, &cx.up);
        let down = pump(cx, upstream, client, s2c, &cx.down);
        tokio::pin!(up, down);
        run_pair(cx, client, upstream, up, down).await
    }
}

/// Drive the two directions of a tunnel until both end, one of them is
/// refused or fails, or the tunnel is idle. A refusal or failure resets
/// both sockets, except that a refusal whose page was written
/// (`End::Refused`) lets the client read it and resets the upstream only.
pub(super) async fn run_pair(
    cx: &RelayCtx<'_>,
    client: &impl Wire,
    upstream: &impl Wire,
    mut up: std::pin::Pin<&mut impl std::future::Future<Output = End>>,
    mut down: std::pin::Pin<&mut impl std::future::Future<Output = End>>,
) -> End {
    cx.touch();
    let (mut up_end, mut down_end): (Option<End>, Option<End>) = (None, None);
    let tick = cx
        .idle
        .min(Duration::from_secs(5))
        .max(Duration::from_millis(10));
    let end = loop {
        tokio::select! {
            e = &mut up, if up_end.is_none() => {
                if matches!(e, End::Blocked(_) | End::Error(_) | End::Refused) { break e; }
                up_end = Some(e);
            }
            e = &mut down, if down_end.is_none() => {
                if matches!(e, End::Blocked(_) | End::Error(_)) { break e; }
                down_end = Some(e);
            }
            _ = tokio::time::sleep(tick) => {
                if cx.idle_for() >= cx.idle { break End::Idle; }
            }
        }
        if up_end.is_some() && down_end.is_some() {
            break End::Closed;
        }
    };
    match end {
        End::Blocked(_) | End::Error(_) | End::Idle => {
            client.reset();
            upstream.reset();
        }
        End::Refused => upstream.reset(),
        End::Closed => {}
    }
    end
}

/// Relay two upgraded HTTP connections (WebSocket after a 101), counting
/// bytes, under the tunnel idle timeout: the relay ends once no byte has
/// moved either way for that long, however long it has been active.
pub async fn relay_upgraded<A, B>(shared: &Shared, engine: &Engine, a: A, b: B, rec: &mut Record)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let idle = engine.config.limits.tunnel_idle_timeout;
    let clock = Activity::default();
    let (mut a, mut b) = (Active::new(a, &clock), Active::new(b, &clock));
    let tick = idle
        .min(Duration::from_secs(5))
        .max(Duration::from_millis(10));
    let result = {
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                r = &mut copy => break Some(r),
                _ = tokio::time::sleep(tick) => if clock.idle_for() >= idle { break None },
            }
        }
    };
    let (up, down) = (a.read, b.read);
    rec.bytes_up += up;
    rec.bytes_down += down;
    shared.metrics.bytes_up.inc_by(up);
    shared.metrics.bytes_down.inc_by(down);
    match result {
        Some(Ok(_)) => {}
        Some(Err(e)) => rec.error = Some(e.to_string()),
        None => rec.error = Some("idle timeout".into()),
    }
}

/// When bytes last moved through a relay.
#[derive(Debug)]
struct Activity {
    started: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// A stream that notes every read that brought bytes, and counts them.
struct Active<'c, T> {
    inner: T,
    clock: &'c Activity,
    read: u64,
}

impl<'c, T> Active<'c, T> {
    fn new(inner: T, clock: &'c Activity) -> Self {
        Active {
            inner,
            clock,
            read: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read += n as u64;
            this.clock.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
