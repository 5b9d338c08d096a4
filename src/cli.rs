//! The command line: `run` (the default), `check-config`, `signatures
//! list|diff|keygen|sign|update`, `classify host|url|pcap`, `export`,
//! `ca init|show` (TLS inspection's local CA), `passwd`. Exit
//! codes: 0 success,
//! 1 bad configuration, signatures or capture, 2 bad usage, 3 runtime
//! failure.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::classify::Detection;
use crate::config::Config;
use crate::decide::{self, Findings, Refusal};
use crate::engine::Engine;
use crate::export::Format;
use crate::policy::{Verdict, Who};
use crate::signatures::SignatureSet;

pub const EXIT_OK: u8 = 0;
pub const EXIT_CONFIG: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_RUNTIME: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "chatwall",
    version,
    about = "A forward and transparent proxy that keeps instant messaging off the network"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the proxy (the default, on the built-in defaults without -c).
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Load configuration and signatures, print a summary; exit 1 on errors.
    CheckConfig {
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// The signature set.
    Signatures {
        #[command(subcommand)]
        command: SignaturesCommand,
    },
    /// What the policy decides for a destination, and why.
    Classify {
        #[command(subcommand)]
        command: ClassifyCommand,
    },
    /// The active signature set under the active policy as DNS-sinkhole or
    /// firewall rules, on standard output (only apps whose action is block).
    Export {
        #[arg(long, value_enum)]
        format: Format,
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// A users-file line (`name:$argon2id$...`) for proxy authentication;
    /// the password is read from standard input (first line).
    Passwd { name: String },
    /// The local CA for TLS inspection.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Make a CA: DIR/ca.key (the key, mode 0600), DIR/ca.pem and DIR/ca.cer
    /// (the certificate in PEM, and in DER for Windows GPO and MDM); print
    /// its fingerprints and how to make clients trust it.
    Init {
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
        /// The CA's common name [default: "chatwall inspection CA <host name>"].
        #[arg(long, value_name = "NAME")]
        cn: Option<String>,
        /// How long the CA is valid, in days.
        #[arg(long, value_name = "N", default_value_t = 3650,
              value_parser = clap::value_parser!(u32).range(1..=36500))]
        days: u32,
        /// Replace existing files (clients trusting the old CA stop
        /// trusting what chatwall mints).
        #[arg(long)]
        force: bool,
    },
    /// Describe a CA (subject, key type, validity, fingerprints) and check
    /// it as the proxy would; exit 1 if the key is not the certificate's,
    /// others may read the key, or the CA is no CA or expired.
    Show {
        /// The directory of ca.pem and ca.key [default: .].
        #[arg(long, value_name = "DIR", conflicts_with_all = ["cert", "key"])]
        dir: Option<PathBuf>,
        /// The CA certificate (PEM; further certificates are the chain).
        #[arg(long, value_name = "FILE", requires = "key")]
        cert: Option<PathBuf>,
        /// The CA key (PEM).
        #[arg(long, value_name = "FILE", requires = "cert")]
        key: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum SignaturesCommand {
    /// The apps of the active set with the count of each rule kind.
    List {
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Apps and rules added and removed between two signature directories.
    Diff {
        #[arg(value_name = "DIR_A")]
        a: PathBuf,
        #[arg(value_name = "DIR_B")]
        b: PathBuf,
        /// For the inspection window the sets are compiled with.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// A key pair for signing bundles: DIR/signing.key (0600) and
    /// DIR/signing.pub (minisign format).
    Keygen {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// Pack a signature directory (its *.toml and VERSION) into the bundle
    /// OUT and write its signature to OUT.sig.
    Sign {
        #[arg(long, value_name = "KEY")]
        key: PathBuf,
        #[arg(long, value_name = "BUNDLE")]
        out: PathBuf,
        #[arg(value_name = "SIGDIR")]
        sigdir: PathBuf,
    },
    /// Verify, validate and install a newer signed bundle into
    /// [signatures] dir, then ask the running chatwall to reload.
    Update {
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// A URL (http:// or https://) or a path of a bundle; its signature
        /// is at the same place plus `.sig`.
        #[arg(long, value_name = "URL-OR-PATH")]
        from: String,
        /// Check the bundle and print `signatures diff` against the active
        /// set; install nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// For whom and when `classify host|url` decides.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ClassifyFor {
    /// The client address (default 127.0.0.1): exceptions by client prefix.
    #[arg(long, value_name = "IP")]
    pub client: Option<IpAddr>,
    /// The authenticated user: exceptions by user.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// A directory group the user is a member of (a name or a DN; repeat
    /// for several): exceptions by group, without asking the directory.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// The moment, in RFC 3339 (2025-06-02T12:30:00+02:00): scheduled
    /// exceptions. Default: now.
    #[arg(long, value_name = "RFC3339", value_parser = parse_moment)]
    pub at: Option<jiff::Timestamp>,
}

fn parse_moment(s: &str) -> Result<jiff::Timestamp, String> {
    s.parse::<jiff::Timestamp>().map_err(|e| {
        format!("not an RFC 3339 time with an offset (e.g. 2025-06-02T12:30:00+02:00): {e}")
    })
}

#[derive(Subcommand, Debug)]
pub enum ClassifyCommand {
    /// A host name or address (as in CONNECT host:port).
    Host {
        name: String,
        #[arg(long, default_value_t = 443)]
        port: u16,
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        who: ClassifyFor,
    },
    /// A URL (as in an absolute-form request).
    Url {
        url: String,
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
        #[command(flatten)]
        who: ClassifyFor,
    },
    /// Every TCP flow of a pcap or pcapng capture, replayed through the
    /// proxy's decisions: one verdict per flow.
    Pcap {
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
}

/// Load configuration and signatures, printing errors; Err is the exit code.
pub fn load_engine(path: Option<&std::path::Path>) -> Result<Engine, u8> {
    let cfg = Config::load(path).map_err(|e| {
        eprintln!("{e}");
        EXIT_CONFIG
    })?;
    Engine::build(cfg).map_err(|errs| {
        for e in errs {
            eprintln!("{e}");
        }
        EXIT_CONFIG
    })
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let code = match cli.command.unwrap_or(Command::Run { config: None }) {
        Command::Run { config } => run(config),
        Command::CheckConfig { config } => check_config(config),
        Command::Signatures {
            command: SignaturesCommand::List { config, json },
        } => signatures_list(config, json),
        Command::Signatures {
            command: SignaturesCommand::Diff { a, b, config },
        } => signatures_diff(&a, &b, config.as_deref()),
        Command::Signatures {
            command: SignaturesCommand::Keygen { dir },
        } => signatures_keygen(&dir),
        Command::Signatures {
            command: SignaturesCommand::Sign { key, out, sigdir },
        } => signatures_sign(&key, &out, &sigdir),
        Command::Signatures {
            command:
                SignaturesCommand::Update {
                    config,
                    from,
                    dry_run,
                },
        } => crate::update::run(config.as_deref(), &from, dry_run),
        Command::Classify {
            command: ClassifyCommand::Pcap { file, json, config },
        } => classify_pcap(&file, json, config.as_deref()),
        Command::Classify { command } => classify(command),
        Command::Export { format, config } => export(format, config.as_deref()),
        Command::Passwd { name } => passwd(&name),
        Command::Ca {
            command:
                CaCommand::Init {
                    dir,
                    cn,
                    days,
                    force,
                },
        } => ca_init(&dir, cn.as_deref(), days, force),
        Command::Ca {
            command: CaCommand::Show { dir, cert, key },
        } => match (cert, key) {
            (Some(cert), Some(key)) => ca_show(&cert, &key),
            _ => {
                let dir = dir.unwrap_or_else(|| PathBuf::from("."));
                ca_show(&dir.join("ca.pem"), &dir.join("ca.key"))
            }
        },
    };
    ExitCode::from(code)
}

fn passwd(name: &str) -> u8 {
    if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
        eprintln!("a user name has no ':' and no white space");
        return EXIT_USAGE;
    }
    let mut password = String::new();
    if let Err(e) = std::io::stdin().read_line(&mut password) {
        eprintln!("cannot read the password: {e}");
        return EXIT_RUNTIME;
    }
    let password = password.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        eprintln!("empty password");
        return EXIT_USAGE;
    }
    match crate::auth::hash_line(name, password) {
        Ok(line) => {
            println!("{line}");
            EXIT_OK
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_RUNTIME
        }
    }
}

fn init_tracing(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHATWALL_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `[auth] keytab`: the GSS-API finds an acceptor's keys through
/// `KRB5_KTNAME`, read by the Kerberos library. Set here, once, while the
/// process has a single thread (the environment is not safe to change once
/// other threads may read it); a reload that names another keytab needs a
/// restart (the file's contents are read at every handshake).
fn use_keytab(config: &crate::config::Config) {
    let Some(n) = config.auth.as_ref().and_then(|a| a.negotiate.as_ref()) else {
        return;
    };
    if !n.keytab.as_os_str().is_empty() {
        let mut name = std::ffi::OsString::from("FILE:");
        name.push(n.keytab.as_os_str());
        std::env::set_var("KRB5_KTNAME", name);
    }
}

fn run(config: Option<PathBuf>) -> u8 {
    let engine = match load_engine(config.as_deref()) {
        Ok(e) => e,
        Err(code) => return code,
    };
    init_tracing(&engine.config.log_level);
    use_keytab(&engine.config);
    // One worker per CPU this process may run on (taskset/cpusets count);
    // on a single CPU the current-thread scheduler avoids cross-thread
    // wake-ups altogether.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return EXIT_RUNTIME;
        }
    };
    rt.block_on(async move {
        let summary = format!(
            "{} apps, {} rules ({})",
            engine.signatures.apps().len(),
            engine.signatures.rules().len(),
            engine.signatures.origin
        );
        let server = match crate::server::Server::bind(engine).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("chatwall: {e}");
                return EXIT_RUNTIME;
            }
        };
        for (kind, addr) in server.proxy_addrs() {
            tracing::info!(listener = kind.as_str(), %addr, "listening");
        }
        if let Some(addr) = server.admin_addr() {
            tracing::info!(%addr, "admin listening");
        }
        tracing::info!(signatures = %summary, "policy loaded");
        match server.run_with_signals().await {
            Ok(()) => EXIT_OK,
            Err(e) => {
                eprintln!("chatwall: {e}");
                EXIT_RUNTIME
            }
        }
    })
}

fn check_config(config: Option<PathBuf>) -> u8 {
    let engine = match load_engine(config.as_deref()) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let c = &engine.config;
    println!(
        "configuration: {}",
        c.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<built-in defaults>".into())
    );
    println!("explicit listeners: {:?}", c.listen.explicit);
    println!(
        "transparent listeners: http {:?} tls {:?} other {:?}",
        c.listen.transparent_http, c.listen.transparent_tls, c.listen.transparent
    );
    println!(
        "admin: {}",
        c.listen
            .admin
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into())
    );
    println!(
        "admin allow (metrics, reload): {}; reload token: {}",
        c.admin
            .allow
            .nets()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        c.admin
            .reload_token_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into())
    );
    println!(
        "signatures: {} apps, {} rules from {} (version {})",
        engine.signatures.apps().len(),
        engine.signatures.rules().len(),
        engine.signatures.origin,
        if engine.signatures.version.is_empty() {
            "-"
        } else {
            &engine.signatures.version
        }
    );
    println!(
        "policy: default {}, non_tls_on_443 {}, non_http_on_80 {}, ech {}, {} app and {} category overrides, {} exceptions",
        c.policy.default.as_str(),
        c.policy.non_tls_on_443.as_str(),
        c.policy.non_http_on_80.as_str(),
        c.policy.ech.as_str(),
        c.policy.apps.len(),
        c.policy.categories.len(),
        c.policy.exceptions.len()
    );
    println!("CONNECT ports: {}", c.connect_ports);
    let t = &c.tls_inspect;
    if t.enabled {
        println!(
            "TLS inspection: on, CA {}, {} client prefixes and {} users, {} selections, {} never entries{}, upstream certificate errors: {}",
            t.ca_cert.display(),
            t.clients.nets().count(),
            t.client_users.len(),
            t.decrypt.len(),
            t.never.len(),
            if t.never_builtin { " (built-in list included)" } else { "" },
            match t.upstream_cert_errors {
                crate::config::CertErrors::Block => "block",
                crate::config::CertErrors::Splice => "splice",
            },
        );
    } else {
        println!("TLS inspection: off");
    }
    if let Some(l) = &c.ldap {
        let membership = match &l.membership {
            crate::config::Membership::Attribute(a) => format!("attribute {a}"),
            crate::config::Membership::Search { filter, .. } => format!("search {filter}"),
        };
        let grouped = c
            .policy
            .exceptions
            .iter()
            .filter(|e| !e.groups.is_empty())
            .count();
        // The directory is not contacted: checking must not depend on it.
        println!(
            "directory: {}{}, groups by {membership}, {grouped} exceptions by group, on_unavailable {}{} (not contacted)",
            l.url,
            if l.starttls { " (StartTLS)" } else { "" },
            l.on_unavailable.as_str(),
            if l.basic_bind { ", Basic by bind" } else { "" },
        );
    }
    match &c.parent {
        None => println!("parent proxy: none (direct)"),
        Some(p) => {
            let bypass: Vec<String> = p
                .bypass_names
                .iter()
                .cloned()
                .chain(p.bypass_nets.nets().map(|n| n.to_string()))
                .collect();
            println!(
                "parent proxy: {} ({} credentials; direct: {})",
                p.authority,
                if p.authorization.is_some() {
                    "with"
                } else {
                    "no"
                },
                if bypass.is_empty() {
                    "none".to_string()
                } else {
                    bypass.join(", ")
                }
            );
        }
    }
    println!("ok");
    EXIT_OK
}

