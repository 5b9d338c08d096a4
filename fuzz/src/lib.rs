//! What each chatwall fuzz target does with its input, and the seed corpus.
//!
//! The files under `fuzz_targets/` are one-line wrappers around the
//! functions here. `tests/fuzz_smoke.rs` in the main crate includes this
//! file as a module (`#[path = "../fuzz/src/lib.rs"]`) and feeds the same
//! functions deterministic pseudo-random and mutated inputs under
//! `cargo test` on stable Rust, so both run exactly this code. It must
//! therefore compile as a module too: no crate-level attributes, and only
//! dependencies the main crate's tests also have (`chatwall`, `http`,
//! `httparse`, `tempfile`).
//!
//! Every function must not panic on any input; the `assert!`s are the
//! invariants the proxy relies on, so a failing one is a bug too.

pub mod fixtures;

use std::io::Write as _;
use std::path::Path;
use std::sync::OnceLock;

use chatwall::classify::host::MAX_HOST_LEN;
use chatwall::classify::http::HeadOutcome;
use chatwall::classify::payload::{Direction, Outcome};
use chatwall::classify::server_hello::{self, ServerFlight};
use chatwall::classify::tls::{self, Hello};
use chatwall::classify::{Detection, Reason};
use chatwall::config::Config;
use chatwall::engine::Engine;
use chatwall::policy::Policy;
use chatwall::signatures::load::SourceFile;
use chatwall::signatures::{RuleKind, SignatureSet};

/// The inspection window of the default configuration.
pub const WINDOW: usize = 16 * 1024;

/// The name a fuzzed signature file is loaded under: its `id` must be `fuzz`.
pub const SIGNATURE_FILE_NAME: &str = "fuzz.toml";

/// Every target, by the name of its file under `fuzz_targets/`.
pub const TARGETS: [&str; 6] = [
    "client_hello",
    "server_flight",
    "payload",
    "http_head",
    "signature_file",
    "config",
];

/// Run target `name` on `data`; `false` if there is no such target.
pub fn run(name: &str, data: &[u8]) -> bool {
    match name {
        "client_hello" => client_hello(data),
        "server_flight" => server_flight(data),
        "payload" => payload(data),
        "http_head" => http_head(data),
        "signature_file" => signature_file(data),
        "config" => config(data),
        _ => return false,
    }
    true
}

/// The bundled signature set, compiled once per process.
pub fn bundled() -> &'static SignatureSet {
    static SET: OnceLock<SignatureSet> = OnceLock::new();
    SET.get_or_init(|| match SignatureSet::bundled(WINDOW) {
        Ok(set) => set,
        Err(errors) => panic!("the bundled signature set must compile: {errors:?}"),
    })
}

/// `client_hello`: the TLS parser's own invariants on prefixes of `data`
/// ([`tls::fuzz_logic`]), then the bundled set's SNI/ALPN/JA4 lookup of a
/// complete hello (SNI host names are arbitrary bytes, lossily decoded).
pub fn client_hello(data: &[u8]) {
    tls::fuzz_logic(data);
    if let Hello::Complete(hello) = tls::inspect_client_hello(data) {
        let set = bundled();
        if let Some(d) = set.classify_hello(&hello) {
            check_detection(set, &d);
        }
    }
}

/// `server_flight`: the server-flight parser's invariants on prefixes of
/// `data` ([`server_hello::fuzz_logic`]), then the bundled set's lookup of
/// every certificate name it finds (arbitrary text, wildcards included).
pub fn server_flight(data: &[u8]) {
    server_hello::fuzz_logic(data);
    if let ServerFlight::Names(names) = server_hello::inspect_server_flight(data) {
        let set = bundled();
        for name in &names {
            if let Some(d) = set.classify_cert(name) {
                assert_eq!(d.reason, Reason::Cert, "a certificate name is reason cert");
                check_detection(set, &d);
            }
        }
    }
}

/// `payload`: the matcher's hold/forward contract on the sample rules
/// ([`chatwall::classify::payload::fuzz_logic`]), then the bundled set's
/// automaton on the whole input in both directions.
pub fn payload(data: &[u8]) {
    chatwall::classify::payload::fuzz_logic(data);
    check_payload(bundled(), data);
}

/// The default configuration's engine (bundled signatures), built once.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let config = match Config::load(None) {
            Ok(c) => c,
            Err(e) => panic!("the built-in configuration must load: {e:?}"),
        };
        match Engine::build(config) {
            Ok(e) => e,
            Err(errors) => panic!("the built-in engine must build: {errors:?}"),
        }
    })
}

