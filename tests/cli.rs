//! The command line, through the built binary: exit codes, file:line:field
//! messages for bad configurations and signature files, `signatures list`,
//! `classify`, the environment layer, and `run` failing to bind.
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::WAIT;

/// The output of one bounded run of the binary.
#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The binary with no `CHATWALL*` variable of the caller's environment.
fn chatwall() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chatwall"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHATWALL") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Read a pipe to the end on its own thread.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let mut bytes = Vec::new();
            let _ = p.read_to_end(&mut bytes);
            s = String::from_utf8_lossy(&bytes).to_string();
        }
        s
    })
}

/// Wait for a child under a deadline; kill it (and fail) past the deadline.
fn wait_bounded(mut child: Child, limit: Duration) -> Out {
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "chatwall did not exit within {limit:?}; stderr: {}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        code: status.code(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// Run with arguments (and extra environment), bounded.
fn run_with(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = chatwall();
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    wait_bounded(cmd.spawn().expect("spawn chatwall"), WAIT * 3)
}

fn run(args: &[&str]) -> Out {
    run_with(args, &[])
}

/// A config file in a temp dir.
fn temp_config(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("chatwall.toml");
    std::fs::write(&path, text).expect("write config");
    (dir, path)
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    v.sort();
    v
}

/// Lines of stderr that are errors about files under `prefix`.
fn error_lines<'a>(stderr: &'a str, prefix: &str) -> Vec<&'a str> {
    stderr.lines().filter(|l| l.starts_with(prefix)).collect()
}

// ---------------------------------------------------------------------------
// check-config
// ---------------------------------------------------------------------------

#[test]
fn check_config_on_the_defaults_exits_0() {
    let o = run(&["check-config"]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("<built-in defaults>"), "{}", o.stdout);
    assert!(o.stdout.contains("default block"), "{}", o.stdout);
    assert!(o.stdout.contains("from bundled"), "{}", o.stdout);
    assert_eq!(o.stdout.lines().last(), Some("ok"));
}

/// (file in tests/fixtures/config/invalid, line, what the message must name)
const INVALID_CONFIGS: &[(&str, usize, &str)] = &[
    ("bad_action.toml", 2, "policy.default"),
    ("bad_allow_host.toml", 2, "policy.allow.hosts"),
    ("bad_app_action.toml", 3, "teams"),
    ("bad_cidr.toml", 3, "access.allow_clients"),
    ("bad_connect_ports.toml", 3, "access.connect_ports"),
    ("bad_exception_clients.toml", 5, "policy.exceptions.clients"),
    ("bad_ldap.toml", 4, "ldap.user_filter"),
    ("groups_without_ldap.toml", 5, "policy.exceptions.groups"),
    ("bad_listen_addr.toml", 3, "listen.explicit"),
    ("bad_log_format.toml", 2, "log.format"),
    ("bad_timeout.toml", 3, "limits.upstream_response_timeout_ms"),
    ("no_listener.toml", 2, "listen.explicit"),
    ("out_of_range.toml", 3, "inspect.client_bytes"),
    ("bad_parent.toml", 3, "upstream.parent"),
    ("bad_parent_bypass.toml", 3, "upstream.parent_bypass"),
    ("unknown_key.toml", 3, "bogus"),
    ("unknown_section.toml", 2, "nonsense"),
];

/// Invalid fixtures whose error is a wrong value type, checked on their own.
const TYPE_ERROR_CONFIGS: &[(&str, usize, &str)] = &[("wrong_type.toml", 2, "client_bytes")];

/// check-config on each fixture: exit 1, and a `file:line:` error naming the
/// field. Returns what went wrong.
fn check_invalid_configs(cases: &[(&str, usize, &str)]) -> Vec<String> {
    let dir = fixtures().join("config/invalid");
    let mut failures = Vec::new();
    for (file, line, field) in cases {
        let path = dir.join(file).display().to_string();
        let o = run(&["check-config", "-c", &path]);
        assert_eq!(o.code, Some(1), "{file}: {o:?}");
        assert!(!o.stdout.contains("\nok"), "{file}: printed ok");
        let at = format!("{path}:{line}:");
        if !o
            .stderr
            .lines()
            .any(|l| l.starts_with(&at) && l.contains(field))
        {
            failures.push(format!(
                "{file}: want a line `{at} ...{field}...`, got:\n{}",
                o.stderr
            ));
        }
    }
    failures
}