fn signatures_list(config: Option<PathBuf>, json: bool) -> u8 {
    let engine = match load_engine(config.as_deref()) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let set = &engine.signatures;
    if json {
        let apps: Vec<serde_json::Value> = set
            .apps()
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let counts: serde_json::Map<String, serde_json::Value> =
                    crate::signatures::RuleKind::ALL
                        .iter()
                        .map(|k| {
                            (
                                k.as_str().to_string(),
                                a.counts.get(k).copied().unwrap_or(0).into(),
                            )
                        })
                        .collect();
                serde_json::json!({
                    "id": a.id, "name": a.name, "vendor": a.vendor, "category": a.category,
                    "action": engine.policy.app_action(i).as_str(), "rules": counts, "file": a.file,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&apps).unwrap_or_default()
        );
        return EXIT_OK;
    }
    println!(
        "{:<18} {:<16} {:<8} {:>5} {:>5} {:>5} {:>4} {:>5} {:>4} {:>7} {:>5}",
        "APP",
        "CATEGORY",
        "ACTION",
        "HOSTS",
        "PORTS",
        "CIDRS",
        "TLS",
        "HTTP",
        "PAY",
        "DOWNLD",
        "TOTAL"
    );
    for (i, a) in set.apps().iter().enumerate() {
        use crate::signatures::RuleKind as K;
        let n = |k: K| a.counts.get(&k).copied().unwrap_or(0);
        let tls = n(K::Sni) + n(K::Alpn) + n(K::Ja4);
        let total: usize = a.counts.values().sum();
        println!(
            "{:<18} {:<16} {:<8} {:>5} {:>5} {:>5} {:>4} {:>5} {:>4} {:>7} {:>5}",
            a.id,
            a.category,
            engine.policy.app_action(i).as_str(),
            n(K::Host),
            n(K::Port),
            n(K::Cidr),
            tls,
            n(K::Http),
            n(K::Payload),
            n(K::Download),
            total
        );
    }
    println!(
        "{} apps, {} rules ({})",
        set.apps().len(),
        set.rules().len(),
        set.origin
    );
    EXIT_OK
}

