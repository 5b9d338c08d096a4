//! Reaching upstreams: the destination decision that needs DNS (every
//! address a name resolves to is checked against the CIDR rules and the
//! denied destinations), bounded lookups and connects, and the socket mark
//! that keeps chatwall's own connections out of its REDIRECT rules.
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::TcpStream;

use super::refuse::FlowError;
use super::Shared;
use crate::classify::addr::canonical;
use crate::decide::{self, Findings};
use crate::engine::Engine;
use crate::policy::Who;

/// What the proxy must never connect to besides the configured denied
/// ranges: its own listeners, on any address of this host.
#[derive(Debug, Clone, Default)]
pub struct DestGuard {
    pub own_addrs: Vec<SocketAddr>,
    pub local_ips: Vec<IpAddr>,
}

impl DestGuard {
    pub fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.local_ips.contains(&ip)
    }

    /// Is this one of chatwall's own listening sockets?
    pub fn is_self(&self, dst: SocketAddr) -> bool {
        let ip = canonical(dst.ip());
        self.own_addrs.iter().any(|own| {
            own.port() == dst.port()
                && (canonical(own.ip()) == ip || (own.ip().is_unspecified() && self.is_local(ip)))
        })
    }
}

/// Is this address one the proxy must never reach (configured denied
/// ranges, unspecified addresses, or one of chatwall's own listeners)?
pub fn denied_destination(guard: &DestGuard, engine: &Engine, dst: SocketAddr) -> bool {
    let ip = canonical(dst.ip());
    engine.config.deny_destinations.contains(ip) || ip.is_unspecified() || guard.is_self(dst)
}

/// Check one resolved (or literal) address: chatwall's own listeners, the
/// denied ranges, then the CIDR rules (`decide::address`).
pub fn check_addr(
    guard: &DestGuard,
    engine: &Engine,
    who: &Who,
    dst: SocketAddr,
    name_allowlisted: bool,
    findings: &mut Findings,
) -> Result<(), FlowError> {
    decide::address(
        engine,
        who,
        dst,
        name_allowlisted,
        guard.is_self(dst),
        findings,
    )
    .map_err(FlowError::from)
}

/// The local addresses of chatwall's own tunnel upstream connections, kept
/// while transparent listeners exist. A tunnel is relayed byte for byte,
/// with no `Via` to recognise it by, so a REDIRECT rule that lacks the
/// exemption for chatwall's own traffic would send each upstream
/// connection back to chatwall, and on, until the process runs out of
/// descriptors. A redirected connection whose client address is one of
/// these sockets is that loop.
#[derive(Debug, Default)]
pub struct OwnSockets {
    shards: [Mutex<HashSet<SocketAddr>>; OWN_SHARDS],
}

/// Shards of [`OwnSockets`]: tunnels open and close on every worker.
const OWN_SHARDS: usize = 8;

impl OwnSockets {
    fn shard(&self, a: &SocketAddr) -> &Mutex<HashSet<SocketAddr>> {
        &self.shards[usize::from(a.port()) % OWN_SHARDS]
    }

    /// Remember `up` until the guard is dropped.
    pub fn register(self: &Arc<Self>, up: &TcpStream) -> Option<OwnSocket> {
        let addr = up.local_addr().ok()?;
        self.shard(&addr)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(addr);
        Some(OwnSocket {
            set: Arc::clone(self),
            addr,
        })
    }

    /// Is `peer` one of chatwall's own upstream sockets?
    pub fn contains(&self, peer: SocketAddr) -> bool {
        self.shard(&peer)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&peer)
    }
}

/// One registered upstream socket; forgotten on drop.
#[derive(Debug)]
pub struct OwnSocket {
    set: Arc<OwnSockets>,
    addr: SocketAddr,
}

impl Drop for OwnSocket {
    fn drop(&mut self) {
        self.set
            .shard(&self.addr)
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.addr);
    }
}

/// The system resolver (getaddrinfo) behind a short positive cache, shared
/// by the per-request checks and the upstream connector so that a name is
/// looked up once, and the addresses checked are the addresses connected to.
/// name → [(port, when resolved, addresses)]: looked up by `&str`, so a hit
/// allocates nothing.
type Cache = HashMap<String, Vec<(u16, Instant, Arc<[SocketAddr]>)>>;

pub struct Resolver {
    cache: Mutex<Cache>,
    ttl: Duration,
}

/// Bound on cached names; the cache is cleared when it is full.
const RESOLVER_CACHE_ENTRIES: usize = 4096;