#[test]
fn check_config_names_file_line_and_field_for_each_invalid_fixture() {
    let dir = fixtures().join("config/invalid");
    let files = toml_files(&dir);
    let names: Vec<String> = files
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string()
        })
        .collect();
    let mut expected: Vec<&str> = INVALID_CONFIGS
        .iter()
        .chain(TYPE_ERROR_CONFIGS)
        .map(|c| c.0)
        .collect();
    expected.sort_unstable();
    assert_eq!(
        names, expected,
        "every invalid fixture needs an expectation here"
    );
    let failures = check_invalid_configs(INVALID_CONFIGS);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn check_config_type_errors_name_the_field() {
    let failures = check_invalid_configs(TYPE_ERROR_CONFIGS);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn check_config_accepts_each_valid_fixture() {
    // (file, a line of the summary it must print)
    let cases: &[(&str, &str)] = &[
        ("full.toml", "policy: default block, non_tls_on_443 monitor, non_http_on_80 allow, ech block, 2 app and 4 category overrides, 2 exceptions"),
        ("idn_allow.toml", "policy: default block"),
        ("ldap_groups.toml", "directory: ldap://127.0.0.1:389, groups by search (&(objectClass=groupOfNames)(member={dn})), 1 exceptions by group, on_unavailable stale"),
        ("minimal.toml", "policy: default monitor"),
        ("relative_signatures.toml", "signatures: 2 apps"),
    ];
    let dir = fixtures().join("config/valid");
    let names: Vec<String> = toml_files(&dir)
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string()
        })
        .collect();
    assert_eq!(
        names,
        cases.iter().map(|c| c.0).collect::<Vec<_>>(),
        "every valid fixture needs an expectation here"
    );
    for (file, want) in cases {
        let path = dir.join(file).display().to_string();
        let o = run(&["check-config", "-c", &path]);
        assert_eq!(o.code, Some(0), "{file}: {o:?}");
        assert!(
            o.stdout.lines().any(|l| l.starts_with(want)),
            "{file}: no `{want}` in\n{}",
            o.stdout
        );
        assert_eq!(o.stdout.lines().last(), Some("ok"), "{file}");
    }
    // The shipped example documents every key and must stay valid.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/chatwall.toml");
    let o = run(&["check-config", "-c", &shipped.display().to_string()]);
    assert_eq!(o.code, Some(0), "config/chatwall.toml: {o:?}");
}

#[test]
fn check_config_unknown_key_names_the_line() {
    let (_d, path) = temp_config(
        "[policy]\ndefault = \"block\"\n\n[log]\nlevel = \"info\"\nfromat = \"json\"\n",
    );
    let o = run(&["check-config", "-c", &path.display().to_string()]);
    assert_eq!(o.code, Some(1), "{o:?}");
    let at = format!("{}:6:", path.display());
    assert!(
        o.stderr
            .lines()
            .any(|l| l.starts_with(&at) && l.contains("fromat")),
        "{}",
        o.stderr
    );
}

#[test]
fn check_config_policy_naming_an_unknown_app_exits_1() {
    let (_d, path) = temp_config("[policy]\ndefault = \"block\"\n\n[policy.apps]\nwhatsapp = \"block\"\nnosuchapp = \"allow\"\n");
    let file = path.display().to_string();
    let o = run(&["check-config", "-c", &file]);
    assert_eq!(o.code, Some(1), "{o:?}");
    let line = o
        .stderr
        .lines()
        .find(|l| l.contains("nosuchapp"))
        .unwrap_or_else(|| panic!("no error names the app: {}", o.stderr));
    assert!(line.starts_with(&file), "{line}");
    assert!(line.contains("policy.apps"), "{line}");
    assert!(
        line.starts_with(&format!("{file}:6:")),
        "the error names no line: {line}"
    );
}