/// Explain one detection in a line.
pub fn explain(engine: &Engine, d: &Detection) -> String {
    let set = &engine.signatures;
    let rule = d.rule.and_then(|r| set.rule(r));
    let at = rule
        .and_then(|r| set.app(r.app).map(|a| format!(" ({}:{})", a.file, r.line)))
        .unwrap_or_default();
    format!(
        "app={} reason={} rule={:?}{} source={:?}",
        set.app_id(d.app),
        d.reason.as_str(),
        rule.map(|r| r.text.as_str()).unwrap_or("-"),
        at,
        rule.map(|r| r.source.as_str()).unwrap_or("-"),
    )
}

fn classify(cmd: ClassifyCommand) -> u8 {
    let (config, host, port, path, whom) = match &cmd {
        ClassifyCommand::Pcap { file, json, config } => {
            return classify_pcap(file, *json, config.as_deref())
        }
        ClassifyCommand::Host {
            name,
            port,
            config,
            who,
        } => (config.clone(), name.clone(), *port, None, who.clone()),
        ClassifyCommand::Url { url, config, who } => {
            let uri: http::Uri = match url.parse() {
                Ok(u) => u,
                Err(e) => {
                    eprintln!("not a URL: {e}");
                    return EXIT_USAGE;
                }
            };
            let Some(host) = uri.host() else {
                eprintln!("the URL has no host");
                return EXIT_USAGE;
            };
            // As strictly as the proxy reads a target: a bad port is an
            // error, not the scheme's default.
            let written = uri
                .authority()
                .map(|a| crate::proxy::target::authority_port(a.as_str()));
            let port = match written {
                Some(Err(e)) => {
                    eprintln!("not a URL the proxy would fetch: {e}");
                    return EXIT_USAGE;
                }
                Some(Ok(Some(p))) => p,
                _ if uri.scheme_str() == Some("https") => 443,
                _ => 80,
            };
            (
                config.clone(),
                host.to_string(),
                port,
                Some(uri),
                who.clone(),
            )
        }
    };
    let engine = match load_engine(config.as_deref()) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let client: IpAddr = whom.client.unwrap_or(IpAddr::from([127, 0, 0, 1]));
    let mut who = Who::new(client, whom.user.as_deref().map(std::sync::Arc::from));
    if !whom.groups.is_empty() {
        let groups: Vec<String> = whom
            .groups
            .iter()
            .filter_map(|g| crate::config::group_key(g))
            .collect();
        who = who.with_groups(Some(groups.into()));
    }
    if let Some(at) = whom.at {
        who = who.at(at);
    }
    let set = &engine.signatures;
    let policy = &engine.policy;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    // A plain-HTTP URL's request line, as the proxy would see it.
    let request = path
        .as_ref()
        .filter(|uri| uri.scheme_str() != Some("https"))
        .and_then(|uri| http::Request::get(uri.clone()).body(()).ok())
        .map(|r| r.into_parts().0);

    // The decision, exactly as the proxy makes it.
    let mut found = Findings::default();
    let decided = decide::name(&engine, &who, bare, port, &mut found).and_then(|allowlisted| {
        if let (Some(uri), false) = (&path, allowlisted) {
            if let Some(parts) = &request {
                decide::request_rules(&engine, &who, bare, parts, false, &mut found)?;
            } else {
                found.decide(&engine, &who, set.classify_download(bare, uri.path()))?;
            }
        }
        Ok(allowlisted)
    });
    let allowlisted = decided == Ok(true);
    let verdict = match decided {
        Err(Refusal::Blocked(d)) => Verdict::Block(d),
        _ => found.verdict(),
    };

    // Every finding, for the explanation.
    let mut findings: Vec<Detection> = Vec::new();
    if !allowlisted {
        findings.extend(
            engine
                .name_evidence(bare, port)
                .into_iter()
                .flatten()
                .flatten(),
        );
        if let Some(uri) = &path {
            findings.extend(set.classify_download(bare, uri.path()));
            if let Some(parts) = &request {
                if let crate::classify::http::HeadOutcome::Match(rule) =
                    set.http().classify_head(parts, false)
                {
                    findings.push(set.http_detection(rule));
                }
            }
        }
    }
    // Which exception made the decision: the one behind a block or
    // monitor verdict, or for an allow the first that allowed a finding.
    let decided_by = match verdict.detection() {
        Some(d) => d.exception.map(usize::from),
        None => findings
            .iter()
            .map(|d| policy.resolve(&who, d))
            .find_map(|(action, n)| (action == crate::config::Action::Allow).then_some(n)?),
    };
    let label = |n: usize| policy.exception_label(n).unwrap_or("?").to_string();
    // TLS inspection: an HTTPS flow that passes may be decrypted; one that
    // is refused may get its page over chatwall's certificate.
    let https = path
        .as_ref()
        .map_or(port == 443, |u| u.scheme_str() == Some("https"));
    let literal = bare.parse::<IpAddr>().ok();
    let tls_note = if !https || literal.is_some() {
        None
    } else if verdict.is_block() {
        decide::block_page_over_tls(&engine, &who, bare)
            .then_some("  tls: the client gets the page over chatwall's certificate ([tls_inspect] block_page)")
    } else if decide::decrypt(&engine, &who, bare, None) {
        Some("  tls: decrypted ([tls_inspect] selects it for this client); requests inside are decided one by one")
    } else if engine.config.tls_inspect.enabled {
        Some("  tls: not decrypted (not selected, not a listed client, or on a never list)")
    } else {
        None
    };
    let word = match verdict {
        Verdict::Allow if tls_note.is_some_and(|n| n.starts_with("  tls: decrypted")) => "decrypt",
        _ => verdict.as_str(),
    };
    match decided_by {
        Some(n) => println!("{word} {host}:{port} exception={}", label(n)),
        None => println!("{word} {host}:{port}"),
    }
    if let Some(note) = tls_note {
        println!("{note}");
    }
    let groups = match &who.groups {
        Some(g) if !g.is_empty() => g.join(","),
        _ => "-".to_string(),
    };
    println!(
        "  for client {client}, user {}, groups {groups}, at {:.0}",
        who.user.as_deref().unwrap_or("-"),
        who.moment()
    );
    if let Some(g) = decided_by.and_then(|n| policy.exception_group(n, who.groups.as_deref())) {
        println!("  through group {g}");
    }
    if allowlisted {
        println!("  on the allow-list (policy.allow)");
    }
    for d in &findings {
        let (_, by) = policy.resolve(&who, d);
        println!(
            "  {} -> {}{}",
            explain(&engine, d),
            policy.decide_for(&who, Some(*d)).as_str(),
            by.map(|n| format!(" (exception {})", label(n)))
                .unwrap_or_default()
        );
    }
    if findings.is_empty() && !allowlisted {
        println!("  no signature matches the name, address or port; addresses a name resolves to are checked when the proxy connects");
    }
    EXIT_OK
}