impl Resolver {
    pub fn new(ttl: Duration) -> Resolver {
        Resolver {
            cache: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    /// Resolve `host:port` under the DNS deadline. IP literals are returned
    /// as they are.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Arc<[SocketAddr]>, FlowError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(Arc::from([SocketAddr::new(ip, port)]));
        }
        let mut buf = [0u8; crate::classify::host::MAX_HOST_LEN];
        let lower = buf.get_mut(..host.len()).and_then(|b| {
            b.copy_from_slice(host.as_bytes());
            b.make_ascii_lowercase();
            std::str::from_utf8(b).ok()
        });
        if let Some(h) = lower {
            let hit = self.lock().get(h).and_then(|entries| {
                entries
                    .iter()
                    .find(|(p, at, _)| *p == port && at.elapsed() < self.ttl)
                    .map(|(_, _, addrs)| Arc::clone(addrs))
            });
            if let Some(addrs) = hit {
                return Ok(addrs);
            }
        }
        let addrs: Arc<[SocketAddr]> =
            match tokio::time::timeout(timeout, tokio::net::lookup_host((host, port))).await {
                Err(_) => return Err(FlowError::Dns(format!("{host}: timed out"))),
                Ok(Err(e)) => return Err(FlowError::Dns(format!("{host}: {e}"))),
                Ok(Ok(addrs)) => addrs.collect(),
            };
        if addrs.is_empty() {
            return Err(FlowError::Dns(format!("{host}: no addresses")));
        }
        if let (false, Some(key)) = (self.ttl.is_zero(), lower) {
            let mut cache = self.lock();
            if cache.len() >= RESOLVER_CACHE_ENTRIES {
                cache.clear();
            }
            let entries = cache.entry(key.to_string()).or_default();
            entries.retain(|(p, _, _)| *p != port);
            entries.push((port, Instant::now(), Arc::clone(&addrs)));
        }
        Ok(addrs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Resolve and check every address; all must pass (a name that resolves to
/// one IM address and one innocent one is still the IM service).
pub async fn resolve_checked(
    shared: &Shared,
    engine: &Engine,
    who: &Who,
    host: &str,
    port: u16,
    name_allowlisted: bool,
    findings: &mut Findings,
) -> Result<Arc<[SocketAddr]>, FlowError> {
    let addrs = shared
        .resolver
        .resolve(host, port, engine.config.limits.dns_timeout)
        .await?;
    for a in addrs.iter() {
        check_addr(&shared.guard, engine, who, *a, name_allowlisted, findings)?;
    }
    Ok(addrs)
}

/// Connect to the first address that answers, under the connect deadline.
/// Returns the stream and the address it is connected to.
pub async fn connect(
    addrs: &[SocketAddr],
    timeout: Duration,
    mark: u32,
) -> Result<(TcpStream, SocketAddr), FlowError> {
    let mut last = FlowError::Connect("no address".into());
    for &addr in addrs {
        let sock = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
        }
        .map_err(|e| FlowError::Connect(e.to_string()))?;
        if mark != 0 {
            set_mark(&sock, mark);
        }
        match tokio::time::timeout(timeout, sock.connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok((s, addr));
            }
            Ok(Err(e)) => last = FlowError::from_connect(&addr.to_string(), e),
            Err(_) => last = FlowError::ConnectTimeout(addr.to_string()),
        }
    }
    Err(last)
}

/// Connect as [`connect`] does, and register the socket in `own` while its
/// handshake is under way (the kernel chose the source port at
/// `connect(2)`): a connection that a REDIRECT rule sends back to chatwall
/// can be accepted there before the handshake completes on this side, and
/// must be recognised at once.
pub async fn connect_registered(
    addrs: &[SocketAddr],
    timeout: Duration,
    mark: u32,
    own: Option<&Arc<OwnSockets>>,
) -> Result<(TcpStream, SocketAddr, Option<OwnSocket>), FlowError> {
    let Some(own) = own else {
        let (s, a) = connect(addrs, timeout, mark).await?;
        return Ok((s, a, None));
    };
    #[cfg(not(target_os = "linux"))]
    {
        // Registered once connected: the loop may take a turn more here.
        let (s, a) = connect(addrs, timeout, mark).await?;
        let guard = own.register(&s);
        return Ok((s, a, guard));
    }
    #[cfg(target_os = "linux")]
    let mut last = FlowError::Connect("no address".into());
    #[cfg(target_os = "linux")]
    for &addr in addrs {
        match tokio::time::timeout(timeout, connect_one_registered(addr, mark, own)).await {
            Ok(Ok((s, guard))) => {
                let _ = s.set_nodelay(true);
                return Ok((s, addr, guard));
            }
            Ok(Err(e)) => last = FlowError::from_connect(&addr.to_string(), e),
            Err(_) => last = FlowError::ConnectTimeout(addr.to_string()),
        }
    }
    #[cfg(target_os = "linux")]
    Err(last)
}

/// One non-blocking connect through socket2, registered before it waits.
#[cfg(target_os = "linux")]
async fn connect_one_registered(
    addr: SocketAddr,
    mark: u32,
    own: &Arc<OwnSockets>,
) -> std::io::Result<(TcpStream, Option<OwnSocket>)> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    if mark != 0 {
        if let Err(e) = sock.set_mark(mark) {
            tracing::warn!(error = %e, mark, "cannot set SO_MARK on an upstream socket (needs CAP_NET_ADMIN)");
        }
    }
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if in_progress(&e) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(std::net::TcpStream::from(sock))?;
    let guard = own.register(&stream);
    stream.writable().await?;
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    // Writable without an error, yet not connected, is a refusal too.
    stream.peer_addr()?;
    Ok((stream, guard))
}

/// A non-blocking connect that has started (EINPROGRESS).
#[cfg(target_os = "linux")]
fn in_progress(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error())
}

#[cfg(target_os = "linux")]
fn set_mark(sock: &tokio::net::TcpSocket, mark: u32) {
    if let Err(e) = SockRef::from(sock).set_mark(mark) {
        tracing::warn!(error = %e, mark, "cannot set SO_MARK on an upstream socket (needs CAP_NET_ADMIN)");
    }
}

#[cfg(not(target_os = "linux"))]
fn set_mark(_sock: &tokio::net::TcpSocket, _mark: u32) {}