#[test]
fn check_config_exception_naming_an_unknown_app_exits_1() {
    let (_d, path) = temp_config("[[policy.exceptions]]\nclients = [\"10.0.0.0/8\"]\napps = [\"nosuchapp\"]\naction = \"allow\"\n");
    let o = run(&["check-config", "-c", &path.display().to_string()]);
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr.contains("nosuchapp") && o.stderr.contains("policy.exceptions"),
        "{}",
        o.stderr
    );
}

#[test]
fn check_config_missing_file_exits_1() {
    let o = run(&["check-config", "-c", "/nonexistent/chatwall.toml"]);
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr.contains("/nonexistent/chatwall.toml"),
        "{}",
        o.stderr
    );
}

// ---------------------------------------------------------------------------
// The environment layer
// ---------------------------------------------------------------------------

#[test]
fn environment_variables_override_defaults_and_file() {
    let o = run_with(
        &["check-config"],
        &[("CHATWALL__POLICY__DEFAULT", "monitor")],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("default monitor"), "{}", o.stdout);

    // Over a file that says block.
    let (_d, path) = temp_config("[policy]\ndefault = \"block\"\n");
    let o = run_with(
        &["check-config", "-c", &path.display().to_string()],
        &[("CHATWALL__POLICY__DEFAULT", "monitor")],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("default monitor"), "{}", o.stdout);

    // Lists, comma-separated.
    let o = run_with(
        &["check-config"],
        &[(
            "CHATWALL__LISTEN__EXPLICIT",
            "127.0.0.1:13128,127.0.0.1:13129",
        )],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(
        o.stdout
            .contains("explicit listeners: [127.0.0.1:13128, 127.0.0.1:13129]"),
        "{}",
        o.stdout
    );

    // connect_ports: the default, a list of ports and ranges, one port.
    let o = run(&["check-config"]);
    assert!(o.stdout.contains("CONNECT ports: 443\n"), "{}", o.stdout);
    for (value, want) in [
        ("443,563,8000-8999", "CONNECT ports: 443, 563, 8000-8999\n"),
        ("8443", "CONNECT ports: 8443\n"),
        ("1-65535", "CONNECT ports: 1-65535\n"),
    ] {
        let o = run_with(
            &["check-config"],
            &[("CHATWALL__ACCESS__CONNECT_PORTS", value)],
        );
        assert_eq!(o.code, Some(0), "{value}: {o:?}");
        assert!(o.stdout.contains(want), "{value}: {}", o.stdout);
    }
    let o = run_with(
        &["check-config"],
        &[("CHATWALL__ACCESS__CONNECT_PORTS", "443,0")],
    );
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(o.stderr.contains("access.connect_ports"), "{}", o.stderr);

    // A bad value from the environment is a configuration error.
    let o = run_with(
        &["check-config"],
        &[("CHATWALL__POLICY__DEFAULT", "sometimes")],
    );
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr.contains("policy.default") && o.stderr.contains("sometimes"),
        "{}",
        o.stderr
    );
}

// ---------------------------------------------------------------------------
// Signatures
// ---------------------------------------------------------------------------

#[test]
fn signatures_list_shows_the_bundled_apps() {
    let o = run(&["signatures", "list"]);
    assert_eq!(o.code, Some(0), "{o:?}");
    let last = o.stdout.lines().last().unwrap_or_default();
    let count: usize = last
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("last line {last:?}"));
    assert!(last.contains(" apps"), "{last}");
    assert!(count >= 25, "only {count} apps");
    // One row per app between the header and the summary.
    let rows = o.stdout.lines().count() - 2;
    assert_eq!(rows, count, "{}", o.stdout);
    for app in [
        "whatsapp",
        "telegram",
        "aim",
        "yahoo-messenger",
        "msn-messenger",
    ] {
        assert!(
            o.stdout
                .lines()
                .any(|l| l.split_whitespace().next() == Some(app)),
            "no {app} row"
        );
    }
}