/// Write `text` to standard output. A reader that went away (`| head`) ends
/// the command quietly; any other write failure is a runtime failure.
fn write_out(out: &mut impl std::io::Write, text: &str) -> Result<(), u8> {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(EXIT_OK),
        Err(e) => {
            eprintln!("chatwall: cannot write to standard output: {e}");
            Err(EXIT_RUNTIME)
        }
    }
}

/// `classify pcap`: one line (or JSON object) per TCP flow on standard
/// output; warnings and a summary on standard error.
fn classify_pcap(file: &Path, json: bool, config: Option<&Path>) -> u8 {
    let engine = match load_engine(config) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let replay = match crate::replay::replay_file(&engine, file) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            return EXIT_CONFIG;
        }
    };
    for w in &replay.warnings {
        eprintln!("{}: warning: {w}", file.display());
    }
    let mut counts = [0usize; 3];
    let mut out = std::io::stdout().lock();
    for flow in &replay.flows {
        let line = if json {
            flow.to_json(&engine).to_string()
        } else {
            flow.to_line(&engine)
        };
        if let Err(code) = write_out(&mut out, &(line + "\n")) {
            return code;
        }
        counts[match flow.verdict {
            Verdict::Block(_) => 0,
            Verdict::Monitor(_) => 1,
            Verdict::Allow => 2,
        }] += 1;
    }
    eprintln!(
        "{}: {} TCP flows ({} block, {} monitor, {} allow) from {} TCP segments; {} other frames skipped",
        file.display(),
        replay.flows.len(),
        counts[0],
        counts[1],
        counts[2],
        replay.packets,
        replay.skipped
    );
    EXIT_OK
}

