//! One record per request or tunnel, written as a JSON line or in Squid's
//! native access.log format. The access log is its own stream, not tracing.
//! The file is reopened on SIGUSR1 (logrotate's `postrotate`).
use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::config::{AccessLogTarget, LogFormat};

/// Everything one line says.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Record {
    #[serde(skip)]
    pub start: Option<SystemTime>,
    /// Whether the verdict was already counted in the metrics.
    #[serde(skip)]
    pub counted: bool,
    pub ts: String,
    pub client: String,
    pub user: Option<String>,
    pub listener: &'static str,
    pub method: String,
    pub target: String,
    pub host: Option<String>,
    pub sni: Option<String>,
    pub alpn: Option<String>,
    pub ja4: Option<String>,
    pub app: Option<String>,
    pub verdict: &'static str,
    pub reason: Option<&'static str>,
    /// The rule that matched, as the signature file writes it.
    pub rule: Option<String>,
    /// Where the rule is: `file:line`.
    pub rule_at: Option<String>,
    /// Byte offset of a payload match in its direction's stream.
    pub offset: Option<u32>,
    /// The `[[policy.exceptions]]` entry that chose a block or monitor
    /// verdict: its `name`, or `#N` (1-based position).
    pub exception: Option<String>,
    /// TLS inspection of the flow: `inspected` (decrypted), `spliced`
    /// (selected, relayed undecrypted), `page` (a page over chatwall's
    /// certificate), `client-refused` (the client refused it).
    pub tls: Option<&'static str>,
    /// The directory group through which that exception matched the user.
    pub group: Option<String>,
    /// The user's directory groups, for finding `group`; not logged.
    #[serde(skip)]
    pub groups: Option<crate::directory::Groups>,
    pub status: u16,
    pub upstream: Option<String>,
    pub error: Option<String>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
}

enum Sink {
    Off,
    Stdout,
    File(PathBuf, LineWriter<File>),
}

pub struct AccessLog {
    format: LogFormat,
    /// Fixed at construction, so a disabled log costs one branch per flow.
    off: bool,
    sink: Mutex<Sink>,
}

impl AccessLog {
    pub fn open(target: &AccessLogTarget, format: LogFormat) -> std::io::Result<AccessLog> {
        let sink = match target {
            AccessLogTarget::Off => Sink::Off,
            AccessLogTarget::Stdout => Sink::Stdout,
            AccessLogTarget::File(p) => Sink::File(p.clone(), LineWriter::new(open_append(p)?)),
        };
        Ok(AccessLog {
            format,
            off: matches!(sink, Sink::Off),
            sink: Mutex::new(sink),
        })
    }

    pub fn off() -> AccessLog {
        AccessLog {
            format: LogFormat::Json,
            off: true,
            sink: Mutex::new(Sink::Off),
        }
    }

    pub fn is_off(&self) -> bool {
        self.off
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sink> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reopen the file (after logrotate moved it).
    pub fn reopen(&self) -> std::io::Result<()> {
        let mut sink = self.lock();
        if let Sink::File(path, w) = &mut *sink {
            let _ = w.flush();
            *w = LineWriter::new(open_append(path)?);
        }
        Ok(())
    }

    pub fn write(&self, mut r: Record) {
        if self.off {
            return;
        }
        let end = SystemTime::now();
        let start = r.start.unwrap_or(end);
        let elapsed = end.duration_since(start).unwrap_or(Duration::ZERO);
        r.duration_ms = elapsed.as_millis() as u64;
        let line = match self.format {
            LogFormat::Json => {
                r.ts = humantime::format_rfc3339_millis(end).to_string();
                let mut s = serde_json::to_string(&r).unwrap_or_default();
                s.push('\n');
                s
            }
            LogFormat::Squid => squid_line(&r, end, elapsed),
        };
        let mut sink = self.lock();
        let _ = match &mut *sink {
            Sink::Off => Ok(()),
            Sink::Stdout => std::io::stdout().lock().write_all(line.as_bytes()),
            Sink::File(_, w) => w.write_all(line.as_bytes()),
        };
    }
}

fn open_append(p: &PathBuf) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(p)
}

/// Squid's native format (`logformat squid`):
/// `%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`.
pub fn squid_line(r: &Record, end: SystemTime, elapsed: Duration) -> String {
    let since = end.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let code = match (r.verdict, r.method.as_str(), r.status) {
        ("block", _, _) => "TCP_DENIED",
        (_, "CONNECT", 200) | (_, "TUNNEL", _) => "TCP_TUNNEL",
        (_, _, 0) => "NONE_NONE",
        (_, _, s) if s >= 500 => "TCP_MISS_ABORTED",
        _ => "TCP_MISS",
    };
    let hier = match (&r.upstream, r.verdict) {
        // Through a parent proxy: "<destination> via <parent>", which
        // Squid logs as its parent's host.
        (Some(u), v) if v != "block" => match u.split_once(" via ") {
            Some((_, parent)) => format!("FIRSTUP_PARENT/{}", parent_host(parent)),
            None => format!("HIER_DIRECT/{}", host_of(u)),
        },
        _ => "HIER_NONE/-".to_string(),
    };
    let client = r
        .client
        .parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| r.client.clone());
    let user = r.user.as_deref().filter(|u| !u.is_empty()).unwrap_or("-");
    let bytes = r.bytes_down;
    format!(
        "{}.{:03} {:>6} {} {}/{:03} {} {} {} {} {} -\n",
        since.as_secs(),
        since.subsec_millis(),
        elapsed.as_millis(),
        client,
        code,
        r.status,
        bytes,
        if r.method.is_empty() { "-" } else { &r.method },
        if r.target.is_empty() { "-" } else { &r.target },
        user,
        hier
    )
}

fn host_of(upstream: &str) -> String {
    upstream
        .parse::<SocketAddr>()
        .map(|a| a.ip().to_string())
        .unwrap_or_else(|_| upstream.to_string())
}

/// The host of a parent proxy's `host:port`, without brackets.
fn parent_host(parent: &str) -> String {
    parent
        .parse::<http::uri::Authority>()
        .map(|a| {
            a.host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        })
        .unwrap_or_else(|_| parent.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squid_format_names_the_parent_as_the_hierarchy() {
        assert_eq!(parent_host("gw.example:8080"), "gw.example");
        assert_eq!(parent_host("[2001:db8::1]:3128"), "2001:db8::1");
        let r = Record {
            start: Some(SystemTime::UNIX_EPOCH),
            client: "192.0.2.1:40000".into(),
            method: "GET".into(),
            target: "http://example.org/".into(),
            status: 200,
            verdict: "allow",
            upstream: Some("example.org:80 via gw.example:8080".into()),
            ..Record::default()
        };
        let line = squid_line(&r, SystemTime::UNIX_EPOCH, Duration::ZERO);
        assert!(line.contains(" FIRSTUP_PARENT/gw.example -"), "{line}");
    }

    #[test]
    fn squid_line_has_the_ten_fields_of_squid() {
        let r = Record {
            client: "127.0.0.1:5555".into(),
            method: "GET".into(),
            target: "http://example.com/".into(),
            verdict: "block",
            status: 403,
            bytes_down: 321,
            ..Record::default()
        };
        let end = UNIX_EPOCH + Duration::from_millis(1_286_536_309_450);
        let line = squid_line(&r, end, Duration::from_millis(50));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields,
            [
                "1286536309.450",
                "50",
                "127.0.0.1",
                "TCP_DENIED/403",
                "321",
                "GET",
                "http://example.com/",
                "-",
                "HIER_NONE/-",
                "-"
            ]
        );
    }
}
