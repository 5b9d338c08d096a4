//! Prometheus metrics. A `Metrics` value owns its registry; label values come
//! only from fixed enums and the signature set's app ids, never from traffic.
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::signatures::SignatureSet;

/// The kinds of listener, the `listener` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    Explicit,
    TransparentHttp,
    TransparentTls,
    Transparent,
}

impl ListenerKind {
    pub const ALL: [ListenerKind; 4] = [
        ListenerKind::Explicit,
        ListenerKind::TransparentHttp,
        ListenerKind::TransparentTls,
        ListenerKind::Transparent,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ListenerKind::Explicit => "explicit",
            ListenerKind::TransparentHttp => "transparent_http",
            ListenerKind::TransparentTls => "transparent_tls",
            ListenerKind::Transparent => "transparent",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// TLS inspection's certificate metrics: the leaf cache's size, leaves
/// minted and how long each took, and the CA's notAfter (an alert well
/// before it passes: a new CA must reach every client first).
fn tls_cert_metrics() -> (crate::tls_inspect::mint::MintMetrics, IntGauge) {
    let mint = crate::tls_inspect::mint::MintMetrics {
        cache_entries: IntGauge::new(
            "chatwall_tls_cert_cache_entries",
            "Minted leaf certificates in the cache now.",
        )
        .expect("valid metric"),
        minted: IntCounter::new(
            "chatwall_tls_certs_minted_total",
            "Leaf certificates minted for TLS inspection.",
        )
        .expect("valid metric"),
        mint_seconds: Histogram::with_opts(
            HistogramOpts::new(
                "chatwall_tls_cert_mint_seconds",
                "Time to mint one leaf certificate (key, signature).",
            )
            .buckets(vec![
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.1,
            ]),
        )
        .expect("valid metric"),
    };
    let not_after = IntGauge::new(
        "chatwall_tls_ca_not_after_timestamp_seconds",
        "Unix time the TLS inspection CA expires (0: no CA loaded).",
    )
    .expect("valid metric");
    (mint, not_after)
}

/// Which side a flow error comes from, the `kind` label of upstream errors.
pub const UPSTREAM_ERROR_KINDS: &[&str] = &[
    "dns",
    "connect_refused",
    "connect_timeout",
    "connect",
    "reset",
    "timeout",
    "protocol",
    "parent",
    "denied_destination",
];

pub struct PerListener {
    pub connections_total: IntCounter,
    pub connections_active: IntGauge,
    pub requests_allow: IntCounter,
    pub requests_block: IntCounter,
    pub requests_monitor: IntCounter,
}

pub struct Metrics {
    registry: Registry,
    listeners: Vec<PerListener>,
    pub blocked_total: IntCounterVec,
    pub detections_total: IntCounterVec,
    pub bytes_up: IntCounter,
    pub bytes_down: IntCounter,
    upstream_errors: IntCounterVec,
    pub inspection_duration: Histogram,
    signatures_loaded: IntGaugeVec,
    signatures_info: IntGaugeVec,
    signatures_last_update: IntGauge,
    signatures_update_failures: IntCounter,
    pub reloads_ok: IntCounter,
    pub reloads_failed: IntCounter,
    pub refused_clients: IntCounter,
    pub limit_refusals: IntCounterVec,
    pub auth_failures: IntCounter,
    /// Block and monitor verdicts whose action a `[[policy.exceptions]]`
    /// entry chose, by its label and the action.
    pub exception_decisions: IntCounterVec,
    /// Admin requests refused: `client` (outside `admin.allow`), `token`
    /// (reload without the right bearer token).
    pub admin_refusals: IntCounterVec,
    /// TLS inspection: how selected flows went, and the leaf cache.
    tls_inspect: IntCounterVec,
    tls_cert_cache: IntCounterVec,
    tenant_headers: IntCounterVec,
    /// TLS inspection's leaf cache and mints.
    pub tls_mint: crate::tls_inspect::mint::MintMetrics,
    /// The inspection CA's notAfter (0: no CA loaded).
    pub tls_ca_not_after: IntGauge,
    /// Group look-ups by how they were answered: hit (cache, or another
    /// flow's query), miss (the directory answered), unavailable (it did
    /// not: `[ldap] on_unavailable` applied).
    directory_lookups: IntCounterVec,
    /// Basic credentials checked by a bind: ok, wrong, unavailable.
    directory_binds: IntCounterVec,
    /// Verdicts of exceptions that matched through a directory group, by
    /// exception, group (as the exception names it) and action.
    pub group_decisions: IntCounterVec,
}

/// The `outcome` label of `chatwall_tls_inspect_total`.
pub const TLS_INSPECT_OUTCOMES: &[&str] = &[
    "inspected",
    "spliced_alpn",
    "spliced_cert_error",
    "spliced_upstream_error",
    "upstream_cert_error_page",
    "block_page",
    "client_refused",
    "refused_undecrypted",
];

impl Metrics {
    pub fn new() -> Metrics {
        // Every registration below uses fixed, valid names: failure would be
        // a programming error caught by the first test run.
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry
                .register(c)
                .expect("metric names are unique and valid");
        };
        let connections_total = IntCounterVec::new(
            Opts::new(
                "chatwall_connections_total",
                "Client connections accepted, by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let connections_active = IntGaugeVec::new(
            Opts::new(
                "chatwall_connections_active",
                "Client connections open now, by listener.",
            ),
            &["listener"],
        )
        .expect("valid metric");
        let requests_total = IntCounterVec::new(
            Opts::new(
                "chatwall_requests_total",
                "Requests and tunnels decided, by listener and verdict.",
            ),
            &["listener", "verdict"],
        )
        .expect("valid metric");
        let blocked_total = IntCounterVec::new(
            Opts::new(
                "chatwall_blocked_total",
                "Flows refused, by app and reason.",
            ),
            &["app", "reason"],
        )
        .expect("valid metric");
        let detections_total = IntCounterVec::new(
            Opts::new(
                "chatwall_detections_total",
                "Flows attributed to an app, by app and the action taken.",
            ),
            &["app", "action"],
        )
        .expect("valid metric");
        let bytes_total = IntCounterVec::new(
            Opts::new(
                "chatwall_bytes_total",
                "Payload bytes relayed: up = client to upstream, down = upstream to client.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "chatwall_upstream_errors_total",
                "Upstream failures, by kind.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let inspection_duration = Histogram::with_opts(
            HistogramOpts::new(
                "chatwall_inspection_duration_seconds",
                "Time from a flow's first byte to its verdict.",
            )
            .buckets(vec![
                0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        let signatures_loaded = IntGaugeVec::new(
            Opts::new("chatwall_signatures_loaded", "Rules loaded, by app."),
            &["app"],
        )
        .expect("valid metric");
        let signatures_info = IntGaugeVec::new(
            Opts::new(
                "chatwall_signatures_info",
                "The VERSION of the active signature set (1 for that version).",
            ),
            &["version"],
        )
        .expect("valid metric");
        let signatures_last_update = IntGauge::new(
            "chatwall_signatures_last_update_timestamp_seconds",
            "Unix time of the last successful `chatwall signatures update` of [signatures] dir (0: none recorded).",
        )
        .expect("valid metric");
        let signatures_update_failures = IntCounter::new(
            "chatwall_signatures_update_failures_total",
            "Failed `chatwall signatures update` runs recorded beside [signatures] dir.",
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new("chatwall_reloads_total", "Policy reloads, by result."),
            &["result"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("chatwall_build_info", "Build information."),
            &["version"],
        )
        .expect("valid metric");
        let refused_clients = IntCounter::new(
            "chatwall_refused_clients_total",
            "Connections from clients outside access.allow_clients.",
        )
        .expect("valid metric");
        let auth_failures = IntCounter::new(
            "chatwall_auth_failures_total",
            "Requests without valid proxy credentials (answered 407).",
        )
        .expect("valid metric");
        let limit_refusals = IntCounterVec::new(
            Opts::new(
                "chatwall_limit_refusals_total",
                "Connections refused by a connection cap, by limit.",
            ),
            &["limit"],
        )
        .expect("valid metric");

        let exception_decisions = IntCounterVec::new(
            Opts::new(
                "chatwall_exception_decisions_total",
                "Block and monitor verdicts chosen by a policy exception, by exception (its name, or #N) and action.",
            ),
            &["exception", "action"],
        )
        .expect("valid metric");
        let admin_refusals = IntCounterVec::new(
            Opts::new(
                "chatwall_admin_refusals_total",
                "Admin requests refused: client (outside admin.allow), token (reload without the right bearer token).",
            ),
            &["reason"],
        )
        .expect("valid metric");

        reg(Box::new(connections_total.clone()));
        reg(Box::new(connections_active.clone()));
        reg(Box::new(requests_total.clone()));
        reg(Box::new(blocked_total.clone()));
        reg(Box::new(detections_total.clone()));
        reg(Box::new(bytes_total.clone()));
        reg(Box::new(upstream_errors.clone()));
        reg(Box::new(inspection_duration.clone()));
        reg(Box::new(signatures_loaded.clone()));
        reg(Box::new(signatures_info.clone()));
        reg(Box::new(signatures_last_update.clone()));
        reg(Box::new(signatures_update_failures.clone()));
        reg(Box::new(reloads.clone()));
        reg(Box::new(build_info.clone()));
        reg(Box::new(refused_clients.clone()));
        reg(Box::new(limit_refusals.clone()));
        reg(Box::new(auth_failures.clone()));
        reg(Box::new(exception_decisions.clone()));
        reg(Box::new(admin_refusals.clone()));
        let tls_inspect = IntCounterVec::new(
            Opts::new(
                "chatwall_tls_inspect_total",
                "Flows TLS inspection selected or paged, by outcome: inspected (decrypted), spliced_* (relayed undecrypted, and why), upstream_cert_error_page, block_page (a refusal shown over chatwall's certificate), client_refused (the client refused chatwall's certificate).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let tls_cert_cache = IntCounterVec::new(
            Opts::new(
                "chatwall_tls_cert_cache_total",
                "Leaf certificates asked of the cache, by result (hit, miss: minted).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let directory_lookups = IntCounterVec::new(
            Opts::new(
                "chatwall_directory_lookups_total",
                "Directory group look-ups, by result: hit (cached), miss (read from the directory), unavailable (the directory did not answer; ldap.on_unavailable applied).",
            ),
            &["result"],
        )
        .expect("valid metric");
        reg(Box::new(tls_inspect.clone()));
        reg(Box::new(tls_cert_cache.clone()));
        let tenant_headers = IntCounterVec::new(
            Opts::new(
                "chatwall_tenant_headers_total",
                "Sign-in requests given tenant-restriction fields, by vendor.",
            ),
            &["vendor"],
        )
        .expect("valid metric");
        reg(Box::new(tenant_headers.clone()));
        for v in ["microsoft", "google", "slack", "dropbox"] {
            tenant_headers.with_label_values(&[v]);
        }
        for o in TLS_INSPECT_OUTCOMES {
            tls_inspect.with_label_values(&[o]);
        }
        for r in ["hit", "miss"] {
            tls_cert_cache.with_label_values(&[r]);
        }
        let (tls_mint, tls_ca_not_after) = tls_cert_metrics();
        reg(Box::new(tls_mint.cache_entries.clone()));
        reg(Box::new(tls_mint.minted.clone()));
        reg(Box::new(tls_mint.mint_seconds.clone()));
        reg(Box::new(tls_ca_not_after.clone()));
        let directory_binds = IntCounterVec::new(
            Opts::new(
                "chatwall_directory_binds_total",
                "Basic credentials checked by a bind to the directory, by result: ok, wrong, unavailable.",
            ),
            &["result"],
        )
        .expect("valid metric");
        let group_decisions = IntCounterVec::new(
            Opts::new(
                "chatwall_group_decisions_total",
                "Verdicts chosen by a policy exception through a directory group, by exception, group and action.",
            ),
            &["exception", "group", "action"],
        )
        .expect("valid metric");
        reg(Box::new(directory_lookups.clone()));
        reg(Box::new(directory_binds.clone()));
        reg(Box::new(group_decisions.clone()));
        for r in ["hit", "miss", "unavailable"] {
            directory_lookups.with_label_values(&[r]);
        }
        for r in ["ok", "wrong", "unavailable"] {
            directory_binds.with_label_values(&[r]);
        }

        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        for kind in UPSTREAM_ERROR_KINDS {
            upstream_errors.with_label_values(&[kind]);
        }
        for l in ["global", "per_client"] {
            limit_refusals.with_label_values(&[l]);
        }
        for r in ["client", "token"] {
            admin_refusals.with_label_values(&[r]);
        }
        let listeners = ListenerKind::ALL
            .iter()
            .map(|l| PerListener {
                connections_total: connections_total.with_label_values(&[l.as_str()]),
                connections_active: connections_active.with_label_values(&[l.as_str()]),
                requests_allow: requests_total.with_label_values(&[l.as_str(), "allow"]),
                requests_block: requests_total.with_label_values(&[l.as_str(), "block"]),
                requests_monitor: requests_total.with_label_values(&[l.as_str(), "monitor"]),
            })
            .collect();
        Metrics {
            bytes_up: bytes_total.with_label_values(&["up"]),
            bytes_down: bytes_total.with_label_values(&["down"]),
            reloads_ok: reloads.with_label_values(&["ok"]),
            reloads_failed: reloads.with_label_values(&["failed"]),
            registry,
            listeners,
            blocked_total,
            detections_total,
            upstream_errors,
            inspection_duration,
            signatures_loaded,
            signatures_info,
            signatures_last_update,
            signatures_update_failures,
            refused_clients,
            limit_refusals,
            auth_failures,
            exception_decisions,
            admin_refusals,
            tls_inspect,
            tls_cert_cache,
            tenant_headers,
            tls_mint,
            tls_ca_not_after,
            directory_lookups,
            directory_binds,
            group_decisions,
        }
    }

    /// The engine now in force: its inspection CA's expiry (0: none).
    pub fn set_tls_ca(&self, engine: &crate::engine::Engine) {
        let not_after = engine
            .tls
            .as_ref()
            .map_or(0, |t| t.minter.authority().not_after_unix());
        self.tls_ca_not_after.set(not_after);
        if let Some(t) = &engine.tls {
            self.tls_mint
                .cache_entries
                .set(i64::try_from(t.minter.len()).unwrap_or(i64::MAX));
        }
    }

    /// One request given a vendor's tenant-restriction fields.
    pub fn tenant_headers(&self, vendor: &'static str) {
        self.tenant_headers.with_label_values(&[vendor]).inc();
    }

    /// One flow TLS inspection selected or paged (`TLS_INSPECT_OUTCOMES`).
    pub fn tls_inspect(&self, outcome: &'static str) {
        self.tls_inspect.with_label_values(&[outcome]).inc();
    }

    /// One leaf asked of the cache: `hit` or `miss` (minted, taking
    /// `took`), and the entries it holds now.
    pub fn tls_cert(&self, result: &'static str, took: std::time::Duration, entries: usize) {
        self.tls_cert_cache.with_label_values(&[result]).inc();
        if result == "miss" {
            self.tls_mint.minted.inc();
            self.tls_mint.mint_seconds.observe(took.as_secs_f64());
        }
        self.tls_mint
            .cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// Count a group look-up by how it was answered (`hit`, `miss`,
    /// `unavailable`; children created at startup).
    pub fn directory_lookup(&self, result: &'static str) {
        self.directory_lookups.with_label_values(&[result]).inc();
    }

    /// Count a password checked by a bind (`ok`, `wrong`, `unavailable`).
    pub fn directory_bind(&self, result: &'static str) {
        self.directory_binds.with_label_values(&[result]).inc();
    }

    pub fn listener(&self, kind: ListenerKind) -> &PerListener {
        &self.listeners[kind.index()]
    }

    pub fn upstream_error(&self, kind: &'static str) {
        self.upstream_errors.with_label_values(&[kind]).inc();
    }

    /// Publish the rule counts and the version of a (new) signature set.
    pub fn set_signatures(&self, set: &SignatureSet) {
        self.signatures_info.reset();
        let version = if set.version.is_empty() {
            "-"
        } else {
            set.version.as_str()
        };
        self.signatures_info.with_label_values(&[version]).set(1);
        self.signatures_loaded.reset();
        for (i, app) in set.apps().iter().enumerate() {
            let n = set.rules().iter().filter(|r| r.app as usize == i).count();
            self.signatures_loaded
                .with_label_values(&[&app.id])
                .set(n as i64);
        }
    }

    /// Publish what `signatures update` recorded beside the signature
    /// directory (`None`: nothing recorded, or the bundled set).
    pub fn set_update_status(&self, status: Option<&crate::update::UpdateStatus>) {
        let (when, failures) = status.map_or((0, 0), |s| (s.last_success, s.failures));
        self.signatures_last_update
            .set(i64::try_from(when).unwrap_or(i64::MAX));
        // A counter that mirrors the file: set to its value.
        self.signatures_update_failures.reset();
        self.signatures_update_failures.inc_by(failures);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
