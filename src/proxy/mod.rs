//! All socket IO. The front ends differ only in how they learn the
//! destination and the first bytes; then they share one path, and imports
//! point one way, left to right:
//!
//! ```text
//! listener ─┬─ connect (first head) ─ explicit (hyper: absolute-form HTTP) ─┐
//!           │                      └─ CONNECT ───────────────────────────────┤
//!           └─ transparent (original destination) ──────────────────────────┴─ tunnel
//!                                                                            (first bytes,
//!   decisions: crate::decide            tunnel::http1 for HTTP inside) ─ upstream / relay / refuse
//!   conn: what every stage carries      admin (metrics, health, reload, PAC) on its own listener
//! ```
//!
//! Upstream connections go direct (`upstream`) or, with `[upstream]
//! parent`, through a parent proxy (`parent`), once every decision is made.
pub mod body;
pub mod conn;
pub mod connect;
pub mod explicit;
pub mod forward;
pub mod hop_by_hop;
pub mod listener;
pub mod origdst;
pub mod parent;
pub mod prefixed;
pub mod refuse;
pub mod relay;
pub mod target;
pub mod tls_wire;
pub mod transparent;
pub mod tunnel;
pub mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::access_log::{AccessLog, Record};
use crate::classify::Reason;
use crate::engine::Engine;
use crate::metrics::{ListenerKind, Metrics};
use crate::policy::Verdict;

/// How long a resolved name is reused. getaddrinfo gives no TTL; a short
/// fixed one keeps lookups off the per-request path without pinning stale
/// addresses for long.
pub const DNS_CACHE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