/// `export --format F`: the rules on standard output.
fn export(format: Format, config: Option<&Path>) -> u8 {
    let engine = match load_engine(config) {
        Ok(e) => e,
        Err(code) => return code,
    };
    let text = crate::export::export(&engine, format);
    match write_out(&mut std::io::stdout().lock(), &text) {
        Ok(()) => EXIT_OK,
        Err(code) => code,
    }
}

/// The rules of one app, by kind and text, with how often each occurs and
/// where it is written.
fn rule_table(set: &SignatureSet, app: usize) -> BTreeMap<(&'static str, &str), (usize, usize)> {
    let mut table = BTreeMap::new();
    for r in set.rules().iter().filter(|r| r.app as usize == app) {
        let e = table
            .entry((r.kind.as_str(), r.text.as_str()))
            .or_insert((0, r.line));
        e.0 += 1;
    }
    table
}

/// `signatures diff A B`: apps added and removed, and for each app in both,
/// the rules (by kind and text) added and removed. Exit 1 if either
/// directory does not load.
fn signatures_diff(a: &Path, b: &Path, config: Option<&Path>) -> u8 {
    let window = match Config::load(config) {
        Ok(c) => c.inspect_bytes,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    let mut sets = Vec::new();
    for dir in [a, b] {
        match SignatureSet::from_dir(dir, window) {
            Ok(s) => sets.push(s),
            Err(errs) => {
                for e in errs {
                    eprintln!("{e}");
                }
                return EXIT_CONFIG;
            }
        }
    }
    let report = diff_report(&sets[0], &sets[1]);
    match write_out(&mut std::io::stdout().lock(), &report) {
        Ok(()) => EXIT_OK,
        Err(code) => code,
    }
}

/// `signatures diff` of two loaded sets: apps added and removed, and for
/// each app in both, the rules (by kind and text) added and removed.
pub fn diff_report(old: &SignatureSet, new: &SignatureSet) -> String {
    let (mut added, mut removed, mut changed) = (0, 0, 0);
    let mut report = String::new();
    for app in old.apps() {
        if new.app_index(&app.id).is_none() {
            removed += 1;
            let _ = writeln!(
                report,
                "- app {} ({}, {} rules)",
                app.id,
                app.file,
                app.counts.values().sum::<usize>()
            );
        }
    }
    for app in new.apps() {
        if old.app_index(&app.id).is_none() {
            added += 1;
            let _ = writeln!(
                report,
                "+ app {} ({}, {} rules)",
                app.id,
                app.file,
                app.counts.values().sum::<usize>()
            );
        }
    }
    for (ni, app) in new.apps().iter().enumerate() {
        let Some(oi) = old.app_index(&app.id) else {
            continue;
        };
        let Some(before) = old.app(oi) else { continue };
        let (was, is) = (rule_table(old, oi as usize), rule_table(new, ni));
        let mut lines = Vec::new();
        if before.category != app.category {
            lines.push(format!(
                "  ~ category {} -> {}",
                before.category, app.category
            ));
        }
        if before.name != app.name {
            lines.push(format!("  ~ name {:?} -> {:?}", before.name, app.name));
        }
        for ((kind, text), &(n, line)) in &was {
            let left = is.get(&(*kind, *text)).map_or(0, |e| e.0);
            for _ in left..n {
                lines.push(format!("  - {kind} {text:?} ({}:{line})", before.file));
            }
        }
        for ((kind, text), &(n, line)) in &is {
            let had = was.get(&(*kind, *text)).map_or(0, |e| e.0);
            for _ in had..n {
                lines.push(format!("  + {kind} {text:?} ({}:{line})", app.file));
            }
        }
        if !lines.is_empty() {
            changed += 1;
            let _ = writeln!(report, "~ app {}", app.id);
            for l in lines {
                let _ = writeln!(report, "{l}");
            }
        }
    }
    let _ = writeln!(
        report,
        "{added} apps added, {removed} removed, {changed} changed ({} -> {})",
        old.origin, new.origin
    );
    report
}

/// `signatures keygen --dir D`: D/signing.key (0600) and D/signing.pub;
/// refuses to overwrite either.
fn signatures_keygen(dir: &Path) -> u8 {
    let (secret, public) = match crate::signatures::bundle::keygen() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("chatwall: cannot make a key: {e}");
            return EXIT_RUNTIME;
        }
    };
    let (key, pubkey) = (dir.join("signing.key"), dir.join("signing.pub"));
    for p in [&key, &pubkey] {
        if p.exists() {
            eprintln!(
                "chatwall: {} exists; move it away first (its bundles would no longer verify)",
                p.display()
            );
            return EXIT_CONFIG;
        }
    }
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| write_new(&key, secret.as_bytes(), 0o600))
        .and_then(|()| write_new(&pubkey, public.as_bytes(), 0o644));
    match written {
        Ok(()) => {
            println!(
                "wrote {} (secret, mode 0600) and {} (for [signatures] update_public_key)",
                key.display(),
                pubkey.display()
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("chatwall: {}: {e}", dir.display());
            EXIT_RUNTIME
        }
    }
}