#[test]
fn signatures_list_json_has_id_and_category() {
    const CATEGORIES: &[&str] = &[
        "consumer-im",
        "enterprise-im",
        "legacy-im",
        "open-protocol",
        "self-hosted-im",
        "im-gateway",
        "media-relay",
        "circumvention",
    ];
    let o = run(&["signatures", "list", "--json"]);
    assert_eq!(o.code, Some(0), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("valid JSON");
    let apps = v.as_array().expect("a JSON array");
    assert!(apps.len() >= 25, "only {} apps", apps.len());
    let mut ids = std::collections::HashSet::new();
    for a in apps {
        let id = a["id"].as_str().unwrap_or_else(|| panic!("no id in {a}"));
        assert!(!id.is_empty());
        assert!(ids.insert(id.to_string()), "duplicate id {id}");
        let cat = a["category"]
            .as_str()
            .unwrap_or_else(|| panic!("no category in {a}"));
        assert!(CATEGORIES.contains(&cat), "{id}: category {cat}");
    }
    let wa = apps
        .iter()
        .find(|a| a["id"] == "whatsapp")
        .expect("whatsapp");
    assert!(wa["rules"]["hosts"].as_u64().unwrap_or(0) > 0, "{wa}");
    let aim = apps.iter().find(|a| a["id"] == "aim").expect("aim");
    assert!(aim["rules"]["ports"].as_u64().unwrap_or(0) >= 1, "{aim}");
}

#[test]
fn signatures_list_follows_the_configured_directory() {
    let dir = fixtures().join("signatures/valid/localhost-host");
    let (_d, path) = temp_config(&format!(
        "[signatures]\ndir = {:?}\n",
        dir.display().to_string()
    ));
    let o = run(&["signatures", "list", "-c", &path.display().to_string()]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(
        o.stdout
            .lines()
            .last()
            .unwrap_or_default()
            .starts_with("2 apps"),
        "{}",
        o.stdout
    );
}

/// An expected error: (file, line, field).
type FileError = (&'static str, usize, &'static str);

/// (fixture dir under signatures/invalid, expected errors)
const INVALID_SIGNATURES: &[(&str, &[FileError])] = &[
    ("bad-hex", &[("lambda.toml", 9, "payload.match")]),
    ("bad-port", &[("nu.toml", 6, "ports.tcp")]),
    ("bad-wildcard", &[("zeta.toml", 7, "hosts.names")]),
    ("duplicate-host", &[("theta.toml", 6, "hosts")]),
    ("empty-source", &[("epsilon.toml", 7, "hosts.source")]),
    ("id-mismatch", &[("gamma.toml", 1, "id")]),
    ("missing-source", &[("iota.toml", 5, "source")]),
    ("short-payload", &[("kappa.toml", 8, "payload.match")]),
    (
        "three-errors",
        &[
            ("alpha.toml", 6, "ports.tcp"),
            ("alpha.toml", 10, "cidrs.nets"),
            ("beta.toml", 3, "category"),
        ],
    ),
    ("unknown-field", &[("mu.toml", 8, "weight")]),
];

/// check-config with `[signatures] dir` set to a fixture directory.
fn check_signatures(name: &str) -> (String, Out) {
    let dir = fixtures()
        .join("signatures/invalid")
        .join(name)
        .display()
        .to_string();
    let (_d, path) = temp_config(&format!("[signatures]\ndir = {dir:?}\n"));
    (
        dir,
        run(&["check-config", "-c", &path.display().to_string()]),
    )
}

#[test]
fn invalid_signature_dirs_name_file_line_and_field() {
    let root = fixtures().join("signatures/invalid");
    let mut dirs: Vec<String> = std::fs::read_dir(&root)
        .expect("fixture dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    dirs.sort();
    assert_eq!(
        dirs,
        INVALID_SIGNATURES.iter().map(|c| c.0).collect::<Vec<_>>(),
        "every fixture dir needs an expectation here"
    );
    for (name, errors) in INVALID_SIGNATURES {
        let (dir, o) = check_signatures(name);
        assert_eq!(o.code, Some(1), "{name}: {o:?}");
        for (file, line, field) in errors.iter() {
            let at = format!("{dir}/{file}:{line}:");
            assert!(
                o.stderr
                    .lines()
                    .any(|l| l.starts_with(&at) && l.contains(field)),
                "{name}: want `{at} ...{field}...` in\n{}",
                o.stderr
            );
        }
    }
}

#[test]
fn every_bad_rule_is_reported_not_just_the_first() {
    let (dir, o) = check_signatures("three-errors");
    assert_eq!(o.code, Some(1), "{o:?}");
    let lines = error_lines(&o.stderr, &dir);
    assert_eq!(
        lines.len(),
        3,
        "three bad rules in two files:\n{}",
        o.stderr
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("/alpha.toml:")).count(),
        2
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("/beta.toml:")).count(),
        1
    );
}

#[test]
fn signature_errors_come_without_spurious_follow_ups() {
    // A file whose only rule is bad has one error, the rule's, not an extra
    // "the file has no rules" at line 1.
    let mut extra = Vec::new();
    for (name, errors) in INVALID_SIGNATURES {
        let (dir, o) = check_signatures(name);
        let lines = error_lines(&o.stderr, &dir);
        if lines.len() != errors.len() {
            extra.push(format!(
                "{name}: {} errors reported for {} bad rules:\n{}",
                lines.len(),
                errors.len(),
                lines.join("\n")
            ));
        }
    }
    assert!(extra.is_empty(), "{}", extra.join("\n"));
}

// ---------------------------------------------------------------------------
// classify
// ---------------------------------------------------------------------------

#[test]
fn classify_explains_the_verdict() {
    // (arguments, first word of the first line, text the output must hold)
    let cases: &[(&[&str], &str, &str)] = &[
        (
            &["classify", "host", "web.whatsapp.com"],
            "block",
            "whatsapp",
        ),
        (
            &["classify", "host", "WEB.WhatsApp.COM."],
            "block",
            "whatsapp",
        ),
        (
            &["classify", "host", "x.y.telegram.org"],
            "block",
            "telegram",
        ),
        (
            &["classify", "host", "149.154.167.51"],
            "block",
            "reason=ip",
        ),
        (
            &["classify", "host", "example.com", "--port", "5190"],
            "block",
            "aim",
        ),
        (
            &["classify", "host", "example.com", "--port", "5050"],
            "block",
            "yahoo-messenger",
        ),
        (
            &["classify", "host", "example.com", "--port", "1863"],
            "block",
            "msn-messenger",
        ),
        (
            &["classify", "host", "example.com"],
            "allow",
            "example.com:443",
        ),
        (
            &["classify", "url", "http://example.com/"],
            "allow",
            "example.com:80",
        ),
        (
            &["classify", "url", "http://example.com:5190/"],
            "block",
            "aim",
        ),
        (
            &[
                "classify",
                "url",
                "http://gateway.messenger.hotmail.com/gateway/gateway.dll?Action=open",
            ],
            "block",
            "msn-messenger",
        ),
        (
            &[
                "classify",
                "url",
                "http://example.com/gateway/gateway.dll?Action=open",
            ],
            "block",
            "reason=http",
        ),
    ];
    for (args, verdict, text) in cases {
        let o = run(args);
        assert_eq!(o.code, Some(0), "{args:?}: {o:?}");
        let first = o.stdout.lines().next().unwrap_or_default();
        assert_eq!(
            first.split_whitespace().next(),
            Some(*verdict),
            "{args:?}: {}",
            o.stdout
        );
        assert!(
            o.stdout.contains(text),
            "{args:?}: no {text:?} in {}",
            o.stdout
        );
    }
    // Policy from a file: monitor instead of block.
    let (_d, path) = temp_config("[policy.apps]\nwhatsapp = \"monitor\"\n");
    let o = run(&[
        "classify",
        "host",
        "web.whatsapp.com",
        "-c",
        &path.display().to_string(),
    ]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.starts_with("monitor"), "{}", o.stdout);
}

// ---------------------------------------------------------------------------
// Usage and exit codes
// ---------------------------------------------------------------------------

#[test]
fn bad_usage_exits_2() {
    for args in [
        &["no-such-subcommand"][..],
        &["check-config", "--no-such-flag"],
        &["classify", "host"],
        &["classify", "host", "example.com", "--port", "70000"],
        &["classify", "url", "http://example.com:99999/"],
        &["classify", "url", "http://example.com:/"],
        &["classify", "url", "http://user@example.com/"],
        &["signatures"],
    ] {
        let o = run(args);
        assert_eq!(o.code, Some(2), "{args:?}: {o:?}");
        assert!(!o.stderr.is_empty(), "{args:?}: says nothing");
    }
    let o = run(&["--version"]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains(env!("CARGO_PKG_VERSION")), "{}", o.stdout);
    let o = run(&["--help"]);
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("check-config"), "{}", o.stdout);
}