/// State shared by every connection of one process.
pub struct Shared {
    pub engine: Arc<ArcSwap<Engine>>,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub http: explicit::UpstreamClient,
    /// Idle upstream connections of explicit HTTP forwarding.
    pub pool: forward::Pool,
    pub resolver: Arc<upstream::Resolver>,
    /// Tunnel upstream sockets, to recognise a redirect loop.
    pub own_sockets: Arc<upstream::OwnSockets>,
    /// chatwall's own listeners, never a destination.
    pub guard: Arc<upstream::DestGuard>,
    pub auth: crate::auth::AuthCache,
    /// `Via` value with this instance's pseudonym (RFC 9110 §7.6.3), also
    /// how a forwarding loop is recognised.
    pub via: http::HeaderValue,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    conns_total: AtomicUsize,
    conns_per_client: Mutex<HashMap<IpAddr, usize>>,
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

impl Shared {
    pub fn new(
        engine: Engine,
        metrics: Metrics,
        access_log: AccessLog,
        own_addrs: Vec<SocketAddr>,
    ) -> Arc<Shared> {
        metrics.set_signatures(&engine.signatures);
        metrics.set_tls_ca(&engine);
        let guard = Arc::new(upstream::DestGuard {
            own_addrs,
            local_ips: local_ips(),
        });
        let resolver = Arc::new(upstream::Resolver::new(DNS_CACHE_TTL));
        let engine = Arc::new(ArcSwap::from_pointee(engine));
        let http = explicit::UpstreamClient::new(&engine, &resolver, &guard);
        let (shutdown, _) = tokio::sync::watch::channel(false);
        Arc::new(Shared {
            engine,
            metrics,
            access_log,
            http,
            pool: forward::Pool::default(),
            resolver,
            own_sockets: Arc::default(),
            guard,
            auth: crate::auth::AuthCache::default(),
            via: via_value(),
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            conns_total: AtomicUsize::new(0),
            conns_per_client: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    /// Fill the record's verdict fields and count the verdict in the
    /// metrics, once per record: a flow is counted with the verdict it is
    /// first recorded with (tunnels record theirs when they end).
    pub fn record_verdict(
        &self,
        listener: ListenerKind,
        engine: &Engine,
        verdict: &Verdict,
        rec: &mut Record,
    ) {
        rec.verdict = verdict.as_str();
        let count = !rec.counted;
        rec.counted = true;
        if count {
            let l = self.metrics.listener(listener);
            match verdict {
                Verdict::Allow => l.requests_allow.inc(),
                Verdict::Monitor(_) => l.requests_monitor.inc(),
                Verdict::Block(_) => l.requests_block.inc(),
            }
        }
        let Some(d) = verdict.detection() else {
            return;
        };
        let app = engine.signatures.app_id(d.app);
        if count {
            if verdict.is_block() {
                self.metrics
                    .blocked_total
                    .with_label_values(&[app, d.reason.as_str()])
                    .inc();
            }
            self.metrics
                .detections_total
                .with_label_values(&[app, verdict.as_str()])
                .inc();
        }
        rec.app = Some(app.to_string());
        rec.reason = Some(d.reason.as_str());
        if let Some(r) = d.rule.and_then(|r| engine.signatures.rule(r)) {
            rec.rule = Some(r.text.clone());
            if let Some(a) = engine.signatures.app(r.app) {
                rec.rule_at = Some(format!("{}:{}", a.file, r.line));
            }
        }
        rec.offset = d.offset;
        if let Some(x) = d
            .exception
            .and_then(|i| engine.policy.exception_label(i.into()))
        {
            rec.exception = Some(x.to_string());
            let group = d.exception.and_then(|i| {
                engine
                    .policy
                    .exception_group(i.into(), rec.groups.as_deref())
            });
            if count {
                let labels = [x, verdict.as_str()];
                self.metrics
                    .exception_decisions
                    .with_label_values(&labels)
                    .inc();
                if let Some(g) = group {
                    self.metrics
                        .group_decisions
                        .with_label_values(&[x, g, verdict.as_str()])
                        .inc();
                }
            }
            rec.group = group.map(str::to_string);
        }
        if d.reason == Reason::Payload {
            tracing::debug!(app, offset = ?d.offset, "payload signature matched");
        }
    }

    /// Count a refused or failed flow (or request) and fill its record's
    /// verdict, reason and error: a policy block, a denied destination, an
    /// upstream failure of an allowed flow, or a malformed request.
    pub fn record_refusal(
        &self,
        listener: ListenerKind,
        engine: &Engine,
        e: &refuse::FlowError,
        rec: &mut Record,
    ) {
        use refuse::FlowError;
        match e {
            FlowError::Blocked(d) => {
                self.record_verdict(listener, engine, &Verdict::Block(*d), rec);
            }
            FlowError::PortNotAllowed(_) => {
                let d = target::port_refusal();
                self.record_verdict(listener, engine, &Verdict::Block(d), rec);
            }
            FlowError::DeniedDestination(_) => {
                rec.verdict = "block";
                rec.reason = Some("destination");
                self.metrics.listener(listener).requests_block.inc();
                self.metrics.upstream_error("denied_destination");
            }
            e if e.is_upstream() => {
                self.metrics.upstream_error(e.kind());
                if !rec.counted {
                    // Allowed, then failed upstream: still a request decided.
                    self.record_verdict(listener, engine, &Verdict::Allow, rec);
                }
            }
            _ => {}
        }
        if !matches!(e, FlowError::Blocked(_)) {
            rec.error = Some(e.to_string());
        }
    }

    /// Check a request's proxy credentials: a Kerberos ticket (`Negotiate`,
    /// with `[auth] negotiate`) by the GSS-API, a name in `[auth]
    /// users_file` against its hash, any other name (with `[ldap]
    /// basic_bind`) by a bind to the directory. A user's directory groups
    /// are read too when an exception names groups (cached: see
    /// [`crate::directory`]).
    pub async fn authenticate(
        &self,
        engine: &Engine,
        auth: &crate::config::Auth,
        header: Option<&[u8]>,
    ) -> (crate::auth::AuthOutcome, Option<crate::directory::Groups>) {
        use crate::auth::AuthOutcome;
        use crate::directory::BindOutcome;
        if let Some((cfg, token)) = auth
            .negotiate
            .as_ref()
            .zip(header.and_then(crate::negotiate::parse))
        {
            let outcome = match token {
                Some(token) => match crate::negotiate::accept_async(cfg, token).await {
                    Ok(principal) => {
                        let user = crate::negotiate::user_name(&principal, cfg.strip_realm);
                        AuthOutcome::User(Arc::from(user))
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "Negotiate token refused");
                        AuthOutcome::Wrong
                    }
                },
                None => AuthOutcome::Wrong,
            };
            let groups = match &outcome {
                AuthOutcome::User(user) => self.groups_of(engine, user).await,
                _ => None,
            };
            return (outcome, groups);
        }
        let directory = engine.directory.as_deref();
        let by_bind = directory
            .filter(|d| d.config().basic_bind)
            .zip(header)
            .and_then(|(d, h)| {
                let (user, password) = crate::auth::parse_basic(h)?;
                (!auth.users.contains_key(&user)).then_some((d, h, user, password))
            });
        let outcome = match by_bind {
            Some((d, h, user, password)) => {
                let bound = d.bind(h, &user, &password).await;
                let result = match &bound {
                    BindOutcome::User(_) => "ok",
                    BindOutcome::Wrong => "wrong",
                    BindOutcome::Unavailable => "unavailable",
                };
                self.metrics.directory_bind(result);
                match bound {
                    BindOutcome::User(u) => AuthOutcome::User(u),
                    // A directory that cannot check a password does not
                    // let anyone in.
                    BindOutcome::Wrong | BindOutcome::Unavailable => AuthOutcome::Wrong,
                }
            }
            None => self.auth.check(auth, engine.generation, header),
        };
        let groups = match &outcome {
            AuthOutcome::User(user) => self.groups_of(engine, user).await,
            _ => None,
        };
        (outcome, groups)
    }

    /// An authenticated user's directory groups, when an exception names
    /// groups and a directory is configured.
    pub async fn groups_of(
        &self,
        engine: &Engine,
        user: &Arc<str>,
    ) -> Option<crate::directory::Groups> {
        let d = engine.directory.as_deref()?;
        if !engine.policy.needs_groups() {
            return None;
        }
        let (groups, source) = d.groups(user).await;
        self.metrics.directory_lookup(source.as_str());
        Some(groups)
    }

    /// Where tunnels register their upstream sockets: only while
    /// transparent listeners exist (see [`upstream::OwnSockets`]).
    pub fn own_sockets(&self, engine: &Engine) -> Option<&Arc<upstream::OwnSockets>> {
        let l = &engine.config.listen;
        let transparent = !(l.transparent_http.is_empty()
            && l.transparent_tls.is_empty()
            && l.transparent.is_empty());
        transparent.then_some(&self.own_sockets)
    }

    /// Connect a tunnel's upstream known by its address (a redirected
    /// stream's original destination): through the parent, with a
    /// `CONNECT` to that address, where one is configured and
    /// `parent_bypass` does not send the address direct; else directly.
    pub async fn connect_tunnel_upstream(
        &self,
        engine: &Engine,
        addrs: &[SocketAddr],
    ) -> Result<
        (
            tokio::net::TcpStream,
            SocketAddr,
            Option<upstream::OwnSocket>,
        ),
        refuse::FlowError,
    > {
        if let Some(&dst) = addrs.first() {
            if let parent::Hop::Parent(p) = parent::hop_for_addr(engine, dst.ip()) {
                let authority = parent::authority(&dst.ip().to_string(), dst.port());
                let (s, own) = self.connect_through(engine, p, &authority).await?;
                return Ok((s, dst, own));
            }
        }
        self.connect_tunnel_direct(engine, addrs).await
    }

    /// Open a tunnel to `authority` through the parent proxy, under the
    /// same deadlines, mark and registration as a direct one.
    pub async fn connect_through(
        &self,
        engine: &Engine,
        p: &crate::config::Parent,
        authority: &str,
    ) -> Result<(tokio::net::TcpStream, Option<upstream::OwnSocket>), refuse::FlowError> {
        parent::open_tunnel(
            engine,
            &self.resolver,
            &self.guard,
            p,
            authority,
            self.own_sockets(engine),
        )
        .await
    }

    /// Connect a tunnel's upstream directly under the configured deadline
    /// and mark, registered as chatwall's own while transparent listeners
    /// exist.
    pub async fn connect_tunnel_direct(
        &self,
        engine: &Engine,
        addrs: &[SocketAddr],
    ) -> Result<
        (
            tokio::net::TcpStream,
            SocketAddr,
            Option<upstream::OwnSocket>,
        ),
        refuse::FlowError,
    > {
        upstream::connect_registered(
            addrs,
            engine.config.limits.connect_timeout,
            engine.config.upstream_mark,
            self.own_sockets(engine),
        )
        .await
    }

    /// The token in `Via` that names this instance (without the protocol
    /// version): a request that carries it came through here already.
    pub fn via_token(&self) -> &[u8] {
        self.via.as_bytes().get(4..).unwrap_or_default()
    }

    /// Take a connection slot, or say which cap refused it. The slot (and
    /// the listener's active-connection gauge) is held until the guard and
    /// every clone of it are dropped: a tunnel handed on by the HTTP server
    /// keeps its connection's slot.
    pub fn admit(
        self: &Arc<Self>,
        client: IpAddr,
        kind: ListenerKind,
    ) -> Result<ConnGuard, &'static str> {
        let limits = &self.engine.load().config.limits;
        let (max_total, max_client) = (limits.max_connections, limits.max_connections_per_client);
        if self.conns_total.fetch_add(1, Ordering::AcqRel) >= max_total {
            self.conns_total.fetch_sub(1, Ordering::AcqRel);
            return Err("global");
        }
        let mut map = self
            .conns_per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let n = map.entry(client).or_insert(0);
        if *n >= max_client {
            drop(map);
            self.conns_total.fetch_sub(1, Ordering::AcqRel);
            return Err("per_client");
        }
        *n += 1;
        drop(map);
        self.metrics.listener(kind).connections_active.inc();
        Ok(ConnGuard {
            shared: Arc::clone(self),
            client,
            kind,
        })
    }

    pub fn open_connections(&self) -> usize {
        self.conns_total.load(Ordering::Acquire)
    }
}

/// Releases a connection slot when the connection ends.
pub struct ConnGuard {
    shared: Arc<Shared>,
    client: IpAddr,
    kind: ListenerKind,
}

impl std::fmt::Debug for ConnGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnGuard")
            .field("client", &self.client)
            .field("listener", &self.kind)
            .finish()
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared
            .metrics
            .listener(self.kind)
            .connections_active
            .dec();
        self.shared.conns_total.fetch_sub(1, Ordering::AcqRel);
        let mut map = self
            .shared
            .conns_per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

/// `1.1 chatwall-<6 hex digits>`: random per process, so two chatwall
/// proxies in a chain do not mistake each other for a loop.
fn via_value() -> http::HeaderValue {
    use std::io::Read;
    let mut b = [0u8; 3];
    let random = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if random.is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id();
        b = [(t >> 16) as u8, (t >> 8) as u8, t as u8];
    }
    let v = format!("1.1 chatwall-{:02x}{:02x}{:02x}", b[0], b[1], b[2]);
    http::HeaderValue::from_str(&v)
        .unwrap_or_else(|_| http::HeaderValue::from_static("1.1 chatwall"))
}

/// The addresses of this host's interfaces (best effort, from /proc).
fn local_ips() -> Vec<IpAddr> {
    let mut out = vec![
        IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    ];
    if let Ok(text) = std::fs::read_to_string("/proc/net/if_inet6") {
        for line in text.lines() {
            if let Some(hex) = line.split_whitespace().next() {
                if let Ok(v) = u128::from_str_radix(hex, 16) {
                    out.push(IpAddr::V6(std::net::Ipv6Addr::from(v)));
                }
            }
        }
    }
    if let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") {
        // Lines "|-- a.b.c.d" followed by "/32 host LOCAL" name local addresses.
        let mut last: Option<IpAddr> = None;
        for line in text.lines() {
            let t = line.trim();
            if let Some(a) = t.strip_prefix("|-- ") {
                last = a.parse().ok();
            } else if t.contains("host LOCAL") {
                if let Some(ip) = last {
                    if !out.contains(&ip) {
                        out.push(ip);
                    }
                }
            }
        }
    }
    out
}

/// Resolves once shutdown has been requested.
pub async fn shutdown_requested(rx: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