/// `http_head`: parse a request head with httparse as a front end would,
/// build `http::request::Parts` from it, and run the bundled set's HTTP,
/// host and download rules on it (the body rules on what follows the head);
/// then the whole input as a stream of requests inside a tunnel
/// ([`chatwall::decide::fuzz_logic`]: framing followed request by request,
/// the same outcome however the bytes are split).
pub fn http_head(data: &[u8]) {
    chatwall::decide::fuzz_logic(engine(), data);
    // The explicit forwarder's head rewriting, on the same bytes.
    chatwall::proxy::forward::heads::fuzz_logic(data);
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = request.parse(data) else {
        return;
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return;
    };
    let mut builder = http::Request::builder().method(method).uri(target);
    for h in request.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(request) = builder.body(()) else {
        return;
    };
    let (parts, ()) = request.into_parts();
    let body = data.get(head_len..).unwrap_or_default();
    let set = bundled();
    match set.http().classify_head(&parts, !body.is_empty()) {
        HeadOutcome::Match(rule) => check_rule(set, rule, RuleKind::Http),
        HeadOutcome::NeedBody { window } => {
            assert!(window > 0, "NeedBody with an empty window");
            assert!(
                window <= WINDOW,
                "NeedBody window {window} past the inspection window"
            );
            let seen = body.get(..window).unwrap_or(body);
            if let Some(rule) = set.http().classify_body(&parts, seen) {
                check_rule(set, rule, RuleKind::Http);
            }
        }
        HeadOutcome::NoMatch => {}
    }
    let host_header = parts
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok());
    for host in [parts.uri.host(), host_header].into_iter().flatten() {
        if let Some(d) = set.classify_host(host) {
            check_detection(set, &d);
        }
        if let Some(d) = set.classify_download(host, parts.uri.path()) {
            check_detection(set, &d);
        }
    }
}

/// `signature_file`: `data` as the text of one signature file. Loading
/// must give a set or errors (never both empty); a set must find every one
/// of its own host and SNI names, and its payload automaton must run.
pub fn signature_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = SourceFile {
        name: SIGNATURE_FILE_NAME.into(),
        text: text.into(),
    };
    let set = match SignatureSet::from_files(&[file], WINDOW) {
        Ok(set) => set,
        Err(errors) => {
            assert!(!errors.is_empty(), "a refused file must say why");
            for e in &errors {
                assert!(!e.to_string().is_empty());
            }
            return;
        }
    };
    assert!(!set.rules().is_empty(), "a loaded file has rules");
    for rule in set.rules() {
        let (pattern, lookup): (&str, NameLookup) = match rule.kind {
            RuleKind::Host => (&rule.text, SignatureSet::classify_host),
            RuleKind::Sni => (
                rule.text.strip_prefix("sni ").unwrap_or(&rule.text),
                SignatureSet::classify_sni,
            ),
            _ => continue,
        };
        let name = name_under(pattern);
        // A wildcard within two bytes of the longest name covers no name.
        if name.len() <= MAX_HOST_LEN {
            assert!(
                lookup(&set, &name).is_some(),
                "the set does not find its own name {name:?}"
            );
        }
    }
    check_payload(&set, data);
}

/// `SignatureSet::classify_host` or `classify_sni`.
type NameLookup = fn(&SignatureSet, &str) -> Option<Detection>;

/// A name that host pattern `pattern` covers: itself, or for `*.suffix`
/// a name one label deeper.
fn name_under(pattern: &str) -> String {
    match pattern.strip_prefix("*.") {
        Some(suffix) => format!("x.{suffix}"),
        None => pattern.to_owned(),
    }
}

/// `config`: `data` as a configuration file (written to a temporary file,
/// since [`Config::load`] takes a path). A file that loads must resolve its
/// policy against the bundled set or say why not.
pub fn config(data: &[u8]) {
    let Ok(mut file) = tempfile::NamedTempFile::new() else {
        return;
    };
    if file.write_all(data).and_then(|()| file.flush()).is_err() {
        return;
    }
    match Config::load(Some(file.path())) {
        Ok(cfg) => {
            if let Err(errors) = Policy::new(&cfg.policy, bundled()) {
                assert!(!errors.is_empty(), "a refused policy must say why");
            }
        }
        Err(errors) => assert!(
            !errors.to_string().is_empty(),
            "a refused file must say why"
        ),
    }
}

/// The payload outcome of `data` in both directions is consistent.
fn check_payload(set: &SignatureSet, data: &[u8]) {
    let matcher = set.payload();
    for dir in [Direction::Client, Direction::Server] {
        let outcome = matcher.classify(dir, data);
        match outcome {
            Outcome::Match { tag, offset } => {
                assert!(
                    offset < data.len(),
                    "match offset {offset} outside the input"
                );
                check_rule(set, tag, RuleKind::Payload);
                assert!(set.payload_detection(outcome).is_some());
            }
            Outcome::Pending { forward_upto } => {
                assert!(forward_upto <= data.len(), "forward_upto past the input");
                assert!(data.len() < matcher.reach(dir), "pending past the reach");
            }
            Outcome::NoMatch => {}
        }
    }
}