/// Create a file that must not exist yet, with `mode` (Unix).
fn write_new(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = opts.open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// `signatures sign --key K --out B SIGDIR`: the set must load on its own
/// (with the default inspection window) and carry a VERSION.
fn signatures_sign(key: &Path, out: &Path, sigdir: &Path) -> u8 {
    use crate::signatures::bundle;
    let files = match bundle::read_set(sigdir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("chatwall: {}: {e}", sigdir.display());
            return EXIT_CONFIG;
        }
    };
    let window = match Config::load_default() {
        Ok(c) => c.inspect_bytes,
        Err(e) => {
            eprintln!("{e}");
            return EXIT_CONFIG;
        }
    };
    if let Err(errs) = SignatureSet::from_dir(sigdir, window) {
        for e in errs {
            eprintln!("{e}");
        }
        return EXIT_CONFIG;
    }
    let secret = match std::fs::read_to_string(key) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chatwall: {}: {e}", key.display());
            return EXIT_CONFIG;
        }
    };
    let version = match bundle::version_of(&files) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("chatwall: {}: {e}", sigdir.display());
            return EXIT_CONFIG;
        }
    };
    let packed = match bundle::pack(&files) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("chatwall: cannot pack {}: {e}", sigdir.display());
            return EXIT_RUNTIME;
        }
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let trusted = format!("timestamp:{stamp}\tfile:{name}\tchatwall-signatures:{version}");
    let signature = match bundle::sign(&secret, &packed, &trusted) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("chatwall: {}: {e}", key.display());
            return EXIT_CONFIG;
        }
    };
    let mut sig_path = out.as_os_str().to_os_string();
    sig_path.push(".sig");
    let written = std::fs::write(out, &packed).and_then(|()| std::fs::write(&sig_path, signature));
    match written {
        Ok(()) => {
            println!(
                "signed {} ({} files, VERSION {version}, {} bytes) and {}",
                out.display(),
                files.len(),
                packed.len(),
                PathBuf::from(sig_path).display()
            );
            EXIT_OK
        }
        Err(e) => {
            eprintln!("chatwall: {}: {e}", out.display());
            EXIT_RUNTIME
        }
    }
}

