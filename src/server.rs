//! Process assembly: bind every listener (after the configuration and the
//! signature set have loaded), run the accept loops and the admin listener,
//! reload on SIGHUP or `POST /-/reload`, reopen the access log on SIGUSR1,
//! and drain on SIGTERM/SIGINT.
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;

use crate::access_log::AccessLog;
use crate::config::Config;
use crate::engine::Engine;
use crate::metrics::{ListenerKind, Metrics};
use crate::proxy::{listener, Shared};

/// Tell systemd (Type=notify) about the service's state; a no-op when not
/// started by systemd.
fn notify(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// A listener that could not be bound, with its address.
#[derive(Debug)]
pub struct BindError {
    pub addr: SocketAddr,
    pub error: std::io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot listen on {}: {}", self.addr, self.error)
    }
}

impl std::error::Error for BindError {}

/// Re-reads configuration and signatures and swaps the engine whole.
pub struct Reloader {
    path: Option<PathBuf>,
    listen: Mutex<String>,
}

impl Reloader {
    pub fn reload(&self, shared: &Shared) -> Result<String, String> {
        let started = Instant::now();
        // systemd 253+ wants the reload's monotonic time with RELOADING=1.
        match sd_notify::NotifyState::monotonic_usec_now() {
            Ok(now) => notify(&[sd_notify::NotifyState::Reloading, now]),
            Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
        }
        let result = self.reload_inner(shared, started);
        notify(&[sd_notify::NotifyState::Ready]);
        result
    }

    fn reload_inner(&self, shared: &Shared, started: Instant) -> Result<String, String> {
        let result = Config::load(self.path.as_deref())
            .map_err(|e| e.to_string())
            .and_then(|cfg| Engine::build(cfg).map_err(|e| e.join("\n")));
        match result {
            Ok(engine) => {
                let listen = format!("{:?}", engine.config.listen);
                {
                    let mut old = self.listen.lock().unwrap_or_else(|e| e.into_inner());
                    if *old != listen {
                        tracing::warn!("listener addresses changed in the configuration; they take effect after a restart");
                    }
                    *old = listen;
                }
                let keytab = |e: &Engine| {
                    e.config
                        .auth
                        .as_ref()
                        .and_then(|a| a.negotiate.as_ref())
                        .map(|n| n.keytab.clone())
                        .filter(|k| !k.as_os_str().is_empty())
                };
                if keytab(&engine) != keytab(&shared.engine.load()) {
                    tracing::warn!("[auth] keytab changed in the configuration; it takes effect after a restart");
                }
                shared.metrics.set_signatures(&engine.signatures);
                shared.metrics.set_tls_ca(&engine);
                let summary = format!(
                    "{} apps, {} rules, generation {}",
                    engine.signatures.apps().len(),
                    engine.signatures.rules().len(),
                    engine.generation
                );
                shared.engine.store(Arc::new(engine));
                shared.metrics.reloads_ok.inc();
                tracing::info!(took_ms = started.elapsed().as_millis() as u64, %summary, "policy reloaded");
                Ok(summary)
            }
            Err(e) => {
                shared.metrics.reloads_failed.inc();
                tracing::warn!(error = %e, "reload refused; the old policy keeps serving");
                Err(e)
            }
        }
    }
}

/// Bound listeners and the shared state, ready to run.
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<(TcpListener, ListenerKind)>,
    admin: Option<TcpListener>,
    reloader: Arc<Reloader>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, BindError> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|error| BindError { addr, error })?;
    let _ = sock.set_reuseaddr(true);
    if addr.is_ipv6() {
        let _ = socket2::SockRef::from(&sock).set_only_v6(true);
    }
    sock.bind(addr).map_err(|error| BindError { addr, error })?;
    sock.listen(4096).map_err(|error| BindError { addr, error })
}

impl Server {
    /// Bind every configured listener. The engine was built (and so the
    /// policy validated) before this is called.
    pub async fn bind(engine: Engine) -> Result<Server, BindError> {
        let cfg = Arc::clone(&engine.config);
        let mut listeners = Vec::new();
        let mut own = Vec::new();
        let groups = [
            (&cfg.listen.explicit, ListenerKind::Explicit),
            (&cfg.listen.transparent_http, ListenerKind::TransparentHttp),
            (&cfg.listen.transparent_tls, ListenerKind::TransparentTls),
            (&cfg.listen.transparent, ListenerKind::Transparent),
        ];
        for (addrs, kind) in groups {
            for &addr in addrs.iter() {
                let l = bind(addr).await?;
                own.push(l.local_addr().unwrap_or(addr));
                listeners.push((l, kind));
            }
        }
        let admin = match cfg.listen.admin {
            Some(addr) => {
                let l = bind(addr).await?;
                own.push(l.local_addr().unwrap_or(addr));
                Some(l)
            }
            None => None,
        };
        let access_log =
            AccessLog::open(&cfg.access_log, cfg.log_format).map_err(|error| BindError {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                error,
            })?;
        let reloader = Arc::new(Reloader {
            path: cfg.path.clone(),
            listen: Mutex::new(format!("{:?}", cfg.listen)),
        });
        let shared = Shared::new(engine, Metrics::new(), access_log, own);
        Ok(Server {
            shared,
            listeners,
            admin,
            reloader,
        })
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    pub fn reloader(&self) -> Arc<Reloader> {
        Arc::clone(&self.reloader)
    }

    /// The bound address of each proxy listener, in configuration order.
    pub fn proxy_addrs(&self) -> Vec<(ListenerKind, SocketAddr)> {
        self.listeners
            .iter()
            .filter_map(|(l, k)| l.local_addr().ok().map(|a| (*k, a)))
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serve until `shutdown` completes, then drain.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        let mut tasks = Vec::new();
        for (l, kind) in self.listeners {
            tasks.push(tokio::spawn(listener::run(Arc::clone(&shared), l, kind)));
        }
        let admin_task = self.admin.map(|l| {
            tokio::spawn(crate::admin::run(
                Arc::clone(&shared),
                l,
                Arc::clone(&self.reloader),
            ))
        });
        shared.ready.store(true, Ordering::Release);
        notify(&[sd_notify::NotifyState::Ready]);
        tracing::info!("ready");
        shutdown.await;
        notify(&[sd_notify::NotifyState::Stopping]);

        // Drain: unready first, stop accepting, let flows finish.
        shared.draining.store(true, Ordering::Release);
        let grace = shared.engine.load().config.limits.shutdown_grace;
        tracing::info!(
            grace_ms = grace.as_millis() as u64,
            "shutting down; draining connections"
        );
        let _ = shared.shutdown.send(true);
        let deadline = Instant::now() + grace;
        while shared.open_connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if shared.open_connections() > 0 {
            tracing::warn!(
                open = shared.open_connections(),
                "grace period over; closing the remaining connections"
            );
        }
        for t in tasks {
            t.abort();
        }
        if let Some(t) = admin_task {
            t.abort();
        }
    }

    /// Serve with the process signals: SIGHUP reloads, SIGUSR1 reopens the
    /// access log, SIGTERM and SIGINT drain and stop.
    #[cfg(unix)]
    pub async fn run_with_signals(self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shared = self.shared();
        let reloader = self.reloader();
        let signals = async move {
            loop {
                tokio::select! {
                    _ = hup.recv() => { let _ = reloader.reload(&shared); }
                    _ = usr1.recv() => {
                        if let Err(e) = shared.access_log.reopen() {
                            tracing::error!(error = %e, "cannot reopen the access log");
                        }
                    }
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                }
            }
        };
        self.run(signals).await;
        Ok(())
    }
}