fn check_detection(set: &SignatureSet, d: &Detection) {
    if let Some(rule) = d.rule {
        let info = set.rule(rule).expect("a detection names an existing rule");
        assert_eq!(info.app, d.app, "a detection names the app of its rule");
    }
}

fn check_rule(set: &SignatureSet, rule: u32, kind: RuleKind) {
    let info = set.rule(rule).expect("an outcome names an existing rule");
    assert_eq!(info.kind, kind, "rule {rule} is of the wrong kind");
}

/// One seed input.
pub struct Seed {
    pub target: &'static str,
    pub name: String,
    pub bytes: Vec<u8>,
}

/// The seed corpus: hand-built hellos and protocol first bytes from
/// [`fixtures`], server flights (captured from rustls and hand-built around
/// the captured leaf certificate, all under `tests/fixtures/tls/`), and the
/// repository's signature and configuration files (read from `repo`, the
/// main crate's directory). Signature files get `id = "fuzz"` so that they
/// load under [`SIGNATURE_FILE_NAME`].
pub fn seeds(repo: &Path) -> Vec<Seed> {
    let mut out = Vec::new();
    let mut add = |target: &'static str, name: &str, bytes: Vec<u8>| {
        out.push(Seed {
            target,
            name: name.to_owned(),
            bytes,
        });
    };

    let ech = (
        0xfe0d,
        vec![0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00],
    );
    let hellos = [
        ("browser", fixtures::browser_hello("www.example.org", false)),
        (
            "browser-pq",
            fixtures::browser_hello("www.example.org", true),
        ),
        (
            "whatsapp",
            fixtures::client_hello("web.whatsapp.com", &["h2", "http/1.1"], &[]),
        ),
        (
            "xmpp-alpn",
            fixtures::client_hello("chat.example", &["xmpp-client"], &[]),
        ),
        (
            "idn",
            fixtures::client_hello("xn--bcher-kva.example", &[], &[]),
        ),
        (
            "ech",
            fixtures::client_hello("public.example.net", &["h2"], &[ech]),
        ),
    ];
    for (name, hello) in &hellos {
        add("client_hello", name, hello.clone());
    }
    // The same hello split over 40-byte records.
    let fragmented = fixtures::records(hellos[0].1.get(5..).unwrap_or_default(), 40);
    add("client_hello", "fragmented", fragmented);

    let tls_fixtures = repo.join("tests/fixtures/tls");
    for path in files_with_extension(&tls_fixtures, "bin") {
        if let (Some(stem), Ok(bytes)) = (file_stem(&path), std::fs::read(&path)) {
            add("server_flight", &stem, bytes);
        }
    }
    if let Ok(leaf) = std::fs::read(tls_fixtures.join("leaf.der")) {
        add(
            "server_flight",
            "built",
            fixtures::server_flight(&[&leaf], usize::MAX),
        );
        add(
            "server_flight",
            "built-small-records",
            fixtures::server_flight(&[&leaf], 40),
        );
    }
    add(
        "server_flight",
        "no-certificate",
        fixtures::server_hello_then(&[14, 0, 0, 0]),
    );
    add(
        "server_flight",
        "abbreviated",
        fixtures::server_hello_then(&[])
            .into_iter()
            .chain([20, 3, 3, 0, 1, 1])
            .collect(),
    );

    for (name, bytes) in fixtures::im_first_bytes()
        .into_iter()
        .chain(fixtures::ordinary_first_bytes())
    {
        add("payload", name, bytes);
    }
    add("payload", "browser-hello", hellos[0].1.clone());

    for (name, bytes) in fixtures::http_requests() {
        add("http_head", name, bytes);
    }

    for path in toml_files(&repo.join("signatures")) {
        if let (Some(stem), Ok(text)) = (file_stem(&path), std::fs::read_to_string(&path)) {
            let text = text.replacen(&format!("id = \"{stem}\""), "id = \"fuzz\"", 1);
            add("signature_file", &stem, text.into_bytes());
        }
    }

    let mut configs = vec![repo.join("config").join("chatwall.toml")];
    for group in ["valid", "invalid"] {
        configs.extend(toml_files(&repo.join("tests/fixtures/config").join(group)));
    }
    for path in configs {
        if let (Some(stem), Ok(bytes)) = (file_stem(&path), std::fs::read(&path)) {
            add("config", &stem, bytes);
        }
    }
    out
}

/// The `*.toml` files of a directory, sorted; none if it cannot be read.
fn toml_files(dir: &Path) -> Vec<std::path::PathBuf> {
    files_with_extension(dir, "toml")
}

/// The `*.{extension}` files of a directory, sorted; none if it cannot be
/// read.
fn files_with_extension(dir: &Path, extension: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == extension))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn file_stem(path: &Path) -> Option<String> {
    path.file_stem().and_then(|s| s.to_str()).map(str::to_owned)
}