/// The default CN of `ca init`: this host's name, or a random suffix.
fn default_ca_cn() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let suffix = if !host.is_empty() && host.len() <= 40 && host.is_ascii() {
        host
    } else {
        use ring::rand::SecureRandom;
        let mut b = [0u8; 4];
        let _ = ring::rand::SystemRandom::new().fill(&mut b);
        b.iter().map(|x| format!("{x:02x}")).collect()
    };
    format!("chatwall inspection CA {suffix}")
}

/// How to make clients trust the CA in `dir`.
fn trust_instructions(dir: &Path) -> String {
    let pem = dir.join("ca.pem");
    let cer = dir.join("ca.cer");
    let (pem, cer) = (pem.display(), cer.display());
    format!(
        "Make the managed clients trust it (and keep ca.key on this host only):
  Debian/Ubuntu:   cp {pem} /usr/local/share/ca-certificates/chatwall.crt && update-ca-certificates
  Windows:         certutil -addstore Root {cer}   (or a GPO: Trusted Root Certification Authorities)
  macOS:           security add-trusted-cert -d -r trustRoot -k /Library/Keychains/System.keychain {pem}
  Firefox:         enterprise policy Certificates.ImportEnterpriseRoots = true (the system store),
                   or Certificates.Install = [\"{pem}\"]
  Chrome/Chromium on Linux (NSS): certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n chatwall -i {pem}
"
    )
}

/// `ca init`: DIR/ca.key (0600, created exclusively), DIR/ca.pem, DIR/ca.cer;
/// an existing file is replaced only with `--force`.
fn ca_init(dir: &Path, cn: Option<&str>, days: u32, force: bool) -> u8 {
    let cn = cn.map_or_else(default_ca_cn, str::to_string);
    if cn.trim().is_empty() || cn.len() > 64 {
        eprintln!("chatwall: --cn must have 1 to 64 characters");
        return EXIT_USAGE;
    }
    let (key, pem, cer) = (dir.join("ca.key"), dir.join("ca.pem"), dir.join("ca.cer"));
    if !force {
        for p in [&key, &pem, &cer] {
            if std::fs::symlink_metadata(p).is_ok() {
                eprintln!(
                    "chatwall: {} exists; --force replaces it (clients trusting the old CA then distrust what chatwall mints)",
                    p.display()
                );
                return EXIT_CONFIG;
            }
        }
    }
    let ca = match crate::tls_inspect::ca::generate(&cn, days) {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("chatwall: {e}");
            return EXIT_RUNTIME;
        }
    };
    if let Err(e) = std::fs::create_dir_all(dir) {
        eprintln!("chatwall: {}: {e}", dir.display());
        return EXIT_RUNTIME;
    }
    for (path, data, mode) in [
        (&key, ca.key_pem.as_bytes(), 0o600),
        (&pem, ca.cert_pem.as_bytes(), 0o644),
        (&cer, ca.cert_der.as_slice(), 0o644),
    ] {
        // Replacing: the old file goes first, so the new one is created
        // with its own mode (never a link's target, never a loose mode).
        let removed = if force {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            Ok(())
        };
        if let Err(e) = removed.and_then(|()| write_new(path, data, mode)) {
            eprintln!("chatwall: {}: {e}", path.display());
            return if e.kind() == std::io::ErrorKind::AlreadyExists {
                EXIT_CONFIG
            } else {
                EXIT_RUNTIME
            };
        }
    }
    println!(
        "wrote {} (secret, mode 0600), {} and {} (DER)",
        key.display(),
        pem.display(),
        cer.display()
    );
    println!("subject: CN={cn}");
    println!(
        "valid until: {} ({days} days)",
        crate::tls_inspect::ca::unix_to_rfc3339(ca.not_after)
    );
    println!("SHA-256 fingerprint: {}", ca.sha256);
    println!("SHA-1 fingerprint: {}", ca.sha1);
    println!();
    print!("{}", trust_instructions(dir));
    EXIT_OK
}