#[test]
fn run_on_an_address_in_use_exits_3_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let (_d, path) = temp_config(&format!(
        "[listen]\nexplicit = [\"{addr}\"]\nadmin = \"\"\n\n[log]\naccess = \"off\"\n"
    ));
    let o = run(&["run", "-c", &path.display().to_string()]);
    assert_eq!(o.code, Some(3), "{o:?}");
    assert!(
        o.stderr.contains(&addr.to_string()),
        "the address is not named: {}",
        o.stderr
    );
    // The admin listener too.
    let (_d, path) = temp_config(&format!(
        "[listen]\nexplicit = [\"127.0.0.1:0\"]\nadmin = \"{addr}\"\n\n[log]\naccess = \"off\"\n"
    ));
    let o = run(&["run", "-c", &path.display().to_string()]);
    assert_eq!(o.code, Some(3), "{o:?}");
    assert!(
        o.stderr.contains(&addr.to_string()),
        "the address is not named: {}",
        o.stderr
    );
    drop(taken);
}

#[test]
fn run_with_a_bad_config_exits_1_without_listening() {
    let (_d, path) = temp_config("[policy]\ndefault = \"deny\"\n");
    let o = run(&["run", "-c", &path.display().to_string()]);
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(o.stderr.contains("policy.default"), "{}", o.stderr);
}

