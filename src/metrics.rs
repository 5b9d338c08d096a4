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
}

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
        }
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