/// `ca show`: the CA as the proxy would load it.
fn ca_show(cert: &Path, key: &Path) -> u8 {
    use crate::tls_inspect::ca::unix_to_rfc3339;
    let ca = match crate::tls_inspect::Authority::load_any_time(cert, key) {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("chatwall: {e}");
            return EXIT_CONFIG;
        }
    };
    let now = crate::tls_inspect::ca::now_unix();
    let days_left = (ca.not_after_unix() - now).div_euclid(86_400);
    println!("certificate: {}", cert.display());
    println!("key: {} ({}, matches)", key.display(), ca.key_type());
    println!("subject: {}", ca.subject());
    println!("not before: {}", unix_to_rfc3339(ca.not_before_unix()));
    println!(
        "not after: {} ({})",
        unix_to_rfc3339(ca.not_after_unix()),
        if days_left >= 0 {
            format!("{days_left} days left")
        } else {
            "EXPIRED".to_string()
        }
    );
    println!("SHA-256 fingerprint: {}", ca.sha256_fingerprint());
    println!("SHA-1 fingerprint: {}", ca.sha1_fingerprint());
    println!(
        "sent after each leaf: {} certificate(s)",
        ca.chain_after_leaf().len()
    );
    if ca.not_after_unix() <= now {
        eprintln!(
            "chatwall: {}: the CA has expired; make a new one (chatwall ca init) and deploy it",
            cert.display()
        );
        return EXIT_CONFIG;
    }
    EXIT_OK
}