/// Remove ANSI colour sequences from log text.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `GET path` on a plain HTTP/1.1 server: the status.
fn http_status(addr: SocketAddr, path: &str) -> u16 {
    use std::io::Write;
    let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    crate::support::parse_response(&out).0
}

#[test]
fn run_serves_and_stops_on_sigterm() {
    let (_d, path) = temp_config(
        "[listen]\nexplicit = [\"127.0.0.1:0\"]\nadmin = \"127.0.0.1:0\"\n\n[log]\naccess = \"off\"\nlevel = \"info\"\n\n[limits]\nshutdown_grace_ms = 2000\n",
    );
    let mut cmd = chatwall();
    cmd.args(["run", "-c", &path.display().to_string()]);
    let mut child = cmd.spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    // Find the admin address in the startup log.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(strip_ansi(&line)).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    let admin: SocketAddr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("no admin address in the log: {seen:?}");
        };
        let found = line
            .contains("admin listening")
            .then(|| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix("addr=")?.parse().ok())
            })
            .flatten();
        seen.push(line);
        if let Some(a) = found {
            break a;
        }
    };
    assert_eq!(http_status(admin, "/healthz"), 200);
    let ready = Instant::now() + WAIT;
    while http_status(admin, "/readyz") != 200 {
        assert!(Instant::now() < ready, "never ready");
        std::thread::sleep(Duration::from_millis(25));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chatwall did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}
