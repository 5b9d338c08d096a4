//! Single sign-on (`[auth] negotiate`) against a real MIT KDC: a throwaway
//! realm in a temporary directory, a keytab for the proxy's
//! `HTTP/localhost` principal, tickets got with `kinit`, and curl's
//! `--proxy-negotiate`. The proxy runs as a child process so that the
//! Kerberos environment (`KRB5_CONFIG`, the keytab) is its own. Loopback
//! only; every wait is bounded.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{self, read_response, HttpOrigin, WAIT};

const REALM: &str = "CHATWALL.TEST";
const KRB5KDC: &str = "/usr/sbin/krb5kdc";
const KDB5_UTIL: &str = "/usr/sbin/kdb5_util";
const KADMIN_LOCAL: &str = "/usr/sbin/kadmin.local";
const KINIT: &str = "kinit";

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A KDC for `CHATWALL.TEST` on a loopback port, killed on drop.
struct Kdc {
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Kdc {
    /// `None` (after `skip_or_fail`) without the MIT KDC and client tools.
    fn start() -> Option<Kdc> {
        let kinit_runs = Command::new(KINIT)
            .arg("-V")
            .arg("--help")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        for tool in [KRB5KDC, KDB5_UTIL, KADMIN_LOCAL] {
            if !Path::new(tool).exists() || !kinit_runs {
                support::skip_or_fail(&format!(
                    "{tool} or kinit is missing (apt-get install krb5-kdc krb5-admin-server krb5-user)"
                ));
                return None;
            }
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let port = free_port();
        std::fs::write(
            dir.path().join("krb5.conf"),
            format!(
                "[libdefaults]\n default_realm = {REALM}\n dns_lookup_kdc = false\n dns_lookup_realm = false\n rdns = false\n dns_canonicalize_hostname = false\n udp_preference_limit = 1\n default_ccache_name = FILE:{d}/cc-default\n\n[realms]\n {REALM} = {{\n  kdc = 127.0.0.1:{port}\n }}\n\n[domain_realm]\n localhost = {REALM}\n"
            ),
        )
        .expect("krb5.conf");
        std::fs::write(
            dir.path().join("kdc.conf"),
            format!(
                "[kdcdefaults]\n kdc_ports = {port}\n kdc_tcp_ports = {port}\n\n[realms]\n {REALM} = {{\n  database_name = {d}/principal\n  key_stash_file = {d}/stash\n  acl_file = {d}/kadm5.acl\n  kdc_ports = {port}\n  kdc_tcp_ports = {port}\n  max_life = 1h\n }}\n\n[logging]\n kdc = FILE:{d}/kdc.log\n"
            ),
        )
        .expect("kdc.conf");
        std::fs::write(dir.path().join("kadm5.acl"), "").expect("acl");
        let mut kdc = Kdc { child: None, dir };
        kdc.run(
            KDB5_UTIL,
            &["create", "-s", "-r", REALM, "-P", "masterpw"],
            None,
        );
        kdc.kadmin("addprinc -pw alicepw alice");
        kdc.kadmin("addprinc -randkey HTTP/localhost");
        let child = Command::new(KRB5KDC)
            .arg("-n")
            .envs(kdc.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn krb5kdc");
        kdc.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                kdc.stop();
                panic!("krb5kdc did not listen on {addr} within {WAIT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(kdc)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The environment of every Kerberos program here: this realm only.
    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("KRB5_CONFIG", self.path("krb5.conf")),
            ("KRB5_KDC_PROFILE", self.path("kdc.conf")),
            ("KRB5RCACHEDIR", self.dir.path().to_path_buf()),
            ("KRB5CCNAME", self.path("cc-default")),
        ]
    }

    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) {
        use std::io::Write;
        let mut child = Command::new(program)
            .args(args)
            .envs(self.env())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {program}: {e}"));
        if let Some(mut input) = child.stdin.take() {
            if let Some(text) = stdin {
                input.write_all(text.as_bytes()).expect("stdin");
            }
        }
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn kadmin(&self, query: &str) {
        self.run(KADMIN_LOCAL, &["-r", REALM, "-q", query], None);
    }

    /// A keytab of `HTTP/localhost`'s current key (`ktadd` makes a new
    /// one: an older keytab no longer matches new tickets), mode 600.
    fn keytab(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        self.kadmin(&format!("ktadd -k {} HTTP/localhost", p.display()));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        p
    }

    /// alice's ticket in a credential cache of its own.
    fn kinit_alice(&self) -> PathBuf {
        let cc = self.path("alice.cc");
        let name = format!("FILE:{}", cc.display());
        use std::io::Write;
        let mut child = Command::new(KINIT)
            .arg("alice")
            .envs(self.env())
            .env("KRB5CCNAME", &name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kinit");
        if let Some(mut input) = child.stdin.take() {
            input.write_all(b"alicepw\n").expect("stdin");
        }
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "kinit: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cc
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Kdc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// chatwall as a child process with this realm's environment.
struct Process {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    async fn start(kdc: &Kdc, auth: &str) -> Process {
        let dir = tempfile::tempdir().expect("tempdir");
        let (port, admin) = (free_port(), free_port());
        let proxy = SocketAddr::from(([127, 0, 0, 1], port));
        let admin = SocketAddr::from(([127, 0, 0, 1], admin));
        let log = dir.path().join("access.log");
        // A per-user exception: alice may use the loopback test app.
        let sigs = dir.path().join("sigs");
        std::fs::create_dir_all(&sigs).expect("mkdir");
        std::fs::write(
            sigs.join("loopback.toml"),
            "id = \"loopback\"\nname = \"Loopback\"\ncategory = \"consumer-im\"\n[[hosts]]\nnames = [\"localhost\"]\nsource = \"test fixture\"\n",
        )
        .expect("write sig");
        let cfg = dir.path().join("chatwall.toml");
        std::fs::write(
            &cfg,
            format!(
                "[listen]\nexplicit = [\"{proxy}\"]\nadmin = \"{admin}\"\n[log]\naccess = {:?}\nformat = \"json\"\nlevel = \"warn\"\n[access]\ndeny_destinations = []\nconnect_ports = [\"1-65535\"]\n[signatures]\ndir = {:?}\n[[policy.exceptions]]\nusers = [\"alice\"]\napps = [\"loopback\"]\naction = \"allow\"\n{auth}",
                log.display().to_string(),
                sigs.display().to_string(),
            ),
        )
        .expect("config");
        let child = Command::new(env!("CARGO_BIN_EXE_chatwall"))
            .args(["run", "-c"])
            .arg(&cfg)
            .envs(kdc.env())
            .env_remove("KRB5_KTNAME")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn chatwall");
        let p = Process {
            child,
            proxy,
            admin,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        loop {
            if TcpStream::connect(admin).await.is_ok()
                && support::raw_http(
                    admin,
                    "GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
                )
                .await
                .0 == 200
            {
                return p;
            }
            assert!(Instant::now() < deadline, "chatwall did not become ready");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The access log's records (JSON lines).
    fn log(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// `curl --proxy-negotiate` through this proxy, addressed as
    /// `localhost` so that curl asks for `HTTP/localhost`; (HTTP status,
    /// response headers).
    async fn curl(&self, kdc: &Kdc, cc: &Path, url: &str, extra: &[&str]) -> (u16, String) {
        let proxy = format!("http://localhost:{}", self.proxy.port());
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args(["-s", "-S", "--max-time", "20", "-o", "/dev/null", "-D", "-"])
            .args(["-w", "status=%{http_code}\n", "-x", &proxy])
            .args(extra)
            .arg(url)
            .envs(kdc.env())
            .env("KRB5CCNAME", format!("FILE:{}", cc.display()))
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("all_proxy")
            .env_remove("no_proxy")
            .env_remove("NO_PROXY")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
            .await
            .expect("curl within 30 s")
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let status = text
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("status="))
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        (status, text)
    }
}

/// The `Proxy-Authorization` value curl makes with alice's ticket for
/// `HTTP/localhost`, caught by a stand-in proxy on loopback (a 407 asking
/// for Negotiate until it comes): a fresh token the real proxy has never
/// seen.
async fn capture_token(kdc: &Kdc, cc: &Path) -> String {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let catcher = tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.expect("accept");
            loop {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.is_empty() {
                    break;
                }
                if let Some(v) = support::head_field(&head, "proxy-authorization") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    return v;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Negotiate\r\nContent-Length: 0\r\n\r\n")
                    .await;
            }
        }
    });
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-s",
        "-o",
        "/dev/null",
        "--max-time",
        "10",
        "--proxy-negotiate",
    ])
    .args(["-U", ":", "-x", &format!("http://localhost:{port}")])
    .arg("http://127.0.0.1:9/")
    .envs(kdc.env())
    .env("KRB5CCNAME", format!("FILE:{}", cc.display()))
    .stdin(Stdio::null())
    .kill_on_drop(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), cmd.status()).await;
    let v = tokio::time::timeout(WAIT, catcher)
        .await
        .expect("curl sent a token within the wait")
        .expect("catcher");
    assert!(v.starts_with("Negotiate "), "{v}");
    v
}

/// A users file with bob (Basic), mode 600.
fn users_file(dir: &Path) -> PathBuf {
    let p = dir.join("users");
    let line = chatwall::auth::hash_line("bob", "bobpw").expect("hash");
    std::fs::write(&p, format!("{line}\n")).expect("users");
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiate_with_a_ticket_passes_and_names_the_user() {
    let Some(kdc) = Kdc::start() else { return };
    if !support::have_curl() {
        support::skip_or_fail("curl is missing");
        return;
    }
    let keytab = kdc.keytab("proxy.keytab");
    let users = users_file(kdc.dir.path());
    let p = Process::start(
        &kdc,
        &format!(
            "[auth]\nusers_file = {:?}\nrealm = \"corp\"\nnegotiate = true\nkeytab = {:?}\nnegotiate_principal = \"HTTP/localhost@{REALM}\"\n",
            users.display().to_string(),
            keytab.display().to_string()
        ),
    )
    .await;
    let origin = HttpOrigin::start().await;
    let cc = kdc.kinit_alice();
    let neg = ["--proxy-negotiate", "-U", ":"];

    // A ticket and no password: through, as alice, to a name only alice's
    // exception allows.
    let url = format!("http://localhost:{}/sso", origin.addr.port());
    let (status, head) = p.curl(&kdc, &cc, &url, &neg).await;
    assert_eq!(status, 200, "{head}");
    // And to an address no exception is needed for.
    let plain = format!("http://{}/plain", origin.addr);
    let (status, head) = p.curl(&kdc, &cc, &plain, &neg).await;
    assert_eq!(status, 200, "{head}");
    // Through a CONNECT tunnel (the first CONNECT is answered 407 before
    // the HTTP server sees the connection, the second carries the token).
    let tunnelled = format!("http://localhost:{}/tunnel", origin.addr.port());
    let (status, head) = p
        .curl(
            &kdc,
            &cc,
            &tunnelled,
            &["-p", "--proxy-negotiate", "-U", ":"],
        )
        .await;
    assert_eq!(status, 200, "{head}");
    assert!(
        origin.requests().iter().any(|r| r.uri == "/tunnel"),
        "{:?}",
        origin.requests()
    );
    // Two requests on one connection: the second is alice's too, whether
    // curl repeats the handshake or not.
    let (status, head) = p
        .curl(
            &kdc,
            &cc,
            &format!("{plain}2"),
            &["--proxy-negotiate", "-U", ":", &format!("{plain}3")],
        )
        .await;
    assert_eq!(status, 200, "{head}");
    let log = p.log();
    for path in ["/sso", "/plain", "/plain2", "/plain3"] {
        assert!(
            log.iter().any(|r| r["user"] == "alice"
                && r["status"] == 200
                && r["target"].as_str().is_some_and(|u| u.ends_with(path))),
            "{path}: {log:?}"
        );
    }

    // bob, by Basic, gets past authentication but not alice's exception.
    let (status, head) = p
        .curl(
            &kdc,
            &cc,
            &url,
            &["--proxy-user", "bob:bobpw", "--proxy-basic"],
        )
        .await;
    assert_eq!(status, 403, "{head}");
    let (status, head) = p
        .curl(
            &kdc,
            &cc,
            &plain,
            &["--proxy-user", "bob:bobpw", "--proxy-basic"],
        )
        .await;
    assert_eq!(status, 200, "{head}");
    assert!(
        p.log()
            .iter()
            .any(|r| r["user"] == "bob" && r["status"] == 200),
        "{:?}",
        p.log()
    );

    // Without a ticket: 407, offering both schemes.
    let empty = kdc.path("empty.cc");
    let (status, head) = p.curl(&kdc, &empty, &plain, &neg).await;
    assert_eq!(status, 407, "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains("proxy-authenticate: negotiate\r\n"),
        "{head}"
    );
    assert!(
        lower.contains("proxy-authenticate: basic realm=\"corp\""),
        "{head}"
    );

    // A token authenticates its connection: later requests on it need no
    // header (as browsers send them); another connection does, and the
    // same token replayed there is refused by the replay cache.
    let token = capture_token(&kdc, &cc).await;
    let o = origin.addr;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(
        format!(
            "GET http://{o}/pinned1 HTTP/1.1\r\nHost: {o}\r\nProxy-Authorization: {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 200, "{head}");
    s.write_all(
        format!(
            "GET http://localhost:{}/pinned2 HTTP/1.1\r\nHost: localhost\r\n\r\n",
            o.port()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let (status, head, _) = read_response(&mut s).await;
    assert_eq!(status, 200, "{head}");
    let (status, _) = support::raw_http(
        p.proxy,
        &format!("GET http://{o}/other HTTP/1.1\r\nHost: {o}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 407);
    let (status, _) = support::raw_http(
        p.proxy,
        &format!("GET http://{o}/replayed HTTP/1.1\r\nHost: {o}\r\nProxy-Authorization: {token}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 407, "a replayed token");
    let log = p.log();
    for path in ["/pinned1", "/pinned2"] {
        assert!(
            log.iter().any(|r| r["user"] == "alice"
                && r["status"] == 200
                && r["target"].as_str().is_some_and(|u| u.ends_with(path))),
            "{path}: {log:?}"
        );
    }

    // A garbage token, or the right scheme with nothing: 407.
    for value in [
        "Negotiate YIIBnwYGKwYBBQUCoIIBkzCCAY8=",
        "Negotiate",
        "Negotiate !!",
    ] {
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        let o = origin.addr;
        s.write_all(
            format!(
                "GET http://{o}/x HTTP/1.1\r\nHost: {o}\r\nProxy-Authorization: {value}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let (status, head, _) = read_response(&mut s).await;
        assert_eq!(status, 407, "{value}: {head}");
    }
    assert!(
        origin.requests().iter().all(|r| !r.uri.ends_with("/x")),
        "a refused token reached the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiate_with_a_stale_key_or_alone_refuses_and_offers_negotiate_only() {
    let Some(kdc) = Kdc::start() else { return };
    if !support::have_curl() {
        support::skip_or_fail("curl is missing");
        return;
    }
    // The proxy's keytab holds a key that tickets are no longer made with.
    let stale = kdc.keytab("stale.keytab");
    let _current = kdc.keytab("current.keytab");
    let p = Process::start(
        &kdc,
        &format!(
            "[auth]\nnegotiate = true\nkeytab = {:?}\n",
            stale.display().to_string()
        ),
    )
    .await;
    let origin = HttpOrigin::start().await;
    let cc = kdc.kinit_alice();
    let plain = format!("http://{}/plain", origin.addr);
    let (status, head) = p
        .curl(&kdc, &cc, &plain, &["--proxy-negotiate", "-U", ":"])
        .await;
    assert_eq!(status, 407, "{head}");
    // Negotiate only: no Basic without a users file or basic_bind.
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("proxy-authenticate: negotiate"), "{head}");
    assert!(!lower.contains("basic"), "{head}");
    assert!(origin.requests().is_empty());
    let (status, metrics) = support::raw_http(
        p.admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        support::metric_value(&metrics, "chatwall_auth_failures_total") >= 1.0,
        "{metrics}"
    );
}
